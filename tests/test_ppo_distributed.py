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


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out: Path, stage: int, ranks: int, mode: str = "ppo") -> dict:
    cmd = [sys.executable, str(SCRIPT), str(out), str(stage), mode]
    if ranks > 1:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(_free_port()), str(SCRIPT), str(out),
               str(stage), mode]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("{"))
    return json.loads(line)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """The update check run at most once per (stage, ranks, mode) in this module (the script is
    deterministic; several tests compare against the same 1-rank and 2-rank runs): returns
    (what it printed, the path of the parameters it saved)."""
    folder, done = tmp_path_factory.mktemp("ppo_update"), {}

    def get(stage: int, ranks: int, mode: str = "ppo") -> tuple[dict, Path]:
        key = (stage, ranks, mode)
        if key not in done:
            out = folder / f"{mode}-zero{stage}-{ranks}ranks.pt"
            done[key] = (launch(out, stage, ranks, mode), out)
        return done[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_equal_one_rank(launched, stage):
    (one, one_path), (two, two_path) = launched(stage, 1), launched(stage, 2)
    a, b = torch.load(one_path), torch.load(two_path)
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
def test_group_update_two_ranks_equal_one_rank(launched, stage, normalization):
    """GRPO's update (two groups of 4, one per rank) with the k3 KL in the loss: 2 ranks == 1 rank,
    for each loss normalization (the token mean is the one that needs DeepSpeed's rescaling)."""
    mode = f"grpo-{normalization}"
    (one, one_path), (_, two_path) = launched(stage, 1, mode), launched(stage, 2, mode)
    a, b = torch.load(one_path), torch.load(two_path)
    policy_keys = [k for k in a["params"] if not k.startswith("value.")]
    worst = max((a["params"][k] - b["params"][k]).abs().max().item() for k in policy_keys)
    assert worst < 1e-5, f"largest parameter difference {worst}"
    assert one["stats"]["approx_kl"] > 0 and one["stats"]["kl_ref_k3"] > 0


def launch_two_nodes(out: Path, stage: int, tmp_path: Path, port: int) -> dict:
    """Two "nodes" on localhost, one rank each, as on a cluster without ssh between nodes (Slurm):
    every node runs the DeepSpeed launcher with the same hostfile, `--no_ssh` and its `--node_rank`."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def node(rank: int) -> list[str]:
        return ["deepspeed", "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank), "--master_addr",
                "127.0.0.1", "--master_port", str(port), str(SCRIPT), str(out), str(stage)]

    other = subprocess.Popen(node(1), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        result = subprocess.run(node(0), check=False, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    finally:
        other.wait(timeout=120)
    assert result.returncode == 0 and other.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(next(x for x in result.stdout.splitlines() if x.startswith("{")))


@pytest.mark.slow
def test_two_nodes_equal_two_ranks_and_one_rank(launched, tmp_path):
    """The multi-node launch (hostfile, --no_ssh --node_rank) gives the same parameters after a PPO
    update at ZeRO-2 as two ranks on one node, and as one rank (the runs test_two_ranks_equal_one_rank
    compares, made once for both)."""
    nodes = launch_two_nodes(tmp_path / "nodes.pt", 2, tmp_path, _free_port())
    assert nodes["world"] == 2
    a, b, c = torch.load(tmp_path / "nodes.pt"), torch.load(launched(2, 2)[1]), torch.load(launched(2, 1)[1])
    worst_ranks = max((a["params"][k] - b["params"][k]).abs().max().item() for k in a["params"])
    worst_one = max((a["params"][k] - c["params"][k]).abs().max().item() for k in a["params"])
    print(f"two nodes vs two ranks: {worst_ranks:.3g}; two nodes vs one rank: {worst_one:.3g}")
    assert worst_ranks == 0.0, worst_ranks  # the same two processes, the same arithmetic
    assert worst_one < 1e-5, worst_one
