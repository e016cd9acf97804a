"""Ensemble aggregation: combine K proxy reward scores into one objective, `(K, B) -> (B,)`.

Every method (PPO, best-of-n, DPO/MADPO margins, evaluation) aggregates through `aggregate` or
`aggregator`, so the rule that was optimized is named by one string everywhere (the `aggregator`
key in curves). `aggregator(name, ...)` builds the rule once as a `(K, B) -> (B,)` function, for
callers that apply it to many batches; `aggregate` builds and applies it in one call.
"""

import math
from collections.abc import Callable

import torch

AGGREGATOR_NAMES: tuple[str, ...] = ("mean", "wco", "uwo", "median", "mean_minus_std")
"""The fixed aggregator names; `member_<i>` (a single ensemble member) is accepted in addition."""

_VARIANCE_KINDS = ("population", "sample")


def _check_scores(proxy_scores: torch.Tensor) -> None:
    if proxy_scores.dim() != 2:
        raise ValueError(f"proxy_scores must be 2-D (K, B), got shape {tuple(proxy_scores.shape)}")
    if proxy_scores.shape[0] < 1:
        raise ValueError("proxy_scores must have at least one ensemble member (K >= 1)")


def _ensemble_var(proxy_scores: torch.Tensor, variance: str) -> torch.Tensor:
    """Variance across members, population (divide by K) or sample (divide by K - 1).

    proxy_scores: (K, B). Returns (B,).
    """
    if variance not in _VARIANCE_KINDS:
        raise ValueError(f"variance must be one of {_VARIANCE_KINDS}, got {variance!r}")
    k = proxy_scores.shape[0]
    if variance == "sample" and k < 2:
        raise ValueError("sample variance needs at least 2 ensemble members")
    centered = proxy_scores - proxy_scores.mean(dim=0, keepdim=True)
    denom = k if variance == "population" else k - 1
    return centered.pow(2).sum(dim=0) / denom


def mean(proxy_scores: torch.Tensor) -> torch.Tensor:
    """Mean optimization: `R(b) = (1/K) sum_i R_i(b)`.

    Source: Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization"
    (arXiv:2310.02743), method section.
    proxy_scores: (K, B). Returns (B,).
    """
    _check_scores(proxy_scores)
    return proxy_scores.mean(dim=0)


def worst_case(proxy_scores: torch.Tensor) -> torch.Tensor:
    """Worst-case optimization (WCO): `R(b) = min_i R_i(b)`.

    Source: Coste et al. 2023, method section (WCO); Eisenstein et al. 2023, "Helping or
    Herding?" (arXiv:2312.09244), ensemble aggregation (min).
    proxy_scores: (K, B). Returns (B,).
    """
    _check_scores(proxy_scores)
    return proxy_scores.min(dim=0).values


def uncertainty_weighted(
    proxy_scores: torch.Tensor, lam: float, variance: str = "population"
) -> torch.Tensor:
    """Uncertainty-weighted optimization (UWO): `R(b) = mean_i R_i(b) - lam * Var_i R_i(b)`.

    Population variance `(1/K) sum_i (R_i - mean)^2` is the paper's formula; `variance="sample"`
    divides by K - 1 instead. Coste's public PPO code used `torch.var` (sample variance), which
    silently multiplies lam by K/(K-1).
    Source: Coste et al. 2023, method section (UWO).
    proxy_scores: (K, B); lam: scalar >= 0. Returns (B,).
    """
    _check_scores(proxy_scores)
    return proxy_scores.mean(dim=0) - lam * _ensemble_var(proxy_scores, variance)


