import math

import pytest
import torch

from rlhf_overopt.ops.aggregate import (
    AGGREGATOR_NAMES,
    aggregate,
    aggregator,
    mean,
    mean_minus_std,
    median,
    member,
    parse_aggregator_name,
    uncertainty_weighted,
    worst_case,
)

# K = 4 members, B = 2 samples.
# column 0: [1, 2, 3, 6]   mean 3, squared deviations 4 + 1 + 0 + 9 = 14
#           population var 14/4 = 3.5, sample var 14/3, min 1, median (2 + 3)/2 = 2.5
# column 1: [0, -2, 4, 2]  mean 1, squared deviations 1 + 9 + 9 + 1 = 20
#           population var 20/4 = 5,   sample var 20/3, min -2, median (0 + 2)/2 = 1
SCORES = torch.tensor(
    [
        [1.0, 0.0],
        [2.0, -2.0],
        [3.0, 4.0],
        [6.0, 2.0],
    ]
)


def close(a: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(a, torch.tensor(expected, dtype=a.dtype), atol=1e-5, rtol=1e-5)


def test_mean_hand():
    close(mean(SCORES), [3.0, 1.0])


def test_worst_case_hand():
    close(worst_case(SCORES), [1.0, -2.0])


def test_uwo_population_hand():
    # 3 - 0.5 * 3.5 = 1.25 ; 1 - 0.5 * 5 = -1.5
    close(uncertainty_weighted(SCORES, 0.5), [1.25, -1.5])
    close(uncertainty_weighted(SCORES, 0.5, variance="population"), [1.25, -1.5])


def test_uwo_sample_hand():
    # 3 - 0.5 * 14/3 = 2/3 ; 1 - 0.5 * 20/3 = -7/3
    close(uncertainty_weighted(SCORES, 0.5, variance="sample"), [2.0 / 3.0, -7.0 / 3.0])


def test_uwo_sample_is_population_with_lambda_times_k_over_k_minus_1():
    torch.manual_seed(0)
    s = torch.randn(5, 7)
    torch.testing.assert_close(
        uncertainty_weighted(s, 0.1, variance="sample"),
        uncertainty_weighted(s, 0.1 * 5 / 4, variance="population"),
    )
    torch.testing.assert_close(uncertainty_weighted(s, 0.3, variance="sample"), s.mean(0) - 0.3 * s.var(0))
    torch.testing.assert_close(uncertainty_weighted(s, 0.3), s.mean(0) - 0.3 * s.var(0, unbiased=False))


def test_median_even_k_hand():
    close(median(SCORES), [2.5, 1.0])


def test_median_odd_k_hand():
    # first three members: column 0 [1, 2, 3] -> 2 ; column 1 [0, -2, 4] -> 0
    close(median(SCORES[:3]), [2.0, 0.0])


def test_median_matches_quantile():
    torch.manual_seed(1)
    for k in (1, 2, 3, 4, 5, 6):
        s = torch.randn(k, 9, dtype=torch.float64)
        torch.testing.assert_close(median(s), torch.quantile(s, 0.5, dim=0))


def test_mean_minus_std_population_hand():
    # 3 - sqrt(3.5) ; 1 - sqrt(5)
    close(mean_minus_std(SCORES), [3.0 - math.sqrt(3.5), 1.0 - math.sqrt(5.0)])


def test_mean_minus_std_sample_hand():
    # k = 2: 3 - 2 * sqrt(14/3) ; 1 - 2 * sqrt(20/3)
    close(
        mean_minus_std(SCORES, k=2.0, variance="sample"),
        [3.0 - 2.0 * math.sqrt(14.0 / 3.0), 1.0 - 2.0 * math.sqrt(20.0 / 3.0)],
    )


def test_member_hand():
    close(member(SCORES, 2), [3.0, 4.0])
    with pytest.raises(ValueError, match="4"):
        member(SCORES, 4)
    with pytest.raises(ValueError):
        member(SCORES, -1)


def test_aggregate_dispatch_matches_functions():
    torch.testing.assert_close(aggregate(SCORES, "mean"), mean(SCORES))
    torch.testing.assert_close(aggregate(SCORES, "wco"), worst_case(SCORES))
    torch.testing.assert_close(aggregate(SCORES, "uwo"), uncertainty_weighted(SCORES, 0.5))
    torch.testing.assert_close(
        aggregate(SCORES, "uwo", uwo_lambda=0.1, variance="sample"),
        uncertainty_weighted(SCORES, 0.1, variance="sample"),
    )
    torch.testing.assert_close(aggregate(SCORES, "median"), median(SCORES))
    torch.testing.assert_close(aggregate(SCORES, "mean_minus_std"), mean_minus_std(SCORES))
    torch.testing.assert_close(
        aggregate(SCORES, "mean_minus_std", std_k=2.0, variance="sample"),
        mean_minus_std(SCORES, 2.0, variance="sample"),
    )
    for i in range(4):
        torch.testing.assert_close(aggregate(SCORES, f"member_{i}"), SCORES[i])


@pytest.mark.parametrize("name", ["foo", "member_4", "member_x", "member_", "member_-1", "Mean", ""])
def test_aggregate_bad_name_raises_naming_it(name):
    with pytest.raises(ValueError) as err:
        aggregate(SCORES, name)
    assert repr(name) in str(err.value)


def test_parse_aggregator_name():
    assert AGGREGATOR_NAMES == ("mean", "wco", "uwo", "median", "mean_minus_std")
    for name in AGGREGATOR_NAMES:
        assert parse_aggregator_name(name, 5) == (name, None)
    assert parse_aggregator_name("member_0", 1) == ("member", 0)
    assert parse_aggregator_name("member_4", 5) == ("member", 4)
    with pytest.raises(ValueError, match="member_5"):
        parse_aggregator_name("member_5", 5)
    with pytest.raises(ValueError, match="min"):
        parse_aggregator_name("min", 5)


@pytest.mark.parametrize("shape", [(4,), (2, 3, 4), ()])
def test_rejects_non_2d(shape):
    s = torch.zeros(shape)
    with pytest.raises(ValueError, match="2-D"):
        aggregate(s, "mean")
    with pytest.raises(ValueError, match="2-D"):
        median(s)


def test_bad_variance_kind_and_sample_with_one_member():
    with pytest.raises(ValueError, match="variance"):
        uncertainty_weighted(SCORES, 0.5, variance="unbiased")
    with pytest.raises(ValueError):
        uncertainty_weighted(SCORES[:1], 0.5, variance="sample")
    # one member, population variance is 0: uwo equals the member
    close(uncertainty_weighted(SCORES[:1], 0.5), [1.0, 0.0])


def test_invariant_to_member_order_and_shift():
    torch.manual_seed(2)
    s = torch.randn(5, 6, dtype=torch.float64)
    perm = torch.randperm(5)
    for name in AGGREGATOR_NAMES:
        torch.testing.assert_close(aggregate(s[perm], name), aggregate(s, name))
        # adding a constant to every member shifts every aggregate by that constant
        torch.testing.assert_close(aggregate(s + 3.0, name), aggregate(s, name) + 3.0)


def test_output_shape_and_gradient():
    s = torch.randn(3, 4, requires_grad=True)
    for name in AGGREGATOR_NAMES + ("member_1",):
        out = aggregate(s, name)
        assert out.shape == (4,)
        out.sum().backward()
        assert s.grad is not None and torch.isfinite(s.grad).all()
        s.grad = None


def test_aggregator_builder_hand():
    # K = 3 members, B = 2 samples.
    # column 0: [1, 2, 6]  mean 3, population var (4 + 1 + 9)/3 = 14/3, min 1
    # column 1: [0, 3, 3]  mean 2, population var (4 + 1 + 1)/3 = 2,    min 0
    scores = torch.tensor([[1.0, 0.0], [2.0, 3.0], [6.0, 3.0]])
    close(aggregator("mean")(scores), [3.0, 2.0])
    close(aggregator("wco")(scores), [1.0, 0.0])
    # uwo, lambda 0.5: 3 - 7/3 = 2/3 and 2 - 1 = 1
    close(aggregator("uwo", uwo_lambda=0.5, variance="population")(scores), [2.0 / 3.0, 1.0])
    close(aggregator("member_1", k=3)(scores), [2.0, 3.0])
    # the name is checked when the rule is built, not when it is applied
    with pytest.raises(ValueError, match="'bogus'"):
        aggregator("bogus")
    with pytest.raises(ValueError, match="out of range"):
        aggregator("member_3", k=3)
    with pytest.raises(ValueError, match="out of range"):
        aggregator("member_3")(scores)
