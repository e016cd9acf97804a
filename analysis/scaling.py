"""Report of a scaling_law run (Gao, Schulman & Hilton 2022, §3.2, Fig. 3-4): tables and figures
from the run directory's scaling.json (per-cell fits and trend lines, written by the driver with
rlhf_overopt.ops.scaling) and curves.jsonl.

Command line::

    python -m analysis.scaling RUN_DIR [--out DIR]     (DIR defaults to RUN_DIR/report)

Writes ``table.md`` (one row per proxy: parameters, its backbone's held-out pretraining loss,
pairs, validation accuracy, alpha, beta, fit R², predicted peak d* and the gold gain there), ``trends.md`` (alpha and beta against log10
parameters at each data size and against log10 pairs at each proxy size: slope per decade and
R²), ``gold_vs_sqrt_kl.png`` (one panel per proxy size, observed gold gain per data size with the
fitted form) and ``trends.png`` (alpha and beta against log parameters and log pairs, with the
fitted lines). launch/train.py calls :func:`write_scaling_report` after a completed run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from rlhf_overopt.run.directory import read_jsonl

RESULTS_FILE = "scaling.json"
_DPI = 110


def load_scaling(run_dir: str | Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(scaling.json, the curves.jsonl rows) of a scaling_law run directory."""
    root = Path(run_dir)
    path = root / RESULTS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{root}: no {RESULTS_FILE} (not a finished scaling_law run)")
    return json.loads(path.read_text(encoding="utf-8")), read_jsonl(root / "curves.jsonl")


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g}" if abs(value) >= 1e4 or (value != 0 and abs(value) < 1e-3) else f"{value:.{digits}f}"


def _size(cell: dict[str, Any]) -> str:
    return f"L{cell['n_layer']}-d{cell['n_embd']}"


