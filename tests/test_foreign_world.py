"""A user's own world end to end on CPU (configs/foreign/, README "Your own models and data"):
a GPT-NeoX policy without a pad token, a Llama-architecture gold with another tokenizer,
instruction/input prompts with a template — label_preferences on 2 ranks, train_rm with a Llama
proxy backbone on its output, PPO at ZeRO-3 on 2 ranks, best-of-n, DPO; each stage's outputs checked.

The world is the session's `foreign_world` (tests/conftest.py), linked in where the configs look for
it (runs/foreign_world/models), so the configs run exactly as a user runs them. Each stage runs once
(the module's `stages`), as a test of its own: a failure names its stage, and a later stage that
needs a failed one says which."""

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
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")]

# Each stage as small as what its test checks: PPO needs two ranks at ZeRO-3 and a complete curve
# row before and after training, so one step with an evaluation after it (not two steps).
STAGES = {"label_preferences": (2, ()), "train_rm": (1, ()), "ppo": (2, ("ppo.steps=1", "eval.every=1")),
          "bon": (1, ()), "dpo": (1, ())}
NEEDS = {"train_rm": ("label_preferences",), "ppo": ("train_rm",), "bon": ("train_rm",), "dpo": ("train_rm",)}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stages:
    """Runs each configs/foreign stage at most once, after the stages it reads; remembers failures."""

    def __init__(self, cwd: Path):
        self.cwd, self.done, self.failed = cwd, {}, {}

    def __call__(self, name: str) -> subprocess.CompletedProcess:
        if name in self.failed:
            pytest.fail(self.failed[name])
        if name not in self.done:
            for need in NEEDS.get(name, ()):
                if need not in self.done:
                    try:
                        self(need)
                    except pytest.fail.Exception:
                        self.failed[name] = f"{name}: not run, the stage it reads ({need}) failed"
                        raise
            self.done[name] = self._run(name)
        return self.done[name]

    def _run(self, name: str) -> subprocess.CompletedProcess:
        ranks, overrides = STAGES[name]
        cmd = [sys.executable, str(ROOT / "launch" / "train.py")]
        if ranks > 1:
            cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(_free_port()),
                   str(ROOT / "launch" / "train.py")]
        cmd += ["--config", str(ROOT / "configs" / "foreign" / f"{name}.yaml"), *overrides]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RLHF_OVEROPT_CACHE": str(self.cwd / "cache"),
               "HF_HUB_OFFLINE": "1"}
        result = subprocess.run(cmd, check=False, cwd=self.cwd, capture_output=True, text=True, timeout=600,
                                env=env)
        if result.returncode != 0:
            self.failed[name] = f"{name}:\n" + result.stdout[-3000:] + result.stderr[-3000:]
            pytest.fail(self.failed[name])
        return result


@pytest.fixture(scope="module")
def stages(tmp_path_factory, foreign_world) -> Stages:
    cwd = tmp_path_factory.mktemp("foreign_runs")
    (cwd / "runs" / "foreign_world").mkdir(parents=True)
    (cwd / "runs" / "foreign_world" / "models").symlink_to(Path(foreign_world["policy"]).parent,
                                                           target_is_directory=True)
    return Stages(cwd)


def _runs(stages: Stages) -> Path:
    return stages.cwd / "runs" / "foreign_world"


def _curves_complete(runs: Path, name: str) -> list[dict]:
    rows = read_jsonl(runs / name / "curves.jsonl")
    assert rows and all(all(k in r for k in CURVE_REQUIRED_KEYS) for r in rows), name
    assert all(r["n_eval" if name != "bon" else "n_prompts"] == 8 for r in rows), name
    assert json.loads((runs / name / "summary.json").read_text())["status"] == "completed", name
    return rows


def test_label_preferences_on_two_ranks(stages):
    """Counts, columns, flip rate, the card; the policy had no pad token: one was added."""
    from datasets import load_from_disk

    result = stages("label_preferences")
    assert "padding with <|pad|>" in result.stderr
    folder = _runs(stages) / "label_preferences" / "preferences"
    prefs = load_from_disk(str(folder))
    stats = json.loads((folder / "stats.json").read_text())
    for column in ("prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "flipped", "chosen_ended",
                   "rejected_ended"):
        assert column in prefs.column_names
    assert stats["n_pairs"] + stats["n_ties_dropped"] == 48 and len(prefs) == stats["n_pairs"]
    assert sum(prefs["flipped"]) == round(0.25 * len(prefs))
    assert all((c < r) == f for c, r, f in zip(prefs["gold_chosen"], prefs["gold_rejected"], prefs["flipped"]))
    assert all("\n\n" in p or not p.endswith("\n") for p in prefs["prompt"])  # the AlpacaFarm template
    assert (folder / "README.md").exists()


def test_train_rm_with_a_llama_proxy_backbone(stages):
    """On stage 1's output, with the Llama backbone's own tokenizer (a pad added, not the EOS)."""
    stages("train_rm")
    report = json.loads((_runs(stages) / "train_rm" / "proxies.json").read_text())
    assert report["k"] == 2 and all(v is not None for v in report["val_accuracy_clean"].values())
    ensemble = Path(report["path"])
    tokenizer = json.loads((ensemble / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer.get("pad_token") and tokenizer["pad_token"] != tokenizer.get("eos_token")
    member = json.loads((ensemble / "member_0" / "config.json").read_text())
    assert member["architectures"] == ["LlamaForSequenceClassification"]


def test_ppo_zero3_on_two_ranks(stages):
    """ZeRO-3 partitions the policy over the 2 ranks; the proxies come from the cache train_rm filled."""
    stages("ppo")
    runs = _runs(stages)
    assert [r["step"] for r in _curves_complete(runs, "ppo")] == [0, 1]
    ppo = json.loads((runs / "ppo" / "summary.json").read_text())
    assert ppo["policy_local_params"] < ppo["policy_total_params"]
    trained = json.loads((runs / "train_rm" / "proxies.json").read_text())["path"]
    assert json.loads((runs / "ppo" / "proxies.json").read_text())["path"] == trained


def test_best_of_n_every_aggregator(stages):
    stages("bon")
    rows = _curves_complete(_runs(stages), "bon")
    assert {"member_0", "member_1", "mean", "wco", "uwo"} <= {r["aggregator"] for r in rows}


def test_dpo_on_the_labelled_pairs(stages):
    stages("dpo")
    _curves_complete(_runs(stages), "dpo")
