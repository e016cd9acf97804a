import itertools
import math

import pytest
import torch

from rlhf_overopt.ops.bon import (
    bon_coefficient_matrix,
    bon_coefficients,
    bon_expected,
    bon_kl,
    pool_order,
    sort_pool,
)


def brute_force_bon(objective: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    """Average over every n-subset of the pool of the value at the subset's best sample.

    Tie rule: the highest objective wins; among equal objectives, the lowest sample index.
    objective, values: (P, N). Returns (P,) float64.
    """
    P, N = objective.shape
    out = torch.zeros(P, dtype=torch.float64)
    for p in range(P):
        total = 0.0
        count = 0
        for subset in itertools.combinations(range(N), n):
            best = max(subset, key=lambda j: (objective[p, j].item(), -j))
            total += values[p, best].item()
            count += 1
        out[p] = total / count
    return out


def test_bon_kl_hand():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    # n = 4: log 4 - 3/4
    assert bon_kl(4) == pytest.approx(math.log(4) - 0.75)
    t = bon_kl(torch.tensor([1, 2, 4]))
    torch.testing.assert_close(
        t, torch.tensor([0.0, math.log(2) - 0.5, math.log(4) - 0.75], dtype=torch.float32)
    )
    t64 = bon_kl(torch.tensor([2.0], dtype=torch.float64))
    assert t64.dtype == torch.float64
    with pytest.raises(ValueError):
        bon_kl(0)
    with pytest.raises(ValueError):
        bon_kl(torch.tensor([0, 3]))


def test_coefficients_hand():
    # N = 5, n = 2: C(i-1, 1) / C(5, 2) = (i - 1) / 10 for i = 2..5, 0 at i = 1
    torch.testing.assert_close(
        bon_coefficients(5, 2), torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    )
    # n = 1: uniform 1/N ; n = N: all weight on the last (largest) sample
    torch.testing.assert_close(bon_coefficients(4, 1), torch.full((4,), 0.25, dtype=torch.float64))
    torch.testing.assert_close(
        bon_coefficients(4, 4), torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    )


def test_coefficients_sum_to_one_for_large_pool():
    N = 5000
    for n in (1, 2, 17, 100, 2500, 4999, 5000):
        c = bon_coefficients(N, n)
        assert c.dtype == torch.float64 and c.shape == (N,)
        assert (c >= 0).all()
        assert (c[: n - 1] == 0).all()
        assert c.sum().item() == pytest.approx(1.0, abs=1e-9)


def test_coefficients_bad_n():
    with pytest.raises(ValueError):
        bon_coefficients(5, 6)
    with pytest.raises(ValueError):
        bon_coefficients(5, 0)
    assert bon_coefficient_matrix(6, [1, 3, 6]).shape == (3, 6)


def test_exact_against_brute_force_enumeration():
    torch.manual_seed(0)
    P, N = 3, 6
    objective = torch.randn(P, N)
    values = torch.randn(P, N)
    grid = list(range(1, N + 1))
    est = bon_expected(objective, values, grid)
    assert est.shape == (N, P) and est.dtype == torch.float64
    for row, n in enumerate(grid):
        torch.testing.assert_close(est[row], brute_force_bon(objective, values, n), atol=1e-12, rtol=0)


def test_exact_against_brute_force_with_ties():
    torch.manual_seed(1)
    P, N = 4, 6
    objective = torch.randint(0, 3, (P, N)).float()  # many ties
    values = torch.randn(P, N)
    grid = list(range(1, N + 1))
    est = bon_expected(objective, values, grid)
    for row, n in enumerate(grid):
        torch.testing.assert_close(est[row], brute_force_bon(objective, values, n), atol=1e-12, rtol=0)


def test_against_monte_carlo_subsampling():
    gen = torch.Generator().manual_seed(2)
    P, N, draws = 3, 20, 20000
    objective = torch.randn(P, N, generator=gen, dtype=torch.float64)
    values = objective + torch.randn(P, N, generator=gen, dtype=torch.float64)
    grid = [1, 3, 7, 20]
    est = bon_expected(objective, values, grid)
    for row, n in enumerate(grid):
        for p in range(P):
            subsets = torch.rand(draws, N, generator=gen).argsort(dim=-1)[:, :n]  # (draws, n)
            best_in_subset = objective[p][subsets].argmax(dim=-1)
            chosen = subsets.gather(-1, best_in_subset[:, None]).squeeze(-1)
            mc = values[p][chosen].mean().item()
            assert est[row, p].item() == pytest.approx(mc, abs=0.05)


def test_n1_is_pool_mean_and_nN_is_value_at_argmax():
    torch.manual_seed(3)
    objective = torch.randn(5, 9)
    values = torch.randn(5, 9)
    est = bon_expected(objective, values, [1, 9])
    torch.testing.assert_close(est[0], values.double().mean(dim=-1))
    at_argmax = values.gather(-1, objective.argmax(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(est[1], at_argmax.double())


def test_values_are_reordered_with_the_objective():
    # The pitfall in Coste et al.'s public code: values left in the old order after re-ranking.
    # objective [3, 1, 2], values [10, 20, 30]; sorted ascending by objective: indices [1, 2, 0],
    # values [20, 30, 10].
    # best-of-1: (10 + 20 + 30)/3 = 20
    # best-of-2: subsets {0,1}->10, {0,2}->10, {1,2}->30 : 50/3
    #   = coefficients [0, 1/3, 2/3] . [20, 30, 10] = 10 + 20/3
    # best-of-3: value at argmax objective (index 0) = 10
    # Forgetting to reorder would give [0, 1/3, 2/3] . [10, 20, 30] = 80/3 and 30.
    objective = torch.tensor([[3.0, 1.0, 2.0]])
    values = torch.tensor([[10.0, 20.0, 30.0]])
    est = bon_expected(objective, values, [1, 2, 3])
    torch.testing.assert_close(est[:, 0], torch.tensor([20.0, 50.0 / 3.0, 10.0], dtype=torch.float64))
    obj_sorted, val_sorted, other_sorted = sort_pool(objective, values, -values)
    torch.testing.assert_close(obj_sorted, torch.tensor([[1.0, 2.0, 3.0]]))
    torch.testing.assert_close(val_sorted, torch.tensor([[20.0, 30.0, 10.0]]))
    torch.testing.assert_close(other_sorted, -val_sorted)


def test_ties_are_deterministic_and_follow_argmax():
    # All objectives equal: ascending order puts higher indices first, so index 0 ranks highest,
    # matching argmax's first occurrence.
    objective = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 2.0, 2.0, -1.0]])
    torch.testing.assert_close(pool_order(objective), torch.tensor([[3, 2, 1, 0], [3, 0, 2, 1]]))
    values = torch.tensor([[5.0, 6.0, 7.0, 8.0], [1.0, 2.0, 3.0, 4.0]])
    est = bon_expected(objective, values, [4])
    torch.testing.assert_close(est[0], torch.tensor([5.0, 2.0], dtype=torch.float64))
    # the same input gives the same permutation every time, also for long pools
    big = torch.randint(0, 4, (8, 1000)).float()
    assert torch.equal(pool_order(big), pool_order(big.clone()))
    at_best = big.gather(-1, pool_order(big)[:, -1:]).squeeze(-1)
    assert torch.equal(pool_order(big)[:, -1], big.argmax(dim=-1))
    assert torch.equal(at_best, big.max(dim=-1).values)


def test_objective_as_value_is_nondecreasing_in_n():
    torch.manual_seed(4)
    objective = torch.randn(6, 50)
    est = bon_expected(objective, objective, list(range(1, 51)))
    assert (est[1:] - est[:-1] >= -1e-12).all()


def test_input_validation():
    objective = torch.randn(2, 5)
    values = torch.randn(2, 5)
    with pytest.raises(ValueError, match="n=6"):
        bon_expected(objective, values, [1, 6])
    with pytest.raises(ValueError):
        bon_expected(objective, values, [0])
    with pytest.raises(ValueError):
        bon_expected(objective, values[:, :4], [1])
    with pytest.raises(ValueError):
        bon_expected(objective[0], values[0], [1])
    with pytest.raises(ValueError, match="NaN"):
        bon_expected(torch.tensor([[0.0, float("nan")]]), torch.zeros(1, 2), [1])
