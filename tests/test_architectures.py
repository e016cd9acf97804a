"""The sampler, sequence log-probs, the value model, reward heads and ZeRO-3 gathering on the
architectures users bring: GPT-2 (learned absolute positions, tied embeddings), GPT-NeoX / Pythia
(partial rotary, parallel residual, untied), Llama (rotary, GQA, untied), and Qwen2 / Mistral
(Llama-like; they construct as cheaply). Each is a tiny random-init model (hidden 32, 2 layers)
built here with a byte-level BPE tokenizer that has a pad token distinct from EOS; a second
tokenizer without a pad checks that `load_tokenizer` adds one and the models grow to fit.

Left padding with position ids from the mask must leave every row's numbers unchanged (Huang et
al. 2024, "The N+ Implementation Details of RLHF with PPO"), on every architecture.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rlhf_overopt.ops.masking import response_mask_after_eos
from rlhf_overopt.rollout import cache_argument, generate, sequence_logprobs, tokenize_prompts
from rlhf_overopt.run.models import (
    PAD_TOKEN,
    check_vocabulary,
    left_pad,
    load_causal_lm,
    load_tokenizer,
    reward_model_from_pretrained,
    reward_scores,
)
from rlhf_overopt.values import ValueModel, response_values

sys.path.insert(0, str(Path(__file__).parent))
import foreign_world as fw  # noqa: E402

ARCHS = ["gpt2", "gpt_neox", "llama", "qwen2", "mistral"]
PROMPTS = ["the film was good", "bad", "write a short review of the movie plot acting", "fun story"]


def tiny_config(arch: str, vocab: int, eos: int):
    """A hidden-32, 2-layer config of `arch`; untied embeddings except GPT-2 (tied by design)."""
    import transformers as tf

    common = dict(vocab_size=vocab, eos_token_id=eos, bos_token_id=eos)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=128, rotary_pct=0.25, tie_word_embeddings=False, **common)
    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
    return cls(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=False, **common)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second intra-op thread on a shared CPU; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch_tok")
    fw.bpe_tokenizer(root, vocab_size=300, eos="<|endoftext|>", pad="<|pad|>")
    return root


@pytest.fixture(scope="module", params=ARCHS)
def world(request, tmp_path_factory, tokenizer_dir):
    """(arch, checkpoint dir holding the causal LM and its tokenizer, tokenizer, model)."""
    from transformers import AutoModelForCausalLM

    arch = request.param
    root = tmp_path_factory.mktemp(f"arch_{arch}")
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.save_pretrained(root)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer), tokenizer.eos_token_id)).save_pretrained(root)
    return arch, root, load_tokenizer(root), load_causal_lm(root)


def _responses(tokenizer, batch: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (batch, width), generator=g)
    return torch.where(ids == tokenizer.pad_token_id, torch.full_like(ids, 3), ids)


def _alone(query_ids, query_mask, i):
    """Row i of a left-padded batch without its padding."""
    keep = query_mask[i].bool()
    return query_ids[i : i + 1, keep], query_mask[i : i + 1, keep]


def test_every_architecture_takes_position_ids_and_the_current_cache_argument(world):
    arch, _, _, model = world
    import inspect

    parameters = inspect.signature(model.forward).parameters
    assert "position_ids" in parameters, arch
    assert cache_argument(model) == ("cache" if "cache" in parameters else "past_key_values")


def test_left_padding_equals_no_padding_for_sequence_logprobs(world):
    arch, _, tokenizer, model = world
    q_ids, q_mask = tokenize_prompts(tokenizer, PROMPTS)
    r_ids = _responses(tokenizer, len(PROMPTS), 5, seed=1)
    r_mask = torch.ones_like(r_ids)
    with torch.no_grad():
        batched = sequence_logprobs(model, q_ids, q_mask, r_ids, r_mask)
        for i in range(len(PROMPTS)):
            ids, mask = _alone(q_ids, q_mask, i)
            alone = sequence_logprobs(model, ids, mask, r_ids[i : i + 1], r_mask[i : i + 1])
            torch.testing.assert_close(batched[i : i + 1], alone, atol=1e-5, rtol=0, msg=f"{arch} row {i}")


def test_cached_sampler_logprobs_equal_a_full_forward_without_deprecation(world, caplog):
    """The sampler's per-token log-probs (KV cache, one token per step, position ids from the
    mask) equal one full forward over the sampled tokens. Our calls use the cache argument the
    installed transformers names, so no `past_key_values` deprecation is raised or logged."""
    arch, _, tokenizer, model = world
    hf_logger = logging.getLogger("transformers")
    # warning_once remembers what it said in this process; forget it so a repeat would show.
    logging.Logger.warning_once.cache_clear()
    hf_logger.addHandler(caplog.handler)
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="transformers"):
            warnings.simplefilter("always")
            warnings.simplefilter("error", FutureWarning)
            ro = generate(model, tokenizer, PROMPTS, max_new_tokens=8, temperature=0.7,
                          generator=torch.Generator().manual_seed(0))
    finally:
        hf_logger.removeHandler(caplog.handler)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if "past_key_values" in m or "Use `cache`" in m], said
    with torch.no_grad():
        full = sequence_logprobs(model, ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask,
                                 temperature=0.7)
    torch.testing.assert_close(ro.logprobs, full, atol=1e-4, rtol=0, msg=arch)


def test_old_cache_argument_still_logs_the_deprecation(world, caplog):
    """The check above can see the deprecation: passing `past_key_values` by hand warns (5.24
    raises a FutureWarning from the forward's decorator) or logs it."""
    arch, _, tokenizer, model = world
    if cache_argument(model) != "cache":
        pytest.skip("this transformers has no `cache` argument")
    ids, mask = tokenize_prompts(tokenizer, PROMPTS[:1])
    hf_logger = logging.getLogger("transformers")
    logging.Logger.warning_once.cache_clear()
    hf_logger.addHandler(caplog.handler)
    try:
        with torch.no_grad(), caplog.at_level(logging.WARNING, logger="transformers"), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            model(input_ids=ids[:, -1:], attention_mask=torch.cat([mask, mask[:, -1:]], 1),
                  past_key_values=out["cache"], use_cache=True)
    finally:
        hf_logger.removeHandler(caplog.handler)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert any("past_key_values" in m for m in said), arch


def test_value_model_left_padding_equals_no_padding(world):
    arch, root, tokenizer, _ = world
    torch.manual_seed(0)
    value_model = ValueModel.from_pretrained_backbone(root, 3, tokenizer=tokenizer).eval()
    q_ids, q_mask = tokenize_prompts(tokenizer, PROMPTS)
    r_ids = _responses(tokenizer, len(PROMPTS), 4, seed=2)
    r_ids[1, 2] = tokenizer.eos_token_id
    r_mask = response_mask_after_eos(r_ids, tokenizer.eos_token_id)
    with torch.no_grad():
        batched = response_values(value_model, q_ids, q_mask, r_ids, r_mask)
        assert batched.shape == (3, len(PROMPTS), 4)
        for i in range(len(PROMPTS)):
            ids, mask = _alone(q_ids, q_mask, i)
            alone = response_values(value_model, ids, mask, r_ids[i : i + 1], r_mask[i : i + 1])
            torch.testing.assert_close(batched[:, i : i + 1], alone, atol=1e-5, rtol=0, msg=f"{arch} row {i}")


def test_reward_head_from_the_causal_lm_left_padding_equals_no_padding(world):
    arch, root, tokenizer, _ = world
    model = reward_model_from_pretrained(root, pad_token_id=tokenizer.pad_token_id, seed=3)
    rows = [tokenizer(p)["input_ids"] + [tokenizer.eos_token_id] * (i % 2) for i, p in enumerate(PROMPTS)]
    ids, mask = left_pad(rows, tokenizer.pad_token_id)
    with torch.no_grad():
        batched = reward_scores(model, ids, mask)
        alone = torch.cat([reward_scores(model, *left_pad([r], tokenizer.pad_token_id)) for r in rows])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0, msg=arch)
    assert batched.std() > 0, f"{arch}: the head should tell rows apart"


