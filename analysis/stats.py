"""Comparisons that match the experimental design: paired over seeds where the runs share a seed's
proxy ensemble, initial policy and evaluation prompts, Welch otherwise; the power of the design;
rates with Wilson intervals; robust locations for heavy-tailed outcomes.

Two arms run at the same seeds differ by much less than two seeds of one arm do (the seed moves both
arms' proxies, initial policy and prompts together), so they are compared by the per-seed
differences d = b - a, not by whether two intervals over seeds overlap (the tables' former test,
which misses a small effect under a large shared seed effect). The paired t
interval of the mean difference decides the verdict; the sign test, the Wilcoxon signed-rank test,
the probability of improvement (Agarwal et al. 2021, "Deep Reinforcement Learning at the Edge of the
Statistical Precipice") and, from 10 pairs, a paired bootstrap interval are shown beside it, since
outcomes are heavy-tailed (one seed of three can collapse). An unresolved comparison says how many
seeds would resolve it, from the noncentral t distribution (the standard power analysis of the t
test), never "no difference".

Everything here is a pure function of numbers: sequences of floats in, frozen dataclasses out.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from scipy import optimize, stats

Values = Sequence[float] | np.ndarray
POWER = 0.8  # target power of the design numbers on a Comparison (`detectable`, `seeds_needed`)
MAX_SEEDS = 10_000  # `seeds_needed` gives up (None) above this many seeds
BOOTSTRAP_FROM = 10  # pairs (or runs per arm) from which a bootstrap interval is shown beside the t interval
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
# scipy >= 1.15 takes `rng`; older versions `random_state` (pyproject allows scipy >= 1.11)
_RNG_KEYWORD = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"


@dataclass(frozen=True)
class Comparison:
    """Arm B against arm A: `diff` is mean(b - a) (paired) or mean(b) - mean(a) (Welch); [low, high]
    is its t interval at `level`, which alone decides `verdict`."""

    estimator: str  # "paired t" or "Welch"
    n_a: int
    n_b: int
    mean_a: float
    mean_b: float
    diff: float
    sd: float  # paired: sd of the differences; Welch: sqrt((sd_a^2 + sd_b^2)/2), behind `detectable`
    se: float
    df: float
    level: float
    low: float
    high: float
    p: float  # two-sided t-test p-value (paired t or Welch)
    p_improvement: float  # paired: share of seeds with b > a; Welch: P(b_i > a_j), all pairs; ties half
    detectable: float  # smallest true difference detected with power POWER at alpha = 1 - level
    seeds_needed: int | None  # unresolved: seeds (per arm for Welch) to detect `diff`; None: > MAX_SEEDS
    boot_low: float | None = None  # percentile bootstrap, from BOOTSTRAP_FROM pairs / runs per arm
    boot_high: float | None = None
    p_sign: float | None = None  # paired only: two-sided sign test, ties dropped; None when every pair ties
    p_wilcoxon: float | None = None  # paired only: Wilcoxon signed-rank; None when it cannot be computed
    seeds: tuple[Any, ...] | None = None  # paired: the seeds, in the order of the differences
    pairing_note: str = ""  # compare_arms: why paired or why not

    @property
    def resolved(self) -> bool:
        return self.low > 0 or self.high < 0

    def verdict(self, name_a: str = "A", name_b: str = "B") -> str:
        """"B > A" or "A > B" (the t interval excludes 0) with the names put in, else "not resolved at
        n seeds (would need about m)"."""
        if self.low > 0:
            return f"{name_b} > {name_a}"
        if self.high < 0:
            return f"{name_a} > {name_b}"
        per_arm = "" if self.estimator == "paired t" else " per arm"
        at = f"{self.n_a} seeds{per_arm}" if self.n_a == self.n_b else f"{self.n_a}+{self.n_b} seeds"
        need = f"about {self.seeds_needed}" if self.seeds_needed is not None else f"more than {MAX_SEEDS}"
        return f"not resolved at {at} (would need {need}{per_arm})"

    def text(self, fmt: str = "+.3f") -> str:
        """One line for a table: estimator, n, difference, interval, p-values, P(improvement), design."""
        n = f"n={self.n_a}" if self.estimator == "paired t" else f"n={self.n_a}+{self.n_b}"
        parts = [f"{self.estimator} {n}", f"diff {self.diff:{fmt}} [{self.low:{fmt}}, {self.high:{fmt}}]",
                 f"p={_p(self.p)}"]
        if self.boot_low is not None and self.boot_high is not None:
            parts.append(f"boot [{self.boot_low:{fmt}}, {self.boot_high:{fmt}}]")
        if self.estimator == "paired t":
            parts.append(f"sign p={_p(self.p_sign)}, Wilcoxon p={_p(self.p_wilcoxon)}")
        parts += [f"P(B>A)={self.p_improvement:.2f}", f"detectable ±{self.detectable:.3f}"]
        return "; ".join(parts)

    row = text


