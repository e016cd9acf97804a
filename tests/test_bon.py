"""Best-of-n: curve rows from a scored pool, and the method through its real command line."""

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
from rlhf_overopt.pool import aggregator_names, bon_curve_rows, n_grid
from rlhf_overopt.run.directory import CURVE_REQUIRED_KEYS, read_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_n_grid_and_aggregator_expansion():
    cfg = load_config(None, ["bon.pool_size=20"], check_paths=False)
    assert n_grid(cfg.bon.pool_size, cfg.bon.n_grid) == [1, 2, 4, 8, 16, 20]
    cfg = load_config(None, ["bon.pool_size=20", "bon.n_grid=[5,1,5]"], check_paths=False)
    assert n_grid(cfg.bon.pool_size, cfg.bon.n_grid) == [1, 5]
    cfg = load_config(None, ["proxy.k=2", "bon.aggregators=[members, wco, member_1]"], check_paths=False)
    assert aggregator_names(cfg.bon.aggregators, 2) == ["member_0", "member_1", "wco"]


def test_rows_follow_the_aggregated_objective_not_a_member():
    # one prompt, pool of 3. Member 0 prefers sample 0, member 1 prefers sample 2; the mean prefers
    # sample 1 (scores 0.5+0.5). Gold is [10, 20, 30]: best-of-3 gold must follow each objective.
    members = torch.tensor([[[3.0, 0.5, -2.0]], [[-2.0, 0.5, 3.0]]])  # (K=2, P=1, N=3)
    gold = torch.tensor([[10.0, 20.0, 30.0]])
    cfg = load_config(None, ["proxy.k=2", "bon.pool_size=3"], check_paths=False)
    rows = bon_curve_rows(members, gold, ["member_0", "member_1", "mean", "wco"], [1, 3],
                          uwo_lambda=cfg.aggregate.uwo_lambda)
    at = {(r["aggregator"], r["n"]): r for r in rows}
    assert at[("member_0", 3)]["gold_score"] == pytest.approx(10.0)
    assert at[("member_1", 3)]["gold_score"] == pytest.approx(30.0)
    # mean = [0.5, 0.5, 0.5]: a three-way tie, broken by the lower index -> sample 0
    # wco = min = [-2, 0.5, -2] -> sample 1
    assert at[("wco", 3)]["gold_score"] == pytest.approx(20.0)
    assert at[("wco", 3)]["proxy_member_scores"] == pytest.approx([0.5, 0.5])
    for agg in ("member_0", "member_1", "mean", "wco"):
        assert at[(agg, 1)]["gold_score"] == pytest.approx(20.0)  # n = 1 is the pool mean
        assert at[(agg, 1)]["kl"] == 0.0
    assert at[("mean", 3)]["kl"] == pytest.approx(math.log(3) - 2 / 3)
    assert all(k in rows[0] for k in CURVE_REQUIRED_KEYS)


@pytest.mark.slow
def test_bon_cli_on_the_tiny_testbed(tiny_bon_run, tiny_testbed):
    out = tiny_bon_run  # the session's (tests/conftest.py)
    rows = read_jsonl(out / "curves.jsonl")
    aggs = {r["aggregator"] for r in rows}
    assert aggs == {"member_0", "member_1", "member_2", "mean", "wco", "uwo", "median", "mean_minus_std"}
    assert sorted({r["n"] for r in rows}) == [1, 2, 4, 8, 16]
    for agg in aggs:
        curve = sorted((r for r in rows if r["aggregator"] == agg), key=lambda r: r["n"])
        # the optimized objective can only rise with n (expected max of more draws)
        assert all(b["proxy_score"] >= a["proxy_score"] - 1e-6 for a, b in itertools.pairwise(curve))
    n1 = {r["gold_score"] for r in rows if r["n"] == 1}
    assert max(n1) - min(n1) < 1e-6  # n = 1 is the pool's mean gold whatever the aggregator
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    from datasets import load_from_disk

    pool = load_from_disk(str(out / "pool"))
    assert len(pool) == 8 * 16 and len(pool[0]["proxy_scores"]) == 3
    assert (out / "report" / "table.md").exists()
    # running it again is a no-op that says so; without resume=true it refuses to overwrite; neither
    # writes a byte (which is also what lets them run on the session's run: a copy elsewhere would
    # be refused for its other output_dir)
    import hashlib

    def snapshot() -> dict[str, str]:
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.is_file()}

    before = snapshot()
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs/tiny/bon_ensemble.yaml"),
           f"output_dir={out}", f"testbed.cache_dir={tiny_testbed.root.parent}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    again = subprocess.run(cmd + ["resume=true"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and "already completed" in again.stdout
    refused = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2 and "already holds a run" in refused.stderr
    assert snapshot() == before


