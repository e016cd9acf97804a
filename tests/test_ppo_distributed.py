"""A PPO update on fixed rollouts split over 2 DeepSpeed ranks equals the same update on 1 rank."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist" / "ppo_update_check.py"

pytestmark = pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")


def launch(out: Path, stage: int, ranks: int, mode: str = "ppo") -> dict:
    cmd = [sys.executable, str(SCRIPT), str(out), str(stage), mode]
    if ranks > 1:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(29600 + stage), str(SCRIPT), str(out),
               str(stage), mode]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("{"))
    return json.loads(line)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_equal_one_rank(tmp_path, stage):
    one = launch(tmp_path / "one.pt", stage, 1)
    two = launch(tmp_path / "two.pt", stage, 2)
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert a["params"].keys() == b["params"].keys()
    worst = max((a["params"][k] - b["params"][k]).abs().max().item() for k in a["params"])
    assert worst < 1e-5, f"largest parameter difference {worst}"
    # the update did move the parameters (otherwise equality would prove nothing)
    assert one["stats"]["approx_kl"] > 0
    total = a["total_params"]
    if stage == 3:
        # ZeRO-3 partitions the policy: each of 2 ranks holds half of it, plus the few small
        # tensors (layer norms, biases) kept whole below the persistence threshold of 10 x hidden
        persistent = b["persistent_params"]
        assert 0 < persistent < 0.05 * total
        assert one["local_params"] == [total + persistent]
        assert all(abs(n - (total / 2 + persistent)) <= 0.01 * total for n in two["local_params"]), two["local_params"]
    else:
        assert one["local_params"] == [total]
        assert two["local_params"] == [total, total]


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "normalization"), [(2, "sequence"), (3, "token"), (0, "constant")])
def test_group_update_two_ranks_equal_one_rank(tmp_path, stage, normalization):
    """GRPO's update (two groups of 4, one per rank) with the k3 KL in the loss: 2 ranks == 1 rank,
    for each loss normalization (the token mean is the one that needs DeepSpeed's rescaling)."""
    mode = f"grpo-{normalization}"
    one = launch(tmp_path / "one.pt", stage, 1, mode)
    launch(tmp_path / "two.pt", stage, 2, mode)
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    policy_keys = [k for k in a["params"] if not k.startswith("value.")]
    worst = max((a["params"][k] - b["params"][k]).abs().max().item() for k in policy_keys)
    assert worst < 1e-5, f"largest parameter difference {worst}"
    assert one["stats"]["approx_kl"] > 0 and one["stats"]["kl_ref_k3"] > 0
