"""Overoptimization report for run directories: fits, figures and a markdown table.

Command line::

    python -m analysis.report RUN_DIR [RUN_DIR ...] --out DIR [--form auto|bon|rl] [--x kl|kl_pool]
                              [--members] [--wandb]

Each RUN_DIR is a run directory or a sweep folder of run directories. For every method found
it writes ``DIR/curves_<method>.png`` and ``DIR/frontier_<method>.png``; it writes
``DIR/table.md`` (one row per curve) and ``DIR/frontier.md`` (one row per method and aggregator,
pooled over runs) and prints the per-curve table. ``--members`` adds one ensemble
member-spread figure per curve. ``--wandb`` uploads the figures and both tables to Weights & Biases,
into the project and group of the runs' config (a sweep's group); mode from the environment
variable WANDB_MODE, "offline" by default.

Fits follow Gao, Schulman & Hilton (2022, §3): gold relative to the initial policy against
d = sqrt(KL), R_bon(d) = d (alpha - beta d) with peak d* = alpha / (2 beta), or
R_rl(d) = d (alpha - beta log d) with peak d* = exp(alpha / beta - 1). ``--form auto`` uses the
best-of-n form for method "bon" and the RL form for every other method.

Exit status: 0 on success, 2 when an input is missing or holds no valid curve, 1 when the
W&B upload cannot run.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from analysis.fit import fit_rl, predicted_peak_rl
from analysis.load import Curve, RunDirError, load_for_cli, load_runs
from analysis.plots import FittedForm, plot_frontier, plot_member_spread, plot_method_curves
from rlhf_overopt.config.methods import fit_form
from rlhf_overopt.ops.scaling import bon_peak, fit_bon_form

FORMS = ("auto", "bon", "rl")
X_KEYS = ("kl", "kl_pool")
"""Row keys the KL axis can be read from (``--x``)."""
_FITTERS: dict[str, tuple[Callable[[Any, Any], tuple[float, float, float]], Callable[[float, float], float]]] = {
    "bon": (functools.partial(fit_bon_form, nonfinite="skip"), bon_peak),
    "rl": (fit_rl, predicted_peak_rl),
}

# (row key, table header, kind); kind selects the cell formatting.
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run", "run", "text"),
    ("method", "method", "text"),
    ("aggregator", "aggregator", "text"),
    ("kl_coef", "kl_coef", "number"),
    ("beta", "beta", "number"),
    ("seed", "seed", "text"),
    ("peak_gold", "peak gold", "number"),
    ("sqrt_kl_at_peak", "sqrt_kl at peak", "number"),
    ("final_gold", "gold at largest budget", "number"),
    ("drop_from_peak", "drop from peak", "number"),
    ("drop_from_peak_rel", "drop (% of gain)", "percent"),
    ("proxy_at_peak", "proxy at peak", "number"),
    ("form", "fit form", "text"),
    ("fit_alpha", "fit α", "number"),
    ("fit_beta", "fit β", "number"),
    ("fit_r2", "fit R²", "number"),
    ("predicted_peak_sqrt_kl", "predicted peak d", "number"),
)
# Columns shown only when at least one row has a value.
_OPTIONAL_COLUMNS = frozenset({"kl_coef", "beta", "seed"})


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` produced."""

    rows: list[dict[str, Any]]
    """One dict per curve: labels, overoptimization measures and fit (see :func:`build_rows`)."""
    table: str
    """The markdown table of ``rows``."""
    table_path: Path
    """``DIR/table.md``."""
    images: list[Path]
    """Every PNG written."""
    group_rows: list[dict[str, Any]]
    """One dict per (method, aggregator) over all its runs (see :func:`build_group_rows`)."""
    group_table: str
    """The markdown table of ``group_rows``."""
    group_table_path: Path
    """``DIR/frontier.md``."""


