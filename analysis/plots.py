"""Figures of gold and proxy score against d = sqrt(KL(pi || pi_init)), saved as PNG.

Uses matplotlib's object-oriented API on the Agg canvas (no pyplot, no global figure state),
so it works headless and leaks no figures. Colours are assigned per aggregator so that the
same aggregator has the same colour in every figure of a report.

- :func:`plot_method_curves`: one method; gold (left, solid) and proxy (right, dashed) against
  d, one colour per aggregator, optional fitted Gao et al. (2022) forms dotted.
- :func:`plot_frontier`: one method's sweep; gold and proxy of every run against d, each run's
  gold peak and final point (training order), per aggregator the frontier of best gold within a KL
  budget through those points, and a pooled fit.
- :func:`plot_member_spread`: one curve; each ensemble member's proxy score against d.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.fit import bon_form, kl_gold_frontier, rl_form
from analysis.load import Curve, run_frontier

X_LABEL = "sqrt(KL(π‖π_init)) [sqrt nats]"
GOLD_LABEL = "gold score (relative to initial policy)"
PROXY_LABEL = "proxy score (relative to initial policy)"
MEMBER_LABEL = "proxy member score (raw)"

FittedForm = tuple[str, float, float]
"""(form, alpha, beta) with form "bon" or "rl": a fitted Gao et al. (2022) curve."""

_FORMS = {"bon": bon_form, "rl": rl_form}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
_DPI = 110


def aggregator_colors(curves: Sequence[Curve]) -> dict[str | None, Any]:
    """Map each aggregator (in order of first appearance) to a colour of the tab10/tab20 cycle."""
    names: list[str | None] = []
    for curve in curves:
        if curve.aggregator not in names:
            names.append(curve.aggregator)
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _new_figure(ncols: int, width: float) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(width, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig: Figure, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=_DPI)
    return out


def _marker_per_curve(curves: Sequence[Curve]) -> list[str]:
    """Distinct markers for curves that share an aggregator (e.g. a kl_coef sweep)."""
    seen: dict[str | None, int] = {}
    markers = []
    for curve in curves:
        index = seen.get(curve.aggregator, 0)
        seen[curve.aggregator] = index + 1
        markers.append(_MARKERS[index % len(_MARKERS)])
    return markers


def plot_method_curves(
    curves: Sequence[Curve],
    path: str | Path,
    *,
    fits: Sequence[FittedForm | None] | None = None,
    title: str | None = None,
) -> Path:
    """Gold (left, solid) and proxy (right, dashed) against sqrt(KL) for the curves of one method.

    Args:
        curves: the curves to draw (normally all of one method).
        path: PNG file to write; parent folders are created.
        fits: optional fitted form per curve (aligned with ``curves``), drawn dotted on the
            gold panel from d = 0 to the curve's largest d.
        title: figure title; defaults to the method names of the curves.

    Returns:
        The path written.
    """
    if fits is not None and len(fits) != len(curves):
        raise ValueError("fits must have one entry (or None) per curve")
    colors = aggregator_colors(curves)
    markers = _marker_per_curve(curves)
    fig, (ax_gold, ax_proxy) = _new_figure(2, 12.0)
    for i, curve in enumerate(curves):
        color = colors[curve.aggregator]
        ax_gold.plot(
            curve.sqrt_kl,
            curve.gold,
            "-",
            marker=markers[i],
            markersize=3.5,
            color=color,
            label=curve.label,
        )
        stderr = curve.gold_stderr
        if np.any(np.isfinite(stderr)):
            ax_gold.fill_between(
                curve.sqrt_kl,
                curve.gold - stderr,
                curve.gold + stderr,
                color=color,
                alpha=0.15,
                linewidth=0,
            )
        ax_proxy.plot(
            curve.sqrt_kl,
            curve.proxy,
            "--",
            marker=markers[i],
            markersize=3.5,
            color=color,
            label=curve.label,
        )
        fitted = fits[i] if fits is not None else None
        if fitted is not None and np.any(np.isfinite(curve.sqrt_kl)):
            form, alpha, beta = fitted
            grid = np.linspace(0.0, float(np.nanmax(curve.sqrt_kl)), 200)
            ax_gold.plot(
                grid,
                _FORMS[form](grid, alpha, beta),
                ":",
                color=color,
                linewidth=1.5,
            )
    if fits is not None and any(f is not None for f in fits):
        ax_gold.plot([], [], ":", color="0.4", label="fitted Gao et al. form")
    methods = sorted({c.method for c in curves})
    fig.suptitle(title or f"{', '.join(methods)}: gold and proxy vs sqrt(KL)")
    ax_gold.set_title("gold (solid; fitted form dotted)")
    ax_proxy.set_title("proxy objective (dashed)")
    ax_gold.set_ylabel(GOLD_LABEL)
    ax_proxy.set_ylabel(PROXY_LABEL)
    for ax in (ax_gold, ax_proxy):
        ax.set_xlabel(X_LABEL)
        ax.axhline(0.0, color="0.6", linewidth=0.8)
        ax.grid(alpha=0.3)
    ax_gold.legend(fontsize=7, loc="best")
    return _save(fig, path)


def plot_frontier(
    curves: Sequence[Curve],
    path: str | Path,
    *,
    fits: Mapping[str | None, FittedForm] | None = None,
    title: str | None = None,
) -> Path:
    """Gold (left) and proxy (right) against sqrt(KL) for every run of one method, by aggregator.

    Left panel: each run (aggregator x kl_coef/beta x seed) is a thin line with its points in
    training order, a star at its gold peak and a square at its final point; per aggregator a
    thick step line joins the frontier points, the best peak or final gold any run of that
    aggregator reached at or below each KL (see :func:`analysis.load.run_frontier` and
    :func:`analysis.fit.kl_gold_frontier`); optional fitted forms per aggregator (e.g. a
    fit pooled over the aggregator's runs) are drawn dotted. Right panel: each run's aggregated
    proxy objective, dashed, in the same colours, so that a proxy that keeps rising where gold
    turns down is seen at the same d.

    Args:
        curves: the curves of one method.
        path: PNG file to write; parent folders are created.
        fits: aggregator -> (form, alpha, beta) drawn on the gold panel.
        title: figure title; defaults to the method names.

    Returns:
        The path written.
    """
    colors = aggregator_colors(curves)
    markers = _marker_per_curve(curves)
    fig, (ax, ax_proxy) = _new_figure(2, 13.0)
    for i, curve in enumerate(curves):
        color = colors[curve.aggregator]
        ax.plot(
            curve.sqrt_kl,
            curve.gold,
            "-",
            marker=markers[i],
            markersize=3,
            linewidth=0.8,
            alpha=0.55,
            color=color,
        )
        ax_proxy.plot(
            curve.sqrt_kl,
            curve.proxy,
            "--",
            marker=markers[i],
            markersize=3,
            linewidth=0.9,
            alpha=0.7,
            color=color,
            label=curve.label,
        )
        ends = curve.end_points()
        if ends is not None:
            ax.plot(ends["sqrt_kl_at_peak"], ends["peak_gold"], "*", markersize=11, color=color,
                    markeredgecolor="black", markeredgewidth=0.6)
            ax.plot(ends["final_sqrt_kl"], ends["final_gold"], "s", markersize=6, color=color,
                    markeredgecolor="black", markeredgewidth=0.6)
    for aggregator, color in colors.items():
        group = [c for c in curves if c.aggregator == aggregator]
        d = np.concatenate([c.sqrt_kl for c in group])
        # the frontier runs through each run's peak and final point in training order, not every point
        # of its path: under a KL penalty a run's KL rises and comes back, and the points it passed
        # on the way out are not where the run ends
        front_d, front_gold = run_frontier(group)
        front = kl_gold_frontier(front_d, front_gold)
        if front.size:
            xs = np.append(front_d[front], np.nanmax(d))
            ys = np.append(front_gold[front], front_gold[front][-1])
            ax.step(
                xs,
                ys,
                where="post",
                color=color,
                linewidth=2.4,
                label=f"{aggregator if aggregator is not None else 'single'} "
                f"({len(group)} run{'s' if len(group) != 1 else ''})",
            )
        fitted = (fits or {}).get(aggregator)
        if fitted is not None and np.any(np.isfinite(d)):
            form, alpha, beta = fitted
            grid = np.linspace(0.0, float(np.nanmax(d)), 200)
            ax.plot(grid, _FORMS[form](grid, alpha, beta), ":", color=color, linewidth=1.6)
    ax.plot([], [], "*", color="0.5", markeredgecolor="black", label="gold peak of a run")
    ax.plot([], [], "s", color="0.5", markeredgecolor="black", label="final point of a run (training order)")
    if fits:
        ax.plot([], [], ":", color="0.4", label="fitted Gao et al. form (pooled runs)")
    methods = sorted({c.method for c in curves})
    fig.suptitle(title or f"{', '.join(methods)}: gold and proxy vs sqrt(KL), every run")
    ax.set_title("gold (thick: best run peak or end within a KL budget)")
    ax_proxy.set_title("proxy objective (dashed)")
    ax.set_ylabel(GOLD_LABEL)
    ax_proxy.set_ylabel(PROXY_LABEL)
    for axis in (ax, ax_proxy):
        axis.set_xlabel(X_LABEL)
        axis.axhline(0.0, color="0.6", linewidth=0.8)
        axis.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if len(curves) <= 24:
        ax_proxy.legend(fontsize=6, loc="best", ncol=2 if len(curves) > 8 else 1)
    return _save(fig, path)


def plot_member_spread(curve: Curve, path: str | Path, *, title: str | None = None) -> Path:
    """Each proxy ensemble member's raw score against sqrt(KL) for one curve.

    Members are thin lines over a shaded min-max band; the aggregated proxy objective (raw) is
    the thick black dashed line. A widening band is the ensemble disagreement that conservative
    aggregators penalise (Coste et al. 2023; Eisenstein et al. 2023).

    Returns:
        The path written.
    """
    fig, (ax,) = _new_figure(1, 8.0)
    members = curve.member_scores
    if members.shape[1] > 0:
        ax.fill_between(
            curve.sqrt_kl,
            np.nanmin(members, axis=1),
            np.nanmax(members, axis=1),
            color="tab:blue",
            alpha=0.15,
            linewidth=0,
            label="member min-max",
        )
        cmap = colormaps["viridis"]
        k = members.shape[1]
        for j in range(k):
            ax.plot(
                curve.sqrt_kl,
                members[:, j],
                "-",
                marker="o",
                markersize=2.5,
                linewidth=1.0,
                color=cmap(j / max(k - 1, 1)),
                label=f"member {j}",
            )
    ax.plot(
        curve.sqrt_kl,
        curve.proxy_raw,
        "--",
        color="black",
        linewidth=2.0,
        label=f"aggregated ({curve.aggregator or 'single'})",
    )
    ax.set_title(title or f"{curve.method} {curve.label}: proxy ensemble members")
    ax.set_xlabel(X_LABEL)
    ax.set_ylabel(MEMBER_LABEL)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, path)