def cells_markdown(results: dict[str, Any]) -> str:
    """One row per cell: size, parameters, pairs, validation accuracy, the fit and its peak."""
    pool = results["pool"]
    lines = [
        (f"Best-of-n over one pool of {pool['n_prompts']} prompts × {pool['pool_size']} samples "
         f"({pool['source']}); gold relative to the pool's mean gold ({pool['gold_mean']:.3f}). "
         "Fit: R_bon(d) = d (α − β d), d = sqrt(KL_bon), KL_bon = log n − (n−1)/n (Gao et al. 2022, eq. 1); "
         "peak d* = α / (2β), gold gain there α² / (4β)."),
        "",
        ("| proxy | params | non-emb. params | LM loss | pairs | val acc (noisy) | val acc (clean) | α | β "
         "| fit R² | peak d* | gold gain at d* | observed peak gain (d) | peak |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in results["cells"]:
        lines.append(
            f"| {_size(c)} | {_num(c['params'])} | {_num(c['params_non_embedding'])} "
            f"| {_num(c.get('backbone_heldout_loss'))} | {_num(c['train_pairs'])} "
            f"| {_num(c['proxy_val_accuracy'])} | {_num(c['proxy_val_accuracy_clean'])} | {_num(c['alpha'])} "
            f"| {_num(c['beta'])} | {_num(c['fit_r2'])} | {_num(c['peak_sqrt_kl'])} | {_num(c['peak_gain'])} "
            f"| {_num(c['observed_peak_gain'])} ({_num(c['observed_peak_sqrt_kl'], 2)}) | {c['peak']} |")
    return "\n".join(lines) + "\n"


def trends_markdown(results: dict[str, Any]) -> str:
    """One row per trend line, y = a + b log10 x, and a plain verdict on smoothness."""
    trends = results["trends"]
    lines = [("α and β against log10 of the proxy's parameter count (at each data size) and of its "
              "training pairs (at each proxy size): least squares y = a + b·log10 x (Gao et al. 2022, §3.2)."),
             "", "| coefficient | against | held fixed | points | intercept a | slope b per decade | R² |",
             "|---|---|---|---:|---:|---:|---:|"]
    for t in trends:
        lines.append(f"| {t['coefficient']} | log10 {t['against']} | {t['at']} | {t['points']} "
                     f"| {_num(t['intercept'])} | {_num(t['slope_per_decade'])} | {_num(t['r2'])} |")
    lines += ["", smoothness_verdict(trends)]
    return "\n".join(lines) + "\n"


def smoothness_verdict(trends: Sequence[dict[str, Any]], threshold: float = 0.8) -> str:
    """A plain sentence: do the trend lines with 3+ points fit a log-linear law (R² >= threshold)?"""
    judged = [t for t in trends if t["points"] >= 3 and t["r2"] is not None]
    if not judged:
        return ("No trend line has 3 or more points: with two points every line fits exactly (R² = 1), "
                "so smoothness cannot be judged from this grid.")
    smooth = [t for t in judged if t["r2"] >= threshold]
    parts = []
    for coefficient in ("alpha", "beta"):
        for against in ("params", "train_pairs"):
            group = [t for t in judged if t["coefficient"] == coefficient and t["against"] == against]
            if group:
                good = sum(t["r2"] >= threshold for t in group)
                parts.append(f"{coefficient} vs log {against}: {good} of {len(group)} lines with R² ≥ {threshold}")
    verdict = ("The log-linear trend appears" if len(smooth) == len(judged) else
               "The smooth log-linear trend does NOT appear on this testbed" if len(smooth) <= len(judged) / 2 else
               "The log-linear trend appears only in part")
    return f"{verdict} ({'; '.join(parts)})."


def _figure(nrows: int, ncols: int, width: float, height: float):
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [[fig.add_subplot(nrows, ncols, r * ncols + c + 1) for c in range(ncols)] for r in range(nrows)]


def plot_cells(results: dict[str, Any], rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Gold gain against sqrt(KL): one panel per proxy size, one colour per data size, observed
    points joined by lines and the fitted R_bon dashed (extended to the predicted peak if within 2x)."""
    cells = results["cells"]
    sizes = list(dict.fromkeys(_size(c) for c in cells))
    pairs = sorted({c["train_pairs"] for c in cells})
    cmap = colormaps["viridis"]
    colour = {p: cmap(i / max(1, len(pairs) - 1) * 0.9) for i, p in enumerate(pairs)}
    fig, axes = _figure(1, len(sizes), 4.2 * len(sizes) + 0.5, 4.2)
    by_label: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_label.setdefault(r["aggregator"], []).append(r)
    for ax, size in zip(axes[0], sizes):
        for c in (c for c in cells if _size(c) == size):
            curve = sorted(by_label.get(c["label"], []), key=lambda r: r["n"])
            d = np.array([r["sqrt_kl"] for r in curve])
            gain = np.array([r["gold_score"] - r["gold_score_initial"] for r in curve])
            ax.plot(d, gain, "o-", color=colour[c["train_pairs"]], ms=3.5, lw=1.2,
                    label=f"{c['train_pairs']:,} pairs (acc {_num(c['proxy_val_accuracy_clean'], 2)})")
            if c["alpha"] is not None and len(d):
                top = float(d.max())
                if c["peak_sqrt_kl"] is not None and c["peak_sqrt_kl"] <= 2 * top:
                    top = max(top, c["peak_sqrt_kl"])
                grid = np.linspace(0.0, top, 80)
                ax.plot(grid, grid * (c["alpha"] - c["beta"] * grid), "--", color=colour[c["train_pairs"]], lw=1)
        params = next(c["params"] for c in cells if _size(c) == size)
        ax.set_title(f"{size} ({params:,} params)")
        ax.axhline(0.0, color="0.7", lw=0.8)
        ax.set_xlabel("sqrt(KL_bon) [sqrt nats]")
        ax.set_ylabel("gold gain over the pool mean")
        ax.legend(fontsize=7)
    fig.suptitle("Best-of-n gold per proxy (points) and Gao's form d(α − βd) (dashed)")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI)
    return out


def plot_trends(results: dict[str, Any], path: str | Path) -> Path:
    """alpha (top) and beta (bottom) against log params (left, one line per data size) and against
    log pairs (right, one line per proxy size), each with its fitted log-linear line and R²."""
    cells = [c for c in results["cells"] if c["alpha"] is not None]
    fig, axes = _figure(2, 2, 10.0, 7.5)
    for col, (against, held, xlabel) in enumerate((
            ("params", lambda c: f"train_pairs={c['train_pairs']}", "proxy parameters"),
            ("train_pairs", lambda c: f"size={_size(c)}", "training pairs"))):
        groups = list(dict.fromkeys(held(c) for c in cells))
        cmap = colormaps["tab10"]
        for row, coefficient in enumerate(("alpha", "beta")):
            ax = axes[row][col]
            for i, at in enumerate(groups):
                group = sorted((c for c in cells if held(c) == at), key=lambda c: c[against])
                x = np.array([c[against] for c in group], dtype=float)
                y = np.array([c[coefficient] for c in group], dtype=float)
                line = next((t for t in results["trends"] if t["coefficient"] == coefficient
                             and t["against"] == against and t["at"] == at), None)
                label = at if line is None else f"{at}: b={_num(line['slope_per_decade'])}, R²={_num(line['r2'], 2)}"
                ax.plot(x, y, "o", color=cmap(i % 10), label=label)
                if line is not None:
                    xs = np.geomspace(x.min(), x.max(), 30)
                    ax.plot(xs, line["intercept"] + line["slope_per_decade"] * np.log10(xs), "-", color=cmap(i % 10),
                            lw=1)
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("α" if coefficient == "alpha" else "β")
            ax.legend(fontsize=7)
    fig.suptitle("Gao's best-of-n coefficients against log proxy size and log data size")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI)
    return out


def write_scaling_report(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """table.md, trends.md, gold_vs_sqrt_kl.png and trends.png of a scaling_law run; returns the paths."""
    results, rows = load_scaling(run_dir)
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(cells_markdown(results), encoding="utf-8")
    (out / "trends.md").write_text(trends_markdown(results), encoding="utf-8")
    return [out / "table.md", out / "trends.md", plot_cells(results, rows, out / "gold_vs_sqrt_kl.png"),
            plot_trends(results, out / "trends.png")]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.scaling", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a scaling_law run directory")
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        paths = write_scaling_report(args.run_dir, args.out)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print((Path(paths[0])).read_text(encoding="utf-8"))
    print(Path(paths[1]).read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
