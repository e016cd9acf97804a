"""Runs that differ only by seed, pooled: mean, standard deviation and a 95% bootstrap interval of
each quantity over seeds, per evaluation point and for the run-level numbers (peak gold, d at the
peak, final gold, drop, gold at a matched distance).

One seed is a sample: an RL run's curve moves with the seed of its proxies, rollouts and
evaluation draws, so each number is stated with its spread and interval over seeds. These describe
one arm; two arms are compared by analysis.stats (per-seed differences where the runs provably share a
seed's proxies, initial policy and prompts, Welch otherwise), never by whether their intervals overlap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from analysis.load import Curve
from analysis.trajectories import summary_row


def bootstrap_interval(values: Sequence[float], *, level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement, a fixed
    generator so a table is reproducible). One value gives (value, value)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 1:
        return float(x[0]), float(x[0])
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


@dataclass(frozen=True)
class Pooled:
    """A quantity over seeds."""

    values: tuple[float, ...]
    mean: float
    std: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Pooled:
        x = np.asarray(values, dtype=np.float64)
        lo, hi = bootstrap_interval(x)
        return cls(tuple(float(v) for v in x), float(x.mean()), float(x.std(ddof=1)) if len(x) > 1 else 0.0, lo, hi)

    def text(self, fmt: str = "+.2f") -> str:
        if len(self.values) == 1:
            return format(self.mean, fmt)
        return f"{self.mean:{fmt}} ± {self.std:.2f} [{self.low:{fmt}}, {self.high:{fmt}}]"


def group_by_setting(curves: Sequence[Curve]) -> dict[tuple[str, str], list[Curve]]:
    """(method, aggregator) -> the curves of every seed, in seed order."""
    groups: dict[tuple[str, str], list[Curve]] = {}
    for c in sorted(curves, key=lambda c: (c.method, str(c.aggregator), c.seed if c.seed is not None else -1)):
        groups.setdefault((c.method, str(c.aggregator)), []).append(c)
    return groups


def pooled_summary(curves: Sequence[Curve], at: Sequence[float]) -> dict[str, Pooled | None]:
    """Run-level numbers (analysis.trajectories.summary_row) pooled over the seeds' curves; a
    gold-at-d entry is None when some seed never reached that distance."""
    rows = [summary_row(c, at) for c in curves]
    out: dict[str, Pooled | None] = {}
    for key in ("peak", "d_peak", "final", "d_final", "drop", "proxy_final", *(f"gold_at_{x:g}" for x in at)):
        values = [r[key] for r in rows]
        out[key] = None if any(v is None for v in values) else Pooled.of(values)
    return out


def pooled_curve(curves: Sequence[Curve], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, std) over seeds of a per-point quantity ('gold', 'proxy', 'sqrt_kl') at the
    evaluation steps every seed has."""
    common = sorted(set.intersection(*(set(c.step.tolist()) for c in curves)))
    stacked = np.stack([[getattr(c, key)[list(c.step).index(s)] for s in common] for c in curves])
    std = stacked.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(common))
    return np.asarray(common), stacked.mean(axis=0), std
