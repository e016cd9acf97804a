"""PPO through its real command line on the tiny testbed: smoke, learning, resume, 2 DeepSpeed ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_overopt.run.directory import CURVE_REQUIRED_KEYS, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "ppo_ensemble.yaml"
TIMING = ("time_generate_s", "time_update_s", "time_step_s")


def train(*args: str, cache: Path, launcher: list[str] | None = None, timeout: int = 600):
    cmd = [*(launcher or [sys.executable]), str(ROOT / "launch" / "train.py"), "--config", str(TINY),
           f"testbed.cache_dir={cache}", *args]
    result = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def ppo_run(tiny_ppo_run):
    """The session's tiny PPO run (tests/conftest.py), read-only."""
    return tiny_ppo_run


@pytest.mark.slow
def test_ppo_cli_writes_curves_and_summary(ppo_run):
    rows = read_jsonl(ppo_run / "curves.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows:
        assert all(k in row for k in CURVE_REQUIRED_KEYS)
        assert row["method"] == "ppo" and row["aggregator"] == "uwo" and len(row["proxy_member_scores"]) == 3
        assert row["n_eval"] == 16
    # at step 0 the policy is its own reference: the k1 estimate is exactly 0
    assert abs(rows[0]["kl"]) < 1e-5
    assert rows[-1]["kl"] > 0
    summary = json.loads((ppo_run / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["curves"]["ppo/uwo"]["points"] == 3
    stats = read_jsonl(ppo_run / "train_stats.jsonl")
    assert [s["step"] for s in stats] == [1, 2, 3, 4]
    for key in ("approx_kl", "clipfrac", "ratio_mean", "entropy", "value_error", "eos_rate", "response_length"):
        assert key in stats[0]
    assert json.loads((ppo_run / "checkpoints" / "state.json").read_text())["step"] == 4
    assert (ppo_run / "samples.jsonl").exists()
    assert "git_sha" in (ppo_run / "config.yaml").read_text()


@pytest.mark.slow
def test_ppo_changes_the_policy(ppo_run, tiny_testbed):
    before = load_file(str(Path(tiny_testbed.policy_dir) / "model.safetensors"))
    after = load_file(str(ppo_run / "policy" / "model.safetensors"))
    changed = [k for k in after if k in before and not torch.equal(before[k], after[k])]
    assert len(changed) > len(after) // 2


@pytest.mark.slow
def test_resume_equals_uninterrupted(ppo_run, tiny_testbed, tmp_path):
    out = tmp_path / "run"
    cache = tiny_testbed.root.parent
    train(f"output_dir={out}", "ppo.steps=2", cache=cache)
    assert [r["step"] for r in read_jsonl(out / "curves.jsonl")] == [0, 2]
    train(f"output_dir={out}", "ppo.steps=4", "resume=true", cache=cache)

    def strip(rows):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]

    assert strip(read_jsonl(out / "curves.jsonl")) == strip(read_jsonl(ppo_run / "curves.jsonl"))
    assert strip(read_jsonl(out / "train_stats.jsonl")) == strip(read_jsonl(ppo_run / "train_stats.jsonl"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_two_rank_zero3_cli(tiny_testbed, tmp_path):
    """ZeRO-3 on 2 ranks through the command line, one step (an evaluation before and after it)."""
    out = tmp_path / "run"
    train(f"output_dir={out}", "deepspeed.zero_stage=3", "ppo.steps=1", "eval.every=1", cache=tiny_testbed.root.parent,
          launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port())])
    rows = read_jsonl(out / "curves.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert rows[0]["n_eval"] == 16  # both ranks' halves of the eval prompts were gathered
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    total, local = summary["policy_total_params"], summary["policy_local_params"]
    assert abs(local - total / 2) <= 0.05 * total


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


@pytest.mark.slow
def test_same_seed_gives_identical_curves(ppo_run, tiny_testbed, tmp_path):
    out = tmp_path / "again"
    train(f"output_dir={out}", cache=tiny_testbed.root.parent)
    assert _without_timing(read_jsonl(out / "curves.jsonl")) == _without_timing(read_jsonl(ppo_run / "curves.jsonl"))


SUMMARY_TIMING = ("wall_time_s", "train_time_s")


def _steps_logged(run_dir: Path) -> int:
    """Training steps recorded so far in a run directory (0 before the first one)."""
    try:
        return len((run_dir / "train_stats.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume(ppo_run, tiny_testbed, tmp_path):
    """Kill the run (whole process group, SIGKILL) at seeded random moments and resume each
    time; the final files must equal those of the uninterrupted run.

    The moments are tied to the run's progress, not to the wall clock, so a fast or a loaded
    machine kills at the same kinds of points: while starting up, and a random fraction of a
    second after a training step was logged (mid-rollout, mid-update, mid-checkpoint)."""
    import random
    import signal
    import time

    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(TINY),
           f"testbed.cache_dir={tiny_testbed.root.parent}", f"output_dir={out}"]
    rng = random.Random(7)
    kills = 0
    for attempt in range(12):
        args = cmd + (["resume=true"] if out.exists() else [])
        # stderr goes to a file: a pipe nobody reads while the run goes on can fill and block it
        log = tmp_path / f"attempt{attempt}.log"
        with log.open("w") as err_file:
            proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err_file, text=True,
                                    start_new_session=True)
        if kills < 3:
            # the first kill lands during start-up; later ones after one more step is logged
            target = _steps_logged(out) + (0 if kills == 0 else 1)
            delay = rng.uniform(1.0, 3.0) if kills == 0 else rng.uniform(0.0, 0.5)
            while proc.poll() is None and _steps_logged(out) < target:
                time.sleep(0.02)
            time.sleep(delay)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        proc.wait(timeout=600)
        assert proc.returncode == 0, log.read_text()[-3000:]
        summary = json.loads((out / "summary.json").read_text())
        if summary["status"] == "completed":
            break
    assert kills >= 1, "the run finished before any kill; lengthen it"
    assert _without_timing(read_jsonl(out / "curves.jsonl")) == _without_timing(read_jsonl(ppo_run / "curves.jsonl"))
    done, reference = (json.loads((d / "summary.json").read_text()) for d in (out, ppo_run))
    for s in (done, reference):
        for key in SUMMARY_TIMING:
            s.pop(key, None)
    assert done == reference


@pytest.mark.slow
def test_value_model_initialized_from_a_proxy_member(tiny_testbed, tmp_path):
    """ppo.value_init=proxy loads member_0's transformer into the value model: with a learning rate
    too small to move it, the value checkpoint's backbone equals the proxy's, not the policy's."""
    out = tmp_path / "run"
    train(f"output_dir={out}", "ppo.value_init=proxy", "ppo.steps=2", "ppo.value_lr=1e-20",
          cache=tiny_testbed.root.parent)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    member = Path(json.loads((out / "proxies.json").read_text())["path"]) / "member_0"
    proxy = {k.removeprefix("transformer."): v for k, v in load_file(str(member / "model.safetensors")).items()
             if k.startswith("transformer.")}
    policy = {k.removeprefix("transformer."): v
              for k, v in load_file(str(Path(tiny_testbed.policy_dir) / "model.safetensors")).items()}
    states = torch.load(next((out / "checkpoints" / "value" / "step_2").glob("*model_states.pt")),
                        map_location="cpu", weights_only=False)["module"]
    backbone = {k.removeprefix("backbone."): v for k, v in states.items() if k.startswith("backbone.")}
    shared = [k for k in backbone if k in proxy]
    assert len(shared) >= len(proxy) - 2  # every transformer tensor of the proxy (buffers aside)
    assert all(torch.allclose(backbone[k], proxy[k], atol=1e-6) for k in shared)
    assert any(not torch.allclose(backbone[k], policy[k], atol=1e-4) for k in shared if k in policy)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_lora_policy_two_rank_zero2_cli(tiny_testbed, tmp_path):
    """policy.lora_r=8 at ZeRO-2 on 2 ranks: the run completes, the policy moves away from its
    adapter-disabled reference (KL > 0), only the adapters train, and the saved policy is a merged
    plain transformers model that differs from the initial one."""
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    train(f"output_dir={out}", "policy.lora_r=8", "deepspeed.zero_stage=2", "ppo.lr=1e-3",
          cache=tiny_testbed.root.parent, launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port())])
    rows = read_jsonl(out / "curves.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert abs(rows[0]["kl"]) < 1e-5 and rows[-1]["kl"] > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    initial = AutoModelForCausalLM.from_pretrained(tiny_testbed.policy_dir)
    base_total = sum(p.numel() for p in initial.parameters())
    trainable, total = summary["policy_trainable_params"], summary["policy_total_params"]
    assert 0 < trainable < 0.2 * base_total and total == base_total + trainable
    assert summary["value_trainable_params"] == summary["value_total_params"]  # the value model is a full model
    saved = AutoModelForCausalLM.from_pretrained(out / "policy")
    assert not any(isinstance(m, LoraLayer) for m in saved.modules())
    after = load_file(str(out / "policy" / "model.safetensors"))
    before = load_file(str(Path(tiny_testbed.policy_dir) / "model.safetensors"))
    assert set(after) == set(before)
    assert any(not torch.equal(before[k], after[k]) for k in after)
