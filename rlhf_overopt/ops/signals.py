"""Overoptimization signals computed on an evaluation's policy samples (pure tensor functions).

    member_std      ensemble disagreement: population std across proxy members, per sample
                    (Coste et al. 2023; Eisenstein et al. 2023)
    spearman        rank correlation of the aggregated proxy and gold over the samples: how well
                    the proxy still orders what the policy produces

Each is logged against sqrt(KL) at every evaluation (rlhf_overopt.evaluate), to ask whether it
moves before gold peaks (an early warning) or only with it (an audit).
"""

import math

import torch


def member_std(proxy_scores: torch.Tensor) -> torch.Tensor:
    """Population standard deviation across members, `sqrt((1/K) sum_i (R_i - mean)^2)`.

    proxy_scores: (K, B). Returns (B,).
    """
    if proxy_scores.dim() != 2:
        raise ValueError(f"proxy_scores must be 2-D (K, B), got shape {tuple(proxy_scores.shape)}")
    return proxy_scores.std(dim=0, unbiased=False)


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of x, tied values sharing the mean of the ranks they occupy.

    E.g. [10, 20, 20, 30] -> [1, 2.5, 2.5, 4] (scipy.stats.rankdata's "average" method).
    x: (n,). Returns (n,) float64.
    """
    if x.dim() != 1:
        raise ValueError(f"x must be 1-D, got shape {tuple(x.shape)}")
    n = x.shape[0]
    order = torch.argsort(x, stable=True)
    ordered = x[order]
    ranks = torch.empty(n, dtype=torch.float64)
    start = 0
    while start < n:
        end = start + 1
        while end < n and ordered[end] == ordered[start]:
            end += 1
        # positions start..end-1 (0-based) hold ranks start+1..end: their mean is (start + end + 1) / 2
        ranks[order[start:end]] = (start + end + 1) / 2
        start = end
    return ranks


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks of x and y.

    `rho = cov(rank x, rank y) / (std(rank x) std(rank y))`, ties given their average rank
    (Spearman 1904; with ties this is the tie-corrected coefficient, as scipy.stats.spearmanr).
    NaN when n < 2 or either side is constant (no ordering to compare).
    x, y: (n,). Returns a float in [-1, 1] or NaN.
    """
    if x.shape != y.shape or x.dim() != 1:
        raise ValueError(f"x and y must be 1-D of one length, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] < 2:
        return math.nan
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = float((rx.pow(2).sum() * ry.pow(2).sum()).sqrt())
    if denom == 0.0:
        return math.nan
    return max(-1.0, min(1.0, float((rx * ry).sum()) / denom))
