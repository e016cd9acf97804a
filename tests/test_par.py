"""PAR reward shaping (Fu et al. 2025): the formula on hand-worked numbers, the reference cache,
tiny PPO and GRPO runs with aggregate.shaping=par, and the methods that refuse it."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_overopt.config.load import load_config
from rlhf_overopt.errors import ConfigError
from rlhf_overopt.ops.shaping import par_reward
from rlhf_overopt.references import (
    CHUNK_PROMPTS,
    REFERENCE_DIR,
    ParReferences,
    chunk_range,
    drawn_chunks,
    lookup,
)
from rlhf_overopt.run import seeds
from rlhf_overopt.run.directory import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
TIMING = ("time_generate_s", "time_update_s", "time_step_s")


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# -- the formula ------------------------------------------------------------------------------------


def test_par_hand_worked():
    # r = 1 against references [0, 1, 2]: (s(1) + s(0) + s(-1)) / 3 = 0.5 by symmetry
    out = par_reward(torch.tensor([1.0, 2.0, 0.0]), torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [1.0, 3.0, 3.0]]))
    assert out[0].item() == pytest.approx(0.5, abs=1e-7)
    assert out[1].item() == pytest.approx(sigmoid(2.0), abs=1e-7)
    assert out[2].item() == pytest.approx((sigmoid(-1.0) + 2 * sigmoid(-3.0)) / 3, abs=1e-7)


def test_par_is_bounded_centred_and_monotone():
    g = torch.Generator().manual_seed(0)
    refs = torch.randn(64, 4, generator=g, dtype=torch.float64) * 5
    r = torch.randn(64, generator=g, dtype=torch.float64) * 5
    out = par_reward(r, refs)
    assert ((out > 0) & (out < 1)).all()
    # a response scored exactly like each of its (equal) references is at 0.5
    same = torch.full((64, 4), 0.7, dtype=torch.float64)
    assert torch.allclose(par_reward(same[:, 0], same), torch.full((64,), 0.5, dtype=torch.float64))
    # higher proxy, higher shaped reward; the slope never exceeds 1/4
    up = par_reward(r + 1e-3, refs)
    assert (up > out).all() and ((up - out) / 1e-3 <= 0.25 + 1e-6).all()


def test_par_rejects_bad_shapes():
    with pytest.raises(ValueError, match="proxy_score must be 1-D"):
        par_reward(torch.zeros(2, 1), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\(B, k\)"):
        par_reward(torch.zeros(2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="at least one reference"):
        par_reward(torch.zeros(2), torch.zeros(2, 0))


# -- reference bookkeeping --------------------------------------------------------------------------


def test_reference_aggregation_and_lookup():
    # 3 prompts, K = 2 members, k = 2 references; prompt 2 never sampled
    scores = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [2.0, -2.0]], [[math.nan] * 2] * 2])
    refs = ParReferences({"train": scores, "eval": scores[:0]}, k=2)
    agg = refs.aggregated("train", lambda s: s.mean(dim=0))  # (K, B) -> (B,)
    assert agg.shape == (3, 2)
    assert agg[:2].tolist() == [[2.0, 3.0], [1.0, -1.0]]
    assert lookup(agg, [1, 0, 1], "train").tolist() == [[1.0, -1.0], [2.0, 3.0], [1.0, -1.0]]
    with pytest.raises(RuntimeError, match=r"prompt\(s\) \[2\] have no cached references"):
        lookup(agg, [0, 2], "train")


def test_drawn_chunks_cover_every_drawn_prompt():
    n, per_step, steps = 200, 8, 5
    chunks = drawn_chunks(n, per_step, 3, steps)
    covered = {i for c in chunks for i in chunk_range(n, c)}
    for step in range(steps):
        assert set(seeds.prompt_draw(n, per_step, 3, step, 0, per_step)) <= covered
    assert chunk_range(n, chunks[-1]).stop <= n and CHUNK_PROMPTS == 32


# -- runs through the real command line ---------------------------------------------------------------


def train(config: str, *args: str, cache: Path, check: bool = True, launcher: list[str] | None = None):
    cmd = [*(launcher or [sys.executable]), str(ROOT / "launch" / "train.py"), "--config", str(TINY / config),
           f"testbed.cache_dir={cache}", *args]
    result = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def reference_files(run: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((run / REFERENCE_DIR).iterdir())}


@pytest.fixture(scope="module")
def par_ppo_run(tmp_path_factory, tiny_testbed):
    out = tmp_path_factory.mktemp("par_ppo") / "run"
    train("ppo_ensemble.yaml", f"output_dir={out}", "aggregate.shaping=par", cache=tiny_testbed.root.parent)
    return out


@pytest.mark.slow
def test_ppo_with_par_logs_shaped_and_unshaped(par_ppo_run):
    rows = read_jsonl(par_ppo_run / "curves.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows:
        assert 0 < row["proxy_shaped"] < 1
        assert "proxy_score" in row and row["proxy_score"] != row["proxy_shaped"]
    # at step 0 the policy is the one the references came from: PAR is near its centre
    assert abs(rows[0]["proxy_shaped"] - 0.5) < 0.1
    stats = read_jsonl(par_ppo_run / "train_stats.jsonl")
    assert all(0 < s["proxy_shaped"] < 1 and s["score"] == s["proxy_shaped"] for s in stats)
    files = sorted(p.name for p in (par_ppo_run / REFERENCE_DIR).iterdir())
    assert files[0] == "eval_00000.json" and any(f.startswith("train_") for f in files)
    chunk = json.loads((par_ppo_run / REFERENCE_DIR / files[-1]).read_text())
    k, n = chunk["k"], len(chunk["prompts"])
    assert k == 4 and len(chunk["responses"]) == len(chunk["ended"]) == n * k
    assert len(chunk["member_scores"]) == 3 and all(len(m) == n * k for m in chunk["member_scores"])


@pytest.mark.slow
def test_references_are_cached_and_reused_on_resume(par_ppo_run, tiny_testbed, tmp_path):
    cache = tiny_testbed.root.parent
    out = tmp_path / "run"
    train("ppo_ensemble.yaml", f"output_dir={out}", "aggregate.shaping=par", "ppo.steps=2", cache=cache)
    before = reference_files(out)
    resumed = train("ppo_ensemble.yaml", f"output_dir={out}", "aggregate.shaping=par", "ppo.steps=4",
                    "resume=true", cache=cache)
    after = reference_files(out)
    # not one chunk sampled again: same bytes, same modification times (new chunks only if drawn)
    assert {name: after[name] for name in before} == before
    log_text = resumed.stdout + resumed.stderr
    if set(after) == set(before):
        assert "reference chunk(s) read from" in log_text and "PAR: sampling" not in log_text
    # the references do not depend on when they were sampled: the same as the uninterrupted run's
    assert {n: b for n, (b, _) in after.items()} == {n: b for n, (b, _) in reference_files(par_ppo_run).items()}

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]

    assert strip(read_jsonl(out / "curves.jsonl")) == strip(read_jsonl(par_ppo_run / "curves.jsonl"))
    assert strip(read_jsonl(out / "train_stats.jsonl")) == strip(read_jsonl(par_ppo_run / "train_stats.jsonl"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_references_do_not_depend_on_the_rank_count(par_ppo_run, tiny_testbed, tmp_path):
    # ZeRO-3: each rank samples a padded equal share inside the gathered reference
    out = tmp_path / "run"
    train("ppo_ensemble.yaml", f"output_dir={out}", "aggregate.shaping=par", "deepspeed.zero_stage=3",
          cache=tiny_testbed.root.parent, launcher=["deepspeed", "--num_gpus", "2", "--master_port", "29679"])
    one = {n: b for n, (b, _) in reference_files(par_ppo_run).items()}
    assert {n: b for n, (b, _) in reference_files(out).items()} == one
    rows = read_jsonl(out / "curves.jsonl")
    assert rows[0]["n_eval"] == 16 and all(0 < r["proxy_shaped"] < 1 for r in rows)


@pytest.mark.slow
def test_grpo_with_par_completes_and_logs_shaped(tiny_testbed, tmp_path):
    out = tmp_path / "run"
    train("grpo_ensemble.yaml", f"output_dir={out}", "aggregate.shaping=par", "aggregate.par_references=2",
          cache=tiny_testbed.root.parent)
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    rows = read_jsonl(out / "curves.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert all(0 < r["proxy_shaped"] < 1 for r in rows)
    assert all(0 < s["proxy_shaped"] < 1 for s in read_jsonl(out / "train_stats.jsonl"))
    chunk = json.loads(next((out / REFERENCE_DIR).glob("train_*.json")).read_text())
    assert chunk["k"] == 2


# -- methods that refuse it ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["constrained_ppo.yaml", "nm_ppo.yaml", "dynamic_weighting.yaml",
                                    "proxy_points.yaml", "bon_ensemble.yaml", "madpo.yaml"])
def test_methods_without_a_shapeable_reward_refuse_par(config):
    with pytest.raises(ConfigError) as info:
        load_config(TINY / config, ["aggregate.shaping=par"], check_paths=False)
    message = str(info.value)
    method = load_config(TINY / config, check_paths=False).method
    assert message.startswith("aggregate.shaping:") and f"method {method}" in message


def test_bad_shaping_values_are_refused():
    with pytest.raises(ConfigError, match="aggregate.shaping"):
        load_config(TINY / "ppo_ensemble.yaml", ["aggregate.shaping=warm"], check_paths=False)
    with pytest.raises(ConfigError, match="aggregate.par_references: must be positive"):
        load_config(TINY / "ppo_ensemble.yaml", ["aggregate.shaping=par", "aggregate.par_references=0"],
                    check_paths=False)
    assert load_config(TINY / "rloo_ensemble.yaml", ["aggregate.shaping=par"], check_paths=False).aggregate.shaping == "par"


@pytest.mark.slow
def test_refused_combination_fails_before_any_work(tmp_path):
    out = tmp_path / "run"
    result = train("constrained_ppo.yaml", f"output_dir={out}", "aggregate.shaping=par", cache=tmp_path / "cache",
                   check=False)
    assert result.returncode != 0
    assert "aggregate.shaping: par is not supported by method constrained_ppo" in result.stdout + result.stderr
    assert not out.exists() and not (tmp_path / "cache").exists()
