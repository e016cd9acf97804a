"""ZeRO-3 sizing rules of rlhf_overopt.engines (the engines themselves run in the 2-rank tests)."""

from __future__ import annotations

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_overopt.engines import ds_config, sized_for


def model(h: int):
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=h, n_head=2, vocab_size=50, n_positions=16))


def test_stage3_sizes_follow_the_hidden_size():
    cfg = ds_config(zero_stage=3, micro_batch_per_rank=2, world_size=1, max_grad_norm=1.0)
    zero = sized_for(cfg, model(64))["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 640
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 64 * 64)
    assert zero["reduce_bucket_size"] == 64 * 64
    assert "reduce_bucket_size" not in cfg["zero_optimization"]  # the input is not modified


def test_user_settings_and_other_stages_are_kept(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')
    cfg = ds_config(zero_stage=3, micro_batch_per_rank=2, world_size=1, max_grad_norm=1.0, extra_path=str(path))
    zero = sized_for(cfg, model(64))["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 0
    assert zero["reduce_bucket_size"] == 64 * 64
    stage2 = ds_config(zero_stage=2, micro_batch_per_rank=2, world_size=1, max_grad_norm=1.0)
    assert sized_for(stage2, model(64)) == stage2


CHECKED_STEP_SCRIPT = """
import sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
from rlhf_overopt.engines import checked_step, ds_config, ensure_process_group, train_engine
from rlhf_overopt.errors import NonFiniteError

stage = int(sys.argv[1])
ensure_process_group(torch.device("cpu"))
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
engine = train_engine(model, lr=1e-2, total_steps=4, final_ratio=1.0,
                      config=ds_config(zero_stage=stage, micro_batch_per_rank=2, world_size=1, max_grad_norm=1.0))
x = torch.randint(0, 50, (2, 8))
before = [p.detach().clone() for p in engine.module.parameters()]
engine.backward(engine(input_ids=x, labels=x).loss)
checked_step(engine, "policy", 0)
stepped = [p.detach().clone() for p in engine.module.parameters()]
assert any(not torch.equal(a, b) for a, b in zip(before, stepped)), "a finite gradient must step"
hook = next(engine.module.parameters()).register_hook(lambda g: g * float("nan"))
loss = engine(input_ids=x, labels=x).loss
assert torch.isfinite(loss)
engine.backward(loss)
hook.remove()
try:
    checked_step(engine, "policy", 7)
except NonFiniteError as exc:
    print("ERROR:", exc)
assert all(torch.equal(a, b.detach()) for a, b in zip(stepped, engine.module.parameters())), "weights changed"
print("WEIGHTS KEPT")
"""


@pytest.mark.parametrize("stage", [0, 2])
def test_checked_step_refuses_a_nan_gradient_and_keeps_the_weights(stage):
    """A NaN gradient with a finite loss: at stage 0 DeepSpeed would write NaN into the weights,
    at stage 2 it skips the update silently; checked_step names the source and the step in both
    cases and the weights stay as they were. A finite gradient steps as before. (A subprocess:
    the DeepSpeed process group would outlive the test in this one.)"""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", CHECKED_STEP_SCRIPT, str(stage)], capture_output=True, text=True,
                            timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.startswith("ERROR: step 7: policy gradient is not finite") for line in lines), result.stdout
    assert "WEIGHTS KEPT" in lines
