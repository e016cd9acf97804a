"""Report for composite-reward runs: constrained PPO, NM-PPO and dynamic reward weighting.

Command line::

    python -m analysis.composite RUN_DIR [RUN_DIR ...] --out DIR [--title T] [--max-step N]

Each RUN_DIR is one run directory of method ``constrained_ppo`` (mu-PPO / xi-PPO with Lagrange
multipliers, Moskovitz et al. 2023, §4), ``nm_ppo`` (Nelder-Mead over the thresholds, §4.3) or
``dynamic_ppo`` (fixed, hypervolume-guided or gradient-based reward weights, Lu et al. 2025).
It writes ``DIR/composite.md`` (:func:`composite_table`, then :func:`nm_path_table` for every
nm_ppo run) and ``DIR/composite.png`` (:func:`plot_composite`), and prints the markdown.

The table holds, per run, the final and peak gold score (absolute, as logged), the final KL,
the final proxy component values, thresholds and multipliers f(mu) or reward weights, and the
hypervolume (all components maximized) of the run's final component point and of all its
evaluation points. The reference point defaults to the first run's step-0 component scores
minus 1.0. Below the table: the runs whose final points no other run's final point dominates,
and the hypervolume of all runs' final points together.

Like the rest of ``analysis/`` this reads plain files only (``config.yaml``, ``curves.jsonl``,
``summary.json``, ``nm_path.jsonl``); the imports from the package are the pure tensor math
:func:`rlhf_overopt.ops.constrained.hypervolume` / :func:`~rlhf_overopt.ops.constrained.pareto_mask` and
the list of composite methods (:data:`rlhf_overopt.config.methods.COMPOSITE_METHODS`, from its method table).

Exit status: 0 on success, 2 when a run directory is missing, empty or not a composite run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import yaml
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.load import CONFIG_FILE, CURVES_FILE, SUMMARY_FILE, MalformedLineWarning, load_for_cli
from rlhf_overopt.config.methods import COMPOSITE_METHODS, METHODS
from rlhf_overopt.ops.constrained import hypervolume, pareto_mask
from rlhf_overopt.run.directory import CURVE_REQUIRED_KEYS

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

NM_PATH_FILE = "nm_path.jsonl"
REFERENCE_OFFSET = 1.0
"""Default hypervolume reference: the first run's step-0 component scores minus this."""

_NUMBERS_READ = ("step", "kl", "gold_score")
"""Required keys (CURVE_REQUIRED_KEYS) this report reads as numbers."""
# Line style and marker per component (index mod length); plain "--" is kept for thresholds.
_COMPONENT_STYLES: tuple[Any, ...] = ("-", "-.", ":", (0, (3, 1, 1, 1, 1, 1)))
_COMPONENT_MARKERS = ("o", "s", "^", "D", "v", "P")
_THRESHOLD_STYLE = (0, (4, 2.5))
_DPI = 110


@dataclass(frozen=True)
class CompositeRun:
    """One composite-reward run, read from its run directory.

    Arrays have one entry per evaluation (S rows, sorted by step; a repeated step keeps the last
    row) and, where 2-D, one column per component (N, in ``component_names`` order). Thresholds
    and multipliers of components that are not constrained (the objective) are NaN.
    """

    name: str
    """The run directory's folder name."""
    run_dir: Path
    """The run directory."""
    method: str
    """"constrained_ppo", "nm_ppo" or "dynamic_ppo" (any method with component scores is read)."""
    component_names: list[str]
    """Names of the N reward components, e.g. ["sentiment", "fluency"]."""
    steps: IntArray
    """(S,) training step of each evaluation."""
    gold: FloatArray
    """(S,) gold score as logged (absolute, not relative to the initial policy)."""
    gold_stderr: FloatArray
    """(S,) standard error of the gold mean; NaN where not logged."""
    kl: FloatArray
    """(S,) KL(pi || pi_init) in nats."""
    components: FloatArray
    """(S, N) proxy component scores of the policy."""
    thresholds: FloatArray | None
    """(S, N) constraint thresholds theta in effect up to each evaluation; None if not logged."""
    multipliers: FloatArray | None
    """(S, N) squashed Lagrange multipliers f(mu); None if not logged (dynamic runs)."""
    weights: FloatArray | None
    """(S, N) reward weights of the components; None if not logged."""
    mode: str | None
    """Constraint kind ("inequality"/"equality") or weighting mode ("fixed"/"hypervolume"/"gradient")."""
    nm_path: list[dict[str, Any]] | None
    """Rows of ``nm_path.jsonl`` (one per Nelder-Mead function evaluation); None without the file."""
    summary: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """Parsed ``summary.json``; empty if absent or unreadable."""

    @property
    def label(self) -> str:
        """Method with its mode, e.g. "constrained_ppo (inequality)"."""
        return f"{self.method} ({self.mode})" if self.mode else self.method

    @property
    def final_point(self) -> FloatArray:
        """(N,) component scores of the last evaluation."""
        return self.components[-1]


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _number_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_number(v) or v is None for v in value)


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) per JSON-object line; other lines are skipped with a warning."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                warnings.warn(
                    f"{path}:{lineno}: skipped malformed line (invalid JSON: {err.msg})",
                    MalformedLineWarning,
                    stacklevel=3,
                )
                continue
            if not isinstance(row, dict):
                warnings.warn(
                    f"{path}:{lineno}: skipped line (expected a JSON object)", MalformedLineWarning, stacklevel=3
                )
                continue
            rows.append((lineno, row))
    return rows