def resolve_form(method: str, form: str) -> str:
    """The Gao form to fit: ``form`` itself, or for "auto" the method table's fit_form of ``method``
    ("bon" for best-of-n and scaling_law, "rl" otherwise)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form != "auto":
        return form
    return fit_form(method)


def build_rows(curves: Sequence[Curve], form: str = "auto") -> list[dict[str, Any]]:
    """Measure and fit every curve; one row per curve, sorted by method, aggregator, coefficients.

    Row keys: run, method, aggregator, kl_coef, beta, seed, the keys of
    :func:`analysis.fit.overoptimization_measures` (peak_gold, sqrt_kl_at_peak, ...), form,
    fit_alpha, fit_beta, fit_r2, predicted_peak_sqrt_kl. Measures and fits use gold relative
    to the initial policy and d = sqrt_kl; a fit that is not identifiable (too few points)
    leaves its keys None.
    """
    rows = []
    for curve in _sorted_curves(curves):
        row: dict[str, Any] = {
            "run": curve.run_dir.name,
            "method": curve.method,
            "aggregator": curve.aggregator,
            "kl_coef": curve.kl_coef,
            "beta": curve.beta,
            "seed": curve.seed,
        }
        row.update(curve.end_points() or {})
        chosen = resolve_form(curve.method, form)
        row["form"] = chosen
        row.update(_fit_row(chosen, curve.sqrt_kl, curve.gold))
        rows.append(row)
    return rows


def _sort_key(curve: Curve) -> tuple[Any, ...]:
    def number(value: float | None) -> float:
        return -math.inf if value is None else value

    return (
        curve.method,
        curve.aggregator or "",
        number(curve.kl_coef),
        number(curve.beta),
        -1 if curve.seed is None else curve.seed,
        str(curve.run_dir),
    )


def _sorted_curves(curves: Sequence[Curve]) -> list[Curve]:
    return sorted(curves, key=_sort_key)


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return ""
    if kind == "text":
        return str(value).replace("|", "\\|")
    number = float(value)
    if math.isnan(number):
        return "—"
    if math.isinf(number):
        return "inf" if number > 0 else "-inf"
    if kind == "percent":
        return f"{100.0 * number:.1f}%"
    return f"{number:.4g}"


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Render rows from :func:`build_rows` as a markdown table (optional columns only if used)."""
    columns = [
        (key, header, kind)
        for key, header, kind in _COLUMNS
        if key not in _OPTIONAL_COLUMNS or any(row.get(key) is not None for row in rows)
    ]
    lines = [
        "| " + " | ".join(header for _, header, _ in columns) + " |",
        "|" + "|".join("---" if kind == "text" else "---:" for _, _, kind in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), kind) for key, _, kind in columns) + " |")
    return "\n".join(lines) + "\n"


# (row key, table header, kind) of the per-aggregator table.
_GROUP_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("method", "method", "text"),
    ("aggregator", "aggregator", "text"),
    ("runs", "runs", "text"),
    ("best_run", "best run", "text"),
    ("best_peak_gold", "best peak gold", "number"),
    ("best_sqrt_kl_at_peak", "sqrt_kl at best peak", "number"),
    ("best_final_run", "best final run", "text"),
    ("best_final_gold", "best final gold", "number"),
    ("best_final_sqrt_kl", "sqrt_kl at best final", "number"),
    ("largest_sqrt_kl", "largest final sqrt_kl", "number"),
    ("gold_at_largest_kl", "final gold there", "number"),
    ("drop_from_best_peak", "drop from best peak", "number"),
    ("proxy_at_largest_kl", "final proxy there", "number"),
    ("form", "fit form", "text"),
    ("fit_alpha", "pooled fit α", "number"),
    ("fit_beta", "pooled fit β", "number"),
    ("fit_r2", "pooled fit R²", "number"),
    ("predicted_peak_sqrt_kl", "predicted peak d", "number"),
    ("peaks_fit_alpha", "run-peaks fit α", "number"),
    ("peaks_fit_beta", "run-peaks fit β", "number"),
    ("peaks_fit_r2", "run-peaks fit R²", "number"),
    ("peaks_predicted_peak_sqrt_kl", "run-peaks predicted peak d", "number"),
)


