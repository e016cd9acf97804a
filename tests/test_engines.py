"""ZeRO-3 sizing rules of rlhf_overopt.run.engines (the engines themselves run in the 2-rank tests)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rlhf_overopt.run.engines import ds_config, offloads_optimizer, sized_for


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
from rlhf_overopt.run.engines import checked_step, ds_config, ensure_process_group, train_engine
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
from rlhf_overopt.run import dist
dist.shutdown()  # left to interpreter exit, the process group's threads have aborted a finished script
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


# ---------------------------------------------------------------------------------------------
# GPU-ready training: gradient checkpointing, LoRA policy, offload JSONs, bf16 refusals
# ---------------------------------------------------------------------------------------------

def tiny_causal_lm(kind: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=50,
                                        max_position_embeddings=32))


def minibatch(seed: int = 1):
    """A left-padded PPO minibatch: query (4, 6), response (4, 5) with one short response."""
    g = torch.Generator().manual_seed(seed)
    query_ids = torch.randint(0, 50, (4, 6), generator=g)
    query_mask = torch.ones(4, 6, dtype=torch.long)
    query_mask[0, :2] = 0
    response_ids = torch.randint(0, 50, (4, 5), generator=g)
    response_mask = torch.ones(4, 5, dtype=torch.long)
    response_mask[1, 3:] = 0
    advantages = torch.randn(4, 5, generator=g)
    return query_ids, query_mask, response_ids, response_mask, advantages


def ppo_policy_gradients(model) -> dict[str, torch.Tensor]:
    """Gradients of one PPO minibatch's clipped policy loss (old log-probs perturbed so the
    ratio differs from 1 and some tokens clip)."""
    from rlhf_overopt.ops.losses import clipped_surrogate
    from rlhf_overopt.ops.masking import masked_mean
    from rlhf_overopt.rollout import sequence_logprobs

    q, qm, r, rm, adv = minibatch()
    model.train()
    model.zero_grad(set_to_none=True)
    logprobs = sequence_logprobs(model, q, qm, r, rm)
    old = logprobs.detach() + 0.3 * torch.randn(logprobs.shape, generator=torch.Generator().manual_seed(2))
    per_token, _ = clipped_surrogate(logprobs, old, adv, rm, 0.2)
    masked_mean(per_token, rm.bool()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    """policy.gradient_checkpointing recomputes activations in backward; the PPO loss's gradients
    are those without it (atol 1e-6), and the value backbone's too. In eval mode the model still
    returns its KV cache when asked (generation passes use_cache=True)."""
    import copy

    from rlhf_overopt.run.engines import enable_gradient_checkpointing
    from rlhf_overopt.values import ValueModel, response_values

    plain = tiny_causal_lm(kind)
    checkpointed = copy.deepcopy(plain)
    enable_gradient_checkpointing(checkpointed)
    assert getattr(checkpointed, "is_activation_checkpointing", None) or checkpointed.is_gradient_checkpointing
    a, b = ppo_policy_gradients(plain), ppo_policy_gradients(checkpointed)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=name)

    q, qm, r, rm, _ = minibatch()
    grads = []
    for gc in (False, True):
        torch.manual_seed(3)
        value = ValueModel(copy.deepcopy(plain.base_model))
        if gc:
            enable_gradient_checkpointing(value.backbone)
        value.train()
        (response_values(value, q, qm, r, rm) ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in value.named_parameters() if p.grad is not None})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=0, msg=name)

    checkpointed.eval()
    with torch.no_grad():
        out = checkpointed(input_ids=q, attention_mask=qm, use_cache=True)
    assert out.get("past_key_values") is not None


class _LoraCfg:
    lora_r, lora_alpha, lora_dropout, lora_target_modules = 8, 16, 0.0, "all-linear"


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_lora_reference_is_the_base_model_exactly(kind, tmp_path):
    """The adapter-disabled reference gives exactly the base model's log-probs, before and after
    optimizer steps on the adapters (which move the policy's log-probs and never the base
    weights); the saved policy is the merged model, loadable by AutoModelForCausalLM."""
    import copy

    from transformers import AutoModelForCausalLM

    from rlhf_overopt.rollout import sequence_logprobs
    from rlhf_overopt.run.engines import AdapterDisabledReference, lora_policy, savable

    base = tiny_causal_lm(kind).eval()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    policy = lora_policy(copy.deepcopy(base), _LoraCfg)
    reference = AdapterDisabledReference(policy)
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    q, qm, r, rm, adv = minibatch()

    def logprobs(model):
        with torch.no_grad():
            return sequence_logprobs(model, q, qm, r, rm)

    expected = logprobs(base)
    assert torch.equal(logprobs(reference), expected)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        policy.train()
        loss = -(sequence_logprobs(policy, q, qm, r, rm) * adv).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    reference.eval()
    assert policy.training  # the reference's mode switch leaves the policy's alone
    trained = logprobs(policy)
    assert not torch.allclose(trained, expected, atol=1e-4)
    assert torch.equal(logprobs(reference), expected)
    merged_base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
                   for k, v in policy.state_dict().items() if "lora_" not in k}
    assert all(torch.equal(merged_base[k], v) for k, v in base_state.items())

    savable(policy).save_pretrained(tmp_path / "policy")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy").eval()
    torch.testing.assert_close(logprobs(loaded), trained, atol=1e-5, rtol=0)
    assert hasattr(policy, "peft_config")  # the training model is untouched by the save


@pytest.mark.parametrize(("name", "stage"), [("zero2_offload.json", 2), ("zero3_offload.json", 3)])
def test_offload_json_keeps_its_entries_and_our_stage(name, stage):
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / "deepspeed" / name
    user = json.loads(path.read_text())["zero_optimization"]
    # the computed stage wins over the JSON's, its offload entries are kept
    for computed in (stage, 1):
        cfg = ds_config(zero_stage=computed, micro_batch_per_rank=2, world_size=2, max_grad_norm=1.0,
                        extra_path=str(path))
        zero = cfg["zero_optimization"]
        assert zero["stage"] == computed
        assert zero["offload_optimizer"] == user["offload_optimizer"] and zero["offload_optimizer"]["device"] == "cpu"
        assert cfg["train_batch_size"] == 4
        assert offloads_optimizer(cfg)  # train_engine then builds DeepSpeed's CPU Adam
    assert not offloads_optimizer(ds_config(zero_stage=stage, micro_batch_per_rank=2, world_size=1, max_grad_norm=1.0))
    if stage == 3:
        assert zero["offload_param"]["device"] == "cpu"
    else:
        assert "offload_param" not in zero


def test_bf16_policy_refused_on_cpu_and_sections_on_cuda():
    from rlhf_overopt.config.load import load_config
    from rlhf_overopt.errors import ConfigError, InputError
    from rlhf_overopt.run.engines import check_policy_dtype

    cfg = ds_config(zero_stage=2, micro_batch_per_rank=2, world_size=1, max_grad_norm=1.0, dtype="bfloat16")
    assert cfg["bf16"] == {"enabled": True} and cfg["fp16"] == {"enabled": False}
    tiny = "configs/tiny/ppo_ensemble.yaml"
    with pytest.raises(ConfigError, match=r"^policy\.dtype: bfloat16 needs a CUDA device"):
        load_config(tiny, ["policy.dtype=bfloat16", "device=cpu"])
    auto = load_config(tiny, ["policy.dtype=bfloat16"])  # device auto: decided at run start
    with pytest.raises(InputError, match=r"^policy\.dtype"):
        check_policy_dtype(auto, torch.device("cpu"))
    check_policy_dtype(auto, torch.device("cuda"))
    check_policy_dtype(load_config(tiny, []), torch.device("cpu"))


def test_lora_config_rules():
    from rlhf_overopt.config.load import load_config
    from rlhf_overopt.errors import ConfigError

    tiny = "configs/tiny/ppo_ensemble.yaml"
    assert load_config(tiny, ["policy.lora_r=8", "deepspeed.zero_stage=2"]).policy.lora_r == 8
    with pytest.raises(ConfigError, match=r"^policy\.lora_r: LoRA runs at ZeRO stages 0-2"):
        load_config(tiny, ["policy.lora_r=8", "deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match=r"^policy\.lora_r"):
        load_config(tiny, ["policy.lora_r=-1"])
    with pytest.raises(ConfigError, match=r"^policy\.lora_dropout"):
        load_config(tiny, ["policy.lora_dropout=1.0"])


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_checkpointing_and_lora_raise_no_future_warning(kind):
    """transformers 5.x renamed gradient checkpointing to activation checkpointing and warns
    (FutureWarning) on the old names: enabling it and wrapping the policy in LoRA (peft reads
    is_gradient_checkpointing) call the new API or keep peft's read quiet."""
    import warnings
    from types import SimpleNamespace

    from rlhf_overopt.run.engines import enable_gradient_checkpointing, lora_policy

    lora = SimpleNamespace(lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules="all-linear")
    for checkpointed in (True, False):
        model = tiny_causal_lm(kind)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            if checkpointed:
                enable_gradient_checkpointing(model)
            assert model.is_activation_checkpointing is checkpointed
            lora_policy(model, lora)
