"""Read run directories into curves of gold and proxy score against KL.

A run directory holds ``config.yaml``, ``curves.jsonl`` (one JSON object per evaluation point)
and ``summary.json``. A best-of-n run stores one curve per aggregator in one file (rows over n),
and one per selector curve (row key ``curve``, e.g. "member_0+soft(lambda=0.3)": regularized or
soft best-of-n on an aggregator, kept apart from that aggregator's plain curve);
an RL run (PPO, DPO, MADPO, ...) stores one curve (rows over steps). A sweep is a folder of run
directories, possibly nested; :func:`load_runs` accepts run directories and sweep folders alike.

Gold is reported relative to the initial policy, as in Gao et al. (2022, §2): it is shifted so
that the initial policy scores 0. The baseline is the row key ``gold_score_initial`` when a row
carries it, otherwise the gold score of the curve's row with the smallest KL (n = 1 for best-of-n,
step 0 for RL). The proxy is shifted the same way, always by its smallest-KL row.

This module reads plain files only; of the package it imports just the curves row's required keys,
declared once in :mod:`rlhf_overopt.run.directory` beside the writer that checks them.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt
import yaml

from rlhf_overopt.run.directory import CURVE_REQUIRED_KEYS

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

CURVES_FILE = "curves.jsonl"
CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"

# Config sections searched for a run-level coefficient when the rows do not carry it.
# MADPO reuses the DPO section for beta in configs that do not repeat it.
_CONFIG_SECTIONS: dict[str, tuple[str, ...]] = {"madpo": ("madpo", "dpo")}


class RunDirError(Exception):
    """A path given to the loader is not a readable run directory or sweep folder."""


class MalformedLineWarning(UserWarning):
    """A line of ``curves.jsonl`` was skipped; the message names the file and line number."""


@dataclass(frozen=True)
class Curve:
    """One curve: a sequence of evaluation points of one optimizer/aggregator in one run.

    Arrays have one entry per evaluation point (T points), ordered by (step, n).
    """

    run_dir: Path
    """The run directory the curve was read from."""
    method: str
    """Optimizer, e.g. "bon", "ppo", "dpo", "madpo"."""
    aggregator: str | None
    """Ensemble aggregation rule, e.g. "mean", "wco", "uwo"; for a best-of-n selector curve its
    ``curve`` label (e.g. "member_0+rbon_kl(alpha=0.1)"); None when neither rows nor config say."""
    kl_coef: float | None
    """KL penalty coefficient (PPO-style RL), first row's value or the config's; None if absent."""
    beta: float | None
    """DPO/MADPO beta, first row's value or the config's; None if absent."""
    seed: int | None
    """Top-level ``seed`` of the run's config; None if absent."""
    status: str | None
    """``status`` from summary.json ("completed", "failed", ...); None if there is no summary."""
    step: IntArray
    """(T,) training step of each point (0 for every best-of-n point in most runs)."""
    n: FloatArray
    """(T,) best-of-n n of each point; NaN where the row has no ``n``."""
    kl: FloatArray
    """(T,) KL(pi || pi_init) in nats: the row key the loader was asked for (``kl`` by default,
    e.g. ``kl_pool`` for best-of-n's exact pool KL) where every row of the curve has it."""
    sqrt_kl: FloatArray
    """(T,) d = sqrt(KL) in sqrt nats, as logged (``sqrt_<key>``)."""
    proxy: FloatArray
    """(T,) aggregated proxy score minus the proxy of the smallest-KL point."""
    proxy_raw: FloatArray
    """(T,) aggregated proxy score as logged (``proxy_score``)."""
    gold: FloatArray
    """(T,) gold score relative to the initial policy (``gold_raw - gold_initial``)."""
    gold_raw: FloatArray
    """(T,) gold score as logged (``gold_score``)."""
    gold_initial: float
    """Gold score of the initial policy subtracted from ``gold_raw``."""
    gold_initial_source: str
    """"gold_score_initial" if read from the rows, "smallest_kl" if taken from the curve."""
    gold_stderr: FloatArray
    """(T,) standard error of the gold mean; NaN where not logged."""
    member_scores: FloatArray
    """(T, K) raw mean score of each proxy ensemble member (``proxy_member_scores``)."""
    config: Mapping[str, Any] = field(default_factory=dict, repr=False)
    """The run's resolved config (parsed ``config.yaml``), empty if absent."""

    @property
    def num_members(self) -> int:
        """K, the number of proxy ensemble members."""
        return int(self.member_scores.shape[1])

    @property
    def budget(self) -> FloatArray:
        """(T,) optimization budget of each point, the order "final" is read in: n for best-of-n
        rows, the training step otherwise (not d: under a KL penalty an RL run's KL rises and
        falls back, so its furthest point need not be its last)."""
        if self.n.size and np.all(np.isfinite(self.n)):
            return self.n
        return self.step.astype(np.float64)

    def end_points(self) -> dict[str, float] | None:
        """:func:`analysis.fit.overoptimization_measures` in budget order: the gold peak and the final
        point in training order, the two points a run contributes to a frontier across a sweep's
        coefficients. None when the curve has no finite point."""
        from analysis.fit import overoptimization_measures

        try:
            return overoptimization_measures(self.sqrt_kl, self.gold, self.proxy, budget=self.budget)
        except ValueError:
            return None

    @property
    def label(self) -> str:
        """Short human-readable label: aggregator plus the coefficients that are set."""
        parts = [self.aggregator if self.aggregator is not None else "single"]
        if self.kl_coef is not None:
            parts.append(f"kl_coef={self.kl_coef:g}")
        if self.beta is not None:
            parts.append(f"beta={self.beta:g}")
        if self.seed is not None:
            parts.append(f"seed={self.seed}")
        return " ".join(parts)