def _fit_row(form: str, d: np.ndarray, gold: np.ndarray, prefix: str = "") -> dict[str, Any]:
    """alpha, beta, R^2 and predicted peak of Gao's `form` fitted to (d, gold); None where the
    fit is not identifiable."""
    fitter, peak = _FITTERS[form]
    try:
        alpha, beta, r2 = fitter(d, gold)
    except ValueError:
        return {f"{prefix}fit_alpha": None, f"{prefix}fit_beta": None, f"{prefix}fit_r2": None,
                f"{prefix}predicted_peak_sqrt_kl": None}
    return {f"{prefix}fit_alpha": alpha, f"{prefix}fit_beta": beta, f"{prefix}fit_r2": r2,
            f"{prefix}predicted_peak_sqrt_kl": peak(alpha, beta)}


def build_group_rows(curves: Sequence[Curve], form: str = "auto") -> list[dict[str, Any]]:
    """One row per (method, aggregator), pooling every run of a sweep with that aggregator.

    Each run contributes its gold peak and its final point in training order (the largest step;
    the largest n for best-of-n): under a KL penalty a run's KL rises and falls back during
    training, so its final point need not be its furthest one, and a sweep over KL coefficients
    compares where runs end and where they peak (#15), not the points of largest KL:

    - best_peak_gold, best_run, best_sqrt_kl_at_peak: the highest gold any run reached, and where;
    - best_final_gold, best_final_run, best_final_sqrt_kl: the best gold a run ended at, and where;
    - largest_sqrt_kl, gold_at_largest_kl, proxy_at_largest_kl: the final point of the run that
      ended furthest from the initial policy (the largest budget the sweep spent);
    - drop_from_best_peak = best_peak_gold - gold_at_largest_kl;
    - a Gao et al. form fitted to all points of all runs together (gold relative to the initial
      policy, which every run of a sweep shares): alpha, beta, R^2 and the predicted peak d;
    - the same form fitted to one point per run, its gold peak (`peaks_fit_*`): the view of a
      budget sweep in which each run's coefficient (beta, kl_coef) is one KL budget, as in
      Rafailov et al. (2024), whose DPO runs wander in KL within a run (the pooled fit is poor
      there); needs at least three runs.
    """
    groups: dict[tuple[str, str | None], list[Curve]] = {}
    for curve in _sorted_curves(curves):
        groups.setdefault((curve.method, curve.aggregator), []).append(curve)
    rows = []
    for (method, aggregator), group in groups.items():
        d = np.concatenate([c.sqrt_kl for c in group])
        gold = np.concatenate([c.gold for c in group])
        row: dict[str, Any] = {"method": method, "aggregator": aggregator, "runs": len(group)}
        ends = [(c, e) for c in group if (e := c.end_points()) is not None]
        if ends:
            peak_run, peak = max(ends, key=lambda ce: ce[1]["peak_gold"])
            final_run, final = max(ends, key=lambda ce: ce[1]["final_gold"])
            _, far = max(ends, key=lambda ce: ce[1]["final_sqrt_kl"])
            row.update(
                best_run=peak_run.run_dir.name,
                best_peak_gold=peak["peak_gold"],
                best_sqrt_kl_at_peak=peak["sqrt_kl_at_peak"],
                best_final_run=final_run.run_dir.name,
                best_final_gold=final["final_gold"],
                best_final_sqrt_kl=final["final_sqrt_kl"],
                largest_sqrt_kl=far["final_sqrt_kl"],
                gold_at_largest_kl=far["final_gold"],
                drop_from_best_peak=peak["peak_gold"] - far["final_gold"],
                proxy_at_largest_kl=far["final_proxy"],
            )
        chosen = resolve_form(method, form)
        row["form"] = chosen
        row.update(_fit_row(chosen, d, gold))
        if len(ends) >= 3:
            row.update(_fit_row(chosen, np.array([e["sqrt_kl_at_peak"] for _, e in ends]),
                                np.array([e["peak_gold"] for _, e in ends]), "peaks_"))
        rows.append(row)
    return rows


