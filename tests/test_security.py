"""Security: secrets never reach the run directory or logs; nothing is executed from configs or
checkpoints; remote code is off by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_overopt.config.load import load_config
from rlhf_overopt.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PLANTED = {
    "WANDB_API_KEY": "planted0wandb0key0d41d8cd98f00b204e9800998ecf8427e",
    "HF_TOKEN": "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",
    "OPENAI_API_KEY": "sk-planted-never-logged-000",
}


@pytest.mark.slow
def test_planted_keys_never_reach_run_dir_or_logs(tiny_testbed, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs/tiny/ppo_ensemble.yaml"),
           f"output_dir={out}", f"testbed.cache_dir={tiny_testbed.root.parent}", "wandb.mode=offline", "ppo.steps=2"]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, **PLANTED, "WANDB_MODE": "offline"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(out.glob("wandb/offline-run-*/run-*.wandb")), "the offline W&B run was not written"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    for secret in PLANTED.values():
        assert secret not in result.stdout and secret not in result.stderr
        for path in files:
            assert secret.encode() not in path.read_bytes(), f"{secret[:12]}... found in {path}"


def test_configs_are_data_not_code(tmp_path):
    # YAML tags that would construct Python objects are refused by the safe loader
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(evil)
    assert not (tmp_path / "pwned").exists()
    # override values are parsed as YAML data too, never evaluated
    with pytest.raises(ConfigError):
        load_config(None, ["ppo.steps=__import__('os').getpid()"], check_paths=False)


def test_remote_code_is_off_by_default():
    cfg = load_config(None, check_paths=False)
    assert cfg.policy.trust_remote_code is False and cfg.gold.trust_remote_code is False


class _Payload:
    """Unpickling this would run a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_checkpoint_cannot_execute_code(tmp_path):
    """Weights come from safetensors, or from .bin files read with weights_only=True: a pickle that
    would run code on load is refused and never runs."""
    import torch
    from transformers import GPT2Config

    from rlhf_overopt.run.models import load_causal_lm

    marker = tmp_path / "pwned"
    GPT2Config(vocab_size=50, n_layer=1, n_embd=16, n_head=2, n_positions=16).save_pretrained(tmp_path)
    torch.save({"transformer.wte.weight": _Payload(marker)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception):
        load_causal_lm(tmp_path)
    assert not marker.exists(), "loading the checkpoint executed code"
