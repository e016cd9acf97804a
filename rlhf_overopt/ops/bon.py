"""Best-of-n math: analytic KL, the unbiased best-of-n estimator over a fixed sample pool, and the
exact selection probabilities and KL of best-of-n and soft best-of-n on the pool's empirical distribution.

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


# ---------------------------------------------------------------------------------------------
# The pool's empirical distribution: exact selection probabilities and KL (with replacement)
# ---------------------------------------------------------------------------------------------


def bon_selection_probs(objective: torch.Tensor, n_grid: list[int]) -> torch.Tensor:
    """Probability that each pool sample is the best-of-n choice when the n draws are iid WITH
    replacement from the pool's empirical distribution (uniform over the N samples).

    With the pool sorted ascending by the objective (ties as in `pool_order`: the lower sample
    index ranks higher), the sample at position i (1-based) is the maximum of n iid draws with
    probability `q_i(n) = (i/N)^n - ((i-1)/N)^n` (= F_i^n - F_{i-1}^n, F the empirical CDF of
    the order). Unlike `bon_coefficients` (n-subsets without replacement, for the unbiased
    estimator), these are the masses of a distribution on the pool, the model under which the
    pool KL of best-of-n is exact.
    Source: Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy",
    arXiv 2401.01879, §3 (pi_bon(y) = F(y)^n - F^-(y)^n on a finite support).
    objective: (P, N), no NaN; n_grid: ints >= 1 (n > N is allowed: draws repeat).
    Returns (len(n_grid), P, N) float64, indexed by the ORIGINAL sample index; each (g, p) row
    sums to 1.
    """
    if len(n_grid) == 0:
        raise ValueError("bon_selection_probs: n_grid is empty")
    order = pool_order(objective)
    P, N = objective.shape
    for n in n_grid:
        if n < 1:
            raise ValueError(f"bon_selection_probs: n must be >= 1, got {n}")
    i = torch.arange(1, N + 1, dtype=torch.float64, device=objective.device)
    n_t = torch.tensor([float(n) for n in n_grid], dtype=torch.float64, device=objective.device)[:, None]
    q = (i / N) ** n_t - ((i - 1) / N) ** n_t  # (G, N) by ascending position
    probs = torch.zeros(len(n_grid), P, N, dtype=torch.float64, device=objective.device)
    return probs.scatter_(-1, order.unsqueeze(0).expand(len(n_grid), P, N), q[:, None, :].expand(-1, P, -1))


def merged_kl(probs: torch.Tensor, response_ids: torch.Tensor) -> torch.Tensor:
    """KL(pi_sel || pi_0) of a selection distribution over the pool, identical responses merged.

    Per prompt, samples with the same id are one response y: `pi_sel(y) = sum_{j in y} probs_j`,
    `pi_0(y) = m(y) / N` (m(y) copies among the N samples: the empirical distribution of the
    base policy), `KL = sum_y pi_sel(y) log(pi_sel(y) / pi_0(y))` with 0 log 0 = 0. Merging is
    what makes the KL smaller than `log n - (n - 1)/n` when short responses repeat.
    Source: Beirami et al. 2024, arXiv 2401.01879, §3.
    probs: (G, P, N), each (g, p) row a distribution over the N samples; response_ids: (P, N)
    integers, equal within a prompt exactly for identical responses (values are per prompt: the
    same id in two prompts means nothing). Returns (G, P) float64, clamped at 0 (rounding).
    """
    if probs.dim() != 3 or response_ids.shape != probs.shape[1:]:
        raise ValueError(f"merged_kl: probs must be (G, P, N) and response_ids (P, N); got "
                         f"{tuple(probs.shape)} and {tuple(response_ids.shape)}")
    if response_ids.is_floating_point():
        raise ValueError("merged_kl: response_ids must be an integer tensor")
    G, P, N = probs.shape
    prompt = torch.arange(P, device=response_ids.device)[:, None].expand(P, N)
    keys = torch.stack([prompt.reshape(-1), response_ids.reshape(-1).to(torch.int64)], dim=1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)  # (U, 2), (P*N,)
    U = unique.shape[0]
    pi_sel = torch.zeros(G, U, dtype=torch.float64, device=probs.device)
    pi_sel.index_add_(1, inverse.to(probs.device), probs.reshape(G, P * N).to(torch.float64))
    pi_0 = torch.bincount(inverse, minlength=U).to(torch.float64).to(probs.device) / N
    positive = pi_sel > 0
    terms = torch.where(positive, pi_sel * (torch.log(torch.where(positive, pi_sel, 1.0)) - torch.log(pi_0)), 0.0)
    kl = torch.zeros(G, P, dtype=torch.float64, device=probs.device)
    kl.index_add_(1, unique[:, 0].to(probs.device), terms)
    return kl.clamp(min=0.0)


def kl_pool(objective: torch.Tensor, response_ids: torch.Tensor, n_grid: list[int]) -> torch.Tensor:
    """Exact KL of best-of-n from the base policy over the pool's empirical distribution.

    `KL_n = sum_y pi_n(y) log(pi_n(y) / pi_0(y))` with `pi_n(y) = sum_{i in y} q_i(n)`,
    `q_i(n) = (i/N)^n - ((i-1)/N)^n` at ascending position i of `pool_order` (ties broken by
    sample index, as the unbiased estimator does), `pi_0(y) = m(y)/N`, identical responses
    merged (`merged_kl`). `log n - (n-1)/n` (`bon_kl`) is an upper bound on it, reached as
    N -> inf with every response distinct.
    Source: Beirami et al. 2024, "Theoretical guarantees on the best-of-n alignment policy",
    arXiv 2401.01879.
    objective: (P, N); response_ids: (P, N) integers (see `merged_kl`); n_grid: ints >= 1.
    Returns (len(n_grid), P) float64.
    """
    return merged_kl(bon_selection_probs(objective, n_grid), response_ids)


def expected_under(probs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`E[value] = sum_j probs_j value_j` per (g, p). probs: (G, P, N); values: (P, N).
    Returns (G, P) float64."""
    if values.shape != probs.shape[1:]:
        raise ValueError(f"values shape {tuple(values.shape)} does not match probs {tuple(probs.shape)}")
    return torch.einsum("gpn,pn->gp", probs.to(torch.float64), values.to(torch.float64))


