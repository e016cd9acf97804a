import itertools
import math

import numpy as np
import pytest
from scipy import stats

from analysis.seeds import bootstrap_interval
from analysis.stats import (
    Run,
    collapse_rate,
    compare_arms,
    detectable_difference,
    drop_rate,
    pair_runs,
    paired,
    rate,
    robust_location,
    seeds_needed,
    unpaired,
)

Z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)


def test_paired_hand_worked():
    # d = [1, 2, 3]: mean 2, sd 1, se 1/sqrt(3); t_{0.975,2} = 4.3027 -> 2 ± 2.4841
    c = paired([0, 0, 0], [1, 2, 3])
    assert (c.estimator, c.n_a, c.df) == ("paired t", 3, 2)
    assert c.diff == pytest.approx(2.0) and c.sd == pytest.approx(1.0)
    assert c.low == pytest.approx(-0.484, abs=1e-3) and c.high == pytest.approx(4.484, abs=1e-3)
    # t = 2 sqrt(3); for df = 2, P(T > t) = (1 - t / sqrt(t^2 + 2)) / 2
    t = 2 * math.sqrt(3)
    assert c.p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert c.p_sign == pytest.approx(2 / 8)  # 3 of 3 positive, two-sided
    assert c.p_wilcoxon == pytest.approx(2 / 8)  # exact: all ranks positive, two-sided
    assert c.p_improvement == 1.0
    assert c.boot_low is None and c.boot_high is None  # below 10 pairs
    verdict = c.verdict("member_0", "uwo")
    assert verdict == f"not resolved at 3 seeds (would need about {c.seeds_needed})"
    assert c.seeds_needed is not None and c.seeds_needed > 3
    assert "paired t n=3" in c.text() and "[-0.484, +4.484]" in c.text()


def test_paired_ties_and_degenerate():
    c = paired([1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])  # d = 0, +1, -1, 0
    assert c.p_improvement == pytest.approx(0.5)
    assert c.p_sign == pytest.approx(1.0)  # 1 positive of 2 non-tied
    same = paired([1, 2, 3], [1, 2, 3])
    assert same.p_sign is None and same.p_wilcoxon is None
    assert same.verdict().startswith("not resolved at 3 seeds")
    shifted = paired([1, 2, 3], [2, 3, 4])  # every seed +1, no spread
    assert shifted.verdict("a", "b") == "b > a" and shifted.low == shifted.high == 1.0
    assert paired([1, 2, 3], [0, 1.1, 2.05]).verdict("ref", "new") == "ref > new"


def test_paired_bootstrap_from_ten_pairs_reproducible():
    rng = np.random.default_rng(1)
    a = rng.normal(size=10)
    b = a + 0.5 + rng.normal(scale=0.3, size=10)
    c1, c2 = paired(a, b), paired(a, b)
    assert c1.boot_low is not None and c1.boot_high is not None
    assert (c1.boot_low, c1.boot_high) == (c2.boot_low, c2.boot_high)
    assert c1.boot_low < c1.diff < c1.boot_high
    assert paired(a[:9], b[:9]).boot_low is None


def test_welch_hand_worked():
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]  # means 2, 4; variances 1, 4
    c = unpaired(a, b)
    se = math.sqrt(1 / 3 + 4 / 3)
    df = (5 / 3) ** 2 / ((1 / 3) ** 2 / 2 + (4 / 3) ** 2 / 2)  # = 50/17
    assert df == pytest.approx(50 / 17)
    assert (c.estimator, c.diff, c.df) == ("Welch", pytest.approx(2.0), pytest.approx(df))
    half = stats.t.ppf(0.975, df) * se
    assert c.low == pytest.approx(2 - half, abs=1e-9) and c.high == pytest.approx(2 + half, abs=1e-9)
    assert c.p == pytest.approx(stats.ttest_ind(b, a, equal_var=False).pvalue, rel=1e-9)
    # b=2 beats a=1 and ties a=2 (1.5); b=4 and b=6 beat all three: 7.5 of 9
    assert c.p_improvement == pytest.approx(7.5 / 9)
    assert c.p_sign is None and c.p_wilcoxon is None
    assert c.verdict() == f"not resolved at 3 seeds per arm (would need about {c.seeds_needed} per arm)"
    assert unpaired([0, 1, 2, 3], [10, 11, 12]).verdict("x", "y") == "y > x"


