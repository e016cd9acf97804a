"""What a run does when something goes wrong after it started: a non-finite gold, proxy or loss at a
later step stops it at that step, names the source, records the failure, and leaves curves and the
last checkpoint intact and resumable; a resume that is refused (changed key, corrupt checkpoint)
leaves every byte of the run as it was."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_overopt.run.directory import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny" / "ppo_ensemble.yaml"
TIMING = ("time_generate_s", "time_update_s", "time_step_s")


def _cmd(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["--config", str(TINY), f"testbed.cache_dir={cache}", f"output_dir={out}", *extra]


def _run(args: list[str], fault: tuple[str, int] | None = None) -> subprocess.CompletedProcess:
    prefix = ([sys.executable, str(ROOT / "tests" / "dist" / "faulty_train.py"), fault[0], str(fault[1]), "--"]
              if fault else [sys.executable, str(ROOT / "launch" / "train.py")])
    return subprocess.run(prefix + args, check=False, cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"})


def _strip(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def reference(tiny_ppo_run):
    """The uninterrupted tiny PPO run (steps 4, evaluations at 0/2/4, checkpoints at 2/4): the
    session's (tests/conftest.py), read-only."""
    return tiny_ppo_run


# The faulty call lands after the step-2 checkpoint: gold is scored at evaluations 0, 2, 4 (the
# third call is step 4's); the proxy at every rollout and evaluation (eval 0, steps 1-2, eval 2,
# step 3 is the 5th call); the loss at every minibatch (2 epochs x 2 minibatches a step: the 9th is
# step 3's first).
FAULTS = [("gold_nan", 3, "step 4: gold score is not finite"), ("gold_inf", 3, "step 4: gold score is not finite"),
          ("proxy_inf", 5, "step 2: proxy member 0 score is not finite"),
          ("loss_nan", 9, "step 2: policy loss is not finite")]


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "call", "message"), FAULTS, ids=[f[0] for f in FAULTS])
def test_non_finite_later_stops_then_resumes(fault, call, message, reference, tiny_testbed, tmp_path):
    out = tmp_path / "run"
    cache = tiny_testbed.root.parent
    result = _run(_cmd(out, cache), fault=(fault, call))
    assert result.returncode == 2, result.stderr[-3000:]
    assert message in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and message in summary["error"]
    # everything up to the last good point is there, and equals the uninterrupted run's
    rows = read_jsonl(out / "curves.jsonl")
    assert rows and all(r["step"] <= 2 for r in rows)
    assert _strip(rows) == _strip([r for r in read_jsonl(reference / "curves.jsonl") if r["step"] <= 2])
    assert json.loads((out / "checkpoints" / "state.json").read_text())["step"] == 2
    # and the run resumes from its checkpoint to the same end as the uninterrupted run
    again = _run(_cmd(out, cache, "resume=true"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _strip(read_jsonl(out / "curves.jsonl")) == _strip(read_jsonl(reference / "curves.jsonl"))
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_refused_resume_leaves_every_byte(reference, tiny_testbed, tmp_path):
    import shutil

    cache = tiny_testbed.root.parent
    out = tmp_path / "run"
    assert _run(_cmd(out, cache, "ppo.steps=2")).returncode == 0
    before = _snapshot(out)
    # a changed key: refused before any work
    changed = _run(_cmd(out, cache, "ppo.steps=4", "resume=true", "ppo.lr=0.5"))
    assert changed.returncode == 2 and "ppo.lr: differs from the run being resumed" in changed.stderr
    assert _snapshot(out) == before
    # a corrupt checkpoint: the resume fails, and the run is as it was
    shutil.copytree(out, tmp_path / "copy")
    states = next((out / "checkpoints" / "policy").glob("step_2/*model_states.pt"))
    states.write_bytes(b"not a checkpoint")
    before = _snapshot(out)
    corrupt = _run(_cmd(out, cache, "ppo.steps=4", "resume=true"))
    assert corrupt.returncode != 0
    assert _snapshot(out) == before
