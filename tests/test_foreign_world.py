"""A user's own world end to end on CPU (configs/foreign/, README "Your own models and data"):
a GPT-NeoX policy without a pad token, a Llama-architecture gold with another tokenizer,
instruction/input prompts with a template — label_preferences on 2 ranks, train_rm with a Llama
proxy backbone on its output, PPO at ZeRO-3 on 2 ranks, best-of-n, DPO; each stage's outputs checked."""

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


def stage(cwd: Path, name: str, ranks: int = 1, port: int = 0) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "launch" / "train.py")]
    if ranks > 1:
        cmd = ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(port), str(ROOT / "launch" / "train.py")]
    cmd += ["--config", str(ROOT / "configs" / "foreign" / f"{name}.yaml")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RLHF_OVEROPT_CACHE": str(cwd / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, f"{name}:\n" + result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_foreign_world_pipeline(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    import foreign_world as fw

    fw.build(tmp_path / "runs" / "foreign_world" / "models")
    runs = tmp_path / "runs" / "foreign_world"

    # 1. label_preferences on 2 ranks: counts, columns, flip rate, the card
    first = stage(tmp_path, "label_preferences", ranks=2, port=29711)
    assert "padding with <|pad|>" in first.stderr  # the policy had no pad token: one was added
    from datasets import load_from_disk

    prefs = load_from_disk(str(runs / "label_preferences" / "preferences"))
    stats = json.loads((runs / "label_preferences" / "preferences" / "stats.json").read_text())
    for column in ("prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "flipped", "chosen_ended",
                   "rejected_ended"):
        assert column in prefs.column_names
    assert stats["n_pairs"] + stats["n_ties_dropped"] == 48 and len(prefs) == stats["n_pairs"]
    assert sum(prefs["flipped"]) == round(0.25 * len(prefs))
    assert all((c < r) == f for c, r, f in zip(prefs["gold_chosen"], prefs["gold_rejected"], prefs["flipped"]))
    assert all("\n\n" in p or not p.endswith("\n") for p in prefs["prompt"])  # the AlpacaFarm template
    assert (runs / "label_preferences" / "preferences" / "README.md").exists()

    # 2. train_rm on its output with a Llama proxy backbone and its own tokenizer
    stage(tmp_path, "train_rm")
    report = json.loads((runs / "train_rm" / "proxies.json").read_text())
    assert report["k"] == 2 and all(v is not None for v in report["val_accuracy_clean"].values())
    ensemble = Path(report["path"])
    tokenizer = json.loads((ensemble / "tokenizer" / "tokenizer_config.json").read_text())
    assert tokenizer.get("pad_token") and tokenizer["pad_token"] != tokenizer.get("eos_token")
    member = json.loads((ensemble / "member_0" / "config.json").read_text())
    assert member["architectures"] == ["LlamaForSequenceClassification"]

    # 3. PPO at ZeRO-3 on 2 ranks; 4. best-of-n; 5. DPO — every curve row complete
    stage(tmp_path, "ppo", ranks=2, port=29712)
    stage(tmp_path, "bon")
    stage(tmp_path, "dpo")
    for name, steps in (("ppo", [0, 2]), ("dpo", None), ("bon", None)):
        rows = read_jsonl(runs / name / "curves.jsonl")
        assert rows and all(all(k in r for k in CURVE_REQUIRED_KEYS) for r in rows), name
        assert all(r["n_eval" if name != "bon" else "n_prompts"] == 8 for r in rows), name
        if steps:
            assert [r["step"] for r in rows] == steps
        summary = json.loads((runs / name / "summary.json").read_text())
        assert summary["status"] == "completed", name
    ppo = json.loads((runs / "ppo" / "summary.json").read_text())
    assert ppo["policy_local_params"] < ppo["policy_total_params"]  # ZeRO-3 partitioned the policy
    assert json.loads((runs / "ppo" / "proxies.json").read_text())["path"] == report["path"]  # the cached proxies
    bon_aggregators = {r["aggregator"] for r in read_jsonl(runs / "bon" / "curves.jsonl")}
    assert {"member_0", "member_1", "mean", "wco", "uwo"} <= bon_aggregators
