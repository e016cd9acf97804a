"""Tests of rlhf_overopt.run.models: loading, dropout, reward-model input, scalar reward models.

A tiny offline world is built once per module: a byte-level BPE tokenizer trained on synthetic
sentences (EOS and a distinct PAD) and a random-init 2-layer GPT-2 causal LM saved to disk.
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rlhf_overopt.ops.masking import position_ids_from_mask
from rlhf_overopt.run.models import (
    backbone_from_pretrained,
    check_tokenizer,
    init_reward_head_,
    left_pad,
    load_causal_lm,
    load_tokenizer,
    reward_head,
    reward_model_from_pretrained,
    reward_scores,
    set_dropout_zero,
    tokenize_for_reward,
)

WORDS = ["the", "film", "was", "good", "bad", "plot", "acting", "and", "really", "music", "dull", "great"]


def _train_bpe(seed: int = 0) -> Tokenizer:
    rng = random.Random(seed)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(300)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run these tiny models on one intra-op thread.

    A 32-dim model gains nothing from a second thread, and on a busy shared CPU the threads'
    spin-waiting made the module ~10x slower (measured); the setting is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(tokenizer dir, causal-LM dir, tokenizer)."""
    root = tmp_path_factory.mktemp("models_world")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(), eos_token="<|endoftext|>", pad_token="<|pad|>", padding_side="right"
    )
    tokenizer.save_pretrained(str(root / "tok"))
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.3,
        embd_pdrop=0.3,
        attn_pdrop=0.3,
    )
    GPT2LMHeadModel(config).save_pretrained(str(root / "lm"))
    return root / "tok", root / "lm", load_tokenizer(root / "tok")


# ------------------------------------------------------------------------------------ tokenizer


def test_load_tokenizer_sets_left_padding(world):
    tok_dir, _, _ = world
    tokenizer = load_tokenizer(tok_dir)  # saved with padding_side="right"
    assert tokenizer.padding_side == "left"
    assert tokenizer.truncation_side == "left"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_tokenizer_without_pad_raises_unless_one_may_be_added(tmp_path):
    no_pad = PreTrainedTokenizerFast(tokenizer_object=_train_bpe(), eos_token="<|endoftext|>")
    no_pad.save_pretrained(str(tmp_path / "no_pad"))
    with pytest.raises(ValueError, match="pad token distinct from EOS"):
        load_tokenizer(tmp_path / "no_pad", add_pad=False)
    # The policy path adds <|pad|> (here already in the vocabulary, so no new id).
    padded = load_tokenizer(tmp_path / "no_pad")
    assert padded.pad_token == "<|pad|>" and len(padded) == len(no_pad)
    no_pad.pad_token = no_pad.eos_token
    no_pad.save_pretrained(str(tmp_path / "pad_is_eos"))
    padded = load_tokenizer(tmp_path / "pad_is_eos")
    assert padded.pad_token_id != padded.eos_token_id
    pad_is_eos = PreTrainedTokenizerFast(
        tokenizer_object=_train_bpe(), eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    with pytest.raises(ValueError, match="pad token distinct from EOS"):
        check_tokenizer(pad_is_eos)


# ------------------------------------------------------------------------------------ dropout


def test_load_causal_lm_turns_dropout_off(world):
    _, lm_dir, _ = world
    model = load_causal_lm(lm_dir)
    assert not model.training
    assert model.config.resid_pdrop == model.config.embd_pdrop == model.config.attn_pdrop == 0.0
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    # Train mode must compute exactly what eval mode computes.
    ids = torch.randint(2, 200, (3, 10))
    model.train()
    a = model(ids).logits
    model.eval()
    b = model(ids).logits
    assert torch.equal(a, b)
    kept = load_causal_lm(lm_dir, dropout_off=False)
    assert kept.config.resid_pdrop == 0.3


def test_set_dropout_zero_covers_modules_and_float_attributes():
    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_dropout = 0.1  # read at forward time, like HF SDPA attention
            self.drop = nn.Dropout(0.2)
            self.keep_prob = 0.9  # not a dropout name: untouched

    net = nn.Sequential(Attention(), nn.Dropout2d(0.5))
    set_dropout_zero(net)
    assert net[0].attention_dropout == 0.0 and net[0].drop.p == 0.0 and net[1].p == 0.0
    assert net[0].keep_prob == 0.9


# ------------------------------------------------------------------------------------ encoding


def test_reward_input_appends_eos_only_when_ended(world):
    _, _, tokenizer = world
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    prompts = ["the film", "the plot", "music"]
    responses = [" was good", " was really dull and bad", " great"]
    ids, mask = left_pad(tokenize_for_reward(tokenizer, prompts, responses, [True, False, True], max_length=64), pad)
    assert ids.shape == mask.shape and ids.dtype == torch.long
    assert ids[0, -1] == eos and ids[2, -1] == eos and ids[1, -1] != eos
    plain = tokenizer(["the film was good"], add_special_tokens=False)["input_ids"][0]
    assert ids[0][mask[0].bool()].tolist() == plain + [eos]
    # Left padding: every row ends in the last column; pads only before the text.
    assert mask[:, -1].all()
    for row, m in zip(ids, mask):
        n_pad = int((m == 0).sum())
        assert (m[:n_pad] == 0).all() and (m[n_pad:] == 1).all()
        assert (row[:n_pad] == pad).all() and (row[n_pad:] != pad).all()
    # No EOS can come from text: an unfinished row holds no EOS at all.
    assert eos not in ids[1].tolist()


def test_reward_input_truncation_keeps_the_end(world):
    _, _, tokenizer = world
    full = tokenize_for_reward(
        tokenizer, ["the film"], [" was really good and great"], [True], max_length=64
    )[0]
    short = tokenize_for_reward(
        tokenizer, ["the film"], [" was really good and great"], [True], max_length=4
    )[0]
    assert len(full) > 4 and short == full[-4:] and short[-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="same length"):
        tokenize_for_reward(tokenizer, ["a"], ["b", "c"], [True], max_length=4)


def test_left_pad_and_position_ids():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2], [0, 0, 0]]