def run_frontier(curves: Iterable[Curve]) -> tuple[FloatArray, FloatArray]:
    """(d, gold) of every run's gold peak and final point (:meth:`Curve.end_points`), the points a
    frontier across KL coefficients is drawn through (each run is one budget)."""
    points = [(e[d], e[g]) for c in curves if (e := c.end_points()) is not None
              for d, g in (("sqrt_kl_at_peak", "peak_gold"), ("final_sqrt_kl", "final_gold"))]
    return np.array([p[0] for p in points], dtype=np.float64), np.array([p[1] for p in points], dtype=np.float64)


def find_run_dirs(path: str | Path) -> list[Path]:
    """Return the run directories at or below ``path``, depth first in name order.

    A run directory is a directory containing ``curves.jsonl``; its subfolders (checkpoints,
    wandb, ...) are not searched. Any other directory is searched recursively (a sweep folder,
    which may hold its own config.yaml). A directory with ``config.yaml`` or ``summary.json`` but
    no ``curves.jsonl`` and no run below it is a run without curves: named directly it is an
    error; found inside a sweep folder (e.g. a run that failed before its first evaluation) it
    is skipped with a warning so that the rest of the sweep can still be analysed.

    Raises:
        RunDirError: ``path`` does not exist, is not a directory, is a run directory without
            ``curves.jsonl``, or has no run directory at or below it.
    """
    root = Path(path)
    if not root.exists():
        raise RunDirError(f"{root}: no such file or directory")
    if not root.is_dir():
        raise RunDirError(f"{root}: not a directory (expected a run directory or a sweep folder)")
    if (root / CURVES_FILE).is_file():
        return [root]
    found: list[Path] = []
    for child in sorted(p for p in root.iterdir() if p.is_dir()):
        _collect_run_dirs(child, found)
    if found:
        return found
    if _has_run_files(root):
        raise RunDirError(f"{root / CURVES_FILE}: missing (run directory has no curves)")
    raise RunDirError(f"{root}: no run directories found (no {CURVES_FILE} at or below it)")


def _has_run_files(path: Path) -> bool:
    return any((path / name).is_file() for name in (CONFIG_FILE, SUMMARY_FILE))


def _collect_run_dirs(folder: Path, found: list[Path]) -> None:
    if (folder / CURVES_FILE).is_file():
        found.append(folder)
        return
    before = len(found)
    for child in sorted(p for p in folder.iterdir() if p.is_dir()):
        _collect_run_dirs(child, found)
    if len(found) == before and _has_run_files(folder):
        warnings.warn(
            f"{folder / CURVES_FILE}: missing; skipped run directory {folder}",
            MalformedLineWarning,
            stacklevel=2,
        )


def load_runs(paths: Iterable[str | Path], x: str = "kl") -> list[Curve]:
    """Load every curve from the given run directories and sweep folders.

    ``x`` is the row key of the KL axis (see :func:`load_run`).

    Run directories reached twice (e.g. a sweep folder and one of its runs) are read once.
    Returns curves in the order their run directories were found.

    Raises:
        RunDirError: see :func:`find_run_dirs` and :func:`load_run`.
    """
    seen: set[Path] = set()
    curves: list[Curve] = []
    for path in paths:
        for run_dir in find_run_dirs(path):
            key = run_dir.resolve()
            if key in seen:
                continue
            seen.add(key)
            curves.extend(load_run(run_dir, x))
    return curves