# ------------------------------------------------------------------------------ pad tokens for policies


@pytest.fixture(scope="module")
def no_pad_tokenizer_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch_tok_no_pad")
    fw.bpe_tokenizer(root, vocab_size=300, eos="<|endoftext|>", pad=None)
    return root


@pytest.mark.parametrize("arch", ARCHS)
def test_a_policy_without_pad_gets_one_and_every_model_grows_to_fit(arch, tmp_path, no_pad_tokenizer_dir, caplog):
    """Pythia / Llama tokenizers ship without a pad: `load_tokenizer` adds `<|pad|>` (said once),
    and the policy, its reference and the value backbone are grown to the tokenizer, identically."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_overopt.run.engines import load_policy_model

    raw = AutoTokenizer.from_pretrained(no_pad_tokenizer_dir)
    assert raw.pad_token is None
    raw.save_pretrained(tmp_path)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(arch, len(raw), raw.eos_token_id)).save_pretrained(tmp_path)
    with caplog.at_level(logging.INFO, logger="rlhf_overopt.run.models"):
        tokenizer = load_tokenizer(tmp_path)
        load_tokenizer(tmp_path)
    assert tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == len(raw)
    assert len([r for r in caplog.records if PAD_TOKEN in r.getMessage()]) == 1
    cfg = SimpleNamespace(policy=SimpleNamespace(dtype="float32", trust_remote_code=False, dropout_off=True))
    state = torch.random.get_rng_state()
    policy = load_policy_model(cfg, str(tmp_path), tokenizer)
    reference = load_policy_model(cfg, str(tmp_path))  # loads (and pads) the tokenizer itself
    assert torch.equal(state, torch.random.get_rng_state()), "resizing must not move the global RNG"
    check_vocabulary(tokenizer, policy)
    for a, b in zip(policy.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    assert policy.get_output_embeddings().weight.shape[0] == len(tokenizer)
    value_model = ValueModel.from_pretrained_backbone(tmp_path, 1, tokenizer=tokenizer)
    assert value_model.backbone.get_input_embeddings().num_embeddings == len(tokenizer)
    ro = generate(policy, tokenizer, PROMPTS, max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = sequence_logprobs(policy, ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask)
        values = response_values(value_model, ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask)
    torch.testing.assert_close(ro.logprobs, full, atol=1e-4, rtol=0)
    assert torch.isfinite(values).all()


def test_a_tokenizer_with_a_pad_is_left_alone(tokenizer_dir, tmp_path):
    """The testbed path: a distinct pad already there, nothing added, nothing resized."""
    from transformers import AutoTokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    assert len(tokenizer) == len(AutoTokenizer.from_pretrained(tokenizer_dir))
    fw.bpe_tokenizer(tmp_path, vocab_size=300, eos="<|endoftext|>", pad=None)
    with pytest.raises(ValueError, match="pad token distinct from EOS"):  # where nothing may be modified
        load_tokenizer(tmp_path, add_pad=False)


# ------------------------------------------------------------------------------ ZeRO-3 gathering

ZERO3_SCRIPT = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
import test_architectures as ta
from transformers import AutoModelForCausalLM
from rlhf_overopt.run.engines import ds_config, ensure_process_group, frozen_model, gathered, train_engine
from rlhf_overopt.run.models import load_tokenizer
from rlhf_overopt.rollout import generate, sequence_logprobs

torch.set_num_threads(1)
ensure_process_group(torch.device("cpu"))
tokenizer = load_tokenizer(sys.argv[2])
config = ds_config(zero_stage=3, micro_batch_per_rank=2, world_size=1, max_grad_norm=1.0)
for arch in sys.argv[3:]:
    torch.manual_seed(0)
    plain = AutoModelForCausalLM.from_config(ta.tiny_config(arch, len(tokenizer), tokenizer.eos_token_id)).eval()
    copy = AutoModelForCausalLM.from_config(plain.config).eval()
    copy.load_state_dict(plain.state_dict())
    reference = AutoModelForCausalLM.from_config(plain.config).eval()
    reference.load_state_dict(plain.state_dict())
    expected = generate(plain, tokenizer, ta.PROMPTS, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    engine = train_engine(copy, lr=1e-3, total_steps=1, final_ratio=1.0, config=config)
    frozen = frozen_model(reference, zero_stage=3, config=config, device=torch.device("cpu"))
    with gathered(engine.module, 3):
        ro = generate(engine.module, tokenizer, ta.PROMPTS, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    assert torch.equal(ro.response_ids, expected.response_ids), arch
    torch.testing.assert_close(ro.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    with torch.no_grad():
        policy_lp = sequence_logprobs(engine.module, ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask)
        ref_lp = sequence_logprobs(frozen, ro.query_ids, ro.query_mask, ro.response_ids, ro.response_mask)
    torch.testing.assert_close(policy_lp, ro.logprobs, atol=1e-4, rtol=0)
    torch.testing.assert_close(ref_lp, policy_lp, atol=1e-5, rtol=0)
    print("ZERO3 OK", arch, flush=True)
"""


def test_zero3_gathered_generation_and_partitioned_forward(tokenizer_dir):
    """Under ZeRO-3 (one CPU rank, gloo), gathered generation reproduces the unpartitioned model's
    samples and log-probs, and the partitioned policy and reference recompute them. A subprocess:
    the DeepSpeed process group would outlive the test in this one."""
    result = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT, str(Path(__file__).parent), str(tokenizer_dir),
                             *ARCHS], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert [line for line in result.stdout.splitlines() if line.startswith("ZERO3 OK")] == [
        f"ZERO3 OK {arch}" for arch in ARCHS]


def test_a_mismatched_vocabulary_is_not_grown_away(world, tmp_path):
    """Only the added pad's row is grown: a model short of other tokens keeps its size, and
    check_vocabulary still names the mismatch."""
    from rlhf_overopt.run.models import fit_embeddings

    arch, root, tokenizer, _ = world
    model = load_causal_lm(root)
    model.resize_token_embeddings(64)
    assert not fit_embeddings(model, tokenizer)
    assert model.get_input_embeddings().num_embeddings == 64
    with pytest.raises(ValueError, match="mismatched vocabulary"):
        check_vocabulary(tokenizer, model)
