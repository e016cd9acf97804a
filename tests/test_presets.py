"""Every preset under configs/presets/ resolves and prints its plan with `--check`, its hub names
read from local stand-ins of the same architecture families (nothing is downloaded)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "presets").rglob("*.yaml"))


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory, foreign_world):
    """hub name -> tiny local checkpoint of the same family (config files are all --check reads)."""
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
    )

    root = tmp_path_factory.mktemp("stand_ins")
    GPT2LMHeadModel(GPT2Config(vocab_size=300, n_layer=2, n_embd=32, n_head=2)).save_pretrained(root / "gpt2")
    DistilBertForSequenceClassification(DistilBertConfig(vocab_size=300, dim=32, n_layers=2, n_heads=2,
                                                         hidden_dim=64, num_labels=2)).save_pretrained(root / "bert")
    return {"tlc4418/pythia_1.4b_sft_policy": foreign_world["policy"],
            "tlc4418/pythia_70m_sft": foreign_world["policy"],
            "tatsu-lab/alpaca-farm-reward-model-human": foreign_world["gold"],
            "lvwerra/gpt2-imdb": root / "gpt2", "lvwerra/distilbert-imdb": root / "bert"}


def test_presets_exist():
    names = {p.relative_to(ROOT / "configs" / "presets").as_posix() for p in PRESETS}
    for expected in ("coste2023/label_preferences.yaml", "coste2023/train_rm.yaml", "coste2023/ppo_single.yaml",
                     "coste2023/ppo_mean.yaml", "coste2023/ppo_wco.yaml", "coste2023/ppo_uwo.yaml", "coste2023/bon.yaml",
                     "imdb_sentiment/label_preferences.yaml", "imdb_sentiment/ppo_uwo.yaml"):
        assert expected in names


@pytest.mark.parametrize("preset", PRESETS, ids=[p.relative_to(ROOT / "configs" / "presets").as_posix() for p in PRESETS])
def test_preset_passes_check(preset, stand_ins, capsys, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "launch"))
    import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a name without a stand-in must not reach for a hub
    args = ["--config", str(preset), f"output_dir={tmp_path / 'run'}", "--check"]
    for name, path in stand_ins.items():
        args += ["--stand-in", f"{name}={path}"]
    assert train.main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert out.startswith("method ") and "model states per rank:" in out
    assert "parameters" in out and not (tmp_path / "run").exists()  # nothing was started