# ------------------------------------------------------------------------------------ reward models


def test_reward_head_init_std():
    d = 4095
    head = init_reward_head_(nn.Linear(d, 8), torch.Generator().manual_seed(0))
    expected = 1.0 / math.sqrt(d + 1)
    assert head.weight.std().item() == pytest.approx(expected, rel=0.03)
    assert head.weight.mean().abs().item() < 4 * expected / math.sqrt(head.weight.numel())
    assert torch.all(head.bias == 0)


def test_reward_model_from_causal_lm(world):
    _, lm_dir, tokenizer = world
    lm = load_causal_lm(lm_dir)
    rm = reward_model_from_pretrained(lm_dir, pad_token_id=tokenizer.pad_token_id, seed=3)
    assert type(rm).__name__ == "GPT2ForSequenceClassification"
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tokenizer.pad_token_id
    assert not rm.training and rm.config.attn_pdrop == 0.0
    lm_state = lm.transformer.state_dict()
    for name, value in rm.transformer.state_dict().items():
        assert torch.equal(value, lm_state[name]), name
    head = reward_head(rm)
    assert head.weight.shape == (1, 32)
    # The head comes from its seed: same seed -> same head, another seed -> another head.
    again = reward_model_from_pretrained(lm_dir, pad_token_id=tokenizer.pad_token_id, seed=3)
    other = reward_model_from_pretrained(lm_dir, pad_token_id=tokenizer.pad_token_id, seed=4)
    assert torch.equal(reward_head(again).weight, head.weight)
    assert not torch.equal(reward_head(other).weight, head.weight)
    expected = init_reward_head_(nn.Linear(32, 1, bias=False), torch.Generator().manual_seed(3))
    assert torch.equal(head.weight, expected.weight)


def test_reward_model_layer_truncation(world):
    _, lm_dir, tokenizer = world
    lm = load_causal_lm(lm_dir)
    rm = reward_model_from_pretrained(lm_dir, pad_token_id=tokenizer.pad_token_id, n_layer=1)
    assert len(rm.transformer.h) == 1 and rm.config.num_hidden_layers == 1
    assert torch.equal(rm.transformer.h[0].attn.c_attn.weight, lm.transformer.h[0].attn.c_attn.weight)
    with pytest.raises(ValueError, match="exceeds"):
        reward_model_from_pretrained(lm_dir, pad_token_id=tokenizer.pad_token_id, n_layer=5)


def test_reward_score_with_left_padding_equals_unpadded(world):
    _, lm_dir, tokenizer = world
    rm = reward_model_from_pretrained(lm_dir, pad_token_id=tokenizer.pad_token_id, seed=0)
    prompts = ["the film", "music", "the plot was"]
    responses = [" was good and the acting was great", " dull", " really bad"]
    ended = [True, False, False]
    ids, mask = left_pad(tokenize_for_reward(tokenizer, prompts, responses, ended, max_length=64),
                         tokenizer.pad_token_id)
    assert (mask == 0).any()  # the batch really is padded
    with torch.no_grad():
        batched = reward_scores(rm, ids, mask)
        for i in range(len(prompts)):
            alone = ids[i][mask[i].bool()][None]
            single = reward_scores(rm, alone, torch.ones_like(alone))
            assert batched[i].item() == pytest.approx(single.item(), abs=1e-5)
        # Without mask-derived position ids GPT-2 would shift positions under padding: the
        # invariance above is not automatic, it is what reward_scores provides.
        shifted = rm(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert not torch.allclose(shifted[1:], batched[1:], atol=1e-5)


def test_backbone_from_pretrained(world):
    _, lm_dir, _ = world
    lm = load_causal_lm(lm_dir)
    backbone = backbone_from_pretrained(lm_dir, n_layer=1)
    assert type(backbone).__name__ == "GPT2Model" and len(backbone.h) == 1
    assert torch.equal(backbone.wte.weight, lm.transformer.wte.weight)
    assert backbone.config.attn_pdrop == 0.0