def _p(p: float | None) -> str:
    return "n/a" if p is None else f"{p:.2g}" if p >= 0.001 else "<0.001"


def _array(x: Values, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected a flat sequence of numbers, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        where = np.flatnonzero(~np.isfinite(arr)).tolist()
        raise ValueError(f"{name}: NaN or infinite value at position(s) {where}")
    return arr


def _t_interval(diff: float, se: float, df: float, level: float) -> tuple[float, float, float]:
    """diff ± t_{(1+level)/2, df} se and the two-sided p-value of diff = 0 (0 or 1 when se = 0)."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if se == 0:
        return diff, diff, (1.0 if diff == 0 else 0.0)
    half = float(stats.t.ppf((1 + level) / 2, df)) * se
    return diff - half, diff + half, float(2 * stats.t.sf(abs(diff) / se, df))


def _bootstrap(data: tuple[np.ndarray, ...], paired: bool, level: float) -> tuple[float, float]:
    """Percentile bootstrap interval (as analysis.seeds and Agarwal et al.'s rliable) of mean(b) - mean(a);
    paired resamples seeds (pairs) together. A fixed generator keeps tables reproducible."""
    res = stats.bootstrap(data, lambda a, b, axis: b.mean(axis=axis) - a.mean(axis=axis), paired=paired,
                          vectorized=True, confidence_level=level, n_resamples=BOOTSTRAP_RESAMPLES,
                          method="percentile", **{_RNG_KEYWORD: np.random.default_rng(BOOTSTRAP_SEED)})
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _improvement(b: np.ndarray, a: np.ndarray) -> float:
    """Mean over the given (b, a) pairs of 1[b > a] + 0.5 * 1[b = a]."""
    return float(np.mean((b > a) + 0.5 * (b == a)))


def paired(a: Values, b: Values, *, level: float = 0.95,
           seeds: Sequence[Any] | None = None) -> Comparison:
    """Paired comparison of two arms run at the same seeds, in the same order: d_i = b_i - a_i.

    Decides by the paired t interval mean(d) ± t_{(1+level)/2, n-1} sd(d)/sqrt(n) (Student 1908; sd
    with ddof=1), p = 2 P(T_{n-1} > |mean(d)| sqrt(n)/sd(d)). Beside it: the sign test (binomial,
    p = 1/2, on the number of d_i > 0 among the d_i != 0), the Wilcoxon signed-rank test (zeros
    dropped), the probability of improvement (share of d_i > 0, ties half; Agarwal et al. 2021) and,
    from BOOTSTRAP_FROM pairs, a percentile bootstrap interval resampling seeds (pairs) together.
    """
    x, y = _array(a, "a"), _array(b, "b")
    if len(x) != len(y):
        raise ValueError(f"paired: length mismatch, {len(x)} values in a and {len(y)} in b (one per seed)")
    if seeds is not None and len(seeds) != len(x):
        raise ValueError(f"paired: {len(seeds)} seeds for {len(x)} pairs")
    n = len(x)
    if n < 2:
        raise ValueError(f"paired: fewer than 2 pairs ({n}); a seed-to-seed spread needs at least 2")
    d = y - x
    diff, sd = float(d.mean()), float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    low, high, p = _t_interval(diff, se, n - 1, level)
    boot = (None, None)
    if n >= BOOTSTRAP_FROM:
        boot = (diff, diff) if sd == 0 else _bootstrap((x, y), True, level)
    nonzero = d[d != 0]
    p_sign = float(stats.binomtest(int((nonzero > 0).sum()), len(nonzero)).pvalue) if len(nonzero) else None
    p_wilcoxon = None
    with warnings.catch_warnings():  # scipy warns about ties and small n and may raise on all zeros
        warnings.simplefilter("ignore")
        try:
            p_wilcoxon = float(stats.wilcoxon(d).pvalue) if len(nonzero) else None
        except ValueError:
            pass
    p_wilcoxon = p_wilcoxon if p_wilcoxon is not None and math.isfinite(p_wilcoxon) else None
    alpha = 1 - level
    resolved = low > 0 or high < 0
    return Comparison(
        estimator="paired t", n_a=n, n_b=n, mean_a=float(x.mean()), mean_b=float(y.mean()), diff=diff, sd=sd,
        se=se, df=n - 1, level=level, low=low, high=high, p=p, p_improvement=_improvement(y, x),
        detectable=detectable_difference(sd, n, alpha=alpha, power=POWER, paired=True),
        seeds_needed=None if resolved else seeds_needed(diff, sd, alpha=alpha, power=POWER, paired=True),
        boot_low=boot[0], boot_high=boot[1], p_sign=p_sign, p_wilcoxon=p_wilcoxon,
        seeds=None if seeds is None else tuple(seeds))


def unpaired(a: Values, b: Values, *,
             level: float = 0.95) -> Comparison:
    """Welch (1947) comparison of mean(b) - mean(a) for arms that do not share seeds' randomness.

    se = sqrt(s_a^2/n_a + s_b^2/n_b), df = se^4 / ((s_a^2/n_a)^2/(n_a-1) + (s_b^2/n_b)^2/(n_b-1))
    (Welch–Satterthwaite), interval diff ± t_{(1+level)/2, df} se. Probability of improvement
    P(b_i > a_j) over all n_a n_b pairs, ties half (the normalized Mann–Whitney U; Agarwal et al.
    2021). From BOOTSTRAP_FROM runs per arm, a percentile bootstrap resampling each arm on its own.
    The design numbers take sd = sqrt((s_a^2 + s_b^2)/2) and n = the harmonic mean of n_a, n_b
    (see `detectable_difference`); `seeds_needed` is then per arm.
    """
    x, y = _array(a, "a"), _array(b, "b")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"unpaired: fewer than 2 runs in an arm ({len(x)} in a, {len(y)} in b)")
    va, vb = float(x.var(ddof=1)), float(y.var(ddof=1))
    wa, wb = va / len(x), vb / len(y)
    se = math.sqrt(wa + wb)
    df = (wa + wb) ** 2 / (wa**2 / (len(x) - 1) + wb**2 / (len(y) - 1)) if se > 0 else len(x) + len(y) - 2.0
    diff = float(y.mean() - x.mean())
    low, high, p = _t_interval(diff, se, df, level)
    boot = (None, None)
    if min(len(x), len(y)) >= BOOTSTRAP_FROM:
        boot = (diff, diff) if se == 0 else _bootstrap((x, y), False, level)
    sd = math.sqrt((va + vb) / 2)
    n_design = 2 / (1 / len(x) + 1 / len(y))
    alpha = 1 - level
    resolved = low > 0 or high < 0
    return Comparison(
        estimator="Welch", n_a=len(x), n_b=len(y), mean_a=float(x.mean()), mean_b=float(y.mean()), diff=diff,
        sd=sd, se=se, df=df, level=level, low=low, high=high, p=p,
        p_improvement=_improvement(y[:, None], x[None, :]),
        detectable=detectable_difference(sd, n_design, alpha=alpha, power=POWER, paired=False),
        seeds_needed=None if resolved else seeds_needed(diff, sd, alpha=alpha, power=POWER, paired=False),
        boot_low=boot[0], boot_high=boot[1])


# --- power -----------------------------------------------------------------------------------------

def _power(ncp: float, n: float, alpha: float, paired: bool) -> float:
    """Power of the two-sided t test at noncentrality ncp: P(|T'| > t_{1-alpha/2, df}), T' ~ nct(df, ncp)."""
    df = n - 1 if paired else 2 * n - 2
    crit = stats.t.ppf(1 - alpha / 2, df)
    # the far tail, P(T' < -crit) <= P(Z + ncp < 0) = Phi(-ncp): scipy's nct.cdf returns NaN there for
    # large ncp (seen from ncp ~ 5.3, where the bound is < 1e-7), so NaN is read as 0
    lower = float(stats.nct.cdf(-crit, df, ncp))
    lower = min(lower, float(stats.norm.cdf(-ncp))) if math.isfinite(lower) else 0.0
    return float(stats.nct.sf(crit, df, ncp)) + max(lower, 0.0)


def _ncp_per_unit(sd: float, n: float, paired: bool) -> float:
    """Noncentrality per unit of true difference: sqrt(n)/sd (paired), 1/(sd sqrt(2/n)) (two arms of n)."""
    return math.sqrt(n) / sd if paired else 1 / (sd * math.sqrt(2 / n))


def _check(alpha: float, power: float, n: float, paired: bool) -> None:
    if not 0 < alpha < 1 or not alpha < power < 1:
        raise ValueError(f"need 0 < alpha < power < 1, got alpha={alpha}, power={power}")
    if n < 2:
        raise ValueError(f"need at least 2 seeds{'' if paired else ' per arm'}, got {n}")


def detectable_difference(sd: float, n: float, *, alpha: float = 0.05, power: float = POWER,
                          paired: bool = True) -> float:
    """The smallest true mean difference that a two-sided t test at level alpha detects with the given
    power (standard power analysis of the t test, e.g. Cohen 1988): solves
    P(|T'| > t_{1-alpha/2, df}) = power for the noncentrality lambda with brentq, T' ~ nct(df, lambda),
    and returns lambda / (noncentrality per unit difference).

    paired=True: n pairs, sd = sd of the differences, df = n - 1, lambda = delta sqrt(n) / sd.
    paired=False: two arms of n runs each with a common within-arm sd (for unequal spreads pass
    sqrt((sd_a^2 + sd_b^2)/2), which gives the Welch standard error exactly at equal n), df = 2n - 2,
    lambda = delta / (sd sqrt(2/n)). A non-integer n (the harmonic mean of unequal arms) is allowed.
    For large n this tends to (z_{1-alpha/2} + z_power) sd / sqrt(n) (paired); at n = 3 it is far larger.
    """
    _check(alpha, power, n, paired)
    if sd == 0:
        return 0.0
    hi = 2 * (stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))
    while _power(hi, n, alpha, paired) < power:
        hi *= 2
    ncp = optimize.brentq(lambda lam: _power(lam, n, alpha, paired) - power, 0.0, hi, xtol=1e-10)
    return float(ncp / _ncp_per_unit(sd, n, paired))


def seeds_needed(effect: float, sd: float, *, alpha: float = 0.05, power: float = POWER, paired: bool = True,
                 max_n: int = MAX_SEEDS) -> int | None:
    """The smallest n >= 2 (pairs, or runs per arm when paired=False) at which the two-sided t test
    detects a true difference `effect` with at least the given power (same model as
    `detectable_difference`, so seeds_needed(detectable_difference(sd, n), sd) == n). None when
    effect is 0 or more than max_n would be needed. From an observed effect this is optimistic: the
    observed difference is itself noisy."""
    _check(alpha, power, 2, paired)
    if effect == 0 or not math.isfinite(effect):
        return None
    if sd == 0:
        return 2

    def enough(n: int) -> bool:
        return _power(abs(effect) * _ncp_per_unit(sd, n, paired), n, alpha, paired) >= power - 1e-9

    if not enough(max_n):
        return None
    lo, hi = 1, max_n  # enough(hi); lo is below the smallest valid n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if mid >= 2 and enough(mid):
            hi = mid
        else:
            lo = mid
    return hi


# --- tails and locations ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Rate:
    """count of n, with its Wilson (1927) score interval at `level`."""

    count: int
    n: int
    share: float
    low: float
    high: float
    level: float

    def text(self) -> str:
        return f"{self.count}/{self.n} = {self.share:.0%} [{self.low:.0%}, {self.high:.0%}]"


def rate(successes: int, n: int, level: float = 0.95) -> Rate:
    """successes/n with the Wilson score interval (Wilson 1927),
    (p + z^2/2n ± z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = z_{(1+level)/2}, via scipy's binomtest."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"rate: need 0 <= successes <= n and n >= 1, got {successes}/{n}")
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=level, method="wilson")
    return Rate(int(successes), int(n), successes / n, float(ci.low), float(ci.high), level)


def collapse_rate(final_gold: Values, initial_gold: float | Values,
                  level: float = 0.95) -> Rate:
    """Runs whose final gold ends strictly below the initial policy's gold (a scalar shared by every run,
    or one value per run)."""
    final = _array(final_gold, "final_gold")
    initial = np.broadcast_to(np.asarray(initial_gold, dtype=np.float64), final.shape)
    return rate(int((final < initial).sum()), len(final), level)


def drop_rate(final_gold: Values, peak_gold: Values,
              initial_gold: float | Values, level: float = 0.95) -> Rate:
    """Runs whose final gold fell by more than half of their peak gain: gain = peak - initial, dropped
    when final < initial + max(gain, 0)/2 (strict). A run with gain <= 0 never rose above the initial
    policy, so it has no gain to lose: it counts as dropped exactly when it ends below the initial gold
    (a collapse), which is also the limit of the rule as gain -> 0."""
    final, peak = _array(final_gold, "final_gold"), _array(peak_gold, "peak_gold")
    if len(final) != len(peak):
        raise ValueError(f"drop_rate: {len(final)} final values but {len(peak)} peaks")
    initial = np.broadcast_to(np.asarray(initial_gold, dtype=np.float64), final.shape)
    gain = np.maximum(peak - initial, 0.0)
    return rate(int((final < initial + gain / 2).sum()), len(final), level)


@dataclass(frozen=True)
class Location:
    """Robust location of a few heavy-tailed values: below 5, median and worst; from 5, IQM and median."""

    n: int
    median: float
    worst: float
    iqm: float | None  # from 5 values

    def text(self, fmt: str = "+.2f") -> str:
        if self.iqm is None:
            return f"median {self.median:{fmt}}, worst {self.worst:{fmt}} (n={self.n})"
        return f"IQM {self.iqm:{fmt}}, median {self.median:{fmt}} (n={self.n})"


def robust_location(values: Values) -> Location:
    """Median and worst (min) of the values; from 5 values also the interquartile mean (Agarwal et al.
    2021) as scipy.stats.trim_mean(x, 0.25), as in their rliable library: floor(n/4) values are cut
    from each end (no fractional weights), so for n not divisible by 4 slightly more than the middle
    50% is averaged."""
    x = _array(values, "values")
    if len(x) == 0:
        raise ValueError("robust_location: no values")
    iqm = float(stats.trim_mean(x, 0.25)) if len(x) >= 5 else None
    return Location(len(x), float(np.median(x)), float(x.min()), iqm)


# --- pairing runs ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """A run's record for pairing: its seed, its outcome and what the seed fixed (hashes by name, e.g.
    proxy_cache_key, initial_policy, eval_prompts; None for records that predate them)."""

    seed: Any
    value: float
    identity: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Unmatched:
    arm: str  # "A" or "B"
    seed: Any
    reason: str
    run: Any


@dataclass(frozen=True)
class Pairing:
    pairs: tuple[tuple[Any, Any], ...]  # (run of A, run of B), by seed
    unmatched: tuple[Unmatched, ...]


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, Mapping) else getattr(record, name, None)


def _identity(record: Any) -> dict[str, Any]:
    identity = _field(record, "identity") or {}
    return {k: v for k, v in identity.items() if v is not None}


def pair_runs(arm_a: Sequence[Any], arm_b: Sequence[Any]) -> Pairing:
    """Pairs runs of two arms that have the same seed AND the same non-empty identity (every recorded
    key equal, none recorded on one side only; None values count as not recorded). Records are
    mappings or objects with `seed` and `identity`. Every other run is returned with its reason."""
    by_seed: list[dict[Any, list[Any]]] = [{}, {}]
    unmatched: list[Unmatched] = []
    for side, (arm, runs) in enumerate((("A", arm_a), ("B", arm_b))):
        for r in runs:
            if _field(r, "seed") is None:
                unmatched.append(Unmatched(arm, None, "no seed recorded", r))
            else:
                by_seed[side].setdefault(_field(r, "seed"), []).append(r)
    seeds = set(by_seed[0]) | set(by_seed[1])
    try:
        ordered = sorted(seeds)
    except TypeError:  # seeds of mixed types
        ordered = sorted(seeds, key=repr)
    pairs = []
    for seed in ordered:
        ra, rb = by_seed[0].get(seed, []), by_seed[1].get(seed, [])
        if len(ra) != 1 or len(rb) != 1:
            for arm, runs, other in (("A", ra, rb), ("B", rb, ra)):
                reason = ("seed appears more than once in this arm" if len(runs) > 1 else
                          "no run at this seed in the other arm" if not other else
                          "the other arm has several runs at this seed")
                unmatched += [Unmatched(arm, seed, reason, r) for r in runs]
            continue
        ia, ib = _identity(ra[0]), _identity(rb[0])
        if ia and ib and ia == ib:
            pairs.append((ra[0], rb[0]))
            continue
        if not ia or not ib:
            reasons = ["no identity recorded" if not own else "other arm's run has no identity recorded"
                       for own in (ia, ib)]
        else:
            differs = sorted((k for k in set(ia) | set(ib) if ia.get(k) != ib.get(k)), key=str)
            reasons = ["identity differs: " + ", ".join(map(str, differs))] * 2
        unmatched += [Unmatched("A", seed, reasons[0], ra[0]), Unmatched("B", seed, reasons[1], rb[0])]
    return Pairing(tuple(pairs), tuple(unmatched))


def compare_arms(arm_a: Sequence[Any], arm_b: Sequence[Any], value: str | Callable[[Any], float] = "value", *,
                 level: float = 0.95) -> Comparison:
    """`paired` when every run of both arms pairs (`pair_runs`), else `unpaired` (Welch) on all runs;
    `pairing_note` says which and why. `value` names the record's field (key or attribute) holding
    the outcome, or is a function of the record."""
    def get(record: Any) -> float:
        v = value(record) if callable(value) else _field(record, value)
        if v is None:
            raise ValueError(f"compare_arms: the run at seed {_field(record, 'seed')} has no {value!r}")
        return float(v)

    pairing = pair_runs(arm_a, arm_b)
    if not pairing.unmatched and len(pairing.pairs) >= 2:
        c = paired([get(a) for a, _ in pairing.pairs], [get(b) for _, b in pairing.pairs], level=level,
                   seeds=[_field(a, "seed") for a, _ in pairing.pairs])
        note = f"paired: all {len(pairing.pairs)} seeds match in seed and identity"
        return replace(c, pairing_note=note)
    c = unpaired([get(r) for r in arm_a], [get(r) for r in arm_b], level=level)
    why = "; ".join(f"{u.arm} seed {u.seed}: {u.reason}" for u in pairing.unmatched) or "fewer than 2 pairs"
    note = (f"Welch (unpaired): {len(pairing.unmatched)} of {len(arm_a) + len(arm_b)} runs could not be "
            f"paired ({why})")
    return replace(c, pairing_note=note)
