"""ZeRO-3 sizing rules of rlhf_overopt.engines (the engines themselves run in the 2-rank tests)."""

from __future__ import annotations

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
