"""Scaling-law math for Gao, Schulman & Hilton (2022), §3.2 (Fig. 3-4): Gao's best-of-n form fitted
per proxy, its predicted peak, and log-linear trends of its coefficients in proxy size and data size.

With d = sqrt(KL(pi_bon || pi_init)) and gold measured relative to the initial policy (R(0) = 0),
the best-of-n form is `R_bon(d) = d (alpha - beta d)` (Gao et al. 2022, eq. 1); Gao et al. report
that alpha and beta vary smoothly, about linearly in log(parameter count) and log(data size).
Everything here is pure: tensors or floats in, floats out; least squares in float64 with
`torch.linalg.lstsq`, exact (no iterative fit). analysis/ fits best-of-n curves with these too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch


class BonFit(NamedTuple):
    """Gao's best-of-n form fitted to one curve."""

    alpha: float
    beta: float
    r2: float
    """Coefficient of determination of the fit on the points used (NaN for constant gold)."""


class LogLinearFit(NamedTuple):
    """y = a + b log10(x) fitted by least squares."""

    a: float
    """Intercept: y at x = 1."""
    b: float
    """Slope: change of y per tenfold x."""
    r2: float
    """Coefficient of determination (1 for two points; NaN for constant y)."""


def _as_float64(values: Sequence[float] | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} has a non-finite value")
    return t