def median(proxy_scores: torch.Tensor) -> torch.Tensor:
    """Median over members; for even K the average of the two middle values.

    (`torch.median` returns the lower middle value for even K, which is not used here.)
    Source: Eisenstein et al. 2023, "Helping or Herding?" (arXiv:2312.09244), ensemble aggregation.
    proxy_scores: (K, B). Returns (B,).
    """
    _check_scores(proxy_scores)
    k = proxy_scores.shape[0]
    ordered = proxy_scores.sort(dim=0).values
    upper = ordered[k // 2]
    if k % 2 == 1:
        return upper
    return 0.5 * (ordered[k // 2 - 1] + upper)


def mean_minus_std(proxy_scores: torch.Tensor, k: float = 1.0, variance: str = "population") -> torch.Tensor:
    """Mean minus k standard deviations: `R(b) = mean_i R_i(b) - k * sqrt(Var_i R_i(b))`.

    Population (divide by K) or sample (divide by K - 1) variance, as in `uncertainty_weighted`.
    Source: Eisenstein et al. 2023, ensemble aggregation (coefficient 1 by default).
    proxy_scores: (K, B); k: scalar. Returns (B,).
    """
    _check_scores(proxy_scores)
    return proxy_scores.mean(dim=0) - k * _ensemble_var(proxy_scores, variance).sqrt()


def member(proxy_scores: torch.Tensor, index: int) -> torch.Tensor:
    """A single ensemble member's score `R_index(b)` (the single-RM baseline).

    proxy_scores: (K, B); 0 <= index < K. Returns (B,).
    """
    _check_scores(proxy_scores)
    k = proxy_scores.shape[0]
    if not 0 <= index < k:
        raise ValueError(f"member index {index} out of range for an ensemble of size {k}")
    return proxy_scores[index]


def parse_aggregator_name(name: str, k: int) -> tuple[str, int | None]:
    """Validate an aggregator name for an ensemble of size k.

    Returns `(name, None)` for a fixed name in AGGREGATOR_NAMES, or `("member", i)` for
    `member_<i>` with 0 <= i < k. Raises ValueError naming the bad name otherwise.
    """
    if name in AGGREGATOR_NAMES:
        return name, None
    prefix = "member_"
    if name.startswith(prefix):
        suffix = name[len(prefix) :]
        if suffix.isdigit() and suffix.isascii():
            index = int(suffix)
            if index < k:
                return "member", index
            raise ValueError(
                f"aggregator {name!r}: member index {index} out of range for an ensemble of size {k}"
            )
    raise ValueError(f"unknown aggregator {name!r}; expected one of {AGGREGATOR_NAMES} or 'member_<i>'")


def aggregator(
    name: str,
    *,
    uwo_lambda: float = 0.5,
    std_k: float = 1.0,
    variance: str = "population",
    k: int | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The rule called `name` as a function `(K, B) -> (B,)`, the name validated once, here.

    name: "mean", "wco", "uwo" (mean - uwo_lambda * var), "median",
    "mean_minus_std" (mean - std_k * std) or "member_<i>". `variance` ("population" or "sample")
    applies to "uwo" and "mean_minus_std". With `k`, a member index is checked against it now;
    without, against each call's K. Sources: see the individual functions.
    """
    kind, index = parse_aggregator_name(name, math.inf if k is None else k)
    if kind == "member":

        def pick(proxy_scores: torch.Tensor) -> torch.Tensor:
            _check_scores(proxy_scores)
            parse_aggregator_name(name, proxy_scores.shape[0])  # an index beyond this call's K
            return member(proxy_scores, index)

        return pick
    rules: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "mean": mean,
        "wco": worst_case,
        "uwo": lambda s: uncertainty_weighted(s, uwo_lambda, variance),
        "median": median,
        "mean_minus_std": lambda s: mean_minus_std(s, std_k, variance),
    }
    return rules[kind]


def aggregate(
    proxy_scores: torch.Tensor,
    name: str,
    *,
    uwo_lambda: float = 0.5,
    std_k: float = 1.0,
    variance: str = "population",
) -> torch.Tensor:
    """Aggregate ensemble scores `(K, B) -> (B,)` with the rule called `name` (see `aggregator`).

    proxy_scores: (K, B). Returns (B,).
    """
    _check_scores(proxy_scores)
    rule = aggregator(name, uwo_lambda=uwo_lambda, std_k=std_k, variance=variance, k=proxy_scores.shape[0])
    return rule(proxy_scores)