def test_planted_paired_effect_overlap_misses_paired_finds():
    """Seeds share a large offset (sd 1.0); B is A + 0.1 with per-seed noise sd 0.02."""
    rng = np.random.default_rng(2021)
    offsets = rng.normal(scale=1.0, size=7)
    a = offsets + rng.normal(scale=0.02, size=7)
    b = offsets + 0.1 + rng.normal(scale=0.02, size=7)
    (lo_a, hi_a), (lo_b, hi_b) = bootstrap_interval(a), bootstrap_interval(b)
    assert lo_a <= hi_b and lo_b <= hi_a  # the 95% intervals of the two means overlap
    assert unpaired(a, b).verdict().startswith("not resolved at 7 seeds per arm")
    c = paired(a, b)
    assert c.verdict("member_0", "uwo") == "uwo > member_0"
    assert 0 < c.low and c.p < 1e-4 and c.p_improvement == 1.0


def _identity(proxy="p0", policy="pi0", prompts="e0"):
    return {"proxy_cache_key": proxy, "initial_policy": policy, "eval_prompts": prompts}


def test_matching_identities_pair():
    arm_a = [Run(s, v, _identity(f"p{s}")) for s, v in [(0, 1.0), (1, 0.2), (2, -1.0)]]
    arm_b = [{"seed": s, "value": v, "identity": _identity(f"p{s}")}
             for s, v in [(2, -0.9), (0, 1.1), (1, 0.3)]]
    pairing = pair_runs(arm_a, arm_b)
    assert not pairing.unmatched and [a.seed for a, _ in pairing.pairs] == [0, 1, 2]
    c = compare_arms(arm_a, arm_b)
    assert c.estimator == "paired t" and c.seeds == (0, 1, 2)
    assert c.diff == pytest.approx(0.1) and c.pairing_note.startswith("paired: all 3 seeds")


def test_differing_identities_fall_back_to_welch():
    arm_a = [Run(0, 1.0, _identity("p0")), Run(1, 0.2, _identity("p1")), Run(2, -1.0, None),
             Run(3, 0.5, _identity("p3"))]
    arm_b = [Run(0, 1.1, _identity("p0")), Run(1, 0.3, _identity("OTHER", policy="pi1")),
             Run(2, -0.9, _identity("p2")), Run(4, 0.0, _identity("p4"))]
    pairing = pair_runs(arm_a, arm_b)
    assert len(pairing.pairs) == 1 and pairing.pairs[0][0].seed == 0
    reasons = {(u.arm, u.seed): u.reason for u in pairing.unmatched}
    assert reasons[("A", 1)] == reasons[("B", 1)] == "identity differs: initial_policy, proxy_cache_key"
    assert reasons[("A", 2)] == "no identity recorded"
    assert reasons[("B", 2)] == "other arm's run has no identity recorded"
    assert reasons[("A", 3)] == reasons[("B", 4)] == "no run at this seed in the other arm"
    c = compare_arms(arm_a, arm_b, value=lambda r: r.value)
    assert c.estimator == "Welch" and (c.n_a, c.n_b) == (4, 4)
    assert c.pairing_note.startswith("Welch (unpaired): 6 of 8 runs could not be paired")
    assert "identity differs: initial_policy, proxy_cache_key" in c.pairing_note
    # an identity whose values are all None is no identity
    assert pair_runs([Run(0, 0.0, {"proxy_cache_key": None})],
                     [Run(0, 0.0, {"proxy_cache_key": None})]).unmatched[0].reason == "no identity recorded"


