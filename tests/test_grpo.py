"""GRPO and RLOO through their real command line on the tiny testbed: curves (KL to the initial
policy measured even with no KL penalty), training statistics, resume, 2 DeepSpeed ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_overopt.run.directory import CURVE_REQUIRED_KEYS, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TIMING = ("time_generate_s", "time_update_s", "time_step_s")


def train(config: str, *args: str, cache: Path, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(ROOT / "launch" / "train.py"), "--config",
           str(ROOT / "configs" / "tiny" / config), f"testbed.cache_dir={cache}", *args]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_testbed):
    out = tmp_path_factory.mktemp("grpo") / "run"
    train("grpo_ensemble.yaml", f"output_dir={out}", cache=tiny_testbed.root.parent)
    return out


@pytest.mark.slow
def test_grpo_cli_measures_kl_without_a_penalty(grpo_run):
    rows = read_jsonl(grpo_run / "curves.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows:
        assert all(k in row for k in CURVE_REQUIRED_KEYS)
        assert row["method"] == "grpo" and row["aggregator"] == "uwo" and row["advantage"] == "grpo"
        assert row["kl_coef"] == 0.0 and row["group_size"] == 4 and len(row["proxy_member_scores"]) == 3
    assert abs(rows[0]["kl"]) < 1e-5
    # grpo.kl_coef is 0, and the policy still moved away from its start: measured, not assumed
    assert rows[-1]["kl"] > 0.01
    stats = read_jsonl(grpo_run / "train_stats.jsonl")
    assert [s["step"] for s in stats] == [1, 2, 3, 4]
    for key in ("policy_loss", "approx_kl", "clipfrac", "kl_ref_k3", "constant_group_fraction", "reward"):
        assert key in stats[0]
    assert "value_loss" not in stats[0]  # no value model
    assert not (grpo_run / "checkpoints" / "value").exists()
    summary = json.loads((grpo_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["advantage"] == "grpo"


@pytest.mark.slow
def test_grpo_resume_equals_uninterrupted(grpo_run, tiny_testbed, tmp_path):
    out, cache = tmp_path / "run", tiny_testbed.root.parent
    train("grpo_ensemble.yaml", f"output_dir={out}", "ppo.steps=2", cache=cache)
    train("grpo_ensemble.yaml", f"output_dir={out}", "ppo.steps=4", "resume=true", cache=cache)
    assert _without_timing(read_jsonl(out / "curves.jsonl")) == _without_timing(read_jsonl(grpo_run / "curves.jsonl"))
    assert (_without_timing(read_jsonl(out / "train_stats.jsonl"))
            == _without_timing(read_jsonl(grpo_run / "train_stats.jsonl")))


@pytest.mark.slow
def test_rloo_with_kl_in_the_reward_and_dr_grpo(tiny_testbed, tmp_path):
    cache = tiny_testbed.root.parent
    train("rloo_ensemble.yaml", f"output_dir={tmp_path / 'rloo'}", "ppo.steps=2", cache=cache)
    rows = read_jsonl(tmp_path / "rloo" / "curves.jsonl")
    assert rows[-1]["advantage"] == "rloo" and rows[-1]["kl_in"] == "reward" and rows[-1]["kl_coef"] == 0.05
    stats = read_jsonl(tmp_path / "rloo" / "train_stats.jsonl")
    # the KL penalty went into the reward: reward = score - 0.05 * rollout KL
    for s in stats:
        assert s["reward"] == pytest.approx(s["score"] - 0.05 * s["rollout_kl"], abs=1e-5)
    train("grpo_ensemble.yaml", f"output_dir={tmp_path / 'dr'}", "ppo.steps=2", "grpo.std_normalize=false",
          "grpo.loss_normalization=constant", cache=cache)
    assert read_jsonl(tmp_path / "dr" / "curves.jsonl")[-1]["advantage"] == "dr_grpo"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_grpo_two_ranks_cli(tiny_testbed, tmp_path):
    out = tmp_path / "run"
    train("grpo_ensemble.yaml", f"output_dir={out}", "ppo.steps=2", "deepspeed.zero_stage=2",
          cache=tiny_testbed.root.parent, launcher=["deepspeed", "--num_gpus", "2", "--master_port", "29660"])
    rows = read_jsonl(out / "curves.jsonl")
    assert [r["step"] for r in rows] == [0, 2]
    assert rows[0]["n_eval"] == 16  # both ranks' halves of the eval prompts were gathered
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_grpo_config_errors_before_any_work(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs" / "tiny" /
           "grpo_ensemble.yaml"), f"output_dir={tmp_path / 'x'}", "ppo.batch_size=12", "ppo.mini_batch_size=6", "grpo.group_size=8"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "grpo.group_size" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_grpo_lora_policy_with_gradient_checkpointing(tiny_testbed, tmp_path):
    """GRPO with a LoRA policy (reference = adapters disabled) and gradient checkpointing: the KL
    to the initial policy starts at 0 and grows, and only the adapters train."""
    out = tmp_path / "run"
    train("grpo_ensemble.yaml", f"output_dir={out}", "policy.lora_r=4", "policy.gradient_checkpointing=true",
          "ppo.lr=1e-3", cache=tiny_testbed.root.parent)
    rows = read_jsonl(out / "curves.jsonl")
    assert abs(rows[0]["kl"]) < 1e-5 and rows[-1]["kl"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["policy_trainable_params"] < 0.1 * summary["policy_total_params"]