def load_run(run_dir: str | Path, x: str = "kl") -> list[Curve]:
    """Load the curves of one run directory.

    ``x`` names the KL the curves are drawn against: "kl" (default), or another row key with
    its ``sqrt_`` twin, e.g. "kl_pool" (best-of-n's exact KL on the pool); a curve some of
    whose rows lack it keeps "kl".

    Rows of ``curves.jsonl`` are grouped into curves by (method, aggregator), a row's ``curve``
    label standing for its aggregator when present (best-of-n selectors); a coefficient that
    changes from row to row (an adaptive KL controller) does not split a curve. Within a curve,
    rows are ordered by (step, n); a later row with the same (step, n) replaces an earlier one
    (a resumed run may log a point twice). Malformed lines are skipped with a
    :class:`MalformedLineWarning` naming file and line number.

    Raises:
        RunDirError: ``curves.jsonl`` is missing.
    """
    run_path = Path(run_dir)
    curves_path = run_path / CURVES_FILE
    if not curves_path.is_file():
        raise RunDirError(f"{curves_path}: missing (run directory has no curves)")
    config = _read_config(run_path / CONFIG_FILE)
    status = _read_status(run_path / SUMMARY_FILE)

    groups: dict[tuple[str, str | None], list[dict[str, Any]]] = {}
    member_counts: dict[tuple[str, str | None], int] = {}
    with curves_path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row, problem = _parse_row(line)
            if row is None:
                _warn_line(curves_path, lineno, problem)
                continue
            key = (row["method"], row.get("curve") or row.get("aggregator"))
            count = len(row["proxy_member_scores"])
            expected = member_counts.setdefault(key, count)
            if count != expected:
                _warn_line(
                    curves_path,
                    lineno,
                    f"{count} proxy_member_scores where earlier rows of this curve have {expected}",
                )
                continue
            groups.setdefault(key, []).append(row)

    if not groups:
        warnings.warn(f"{curves_path}: no valid evaluation rows", MalformedLineWarning, stacklevel=2)
    return [
        _build_curve(run_path, curves_path, method, aggregator, rows, config, status, x)
        for (method, aggregator), rows in groups.items()
    ]


