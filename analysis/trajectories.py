"""RL runs side by side at the same distance from the initial policy, drawn as trajectories.

Command line::

    python -m analysis.trajectories RUN_DIR [RUN_DIR ...] --out FIGURE.png [--at 4 8 12] [--table TABLE.md]

RL runs move away from the initial policy as they train, but not monotonically (under a KL
penalty d = sqrt(KL) can rise and fall), so each run is drawn as its trajectory in training
order with step markers — gold and proxy against d, and gold against the step — and every number
of the table is defined on training order:

- peak: the largest gold of the run, with its d and step;
- final: the last evaluation's gold and d; drop = peak - final;
- gold at d = x: gold where the trajectory first reaches d = x (linear between the two
  evaluations around the crossing), so methods are compared at the same KL budget; "—" when the
  run never got that far.

Gold and proxy are relative to the initial policy (analysis.load). Reads run directories only.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from analysis.load import Curve, RunDirError, load_for_cli, load_runs
from rlhf_overopt.config.methods import fit_form


def gold_at_distance(curve: Curve, d: float) -> float | None:
    """Gold where the training-order trajectory first reaches sqrt(KL) = d (linear between the
    two evaluations around the crossing); None when it never does."""
    order = np.argsort(curve.step, kind="stable")
    x, y = curve.sqrt_kl[order], curve.gold[order]
    for i in range(1, len(x)):
        if x[i - 1] < d <= x[i]:
            w = (d - x[i - 1]) / (x[i] - x[i - 1])
            return float(y[i - 1] + w * (y[i] - y[i - 1]))
    return float(y[0]) if len(x) and x[0] >= d else None


def summary_row(curve: Curve, at: Sequence[float]) -> dict[str, object]:
    """Peak, final, drop (training order) and gold at each distance in `at`."""
    order = np.argsort(curve.step, kind="stable")
    gold, d, step = curve.gold[order], curve.sqrt_kl[order], curve.step[order]
    peak = int(np.argmax(gold))
    return {"run": curve.run_dir.name, "method": curve.method, "aggregator": curve.aggregator,
            "peak": float(gold[peak]), "d_peak": float(d[peak]), "step_peak": int(step[peak]),
            "final": float(gold[-1]), "d_final": float(d[-1]), "drop": float(gold[peak] - gold[-1]),
            "proxy_final": float(curve.proxy[order][-1]),
            **{f"gold_at_{x:g}": gold_at_distance(curve, x) for x in at}}


def markdown(rows: Sequence[dict[str, object]], at: Sequence[float]) -> str:
    def num(v: object, fmt: str = "+.2f") -> str:
        return "—" if v is None else format(v, fmt)

    head = ("| run | peak gold (d, step) | final gold (d) | drop | proxy at the end | "
            + " | ".join(f"gold at d = {x:g}" for x in at) + " |")
    lines = [head, "|" + "---|" * (5 + len(at))]
    for r in rows:
        lines.append(f"| {r['run']} | {num(r['peak'])} ({r['d_peak']:.1f}, {r['step_peak']}) | "
                     f"{num(r['final'])} ({r['d_final']:.1f}) | {r['drop']:.2f} | {num(r['proxy_final'])} | "
                     + " | ".join(num(r[f"gold_at_{x:g}"]) for x in at) + " |")
    return "\n".join(lines) + "\n"


def plot(curves: Sequence[Curve], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    styles = {m: s for m, s in zip(sorted({c.method for c in curves}), ("-", "--", ":", "-."))}
    colors = {a: f"C{i}" for i, a in enumerate(sorted({str(c.aggregator) for c in curves}))}
    for c in curves:
        order = np.argsort(c.step, kind="stable")
        kw = {"linestyle": styles[c.method], "color": colors[str(c.aggregator)], "marker": "o", "markersize": 3,
              "label": f"{c.method} {c.aggregator}"}
        axes[0].plot(c.sqrt_kl[order], c.gold[order], **kw)
        axes[1].plot(c.sqrt_kl[order], c.proxy[order], **kw)
        axes[2].plot(c.step[order], c.gold[order], **kw)
    for ax, (x, y) in zip(axes, (("sqrt(KL(pi || pi_init))", "gold - initial"),
                                  ("sqrt(KL(pi || pi_init))", "proxy (optimized objective) - initial"),
                                  ("training step", "gold - initial"))):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.axhline(0, color="grey", linewidth=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_title("gold along each run (step markers, training order)")
    axes[1].set_title("proxy along each run")
    axes[2].set_title("gold against training step")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.trajectories", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories or sweep folders")
    parser.add_argument("--out", required=True, help="figure path (.png)")
    parser.add_argument("--at", nargs="*", type=float, default=[4.0, 8.0], help="distances d to compare gold at")
    parser.add_argument("--table", default="", help="also write the markdown table here")
    args = parser.parse_args(argv)
    curves = load_for_cli(lambda: load_runs(args.runs), (RunDirError,))
    if curves is None:
        return 2
    curves = [c for c in curves if fit_form(c.method) != "bon"]  # best-of-n curves have no trajectory
    if not curves:
        print("no RL curves among the runs", file=sys.stderr)
        return 2
    plot(curves, Path(args.out))
    text = markdown([summary_row(c, args.at) for c in curves], args.at)
    if args.table:
        Path(args.table).write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
