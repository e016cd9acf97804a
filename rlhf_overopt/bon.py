"""Best-of-n math: analytic KL and the unbiased best-of-n estimator over a fixed sample pool.

One pool of N samples per prompt, sorted once by the objective, gives the expected value of any
per-sample quantity (gold score, proxy score, member scores) at the best-of-n choice for every
n <= N in a single matrix product (Nakano et al. 2021, "WebGPT", App. I; used by Gao et al. 2022
and Coste et al. 2023).
"""

import math

import torch


def bon_kl(n: int | torch.Tensor) -> float | torch.Tensor:
    """Analytic KL of best-of-n from the base policy: `KL_bon(n) = log n - (n - 1) / n`.

    An upper bound on the true KL (exact for continuous, tie-free rewards).
    Source: Gao, Schulman, Hilton 2022, "Scaling Laws for Reward Model Overoptimization", §2
    (best-of-n), after Stiennon et al. 2020.
    n: a Python int >= 1 (returns a float) or a tensor of any shape (returns the same shape, in
    the tensor's floating dtype, float32 for integer tensors).
    """
    if isinstance(n, torch.Tensor):
        n_float = n if n.is_floating_point() else n.to(torch.float32)
        if bool((n_float < 1).any()):
            raise ValueError("bon_kl: n must be >= 1")
        return torch.log(n_float) - (n_float - 1) / n_float
    if n < 1:
        raise ValueError(f"bon_kl: n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def bon_coefficients(N: int, n: int) -> torch.Tensor:
    """Weights of the unbiased best-of-n estimator for a pool sorted ascending by the objective.

    Position i (1-based) gets `C(i - 1, n - 1) / C(N, n)` for i >= n, else 0: the probability that
    the i-th smallest of N samples is the maximum of a uniformly random n-subset. Computed in log
    space with lgamma, since N can be in the thousands. The weights sum to 1.
    Source: Nakano et al. 2021, "WebGPT", App. I.
    N: pool size >= 1; 1 <= n <= N. Returns (N,) float64.
    """
    if N < 1:
        raise ValueError(f"bon_coefficients: pool size N must be >= 1, got {N}")
    if not 1 <= n <= N:
        raise ValueError(f"bon_coefficients: n must satisfy 1 <= n <= N={N}, got {n}")
    i = torch.arange(1, N + 1, dtype=torch.float64)
    valid = i >= n
    # log C(i-1, n-1) = lgamma(i) - lgamma(n) - lgamma(i - n + 1), only meaningful for i >= n.
    i_valid = torch.where(valid, i, torch.full_like(i, float(n)))
    log_num = torch.lgamma(i_valid) - math.lgamma(n) - torch.lgamma(i_valid - n + 1)
    log_den = math.lgamma(N + 1) - math.lgamma(n + 1) - math.lgamma(N - n + 1)
    return torch.where(valid, torch.exp(log_num - log_den), torch.zeros_like(i))


def bon_coefficient_matrix(N: int, n_grid: list[int]) -> torch.Tensor:
    """Stack `bon_coefficients(N, n)` for every n in n_grid.

    Source: Nakano et al. 2021, App. I. Returns (len(n_grid), N) float64.
    """
    if len(n_grid) == 0:
        raise ValueError("bon_coefficient_matrix: n_grid is empty")
    return torch.stack([bon_coefficients(N, n) for n in n_grid])


def pool_order(objective: torch.Tensor) -> torch.Tensor:
    """Permutation that sorts each prompt's pool ascending by the objective.

    Ties are broken by original sample index, deterministically: among equal objective values the
    sample with the lower index ranks higher (comes later), matching argmax's first-occurrence rule,
    so the best-of-N choice is `objective.argmax(-1)`.
    objective: (P, N), no NaN. Returns (P, N) int64 indices into the last dimension.
    """
    if objective.dim() != 2:
        raise ValueError(f"objective must be 2-D (P, N), got shape {tuple(objective.shape)}")
    if bool(torch.isnan(objective).any()):
        raise ValueError("objective contains NaN; the best-of-n ranking is undefined")
    # A stable descending sort keeps tied samples in index order; flipping it gives ascending
    # objective with tied samples in decreasing index order.
    descending = torch.sort(objective, dim=-1, descending=True, stable=True).indices
    return descending.flip(-1)


def sort_pool(objective: torch.Tensor, *values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Sort each prompt's pool ascending by the objective and reorder every value tensor with it.

    All tensors are reordered with the SAME permutation (`pool_order`): Coste et al.'s public code
    re-ranked by the ensemble score but left the gold scores in the old order, so the "ensemble"
    gold curve silently equalled one member's.
    objective: (P, N); each of values: (P, N). Returns (objective_sorted, *values_sorted), each
    (P, N).
    """
    order = pool_order(objective)
    for v in values:
        if v.shape != objective.shape:
            raise ValueError(
                f"value shape {tuple(v.shape)} does not match objective shape {tuple(objective.shape)}"
            )
    return (objective.gather(-1, order), *(v.gather(-1, order) for v in values))


def bon_expected(objective: torch.Tensor, values: torch.Tensor, n_grid: list[int]) -> torch.Tensor:
    """Expected `values` at the best-of-n sample chosen by `objective`, for every n in n_grid.

    `E[value(argmax_{S subset, |S| = n} objective)] = sum_{i=n..N} C(i-1, n-1) / C(N, n) * value(S_i)`
    with S_1..S_N the pool sorted ascending by the objective (ties as in `pool_order`), averaged
    over uniformly random n-subsets of the pool. Unbiased estimator; one sort and one matmul of
    the (len(n_grid), N) coefficient matrix give the whole curve.
    Source: Nakano et al. 2021, "WebGPT", App. I.
    objective: (P, N); values: (P, N); n_grid: ints with 1 <= n <= N.
    Returns (len(n_grid), P) float64 (computed in float64 whatever the input dtype).
    """
    if objective.dim() != 2:
        raise ValueError(f"objective must be 2-D (P, N), got shape {tuple(objective.shape)}")
    N = objective.shape[-1]
    for n in n_grid:
        if not 1 <= n <= N:
            raise ValueError(f"bon_expected: n={n} must satisfy 1 <= n <= pool size N={N}")
    _, values_sorted = sort_pool(objective, values)
    coef = bon_coefficient_matrix(N, n_grid).to(values_sorted.device)
    return coef @ values_sorted.to(torch.float64).T