def r_squared(y: torch.Tensor, predicted: torch.Tensor) -> float:
    """R^2 = 1 - SS_res / SS_tot, SS_res = sum (y - predicted)^2, SS_tot = sum (y - mean y)^2.

    NaN when SS_tot = 0 (constant y). y, predicted: (T,).
    """
    ss_res = float(((y - predicted) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return math.nan if ss_tot == 0.0 else 1.0 - ss_res / ss_tot


def _lstsq(basis: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    """argmin_c ||basis @ c - y||^2 for a (T, 2) basis of rank 2."""
    if basis.shape[0] < 2 or int(torch.linalg.matrix_rank(basis)) < 2:
        raise ValueError(f"{name}: the two coefficients are not identifiable from these {basis.shape[0]} point(s)")
    return torch.linalg.lstsq(basis, y[:, None], driver="gelsd").solution[:, 0]


def fit_bon_form(d: Sequence[float] | torch.Tensor, r: Sequence[float] | torch.Tensor, *,
                 nonfinite: Literal["raise", "skip"] = "raise") -> BonFit:
    """Fit R_bon(d) = d (alpha - beta d) = alpha d - beta d^2 (Gao et al. 2022, eq. 1).

    The one best-of-n fitter (the scaling-law driver and analysis/ both call it). The form is linear
    in (alpha, beta), so its least-squares fit is exact linear least squares on the basis (d, -d^2)
    (`torch.linalg.lstsq`, float64): a unique minimiser, no starting point or tolerance, which an
    iterative curve fit would only approach. No intercept, since R(0) = 0 by construction.
    d: (T,) sqrt(KL) >= 0; r: (T,) gold relative to the initial policy (for best-of-n: gold at n
    minus the pool's mean gold, which is gold at n = 1).
    nonfinite: a point whose d or r is NaN or inf raises ValueError ("raise": a curve this run just
    computed must be finite) or is left out of the fit and of R^2 ("skip": curves read back from
    run directories, where a missing value is a hole, not an error).
    Raises ValueError with fewer than two distinct non-zero d values among the points used.
    """
    if nonfinite not in ("raise", "skip"):
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
    d_t = torch.as_tensor(d, dtype=torch.float64).reshape(-1)
    r_t = torch.as_tensor(r, dtype=torch.float64).reshape(-1)
    if d_t.shape != r_t.shape:
        raise ValueError(f"d and r differ in length: {d_t.numel()} vs {r_t.numel()}")
    if nonfinite == "skip":
        keep = torch.isfinite(d_t) & torch.isfinite(r_t)
        d_t, r_t = d_t[keep], r_t[keep]
    d_t, r_t = _as_float64(d_t, "d"), _as_float64(r_t, "r")
    if bool((d_t < 0).any()):
        raise ValueError("d = sqrt(KL) must be non-negative")
    coef = _lstsq(torch.stack([d_t, -(d_t**2)], dim=1), r_t, "fit_bon_form")
    alpha, beta = float(coef[0]), float(coef[1])
    return BonFit(alpha, beta, r_squared(r_t, d_t * (alpha - beta * d_t)))


def bon_peak(alpha: float, beta: float) -> float:
    """Distance of the gold peak of R_bon: d* = alpha / (2 beta), from dR/dd = alpha - 2 beta d = 0.

    inf when beta <= 0: the fitted gold never turns down, no peak within the form.
    """
    return alpha / (2.0 * beta) if beta > 0 else math.inf


def bon_peak_gain(alpha: float, beta: float) -> float:
    """Gold gain over the initial policy at the predicted peak: R_bon(d*) = alpha^2 / (4 beta).

    inf when beta <= 0 and alpha > 0 (gold grows without bound within the form); 0 when alpha <= 0 < beta
    (the form peaks at d* <= 0, i.e. best-of-n never helps).
    """
    if beta <= 0:
        return math.inf if alpha > 0 else 0.0
    return alpha * alpha / (4.0 * beta) if alpha > 0 else 0.0


def fit_log_linear(x: Sequence[float] | torch.Tensor, y: Sequence[float] | torch.Tensor) -> LogLinearFit:
    """Fit y = a + b log10(x) by least squares (Gao et al. 2022, §3.2: alpha and beta against
    log RM parameter count and log data size).

    x: (T,) positive; y: (T,). b = cov(log10 x, y) / var(log10 x), a = mean y - b mean log10 x.
    Raises ValueError for a non-positive x or fewer than two distinct x.
    """
    x_t, y_t = _as_float64(x, "x"), _as_float64(y, "y")
    if x_t.shape != y_t.shape:
        raise ValueError(f"x and y differ in length: {x_t.numel()} vs {y_t.numel()}")
    if bool((x_t <= 0).any()):
        raise ValueError("fit_log_linear: x must be positive (it is log-transformed)")
    lx = torch.log10(x_t)
    coef = _lstsq(torch.stack([torch.ones_like(lx), lx], dim=1), y_t, "fit_log_linear")
    a, b = float(coef[0]), float(coef[1])
    return LogLinearFit(a, b, r_squared(y_t, a + b * lx))


def gpt2_reward_parameters(n_layer: int, n_embd: int, vocab_size: int, n_positions: int) -> int:
    """Parameters of a GPT-2 scalar reward model (GPT2ForSequenceClassification, one label):
    the transformer plus a bias-free Linear(d, 1) head, the LM head dropped.

        V d + P d                          token and position embeddings
        + n_layer (12 d^2 + 13 d)          per block: ln_1, ln_2 (2d each), attention c_attn (3d^2 + 3d)
                                           and c_proj (d^2 + d), MLP c_fc (4d^2 + 4d) and c_proj (4d^2 + d)
        + 2 d                              final layer norm
        + d                                reward head
    """
    if min(n_layer, n_embd, vocab_size, n_positions) < 1:
        raise ValueError("gpt2_reward_parameters: every size must be >= 1")
    d = n_embd
    return vocab_size * d + n_positions * d + n_layer * (12 * d * d + 13 * d) + 2 * d + d


def non_embedding_parameters(n_layer: int, n_embd: int) -> int:
    """Parameters outside the embeddings and the head, `n_layer (12 d^2 + 13 d) + 2 d` (Kaplan et al.
    2020 count non-embedding parameters; at the testbed's sizes the embeddings are most of a small model)."""
    return n_layer * (12 * n_embd * n_embd + 13 * n_embd) + 2 * n_embd
