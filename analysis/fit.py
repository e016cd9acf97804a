"""Functional forms of Gao, Schulman & Hilton (2022), their fits, and overoptimization measures.

With d = sqrt(KL(pi || pi_init)) and gold score R measured relative to the initial policy
(so R(0) = 0), Gao et al. (2022, §3, eqs. 1-2) model

    best-of-n:  R_bon(d) = d * (alpha - beta * d)
    RL:         R_rl(d)  = d * (alpha - beta * log d)

Both forms are linear in (alpha, beta), so they are fitted by exact linear least squares
instead of an iterative curve fit: the minimiser of the sum of squared residuals is unique
whenever the two basis columns are linearly independent, and no starting point or convergence
tolerance is involved. The best-of-n fit and its peak are the package's
(:func:`rlhf_overopt.ops.scaling.fit_bon_form`, called with ``nonfinite="skip"``, and
:func:`rlhf_overopt.ops.scaling.bon_peak`); the RL form is fitted here (:func:`numpy.linalg.lstsq`).

All functions here are pure: arrays and scalars in, arrays, scalars or dicts out.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


class FitResult(NamedTuple):
    """Fitted coefficients of a Gao et al. form and the coefficient of determination."""

    alpha: float
    beta: float
    r2: float


def bon_form(d: npt.ArrayLike, alpha: float, beta: float) -> FloatArray:
    """Best-of-n form R_bon(d) = d (alpha - beta d) (Gao et al. 2022, eq. 1)."""
    d_arr = np.asarray(d, dtype=np.float64)
    return d_arr * (alpha - beta * d_arr)


def _d_log_d(d: FloatArray) -> FloatArray:
    """d log d with its limit 0 at d = 0."""
    out = np.zeros_like(d)
    positive = d > 0
    out[positive] = d[positive] * np.log(d[positive])
    return out


def rl_form(d: npt.ArrayLike, alpha: float, beta: float) -> FloatArray:
    """RL form R_rl(d) = d (alpha - beta log d) (Gao et al. 2022, eq. 2), equal to 0 at d = 0."""
    d_arr = np.asarray(d, dtype=np.float64)
    if np.any(d_arr < 0):
        raise ValueError("rl_form: d = sqrt(KL) must be non-negative")
    return alpha * d_arr - beta * _d_log_d(d_arr)


def _clean(d: npt.ArrayLike, r: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
    d_arr = np.asarray(d, dtype=np.float64).ravel()
    r_arr = np.asarray(r, dtype=np.float64).ravel()
    if d_arr.shape != r_arr.shape:
        raise ValueError(f"d and r differ in length: {d_arr.size} vs {r_arr.size}")
    keep = np.isfinite(d_arr) & np.isfinite(r_arr)
    d_arr, r_arr = d_arr[keep], r_arr[keep]
    if np.any(d_arr < 0):
        raise ValueError("d = sqrt(KL) must be non-negative")
    return d_arr, r_arr


def r_squared(r: npt.ArrayLike, predicted: npt.ArrayLike) -> float:
    """Coefficient of determination R^2 = 1 - SS_res / SS_tot.

    SS_res = sum (r - predicted)^2 and SS_tot = sum (r - mean r)^2. NaN when SS_tot = 0
    (constant data). Can be negative: the Gao forms have no intercept.
    """
    r_arr = np.asarray(r, dtype=np.float64)
    pred = np.asarray(predicted, dtype=np.float64)
    ss_res = float(np.sum((r_arr - pred) ** 2))
    ss_tot = float(np.sum((r_arr - r_arr.mean()) ** 2))
    if ss_tot == 0.0:
        return math.nan
    return 1.0 - ss_res / ss_tot


def _fit_linear(basis: FloatArray, r: FloatArray, name: str) -> tuple[float, float]:
    """Solve min ||basis @ [alpha, beta] - r||^2 exactly; basis is (T, 2)."""
    if basis.shape[0] < 2:
        raise ValueError(f"{name}: need at least 2 finite points, got {basis.shape[0]}")
    coef, _, rank, _ = np.linalg.lstsq(basis, r, rcond=None)
    if rank < 2:
        raise ValueError(f"{name}: alpha and beta are not identifiable from these d values")
    return float(coef[0]), float(coef[1])


def fit_rl(d: npt.ArrayLike, r: npt.ArrayLike) -> FitResult:
    """Fit R_rl(d) = d (alpha - beta log d) = alpha d - beta d log d (Gao et al. 2022, eq. 2).

    Exact linear least squares on the basis columns (d, -d log d) with numpy.linalg.lstsq.
    At d = 0 the form is 0 (d log d -> 0), so d = 0 rows enter with an all-zero basis row:
    they count towards the residual and R^2 but do not move alpha or beta. Points with a
    non-finite d or r are ignored.

    Args:
        d: (T,) sqrt(KL) of each point, >= 0.
        r: (T,) gold score relative to the initial policy.

    Returns:
        (alpha, beta, r2) with r2 = 1 - SS_res/SS_tot of the fitted form on the used points.

    Raises:
        ValueError: fewer than 2 usable points, or d values that do not identify both
            coefficients (e.g. all d in {0, 1}, where d log d = 0).
    """
    d_arr, r_arr = _clean(d, r)
    alpha, beta = _fit_linear(np.column_stack([d_arr, -_d_log_d(d_arr)]), r_arr, "fit_rl")
    return FitResult(alpha, beta, r_squared(r_arr, rl_form(d_arr, alpha, beta)))


def predicted_peak_rl(alpha: float, beta: float) -> float:
    """Distance of the gold peak of R_rl: d* = exp(alpha / beta - 1).

    From dR/dd = alpha - beta (log d + 1) = 0. Returns inf when beta <= 0 (no peak) or when
    the exponential overflows.
    """
    if beta <= 0:
        return math.inf
    try:
        return math.exp(alpha / beta - 1.0)
    except OverflowError:
        return math.inf


def overoptimization_measures(
    d: npt.ArrayLike,
    gold: npt.ArrayLike,
    proxy: npt.ArrayLike,
    *,
    budget: npt.ArrayLike | None = None,
    gold_initial: float = 0.0,
) -> dict[str, float]:
    """Summarise one gold/proxy curve: where gold peaks and how far it falls afterwards.

    Points whose d or gold is not finite are ignored. The "largest budget" point is the one
    with the largest ``budget`` (n for best-of-n, step for RL); by default the largest d.
    Ties for the peak go to the first point in the given order.

    Args:
        d: (T,) sqrt(KL) of each point.
        gold: (T,) gold score, normally relative to the initial policy.
        proxy: (T,) aggregated proxy score.
        budget: (T,) optimization budget of each point; defaults to ``d``.
        gold_initial: gold score of the initial policy on the same scale as ``gold``
            (0 when gold is already relative to it).

    Returns:
        peak_gold: max gold.
        sqrt_kl_at_peak, kl_at_peak (= d^2), proxy_at_peak: at the gold peak.
        final_gold, final_sqrt_kl, final_proxy: at the largest budget.
        drop_from_peak: peak_gold - final_gold (>= 0).
        drop_from_peak_rel: drop_from_peak / (peak_gold - gold_initial), the share of the gain
            over the initial policy that was lost; NaN when the peak is no gain.

    Raises:
        ValueError: no usable point, or arrays of different lengths.
    """
    d_arr = np.asarray(d, dtype=np.float64).ravel()
    gold_arr = np.asarray(gold, dtype=np.float64).ravel()
    proxy_arr = np.asarray(proxy, dtype=np.float64).ravel()
    budget_arr = d_arr if budget is None else np.asarray(budget, dtype=np.float64).ravel()
    if not (d_arr.size == gold_arr.size == proxy_arr.size == budget_arr.size):
        raise ValueError("d, gold, proxy and budget must have the same length")
    keep = np.isfinite(d_arr) & np.isfinite(gold_arr)
    if not np.any(keep):
        raise ValueError("overoptimization_measures: no point with finite d and gold")
    d_arr, gold_arr = d_arr[keep], gold_arr[keep]
    proxy_arr, budget_arr = proxy_arr[keep], budget_arr[keep]

    peak = int(np.argmax(gold_arr))
    # Last occurrence of the largest budget: a later re-evaluation at the same budget wins.
    final = int(len(budget_arr) - 1 - np.argmax(budget_arr[::-1]))
    peak_gold = float(gold_arr[peak])
    final_gold = float(gold_arr[final])
    drop = peak_gold - final_gold
    gain = peak_gold - gold_initial
    return {
        "peak_gold": peak_gold,
        "sqrt_kl_at_peak": float(d_arr[peak]),
        "kl_at_peak": float(d_arr[peak] ** 2),
        "proxy_at_peak": float(proxy_arr[peak]),
        "final_gold": final_gold,
        "final_sqrt_kl": float(d_arr[final]),
        "final_proxy": float(proxy_arr[final]),
        "drop_from_peak": drop,
        "drop_from_peak_rel": drop / gain if gain > 0 else math.nan,
    }


def kl_gold_frontier(d: npt.ArrayLike, gold: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """Indices of the points on the upper-left frontier of (d, gold), ordered by d.

    A point is on the frontier when no other point reaches at least its gold at a smaller or
    equal d: the best gold attainable within a KL budget, read across the runs of a sweep.
    Non-finite points are ignored.
    """
    d_arr = np.asarray(d, dtype=np.float64).ravel()
    gold_arr = np.asarray(gold, dtype=np.float64).ravel()
    candidates = np.flatnonzero(np.isfinite(d_arr) & np.isfinite(gold_arr))
    # Sort by d ascending, then gold descending, so that of equal-d points the best comes first.
    order = candidates[np.lexsort((-gold_arr[candidates], d_arr[candidates]))]
    frontier: list[int] = []
    best = -math.inf
    for index in order:
        if gold_arr[index] > best:
            frontier.append(int(index))
            best = float(gold_arr[index])
    return np.array(frontier, dtype=np.int64)