@pytest.mark.slow
def test_proxies_on_a_subset_of_the_pairs(tiny_testbed, tmp_path):
    """proxy.train_pairs trains on the first pairs of the train split, in its own cache folder;
    0 (all pairs) keeps the cache key of ensembles trained before the option existed."""
    from rlhf_overopt.rewards.cache import proxy_cache_dir

    base = load_config(ROOT / "configs/tiny/train_rm.yaml", [f"testbed.cache_dir={tiny_testbed.root.parent}"])
    subset = load_config(ROOT / "configs/tiny/train_rm.yaml",
                         [f"testbed.cache_dir={tiny_testbed.root.parent}", "proxy.train_pairs=40"])
    assert proxy_cache_dir(base, tiny_testbed) != proxy_cache_dir(subset, tiny_testbed)
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs/tiny/train_rm.yaml"),
           f"output_dir={out}", f"testbed.cache_dir={tiny_testbed.root.parent}", "proxy.train_pairs=40"]
    result = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "(40 train /" in result.stderr
    trained = Path(json.loads((out / "proxies.json").read_text())["path"])
    assert trained == proxy_cache_dir(subset, tiny_testbed)
    assert json.loads((trained / "ensemble.json").read_text())["train_config"]["train_pairs"] == 40
    too_many = subprocess.run(cmd[:-1] + ["proxy.train_pairs=100000", f"output_dir={tmp_path / 'bad'}"], check=False, cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
    assert too_many.returncode == 2 and "exceeds the" in too_many.stderr


@pytest.mark.slow
def test_bon_from_an_existing_scored_pool(tiny_bon_run, tiny_testbed, tmp_path):
    """bon.pool: a released gold-scored pool (here: this run's own pool, re-saved as jsonl without
    its member scores) gives the same curves as sampling it, the proxies filling in the members."""
    import json as _json

    cache = f"testbed.cache_dir={tiny_testbed.root.parent}"
    first = tiny_bon_run  # the sampled run: the session's (tests/conftest.py), read-only
    base = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs/tiny/bon_ensemble.yaml"),
            cache]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    from datasets import load_from_disk

    pool = load_from_disk(str(first / "pool"))
    released = tmp_path / "released.jsonl"
    released.write_text("".join(_json.dumps({"prompt": r["prompt"], "completion": r["response"], "ended": r["ended"],
                                             "gold": r["gold_score"]}) + "\n" for r in pool))
    second = tmp_path / "from_pool"
    result = subprocess.run(base + [f"output_dir={second}", f"bon.pool={released}"], check=False, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    keep = ("aggregator", "n", "gold_score", "kl")
    a, b = read_jsonl(first / "curves.jsonl"), read_jsonl(second / "curves.jsonl")
    assert [{k: r[k] for k in keep} for r in a] == [{k: r[k] for k in keep} for r in b]
    assert max(abs(x["proxy_score"] - y["proxy_score"]) for x, y in zip(a, b)) < 1e-5
    # a pool whose member scores came from another ensemble (here: zeros) is rescored by default ...
    other = tmp_path / "other_scores"
    pool.map(lambda r: {"proxy_scores": [0.0] * len(r["proxy_scores"])}).save_to_disk(str(other))
    rescored = tmp_path / "rescored"
    assert subprocess.run(base + [f"output_dir={rescored}", f"bon.pool={other}"], check=False, cwd=ROOT, env=env,
                          capture_output=True, timeout=600).returncode == 0
    c = read_jsonl(rescored / "curves.jsonl")
    assert [{k: r[k] for k in keep} for r in a] == [{k: r[k] for k in keep} for r in c]
    # ... and kept with bon.pool_scores=keep (every member score of the curves is then 0)
    kept = tmp_path / "kept"
    assert subprocess.run(base + [f"output_dir={kept}", f"bon.pool={other}", "bon.pool_scores=keep"], check=False, cwd=ROOT,
                          env=env, capture_output=True, timeout=600).returncode == 0
    assert all(v == 0.0 for r in read_jsonl(kept / "curves.jsonl") for v in r["proxy_member_scores"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "text": "b"}\n')
    result = subprocess.run(base + [f"output_dir={tmp_path / 'bad'}", f"bon.pool={bad}"], check=False, cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "bon.pool:" in result.stderr and "no response column" in result.stderr