def _read_mapping(path: Path, kind: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        text = path.read_text(encoding="utf-8")
        value = yaml.safe_load(text) if kind == "yaml" else json.loads(text)
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        warnings.warn(f"{path}: unreadable ({err}); ignored", MalformedLineWarning, stacklevel=3)
        return {}
    return value if isinstance(value, dict) else {}


def _aligned(
    rows: list[dict[str, Any]], key: str, names: list[str], path: Path
) -> FloatArray | None:
    """(S, N) array of a per-component list ``key``; a shorter list is placed by ``constraint_names``."""
    if not any(key in row for row in rows):
        return None
    out = np.full((len(rows), len(names)), np.nan, dtype=np.float64)
    for i, row in enumerate(rows):
        values = row.get(key)
        if values is None:
            continue
        if not _number_list(values):
            raise ValueError(f"{path}: step {row['step']}: '{key}' is not a list of numbers")
        columns: list[int]
        if len(values) == len(names):
            columns = list(range(len(names)))
        else:
            constrained = row.get("constraint_names")
            if not isinstance(constrained, list) or len(constrained) != len(values) or any(
                c not in names for c in constrained
            ):
                raise ValueError(
                    f"{path}: step {row['step']}: '{key}' has {len(values)} value(s) for "
                    f"{len(names)} component(s) and no matching 'constraint_names'"
                )
            columns = [names.index(c) for c in constrained]
        for column, value in zip(columns, values):
            out[i, column] = math.nan if value is None else float(value)
    return out


def load_composite(run_dir: str | Path, max_step: int | None = None) -> CompositeRun:
    """Read one composite-reward run directory (its evaluations up to `max_step`, when given, so
    that runs of different lengths are compared at the same budget).

    Malformed JSON lines (e.g. a line being written by a running job) are skipped with a
    :class:`analysis.load.MalformedLineWarning`; rows are sorted by step and a repeated step
    keeps its last row (a resumed run).

    Raises:
        ValueError: ``curves.jsonl`` is missing or has no rows, a row lacks ``component_scores``
            (not a composite-reward run) or a required key, or the per-component lists do not
            match ``component_names``. The message names the file.
    """
    run_path = Path(run_dir)
    curves_path = run_path / CURVES_FILE
    if not curves_path.is_file():
        if run_path.is_dir():
            why = "no evaluation yet, or not a run directory"
        else:
            why = f"{run_path} {'is not a directory' if run_path.exists() else 'does not exist'}"
        raise ValueError(f"{curves_path}: missing ({why})")
    parsed = _read_jsonl(curves_path)
    if not parsed:
        raise ValueError(f"{curves_path}: no evaluation rows")

    by_step: dict[int, dict[str, Any]] = {}
    names: list[str] | None = None
    for lineno, row in parsed:
        where = f"{curves_path}:{lineno}"
        if "component_scores" not in row:
            raise ValueError(
                f"{where}: row has no 'component_scores' (method {row.get('method')!r} is not a "
                f"composite-reward run; expected one of {', '.join(COMPOSITE_METHODS)})"
            )
        missing = [key for key in CURVE_REQUIRED_KEYS
                   if key not in row or (key in _NUMBERS_READ and not _is_number(row[key]))]
        if missing:
            raise ValueError(f"{where}: missing or non-numeric {', '.join(repr(k) for k in missing)}")
        scores = row["component_scores"]
        if not _number_list(scores) or not scores:
            raise ValueError(f"{where}: 'component_scores' is not a non-empty list of numbers")
        row_names = row.get("component_names")
        if row_names is None:
            row_names = [f"c{j}" for j in range(len(scores))]
        if not isinstance(row_names, list) or len(row_names) != len(scores):
            raise ValueError(f"{where}: 'component_names' does not match 'component_scores'")
        row_names = [str(n) for n in row_names]
        if names is None:
            names = row_names
        elif row_names != names:
            raise ValueError(f"{where}: component_names {row_names} differ from earlier rows' {names}")
        by_step[int(row["step"])] = row
    assert names is not None
    rows = [by_step[step] for step in sorted(by_step) if max_step is None or step <= max_step]
    if not rows:
        raise ValueError(f"{curves_path}: no evaluation at or before step {max_step}")
    last = rows[-1]

    config = _read_mapping(run_path / CONFIG_FILE, "yaml")
    method = last.get("method") or config.get("method") or "unknown"
    mode = last.get("constraint") or last.get("weighting")

    nm_path = None
    nm_file = run_path / NM_PATH_FILE
    if nm_file.is_file():
        nm_path = [row for _, row in _read_jsonl(nm_file)]

    def column(key: str) -> FloatArray:
        return np.array(
            [float(r[key]) if _is_number(r.get(key)) else math.nan for r in rows], dtype=np.float64
        )

    return CompositeRun(
        name=run_path.resolve().name,
        run_dir=run_path,
        method=str(method),
        component_names=names,
        steps=np.array([int(r["step"]) for r in rows], dtype=np.int64),
        gold=column("gold_score"),
        gold_stderr=column("gold_stderr"),
        kl=column("kl"),
        components=np.array([[math.nan if v is None else float(v) for v in r["component_scores"]]
                             for r in rows], dtype=np.float64),
        thresholds=_aligned(rows, "thresholds", names, curves_path),
        multipliers=_aligned(rows, "lagrange_multipliers", names, curves_path),
        weights=_aligned(rows, "reward_weights", names, curves_path),
        mode=str(mode) if mode is not None else None,
        nm_path=nm_path,
        summary=_read_mapping(run_path / SUMMARY_FILE, "json"),
    )


# ---------------------------------------------------------------------------------------------
# Hypervolume and tables
# ---------------------------------------------------------------------------------------------


def default_reference(run: CompositeRun, offset: float = REFERENCE_OFFSET) -> FloatArray:
    """The run's step-0 component scores (its first evaluation if it has no step 0) minus ``offset``."""
    index = int(np.argmin(run.steps))
    return run.components[index] - offset


def points_hypervolume(points: FloatArray, reference: FloatArray) -> float:
    """Hypervolume (maximization) of the rows of ``points`` (P, N) w.r.t. ``reference`` (N,).

    Rows with a NaN are ignored.
    """
    pts = np.asarray(points, dtype=np.float64).reshape(-1, len(reference))
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    return float(hypervolume(torch.from_numpy(pts), torch.as_tensor(reference, dtype=torch.float64)))


def non_dominated(points: FloatArray) -> npt.NDArray[np.bool_]:
    """(P,) True where no other row of ``points`` (P, N) dominates the row (maximization)."""
    return pareto_mask(torch.as_tensor(np.asarray(points, dtype=np.float64))).numpy()


def _num(value: float, digits: int = 3) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    if value != 0.0 and abs(value) < 0.5 * 10.0**-digits:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def _vector(values: FloatArray | None) -> str:
    if values is None:
        return "—"
    return ", ".join(_num(float(v)) for v in values)


def _text(value: Any) -> str:
    return str(value).replace("|", "\\|")


def _same_components(runs: Sequence[CompositeRun]) -> bool:
    return all(run.component_names == runs[0].component_names for run in runs)


def composite_table(runs: Sequence[CompositeRun], reference: Sequence[float] | FloatArray | None = None) -> str:
    """Markdown table of composite runs, one row per run, with hypervolumes below it.

    Columns: run, method (mode), last step (number of evaluations), final gold ± stderr, peak
    gold (its step), final KL, final component values, final thresholds, final f(mu) (constrained
    and NM runs) or reward weights (dynamic runs), hypervolume of the final component point and of
    all the run's evaluation points. Gold is as logged (absolute). Hypervolumes treat every
    component as maximized, w.r.t. ``reference`` (N,), by default the first run's step-0 component
    scores minus 1.0; runs whose components differ from the first run's get no hypervolume.

    Raises:
        ValueError: no runs, or ``reference`` has the wrong length.
    """
    if not runs:
        raise ValueError("composite_table needs at least one run")
    names = runs[0].component_names
    if reference is None:
        ref = default_reference(runs[0])
        first = runs[0]
        ref_sentence = (
            f"Hypervolume reference point ({', '.join(names)}) = ({_vector(ref)}): the step-"
            f"{int(np.min(first.steps))} component scores of {first.name} minus {REFERENCE_OFFSET:.1f}; "
            "all components are maximized."
        )
    else:
        ref = np.asarray(reference, dtype=np.float64)
        if ref.shape != (len(names),):
            raise ValueError(f"reference needs {len(names)} value(s) ({', '.join(names)}), got shape {ref.shape}")
        ref_sentence = (
            f"Hypervolume reference point ({', '.join(names)}) = ({_vector(ref)}), given; "
            "all components are maximized."
        )

    shared = _same_components(runs)
    comp_header = f"final ({', '.join(names)})" if shared else "final components"
    header = [
        "run", "method", "last step (evals)", "final gold ± se", "peak gold (step)", "final KL",
        comp_header, "thresholds (final)", "final f(μ) / weights", "HV final", "HV all evals",
    ]
    align = ["---", "---", "---:", "---:", "---:", "---:", "---:", "---:", "---", "---:", "---:"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    comparable: list[CompositeRun] = []
    for run in runs:
        matches = run.component_names == names
        if matches:
            comparable.append(run)
        finite = np.where(np.isfinite(run.gold), run.gold, -np.inf)
        peak = int(np.argmax(finite))
        components = _vector(run.final_point)
        if not shared:
            components = ", ".join(f"{n} {_num(float(v))}" for n, v in zip(run.component_names, run.final_point))
        if run.multipliers is not None:
            coefficients = f"f(μ) {_vector(run.multipliers[-1])}"
        elif run.weights is not None:
            coefficients = f"w {_vector(run.weights[-1])}"
        else:
            coefficients = "—"
        hv_final = _num(points_hypervolume(run.final_point[None, :], ref)) if matches else "—"
        hv_all = _num(points_hypervolume(run.components, ref)) if matches else "—"
        cells = [
            _text(run.name),
            _text(run.label),
            f"{int(run.steps[-1])} ({len(run.steps)})",
            f"{_num(float(run.gold[-1]))} ± {_num(float(run.gold_stderr[-1]))}",
            f"{_num(float(run.gold[peak]))} ({int(run.steps[peak])})",
            _num(float(run.kl[-1])),
            components,
            _vector(run.thresholds[-1]) if run.thresholds is not None else "—",
            coefficients,
            hv_final,
            hv_all,
        ]
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", ref_sentence]
    finals = np.stack([run.final_point for run in comparable])
    mask = non_dominated(finals)
    front = [run.name for run, keep in zip(comparable, mask) if keep]
    left_out = [run.name for run in runs if run.component_names != names]
    summary = (
        f"Non-dominated final points among the {len(comparable)} run(s): {', '.join(front)}. "
        f"Hypervolume of all runs' final points together: {_num(points_hypervolume(finals, ref))}."
    )
    if left_out:
        summary += f" Left out (other components than {', '.join(names)}): {', '.join(left_out)}."
    lines += ["", summary]
    return "\n".join(lines) + "\n"


def nm_path_table(run: CompositeRun) -> str:
    """Markdown table of a run's Nelder-Mead path, one row per function evaluation.

    Columns: evaluation, step, phase, thresholds, gold, constraint values, f(mu). Below it, the
    evaluation with the best gold and, when summary.json has them, the optimizer's message and
    best thresholds. A run without ``nm_path.jsonl`` gives a one-line note.
    """
    if not run.nm_path:
        return f"{run.name}: no Nelder-Mead path ({NM_PATH_FILE} missing or empty).\n"
    names = ", ".join(run.component_names)
    header = ["evaluation", "step", "phase", f"thresholds ({names})", "gold", f"constraint values ({names})", "f(μ)"]
    lines = ["| " + " | ".join(header) + " |", "|---:|---:|---|---:|---:|---:|---:|"]

    def vec(value: Any) -> str:
        return _vector(np.array(value, dtype=np.float64)) if _number_list(value) else "—"

    best: dict[str, Any] | None = None
    for row in run.nm_path:
        gold = row.get("gold_score")
        gold_value = float(gold) if _is_number(gold) else math.nan
        if math.isfinite(gold_value) and (best is None or gold_value > float(best["gold_score"])):
            best = row
        cells = [
            _text(row.get("evaluation", "—")),
            _text(row.get("step", "—")),
            _text(row.get("phase", "—")),
            vec(row.get("thresholds")),
            _num(gold_value),
            vec(row.get("constraint_values")),
            vec(row.get("lagrange_multipliers")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if best is not None:
        lines.append(
            f"Best gold on the path: {_num(float(best['gold_score']))} at evaluation {best.get('evaluation')} "
            f"(step {best.get('step')}), thresholds ({vec(best.get('thresholds'))})."
        )
    result = run.summary.get("nm_result")
    best_thresholds = run.summary.get("nm_best_thresholds")
    if result is not None or best_thresholds is not None:
        lines.append(
            f"Optimizer (summary.json): {_text(str(result).rstrip('.')) if result is not None else '—'}; "
            f"best thresholds ({vec(best_thresholds)})."
        )
    return "\n".join(lines) + "\n"


def composite_markdown(runs: Sequence[CompositeRun], reference: Sequence[float] | None = None,
                       title: str | None = None) -> str:
    """The whole report: a heading, :func:`composite_table`, and the NM path of every nm_ppo run."""
    parts = [f"# {title or 'Composite-reward runs'}\n", composite_table(runs, reference)]
    for run in runs:
        if run.nm_path is not None or (run.method in METHODS and "nm" in METHODS[run.method].sections):
            parts.append(f"## Nelder–Mead path: {run.name}\n")
            parts.append(nm_path_table(run))
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# Figure
# ---------------------------------------------------------------------------------------------


def _component_style(j: int) -> tuple[Any, str]:
    return _COMPONENT_STYLES[j % len(_COMPONENT_STYLES)], _COMPONENT_MARKERS[j % len(_COMPONENT_MARKERS)]


def _run_colors(count: int) -> list[Any]:
    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(count)]


def plot_composite(runs: Sequence[CompositeRun], path: str | Path, *, title: str | None = None) -> Path:
    """One PNG, three panels over training step (shared x axis), one colour per run.

    (a) each proxy component value per run, one line style and marker per component, with the
    run's thresholds as thin dashed step lines in its colour (ended by a hollow marker of the
    component); (b) the squashed Lagrange multipliers f(mu) of constrained and NM runs, or the
    reward weights of dynamic runs, one line style per component; (c) gold score (absolute) per
    run with a ±stderr band. The run legend sits right of the panels.

    Returns:
        The path written (parent folders are created).
    """
    if not runs:
        raise ValueError("plot_composite needs at least one run")
    colors = _run_colors(len(runs))
    fig = Figure(figsize=(12.0, 11.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax_comp, ax_coef, ax_gold = fig.subplots(3, 1, sharex=True)
    axes: list[Axes] = [ax_comp, ax_coef, ax_gold]

    component_names: list[str] = []
    for run in runs:
        for name in run.component_names:
            if name not in component_names:
                component_names.append(name)
    any_thresholds = False
    any_multipliers = any(run.multipliers is not None for run in runs)
    any_weights = any(run.multipliers is None and run.weights is not None for run in runs)

    for color, run in zip(colors, runs):
        x = run.steps
        for j, name in enumerate(run.component_names):
            style, marker = _component_style(component_names.index(name))
            ax_comp.plot(x, run.components[:, j], linestyle=style, marker=marker, markersize=3.5,
                         linewidth=1.6, color=color)
            if run.thresholds is not None and np.any(np.isfinite(run.thresholds[:, j])):
                any_thresholds = True
                ax_comp.plot(x, run.thresholds[:, j], linestyle=_THRESHOLD_STYLE, drawstyle="steps-pre",
                             linewidth=0.9, alpha=0.85, color=color, marker=marker, markevery=[len(x) - 1],
                             markersize=5, markerfacecolor="none")
            coefficients = run.multipliers if run.multipliers is not None else run.weights
            if coefficients is not None and np.any(np.isfinite(coefficients[:, j])):
                ax_coef.plot(x, coefficients[:, j], linestyle=style, marker=marker, markersize=3.5,
                             linewidth=1.4, color=color)
        ax_gold.plot(x, run.gold, "-", marker="o", markersize=3.5, linewidth=1.6, color=color)
        if np.any(np.isfinite(run.gold_stderr)):
            ax_gold.fill_between(x, run.gold - run.gold_stderr, run.gold + run.gold_stderr,
                                 color=color, alpha=0.15, linewidth=0)

    style_handles = []
    for j, name in enumerate(component_names):
        style, marker = _component_style(j)
        style_handles.append(Line2D([], [], linestyle=style, marker=marker, markersize=4, color="0.3",
                                    label=name))
    coef_handles = list(style_handles)
    if any_thresholds:
        for j, name in enumerate(component_names):
            _, marker = _component_style(j)
            style_handles.append(Line2D([], [], linestyle=_THRESHOLD_STYLE, linewidth=0.9, marker=marker,
                                        markerfacecolor="none", color="0.3", label=f"threshold {name}"))
    ax_comp.legend(handles=style_handles, fontsize=8, loc="best", ncol=2 if any_thresholds else 1)
    ax_coef.legend(handles=coef_handles, fontsize=8, loc="best")

    ax_comp.set_title("(a) proxy component values" + (" (thin dashed: thresholds θ)" if any_thresholds else ""))
    ax_comp.set_ylabel("component score (standardized proxy)")
    if any_multipliers and any_weights:
        coef_title, coef_label = "(b) Lagrange multipliers f(μ) (constrained/NM) or reward weights (dynamic)", \
            "f(μ) or weight"
    elif any_multipliers:
        coef_title, coef_label = "(b) Lagrange multipliers f(μ)", "f(μ)"
    else:
        coef_title, coef_label = "(b) reward weights", "weight"
    ax_coef.set_title(coef_title)
    ax_coef.set_ylabel(coef_label)
    ax_gold.set_title("(c) gold score (band: ± stderr)")
    ax_gold.set_ylabel("gold score (absolute)")
    ax_gold.set_xlabel("training step")
    for ax in axes:
        ax.grid(alpha=0.3)
    run_handles = [Line2D([], [], color=color, linewidth=2.5, label=f"{run.name}\n{run.label}")
                   for color, run in zip(colors, runs)]
    fig.legend(handles=run_handles, loc="outside right upper", fontsize=8, title="run", labelspacing=0.9)
    fig.suptitle(title or "Composite-reward runs: components, multipliers/weights and gold vs step")

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI)
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def plot_proxy_points(thresholds: Mapping[str, Any], path: str | Path) -> Path:
    """One panel per component of a proxy_points run's ``thresholds.json``: gold against the
    component's value at each evaluation of the run that pushed it alone, the fitted quadratic
    ``a + b v + c v^2`` over the observed range, and the proxy point (the fit's maximum there)."""
    components = thresholds.get("components") or {}
    if not components:
        raise ValueError("thresholds.json holds no components")
    fig = Figure(figsize=(5.2 * len(components), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(components), squeeze=False)
    for ax, (name, fit) in zip(axes[0], components.items()):
        points = np.asarray(fit["points"], dtype=np.float64)
        order = np.argsort(points[:, 0])
        ax.plot(points[order, 0], points[order, 1], "o", color="tab:blue", label="evaluations")
        a, b, c = fit["coefficients"]
        v = np.linspace(points[:, 0].min(), points[:, 0].max(), 200)
        ax.plot(v, a + b * v + c * v * v, "-", color="tab:gray", label="quadratic fit")
        point = fit["proxy_point"]
        ax.axvline(point, color="tab:red", linestyle="--", label=f"proxy point {point:.2f}")
        ax.set_xlabel(f"{name} (proxy component, standardized)")
        ax.set_ylabel("gold score")
        ax.set_title(f"{name}: gold against the component pushed alone")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m analysis.composite``."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.composite",
        description="Table and figure of composite-reward runs (constrained_ppo, nm_ppo, dynamic_ppo).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="composite-reward run directory")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--title", default=None, help="figure and report title")
    parser.add_argument("--max-step", type=int, default=None, metavar="N",
                        help="use each run's evaluations up to step N (compare runs at the same budget)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the report; return the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2

    runs = load_for_cli(lambda: [load_composite(run_dir, args.max_step) for run_dir in args.run_dirs], (ValueError,))
    if runs is None:
        return 2

    markdown = composite_markdown(runs, title=args.title)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "composite.md").write_text(markdown, encoding="utf-8")
    plot_composite(runs, out / "composite.png", title=args.title)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