def format_group_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Render rows from :func:`build_group_rows` as a markdown table."""
    lines = [
        "| " + " | ".join(header for _, header, _ in _GROUP_COLUMNS) + " |",
        "|" + "|".join("---" if kind == "text" else "---:" for _, _, kind in _GROUP_COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), kind) for key, _, kind in _GROUP_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


_GROUP_NOTE = (
    "\nOne row per method and aggregator, pooling every run of the sweep (e.g. every KL coefficient). "
    "Gold and proxy are relative to the initial policy; d = sqrt(KL(π‖π_init)). The pooled fit is "
    "Gao et al.'s form fitted to the points of all runs together; the run-peaks fit uses one point per run, "
    "its gold peak (each run one budget, e.g. one beta).\n"
)


_TABLE_NOTE = (
    "\nGold and proxy are relative to the initial policy; d = sqrt(KL(π‖π_init)) in sqrt nats. "
    "Drop = peak gold − gold at the largest budget (n for best-of-n, last step for RL), also as "
    "a share of the peak's gain over the initial policy. Fits (Gao et al. 2022): "
    "bon R(d) = d(α − βd), peak α/(2β); rl R(d) = d(α − β log d), peak exp(α/β − 1).\n"
)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "none"


def write_report(
    curves: Sequence[Curve],
    out_dir: str | Path,
    *,
    form: str = "auto",
    members: bool = False,
) -> Report:
    """Write ``curves_<method>.png``, ``frontier_<method>.png``, ``table.md`` and ``frontier.md``.

    ``table.md`` has one row per curve (run and aggregator); ``frontier.md`` one row per method
    and aggregator over all runs (:func:`build_group_rows`), whose pooled fits are drawn on the
    frontier plots. With ``members`` also ``members_<method>_<NN>_<label>.png``, one per curve.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ordered = _sorted_curves(curves)
    rows = build_rows(ordered, form)
    group_rows = build_group_rows(ordered, form)
    images: list[Path] = []
    for method in sorted({c.method for c in ordered}):
        indices = [i for i, c in enumerate(ordered) if c.method == method]
        group = [ordered[i] for i in indices]
        fits: list[FittedForm | None] = []
        for i in indices:
            row = rows[i]
            fits.append(
                None if row["fit_alpha"] is None else (row["form"], row["fit_alpha"], row["fit_beta"])
            )
        name = _slug(method)
        images.append(plot_method_curves(group, out / f"curves_{name}.png", fits=fits))
        pooled: dict[str | None, FittedForm] = {
            g["aggregator"]: (g["form"], g["fit_alpha"], g["fit_beta"])
            for g in group_rows
            if g["method"] == method and g["fit_alpha"] is not None
        }
        images.append(plot_frontier(group, out / f"frontier_{name}.png", fits=pooled))
        if members:
            for j, curve in enumerate(group):
                images.append(
                    plot_member_spread(curve, out / f"members_{name}_{j:02d}_{_slug(curve.label)}.png")
                )
    table = format_table(rows)
    table_path = out / "table.md"
    table_path.write_text(table + _TABLE_NOTE, encoding="utf-8")
    group_table = format_group_table(group_rows)
    group_table_path = out / "frontier.md"
    group_table_path.write_text(group_table + _GROUP_NOTE, encoding="utf-8")
    return Report(
        rows=rows,
        table=table,
        table_path=table_path,
        images=images,
        group_rows=group_rows,
        group_table=group_table,
        group_table_path=group_table_path,
    )


def _wandb_section(curves: Sequence[Curve]) -> Mapping[str, Any]:
    for curve in curves:
        section = curve.config.get("wandb")
        if isinstance(section, Mapping):
            return section
    return {}


