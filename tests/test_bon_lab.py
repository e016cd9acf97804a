"""Best-of-n lab: exact pool KL of best-of-n, the rbon_kl and soft selectors, the overoptimization
signals at the choice, their config keys, their analysis curves, and one tiny end-to-end run."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_overopt.config.load import load_config
from rlhf_overopt.errors import ConfigError
from rlhf_overopt.ops.bon import (
    bon_expected,
    bon_kl,
    bon_selection_probs,
    expected_under,
    kl_pool,
    merged_kl,
    soft_bon_probs,
)
from rlhf_overopt.pool import bon_curve_rows, response_identity
from rlhf_overopt.run.directory import CURVE_REQUIRED_KEYS, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# brute force over all N^n ordered draws with replacement
# ------------------------------------------------------------------------------------------


def _kl_from_masses(masses: dict[int, float], ids: list[int]) -> float:
    """KL of a selection distribution over samples against the uniform pool, ids merged."""
    N = len(ids)
    merged: dict[int, float] = {}
    for j, m in masses.items():
        merged[ids[j]] = merged.get(ids[j], 0.0) + m
    return sum(m * math.log(m / (ids.count(y) / N)) for y, m in merged.items() if m > 0)


def brute_hard(objective: list[float], ids: list[int], n: int) -> tuple[dict[int, float], float]:
    """Masses of argmax best-of-n (ties: lower index wins) over all N^n draws, and their KL."""
    N = len(objective)
    masses = dict.fromkeys(range(N), 0.0)
    for draw in itertools.product(range(N), repeat=n):
        best = max(draw, key=lambda j: (objective[j], -j))
        masses[best] += 1.0 / N**n
    return masses, _kl_from_masses(masses, ids)


def brute_soft(objective: list[float], ids: list[int], n: int, lam: float) -> tuple[dict[int, float], float]:
    """Masses of soft best-of-n (pick draw k w.p. exp(r_k/lam) / sum) over all N^n draws."""
    N = len(objective)
    masses = dict.fromkeys(range(N), 0.0)
    for draw in itertools.product(range(N), repeat=n):
        w = [math.exp(objective[j] / lam) for j in draw]
        for k, j in enumerate(draw):
            masses[j] += w[k] / sum(w) / N**n
    return masses, _kl_from_masses(masses, ids)


# Two prompts of 5 samples: prompt 0 has a duplicated response (samples 1 and 3, equal proxy) and a
# proxy tie between two different responses (samples 0 and 2); prompt 1 is all one response but one.
OBJECTIVE = torch.tensor([[0.5, 1.2, 0.5, 1.2, -0.3], [0.1, 0.1, 0.1, 0.9, 0.1]], dtype=torch.float64)
IDS = torch.tensor([[0, 1, 2, 1, 4], [0, 0, 0, 3, 0]])


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_kl_pool_equals_brute_force_with_duplicates_and_ties(n):
    got = kl_pool(OBJECTIVE, IDS, [n])
    probs = bon_selection_probs(OBJECTIVE, [n])
    for p in range(2):
        masses, kl = brute_hard(OBJECTIVE[p].tolist(), IDS[p].tolist(), n)
        assert got[0, p].item() == pytest.approx(kl, abs=1e-12)
        assert probs[0, p].tolist() == pytest.approx([masses[j] for j in range(5)], abs=1e-12)
        assert got[0, p].item() <= bon_kl(n) + 1e-12


def test_kl_pool_is_the_analytic_kl_when_every_response_is_distinct_and_n_is_small():
    N, grid = 10_000, [1, 2, 4, 8, 16]
    objective = torch.randn(2, N, generator=torch.Generator().manual_seed(0))
    got = kl_pool(objective, torch.arange(N).expand(2, N), grid)
    for g, n in enumerate(grid):
        assert got[g].tolist() == pytest.approx([bon_kl(n)] * 2, abs=1e-6)


def test_kl_pool_is_at_most_the_analytic_bound_and_zero_for_one_response():
    gen = torch.Generator().manual_seed(1)
    objective = torch.randn(6, 12, generator=gen).round(decimals=1)
    ids = torch.randint(0, 5, (6, 12), generator=gen)
    grid = [1, 2, 4, 12, 40]
    got = kl_pool(objective, ids, grid)
    assert got[0].abs().max() < 1e-12  # n = 1 is the base policy
    for g, n in enumerate(grid):
        assert bool((got[g] <= bon_kl(n) + 1e-12).all())
    same = kl_pool(objective, torch.zeros(6, 12, dtype=torch.long), grid)
    assert same.abs().max() < 1e-12  # one response: best-of-n cannot move
    with pytest.raises(ValueError, match="integer"):
        merged_kl(bon_selection_probs(objective, [2]), ids.double())


@pytest.mark.parametrize("lam", [0.05, 0.5, 3.0])
@pytest.mark.parametrize("n", [1, 2, 3])
def test_soft_bon_equals_brute_force_with_duplicates(n, lam):
    probs = soft_bon_probs(OBJECTIVE, [n], lam)
    kl = merged_kl(probs, IDS)
    for p in range(2):
        masses, want_kl = brute_soft(OBJECTIVE[p].tolist(), IDS[p].tolist(), n, lam)
        assert probs[0, p].tolist() == pytest.approx([masses[j] for j in range(5)], abs=1e-10)
        assert kl[0, p].item() == pytest.approx(want_kl, abs=1e-10)
    values = torch.arange(10.0, dtype=torch.float64).reshape(2, 5)
    assert expected_under(probs, values)[0, 0].item() == pytest.approx(sum(probs[0, 0, j] * j for j in range(5)))


def test_soft_bon_limits():
    gen = torch.Generator().manual_seed(2)
    objective = torch.randn(3, 7, generator=gen, dtype=torch.float64)  # tie-free
    ids = torch.arange(7).expand(3, 7)
    grid = [1, 2, 5, 7]
    # lambda -> 0: the hard with-replacement masses F^n - F^-^n (weights spanning many orders)
    cold = soft_bon_probs(objective, grid, 1e-4)
    assert (cold - bon_selection_probs(objective, grid)).abs().max() < 1e-9
    assert (merged_kl(cold, ids) - kl_pool(objective, ids, grid)).abs().max() < 1e-8
    # lambda -> inf: uniform selection, KL -> 0
    hot = soft_bon_probs(objective, grid, 1e6)
    assert (hot - 1 / 7).abs().max() < 1e-5
    assert merged_kl(hot, ids).max() < 1e-9
    kls = [float(merged_kl(soft_bon_probs(objective, [5], lam), ids).mean()) for lam in (0.1, 1.0, 10.0)]
    assert kls[0] > kls[1] > kls[2]  # a hotter soft selection stays closer to the base policy
    with pytest.raises(ValueError, match="sum to 1"):
        soft_bon_probs(objective, grid, 0.3, step=4.0)
    with pytest.raises(ValueError, match="temperature"):
        soft_bon_probs(objective, grid, 0.0)


def test_response_identity_merges_same_text_and_end_within_a_prompt():
    responses = ["a", "b", "a", "a", "a", "c"]
    ended = [True, True, True, False, True, True]
    ids = response_identity([0, 0, 0, 1, 1, 1], responses, ended, 2, 3)
    assert ids.tolist() == [[0, 1, 0], [0, 1, 2]]


# ------------------------------------------------------------------------------------------
# curve rows
# ------------------------------------------------------------------------------------------


def _pool():
    # one prompt, pool of 4; two members; sample 2 duplicates sample 0.
    members = torch.tensor([[[1.0, 3.0, 1.0, 0.0]], [[0.0, 1.0, 0.0, 2.0]]])  # (K=2, P=1, N=4)
    gold = torch.tensor([[1.0, 2.0, 1.0, 4.0]])
    ids = torch.tensor([[0, 1, 0, 3]])
    tokens = torch.tensor([[5.0, 9.0, 5.0, 2.0]])
    ref = torch.tensor([[-10.0, -40.0, -10.0, -5.0]])
    return members, gold, ids, tokens, ref


def test_rows_carry_pool_kl_signals_and_selector_curves():
    members, gold, ids, tokens, ref = _pool()
    grid = [1, 2, 4]
    rows = bon_curve_rows(members, gold, ["member_0", "mean"], grid, response_ids=ids, response_tokens=tokens,
                          ref_logprob=ref, selectors=["rbon_kl", "soft"], rbon_alphas=[0.0, 1.0],
                          soft_temperatures=[0.5], selector_aggregators=["member_0"])
    assert all(k in r for r in rows for k in CURVE_REQUIRED_KEYS)
    curves = {r["curve"] for r in rows}
    assert curves == {"member_0", "mean", "member_0+rbon_kl(alpha=0)", "member_0+rbon_kl(alpha=1)",
                      "member_0+soft(lambda=0.5)"}
    at = {(r["curve"], r["n"]): r for r in rows}
    objective = members[0]
    for n in grid:
        plain = at[("member_0", n)]
        assert plain["kl"] == pytest.approx(bon_kl(n))
        assert plain["kl_pool"] <= plain["kl"] + 1e-12
        assert plain["kl_pool"] == pytest.approx(float(kl_pool(objective, ids, [n])[0, 0]))
        assert plain["sqrt_kl_pool"] == pytest.approx(math.sqrt(plain["kl_pool"]))
        assert plain["estimator"] == "unbiased" and "selector" not in plain
        # the signals are the unbiased estimator's expectations of the per-sample values
        std = members.std(dim=0, unbiased=False)
        assert plain["response_length"] == pytest.approx(float(bon_expected(objective, tokens, [n])[0, 0]))
        assert plain["proxy_member_std"] == pytest.approx(float(bon_expected(objective, std, [n])[0, 0]))
        # alpha = 0 is the plain curve; its kl is the pool KL
        zero = at[("member_0+rbon_kl(alpha=0)", n)]
        assert zero["gold_score"] == pytest.approx(plain["gold_score"])
        assert zero["kl"] == zero["kl_pool"] == pytest.approx(plain["kl_pool"])
        assert (zero["aggregator"], zero["selector"], zero["selector_param"]) == ("member_0", "rbon_kl", 0.0)
        # alpha = 1: objective + log pi_ref ranks sample 3 (0 - 5) over sample 0 (1 - 10) and 1 (3 - 40)
        reg = objective + ref
        one = at[("member_0+rbon_kl(alpha=1)", n)]
        assert one["gold_score"] == pytest.approx(float(bon_expected(reg, gold, [n])[0, 0]))
        assert one["proxy_score"] == pytest.approx(float(bon_expected(reg, objective, [n])[0, 0]))
        assert one["kl"] == pytest.approx(float(kl_pool(reg, ids, [n])[0, 0]))
        soft = at[("member_0+soft(lambda=0.5)", n)]
        probs = soft_bon_probs(objective, [n], 0.5)
        assert soft["estimator"] == "exact_pool"
        assert soft["gold_score"] == pytest.approx(float(expected_under(probs, gold)[0, 0]))
        assert soft["proxy_member_scores"] == pytest.approx([float(expected_under(probs, members[i])[0, 0])
                                                             for i in range(2)])
        assert soft["kl"] == soft["kl_pool"] == pytest.approx(float(merged_kl(probs, ids)[0, 0]))
    assert at[("member_0+rbon_kl(alpha=1)", 4)]["gold_score"] == pytest.approx(4.0)  # n = N: the top of the regularized order
    with pytest.raises(ValueError, match="ref_logprob"):
        bon_curve_rows(members, gold, ["mean"], grid, selectors=["rbon_kl"], rbon_alphas=[0.1],
                       selector_aggregators=["mean"])


def test_selector_config_keys():
    cfg = load_config(None, ["method=bon", "proxy.k=3"], check_paths=False)
    assert (cfg.bon.selectors, cfg.bon.rbon_alphas, cfg.bon.soft_temperatures, cfg.bon.selector_aggregators) == (
        [], [0.01, 0.03, 0.1, 0.3], [0.1, 0.3, 1.0], ["member_0"])
    cfg = load_config(None, ["method=bon", "proxy.k=3", "bon.selectors=[rbon_kl, soft]",
                             "bon.selector_aggregators=[members, uwo]"], check_paths=False)
    assert cfg.bon.selectors == ["rbon_kl", "soft"]
    for override, message in [
        ("bon.selectors=[rbon, soft]", "bon.selectors[0]: unknown selector 'rbon'"),
        ("bon.soft_temperatures=[0.3, 0]", "bon.soft_temperatures[1]: must be positive"),
        ("bon.soft_temperatures=[-1]", "bon.soft_temperatures[0]: must be positive"),
        ("bon.rbon_alphas=[-0.1]", "bon.rbon_alphas[0]: must be >= 0"),
        ("bon.selector_aggregators=[maen]", "bon.selector_aggregators[0]: unknown aggregator 'maen'"),
        ("bon.selector_aggregators=[member_3]", "bon.selector_aggregators[0]: member_3 is out of range"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_config(None, ["method=bon", "proxy.k=3", override], check_paths=False)


# ------------------------------------------------------------------------------------------
# analysis: selector curves stay apart; the x-axis can be the pool KL
# ------------------------------------------------------------------------------------------


def test_analysis_keeps_selector_curves_apart_and_reads_the_pool_kl(tmp_path):
    from analysis.load import load_run
    from analysis.report import main, write_report

    members, gold, ids, tokens, ref = _pool()
    rows = bon_curve_rows(members, gold, ["member_0", "mean"], [1, 2, 4], response_ids=ids, response_tokens=tokens,
                          ref_logprob=ref, selectors=["rbon_kl", "soft"], rbon_alphas=[0.1],
                          soft_temperatures=[0.5], selector_aggregators=["member_0"])
    run = tmp_path / "run"
    run.mkdir()
    (run / "curves.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    curves = {c.aggregator: c for c in load_run(run)}
    assert set(curves) == {"member_0", "mean", "member_0+rbon_kl(alpha=0.1)", "member_0+soft(lambda=0.5)"}
    assert curves["member_0"].kl.tolist() == pytest.approx([bon_kl(n) for n in (1, 2, 4)])
    pooled = {c.aggregator: c for c in load_run(run, x="kl_pool")}
    assert pooled["member_0"].kl.tolist() == pytest.approx([r["kl_pool"] for r in rows if r["curve"] == "member_0"])
    assert pooled["member_0"].sqrt_kl.tolist() == pytest.approx(
        [r["sqrt_kl_pool"] for r in rows if r["curve"] == "member_0"])
    report = write_report(list(curves.values()), tmp_path / "report")
    assert len(report.rows) == 4 and "member_0+soft(lambda=0.5)" in report.table
    assert main([str(run), "--out", str(tmp_path / "report_pool"), "--x", "kl_pool"]) == 0
    assert (tmp_path / "report_pool" / "curves_bon.png").exists()


# ------------------------------------------------------------------------------------------
# end to end on the tiny testbed
# ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bon_cli_with_selectors(tiny_testbed, tmp_path):
    """A tiny bon run with both selectors: new fields on every row, kl_pool <= kl on plain rows;
    then the same pool read back as bon.pool without ref_logprob / response_tokens gets both
    computed from the text and saved into the run's pool."""
    from datasets import load_from_disk

    cache = f"testbed.cache_dir={tiny_testbed.root.parent}"
    selectors = ["bon.selectors=[rbon_kl, soft]", "bon.rbon_alphas=[0.1]", "bon.soft_temperatures=[0.3]",
                 "bon.aggregators=[mean, member_0]"]
    base = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs/tiny/bon_ensemble.yaml"),
            cache, *selectors]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = tmp_path / "run"
    result = subprocess.run(base + [f"output_dir={out}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_jsonl(out / "curves.jsonl")
    assert {r["curve"] for r in rows} == {"mean", "member_0", "member_0+rbon_kl(alpha=0.1)",
                                          "member_0+soft(lambda=0.3)"}
    for r in rows:
        for key in ("kl_pool", "sqrt_kl_pool", "response_length", "proxy_member_std", "estimator"):
            assert key in r, key
        assert r["response_length"] > 0 and r["proxy_member_std"] >= 0
        if "selector" not in r:
            assert r["kl_pool"] <= r["kl"] + 1e-9
        else:
            assert r["kl"] == r["kl_pool"]
    assert (out / "report" / "table.md").exists() and "soft(lambda=0.3)" in (out / "report" / "table.md").read_text()
    pool = load_from_disk(str(out / "pool"))
    assert {"ref_logprob", "response_tokens"} <= set(pool.column_names)
    assert all(v < 0 for v in pool["ref_logprob"])

    released = tmp_path / "released.jsonl"
    released.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"], "ended": r["ended"],
                                            "gold_score": r["gold_score"], "proxy_scores": r["proxy_scores"]}) + "\n"
                                for r in pool))
    second = tmp_path / "from_pool"
    result = subprocess.run(base + [f"output_dir={second}", f"bon.pool={released}"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    again = load_from_disk(str(second / "pool"))
    assert {"ref_logprob", "response_tokens"} <= set(again.column_names)
    assert all(math.isfinite(v) and v < 0 for v in again["ref_logprob"]) and min(again["response_tokens"]) >= 1
    sampled = dict(zip(zip(pool["prompt"], pool["response"], pool["ended"]), pool["ref_logprob"]))
    same = [abs(sampled[k] - lp) < 1e-3 for k, lp in zip(zip(again["prompt"], again["response"], again["ended"]),
                                                          again["ref_logprob"])]
    # text read back is scored in its canonical tokenization: the tiny policy's samples often are
    # not canonical (and hold invalid UTF-8 the decoder replaces), so only some match exactly
    assert sum(same) >= len(same) // 5
    rows = read_jsonl(second / "curves.jsonl")
    assert {r["curve"] for r in rows} >= {"member_0+rbon_kl(alpha=0.1)", "member_0+soft(lambda=0.3)"}