def _warn_line(path: Path, lineno: int, problem: str) -> None:
    warnings.warn(f"{path}:{lineno}: skipped malformed line ({problem})", MalformedLineWarning, stacklevel=3)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_row(line: str) -> tuple[dict[str, Any] | None, str]:
    """Parse and validate one JSON line; return (row, "") or (None, reason)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"invalid JSON: {err.msg}"
    if not isinstance(row, dict):
        return None, f"expected a JSON object, got {type(row).__name__}"
    missing = [key for key in CURVE_REQUIRED_KEYS if key not in row]
    if missing:
        return None, f"missing key(s) {', '.join(missing)}"
    if not isinstance(row["method"], str):
        return None, "'method' is not a string"
    if not _is_number(row["step"]) or not float(row["step"]).is_integer():
        return None, "'step' is not an integer"
    for key in ("kl", "sqrt_kl", "proxy_score", "gold_score"):
        if not _is_number(row[key]):
            return None, f"'{key}' is not a number"
    members = row["proxy_member_scores"]
    if not isinstance(members, list) or not all(_is_number(v) for v in members):
        return None, "'proxy_member_scores' is not a list of numbers"
    for key in ("aggregator", "curve"):
        if row.get(key) is not None and not isinstance(row[key], str):
            return None, f"'{key}' is not a string"
    for key in ("n", "beta", "kl_coef", "gold_score_initial", "gold_stderr"):
        if row.get(key) is not None and not _is_number(row[key]):
            return None, f"'{key}' is not a number"
    return row, ""


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        warnings.warn(f"{path}: unreadable YAML ({err}); ignored", MalformedLineWarning, stacklevel=3)
        return {}
    return config if isinstance(config, dict) else {}


def _read_status(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        warnings.warn(f"{path}: invalid JSON ({err.msg}); ignored", MalformedLineWarning, stacklevel=3)
        return None
    status = summary.get("status") if isinstance(summary, dict) else None
    return str(status) if status is not None else None


def _config_value(config: Mapping[str, Any], method: str, key: str) -> Any:
    """Look ``key`` up in the config section(s) of ``method`` (e.g. ``ppo.kl_coef``)."""
    for section_name in _CONFIG_SECTIONS.get(method, (method,)):
        section = config.get(section_name)
        if isinstance(section, Mapping) and section.get(key) is not None:
            return section[key]
    return None


def _run_coefficient(
    rows: list[dict[str, Any]], config: Mapping[str, Any], method: str, key: str
) -> float | None:
    value = next((row[key] for row in rows if row.get(key) is not None), None)
    if value is None:
        value = _config_value(config, method, key)
    return float(value) if _is_number(value) else None


def _optional_column(rows: list[dict[str, Any]], key: str) -> FloatArray:
    return np.array(
        [float(row[key]) if row.get(key) is not None else math.nan for row in rows],
        dtype=np.float64,
    )


def _build_curve(
    run_dir: Path,
    curves_path: Path,
    method: str,
    aggregator: str | None,
    rows: list[dict[str, Any]],
    config: Mapping[str, Any],
    status: str | None,
    x: str = "kl",
) -> Curve:
    by_point: dict[tuple[int, float], dict[str, Any]] = {}
    for row in rows:
        n = row.get("n")
        by_point[(int(row["step"]), float(n) if n is not None else -1.0)] = row
    duplicates = len(rows) - len(by_point)
    if duplicates:
        warnings.warn(
            f"{curves_path}: {duplicates} repeated evaluation point(s) for "
            f"method={method} aggregator={aggregator}; kept the last of each",
            MalformedLineWarning,
            stacklevel=3,
        )
    ordered = [by_point[key] for key in sorted(by_point)]

    if not all(_is_number(r.get(x)) and _is_number(r.get(f"sqrt_{x}")) for r in ordered):
        x = "kl"
    kl = np.array([float(r[x]) for r in ordered], dtype=np.float64)
    proxy_raw = np.array([float(r["proxy_score"]) for r in ordered], dtype=np.float64)
    gold_raw = np.array([float(r["gold_score"]) for r in ordered], dtype=np.float64)
    members = np.array(
        [[float(v) for v in r["proxy_member_scores"]] for r in ordered], dtype=np.float64
    ).reshape(len(ordered), -1)

    # Baseline = the initial policy (Gao et al. 2022, §2: gold shifted so that R(0) = 0).
    base = int(np.argmin(np.where(np.isnan(kl), np.inf, kl)))
    logged_initial = next(
        (float(r["gold_score_initial"]) for r in ordered if r.get("gold_score_initial") is not None),
        None,
    )
    if logged_initial is not None:
        gold_initial, source = logged_initial, "gold_score_initial"
    else:
        gold_initial, source = float(gold_raw[base]), "smallest_kl"

    if aggregator is None:
        aggregate = config.get("aggregate")
        if isinstance(aggregate, Mapping) and isinstance(aggregate.get("name"), str):
            aggregator = aggregate["name"]
    seed = config.get("seed")

    return Curve(
        run_dir=run_dir,
        method=method,
        aggregator=aggregator,
        kl_coef=_run_coefficient(ordered, config, method, "kl_coef"),
        beta=_run_coefficient(ordered, config, method, "beta"),
        seed=int(seed) if _is_number(seed) else None,
        status=status,
        step=np.array([int(r["step"]) for r in ordered], dtype=np.int64),
        n=_optional_column(ordered, "n"),
        kl=kl,
        sqrt_kl=np.array([float(r[f"sqrt_{x}"]) for r in ordered], dtype=np.float64),
        proxy=proxy_raw - proxy_raw[base],
        proxy_raw=proxy_raw,
        gold=gold_raw - gold_initial,
        gold_raw=gold_raw,
        gold_initial=gold_initial,
        gold_initial_source=source,
        gold_stderr=_optional_column(ordered, "gold_stderr"),
        member_scores=members,
        config=config,
    )


T = TypeVar("T")


def load_for_cli(load: Callable[[], T], errors: tuple[type[Exception], ...]) -> T | None:
    """Run a loader for a command line: its warnings become ``warning: ...`` lines on stderr and
    one of `errors` becomes a single ``error: ...`` line (and None is returned)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            result = load()
        except errors as err:
            print(f"error: {err}", file=sys.stderr)
            return None
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return result