def test_detectable_difference_shrinks_and_approaches_z_formula():
    ds = [detectable_difference(1.0, n) for n in (2, 3, 5, 10, 30, 100)]
    assert all(x > y for x, y in itertools.pairwise(ds))
    assert detectable_difference(1.0, 3) > 1.5 * Z / math.sqrt(3)  # small n: far above the z formula
    for n in (500, 2000):
        assert detectable_difference(1.0, n) == pytest.approx(Z / math.sqrt(n), rel=0.01)
        assert detectable_difference(1.0, n, paired=False) == pytest.approx(Z * math.sqrt(2 / n), rel=0.01)
    assert detectable_difference(2.0, 10) == pytest.approx(2 * detectable_difference(1.0, 10))


@pytest.mark.parametrize("paired_design", [True, False])
def test_seeds_needed_inverts_detectable(paired_design):
    for n in (2, 3, 4, 7, 10, 25, 100):
        d = detectable_difference(0.7, n, paired=paired_design)
        assert seeds_needed(d, 0.7, paired=paired_design) == n
        assert seeds_needed(d * 1.01, 0.7, paired=paired_design) <= n
        assert seeds_needed(d * 0.99, 0.7, paired=paired_design) > n
    assert seeds_needed(0.0, 1.0) is None
    assert seeds_needed(1e-4, 1.0, max_n=1000) is None


def test_detectable_difference_has_its_power_by_simulation():
    rng = np.random.default_rng(0)
    n, sims = 5, 40_000
    d = rng.normal(loc=detectable_difference(1.0, n), size=(sims, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    assert np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1)) == pytest.approx(0.8, abs=0.01)


def test_unresolved_verdict_names_the_seeds_needed():
    c = paired([0.0, 0.1, -0.1, 0.2], [0.05, 0.1, 0.0, 0.2])
    assert not c.resolved
    assert c.seeds_needed == seeds_needed(c.diff, c.sd)
    assert c.verdict() == f"not resolved at 4 seeds (would need about {c.seeds_needed})"
    assert "no difference" not in c.verdict()


def test_wilson_interval_by_hand():
    r = rate(3, 10)
    z, p, n = stats.norm.ppf(0.975), 0.3, 10
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert (r.count, r.n, r.share) == (3, 10, 0.3)
    assert r.low == pytest.approx(centre - half, abs=1e-9)
    assert r.high == pytest.approx(centre + half, abs=1e-9)
    assert r.text() == "3/10 = 30% [11%, 60%]"
    with pytest.raises(ValueError, match="successes"):
        rate(4, 3)


def test_collapse_and_drop_rates():
    final = [0.46, 0.31, -2.62]
    assert collapse_rate(final, 0.0).count == 1
    assert collapse_rate(final, [0.5, 0.0, 0.0]).count == 2
    # gains 1.0, 1.0, 0 (never rose), -0.5 (peak below initial); thresholds 0.5, 0.5, 0, 0
    peak = [1.0, 1.0, 0.0, -0.5]
    r = drop_rate([0.6, 0.4, -0.1, 0.0], peak, 0.0)
    assert r.count == 2 and r.n == 4  # run 2 lost more than half its gain; run 3 ended below the start


def test_robust_location():
    small = robust_location([0.46, 0.31, -2.62])
    assert small.iqm is None and small.median == pytest.approx(0.31) and small.worst == pytest.approx(-2.62)
    assert "worst -2.62" in small.text()
    big = robust_location(range(1, 9))
    assert big.iqm == pytest.approx(4.5) and big.median == pytest.approx(4.5)
    assert big.text().startswith("IQM +4.50")


def test_bad_input():
    with pytest.raises(ValueError, match="length mismatch"):
        paired([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        paired([1, 2, float("nan")], [1, 2, 3])
    with pytest.raises(ValueError, match="fewer than 2 pairs"):
        paired([1], [2])
    with pytest.raises(ValueError, match="fewer than 2 runs"):
        unpaired([1], [2, 3])
    with pytest.raises(ValueError, match="NaN"):
        unpaired([1, 2], [2, float("nan")])