def upload_to_wandb(
    report: Report,
    curves: Sequence[Curve],
    *,
    form: str = "auto",
    mode: str | None = None,
    name: str | None = None,
) -> None:
    """Log the report's figures and tables to a W&B analysis run in the runs' project and group.

    wandb is imported here only. ``mode`` defaults to the environment variable WANDB_MODE, then
    "offline" (nothing needs a login); project, group and entity come from the first ``wandb:``
    section found in the runs' config.yaml (project defaults to "rlhf_overopt"), so the report of
    a sweep lands in the sweep's group. The run is named ``name`` (default: "<group>-report").
    Logged: ``figures/<png stem>`` images, ``overoptimization_table`` (one row per curve) and
    ``frontier_table`` (one row per method and aggregator); the PNGs, table.md and frontier.md
    are also attached as one artifact of type "analysis".

    Raises:
        ImportError: wandb is not installed.
    """
    import wandb

    section = _wandb_section(curves)
    out_dir = report.table_path.parent
    group = section.get("group") or None
    run = wandb.init(
        project=str(section.get("project") or "rlhf_overopt"),
        group=group,
        entity=section.get("entity") or None,
        mode=mode or os.environ.get("WANDB_MODE", "offline"),
        job_type="analysis",
        name=name or f"{group or 'overoptimization'}-report",
        dir=str(out_dir),
        config={"run_dirs": sorted({str(c.run_dir) for c in curves}), "form": form},
    )
    try:
        columns = [key for key, _, _ in _COLUMNS]
        group_columns = [key for key, _, _ in _GROUP_COLUMNS]
        run.log(
            {
                **{f"figures/{path.stem}": wandb.Image(str(path)) for path in report.images},
                "overoptimization_table": wandb.Table(
                    columns=columns, data=[[row.get(key) for key in columns] for row in report.rows]
                ),
                "frontier_table": wandb.Table(
                    columns=group_columns,
                    data=[[row.get(key) for key in group_columns] for row in report.group_rows],
                ),
            }
        )
        artifact = wandb.Artifact("overoptimization_report", type="analysis")
        for path in [*report.images, report.table_path, report.group_table_path]:
            artifact.add_file(str(path))
        run.log_artifact(artifact)
    finally:
        run.finish()


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of ``python -m analysis.report``."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Fit Gao et al. (2022) forms to run directories; write figures and a table.",
    )
    parser.add_argument(
        "run_dirs", nargs="+", metavar="RUN_DIR", help="run directory or sweep folder of runs"
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument(
        "--form",
        choices=FORMS,
        default="auto",
        help="functional form to fit (auto: bon for method 'bon', rl otherwise)",
    )
    parser.add_argument(
        "--x",
        choices=X_KEYS,
        default="kl",
        help="KL of the x-axis and the fits: kl (logged; for best-of-n the analytic log n - (n-1)/n) or kl_pool "
        "(best-of-n's exact KL on the pool, identical responses merged; curves without it keep kl)",
    )
    parser.add_argument(
        "--members", action="store_true", help="also plot each curve's ensemble member scores"
    )
    parser.add_argument(
        "--wandb", action="store_true", help="upload figures and table to W&B (WANDB_MODE, default offline)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the report; return the process exit status (0 ok, 2 bad input, 1 upload failed)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2

    curves = load_for_cli(lambda: load_runs(args.run_dirs, x=args.x), (RunDirError,))
    if curves is None:
        return 2
    if not curves:
        print(f"error: no valid evaluation rows in {' '.join(args.run_dirs)}", file=sys.stderr)
        return 2

    report = write_report(curves, args.out, form=args.form, members=args.members)
    print(report.table, end="")
    if args.wandb:
        try:
            upload_to_wandb(report, curves, form=args.form)
        except ImportError:
            print("error: --wandb needs the wandb package (pip install wandb)", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