def soft_bon_probs(objective: torch.Tensor, n_grid: list[int], temperature: float, *, step: float = 0.25,
                   tolerance: float = 1e-6, max_elements: int = 1 << 22) -> torch.Tensor:
    """Exact selection probabilities of soft best-of-n over the pool's empirical distribution.

    Soft best-of-n draws n responses iid and returns y_i with probability proportional to
    `w_i = exp(r_i / lambda)` (Verdun et al. 2025, "Soft Best-of-n Sampling", arXiv 2505.03156).
    With the n draws iid uniform over the N pool samples (with replacement, the model of
    `bon_selection_probs`), and `1/x = int_0^inf exp(-t x) dt`,

        P(j) = (n/N) w_j int_0^inf exp(-t w_j) phi(t)^(n-1) dt,   phi(t) = (1/N) sum_i exp(-t w_i).

    Computed in log space with w normalized by its per-prompt max (log w <= 0, no overflow) and
    t = e^s: the integrand `w_j e^s exp(-e^s w_j) phi(e^s)^(n-1)` is smooth and decays
    exponentially to the left and doubly exponentially to the right, so the trapezoid rule on a
    uniform s grid converges geometrically in 1/step (0.25 agrees with 0.05 to 1e-14 on a
    256-sample pool with ties, lambda 0.01-1; 0.5 is off by 1e-8). The grid runs
    from s = -36 - log(n_max) (left tail < n e^s relative) to s = log 40 - min log w (right
    tail < e^-40), so a small lambda, whose weights span many orders, gets a longer grid. The
    grid is walked in chunks of at most `max_elements` elements.
    This is a plug-in for the pool's empirical distribution (draws with replacement), not a
    without-replacement U-statistic like `bon_expected`; lambda -> 0 gives the hard masses
    `bon_selection_probs` (on a tie-free pool), lambda -> inf the uniform 1/N.
    objective: (P, N), no NaN; n_grid: ints >= 1; temperature lambda > 0.
    Returns (len(n_grid), P, N) float64 (original sample index), each row renormalized to sum to
    exactly 1 after the check: raises ValueError when a row's quadrature sums to 1 +- more than
    `tolerance`.
    """
    if objective.dim() != 2:
        raise ValueError(f"objective must be 2-D (P, N), got shape {tuple(objective.shape)}")
    if not temperature > 0:
        raise ValueError(f"soft_bon_probs: temperature must be > 0, got {temperature}")
    if bool(torch.isnan(objective).any()):
        raise ValueError("objective contains NaN; soft best-of-n is undefined")
    if len(n_grid) == 0 or min(n_grid) < 1:
        raise ValueError(f"soft_bon_probs: n_grid must hold ints >= 1, got {list(n_grid)}")
    P, N = objective.shape
    obj = objective.to(torch.float64)
    log_w = (obj - obj.max(dim=-1, keepdim=True).values) / temperature  # (P, N), max 0
    s_min = -36.0 - math.log(max(n_grid))
    s_max = math.log(40.0) - float(log_w.min())
    M = int(math.ceil((s_max - s_min) / step)) + 1
    s = s_min + step * torch.arange(M, dtype=torch.float64, device=obj.device)
    log_trap = torch.full((M,), math.log(step), dtype=torch.float64, device=obj.device)
    log_trap[0] = log_trap[-1] = math.log(step / 2)
    chunk = max(1, max_elements // max(1, P * N))
    # log phi(e^s) on the whole grid: (P, M)
    log_phi = torch.cat([
        torch.logsumexp(-torch.exp(s[None, a:a + chunk, None] + log_w[:, None, :]), dim=-1)
        for a in range(0, M, chunk)
    ], dim=1) - math.log(N)
    log_int = torch.full((len(n_grid), P, N), -math.inf, dtype=torch.float64, device=obj.device)
    for a in range(0, M, chunk):
        sc = s[a:a + chunk]
        # log(w_j e^s exp(-e^s w_j)) + trapezoid weight: (P, m, N)
        base = log_w[:, None, :] + sc[None, :, None] - torch.exp(sc[None, :, None] + log_w[:, None, :]) \
            + log_trap[a:a + chunk][None, :, None]
        for g, n in enumerate(n_grid):
            # phi underflows to 0 (log -inf) far right, where base is -inf too: skip 0 * -inf at n = 1
            term = base if n == 1 else base + (n - 1) * log_phi[:, a:a + chunk, None]
            part = torch.logsumexp(term, dim=1)
            log_int[g] = torch.logaddexp(log_int[g], part)
    n_t = torch.tensor([float(n) for n in n_grid], dtype=torch.float64, device=obj.device)[:, None, None]
    probs = torch.exp(torch.log(n_t / N) + log_int)
    total = probs.sum(dim=-1)
    worst = float((total - 1).abs().max())
    if not worst <= tolerance:  # NaN fails too
        raise ValueError(f"soft_bon_probs: selection probabilities sum to 1 +- {worst:.2e} (tolerance {tolerance:g}) "
                         f"at temperature {temperature:g}; use a smaller step")
    return probs / total[..., None]
