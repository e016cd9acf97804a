"""Rollouts and per-token log-probs on a tiny offline world (byte-level BPE + random GPT-2)."""

import copy
import random

import pytest
import torch
from torch import nn

from rlhf_overopt.ops.masking import has_eos, position_ids_from_mask, response_mask_after_eos
from rlhf_overopt.records import PromptBatch, Rollout
from rlhf_overopt.rollout import _nucleus_filter, generate, sequence_logprobs, tokenize_prompts
from rlhf_overopt.values import ValueModel, response_values

PROMPTS = [
    "the film",
    "a quiet story about two old friends who",
    "i think",
    "this movie was really",
    "the ending of the long slow second act felt",
]


def _sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    subjects = ["the film", "this movie", "the story", "a director", "the actor", "my friend", "i"]
    verbs = ["was", "felt", "seemed", "looked", "became", "is", "really was"]
    adjectives = ["great", "boring", "slow", "wonderful", "awful", "quiet", "long", "funny", "sad"]
    tails = ["today", "at the end", "for a while", "in the second act", "to me", "again"]
    return [
        f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(adjectives)} {rng.choice(tails)}."
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_sentences(400), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", padding_side="left"
    )


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_embd=32,
        n_layer=2,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        # A wider init than GPT-2's 0.02 gives peaked, non-uniform next-token distributions, so
        # temperature and top-p have visible effects.
        initializer_range=0.3,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return GPT2LMHeadModel(config).eval()


class _BiasedHead(nn.Module):
    """LM head plus a fixed per-token bias on the logits."""

    def __init__(self, head: nn.Module, bias: torch.Tensor) -> None:
        super().__init__()
        self.head = head
        self.register_buffer("bias", bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden) + self.bias


def _with_token_bias(model, token_id: int, value: float):
    """A copy of `model` whose logit for `token_id` is shifted by `value`."""
    biased = copy.deepcopy(model)
    bias = torch.zeros(model.config.vocab_size)
    bias[token_id] = value
    biased.lm_head = _BiasedHead(biased.lm_head, bias)
    return biased


def _random_responses(tokenizer, batch: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random response tokens with EOS placed at different steps (one row without EOS)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (batch, width), generator=g)
    for b in range(batch - 1):
        eos_at = (b * 3 + 1) % width
        ids[b, eos_at] = tokenizer.eos_token_id
        ids[b, eos_at + 1 :] = tokenizer.pad_token_id
    return ids, response_mask_after_eos(ids, tokenizer.eos_token_id)


def test_position_ids_from_mask_hand():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    expected = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 1, 1]])
    assert torch.equal(position_ids_from_mask(mask), expected)


def test_tokenize_prompts_left_pads(tokenizer):
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    assert ids.shape == mask.shape and ids.shape[0] == len(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        expected = tokenizer(prompt)["input_ids"]
        n = len(expected)
        assert ids[i, -n:].tolist() == expected
        assert mask[i].tolist() == [0] * (ids.shape[1] - n) + [1] * n
        assert (ids[i, : ids.shape[1] - n] == tokenizer.pad_token_id).all()
    short_ids, short_mask = tokenize_prompts(tokenizer, PROMPTS, max_length=3)
    assert short_ids.shape[1] == 3
    # Truncation keeps the end of the prompt: the part the response continues.
    assert short_ids[1].tolist() == tokenizer(PROMPTS[1])["input_ids"][-3:]
    assert short_mask.sum() == sum(min(3, len(tokenizer(p)["input_ids"])) for p in PROMPTS)


def test_pad_must_differ_from_eos(tokenizer, model):
    same = copy.deepcopy(tokenizer)
    same.pad_token = same.eos_token
    with pytest.raises(ValueError, match="distinct from EOS"):
        tokenize_prompts(same, PROMPTS)
    with pytest.raises(ValueError, match="distinct from EOS"):
        generate(model, same, PROMPTS, max_new_tokens=2)


def test_left_padding_equals_no_padding(tokenizer, model):
    query_ids, query_mask = tokenize_prompts(tokenizer, PROMPTS)
    assert (query_mask == 0).any(), "the batch must contain left padding"
    response_ids, response_mask = _random_responses(tokenizer, len(PROMPTS), 7, seed=1)
    with torch.no_grad():
        batched = sequence_logprobs(model, query_ids, query_mask, response_ids, response_mask)
        for i, prompt in enumerate(PROMPTS):
            alone_q = torch.tensor([tokenizer(prompt)["input_ids"]])
            n = int(response_mask[i].sum())
            alone = sequence_logprobs(
                model,
                alone_q,
                torch.ones_like(alone_q),
                response_ids[i : i + 1, :n],
                response_mask[i : i + 1, :n],
            )
            torch.testing.assert_close(batched[i, :n], alone[0], atol=1e-5, rtol=0)
            assert (batched[i, n:] == 0).all()


def test_temperature_divides_logits_before_log_softmax(tokenizer, model):
    temperature = 0.7
    query = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]])
    response = torch.tensor([tokenizer(" was great today")["input_ids"]])
    with torch.no_grad():
        logprobs, entropy = sequence_logprobs(
            model,
            query,
            torch.ones_like(query),
            response,
            torch.ones_like(response),
            temperature=temperature,
            return_entropy=True,
        )
        at_one = sequence_logprobs(model, query, torch.ones_like(query), response, torch.ones_like(response))
        logits = model(torch.cat([query, response], dim=1)).logits[0]
    tq, tr = query.shape[1], response.shape[1]
    expected, expected_entropy = [], []
    for t in range(tr):
        logp = torch.log_softmax(logits[tq - 1 + t] / temperature, dim=-1)
        expected.append(logp[response[0, t]])
        expected_entropy.append(-(logp.exp() * logp).sum())
    torch.testing.assert_close(logprobs[0], torch.stack(expected), atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy[0], torch.stack(expected_entropy), atol=1e-5, rtol=0)
    assert not torch.allclose(logprobs, at_one, atol=1e-3)


def test_sequence_logprobs_gradient_is_finite_with_padding(tokenizer, model):
    trainable = copy.deepcopy(model)
    query_ids, query_mask = tokenize_prompts(tokenizer, PROMPTS)
    response_ids, response_mask = _random_responses(tokenizer, len(PROMPTS), 6, seed=2)
    logprobs = sequence_logprobs(trainable, query_ids, query_mask, response_ids, response_mask)
    logprobs.sum().backward()
    grads = [p.grad for p in trainable.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_generate_logprobs_equal_sequence_logprobs(tokenizer, model):
    g = torch.Generator().manual_seed(0)
    rollout = generate(
        model,
        tokenizer,
        PROMPTS * 2,
        max_new_tokens=12,
        temperature=0.7,
        top_p=0.9,
        generator=g,
        batch_size=4,
    )
    assert len(rollout) == 2 * len(PROMPTS) and rollout.temperature == 0.7
    with torch.no_grad():
        recomputed = sequence_logprobs(
            model,
            rollout.query_ids,
            rollout.query_mask,
            rollout.response_ids,
            rollout.response_mask,
            temperature=0.7,
        )
    torch.testing.assert_close(rollout.logprobs, recomputed, atol=1e-5, rtol=0)
    assert (rollout.logprobs[rollout.response_mask == 0] == 0).all()
    assert (rollout.logprobs[rollout.response_mask == 1] < 0).all()


def test_eos_truncates_pads_and_masks(tokenizer, model):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # A moderate bias: rows end at different steps, some not at all within the cap.
    likely_eos = _with_token_bias(model, eos, 6.0)
    rollout = generate(
        likely_eos, tokenizer, PROMPTS * 4, max_new_tokens=10, generator=torch.Generator().manual_seed(3)
    )
    ids, mask = rollout.response_ids, rollout.response_mask
    assert torch.equal(mask, response_mask_after_eos(ids, eos))
    assert torch.equal(rollout.ended, has_eos(ids, eos))
    lengths = mask.sum(dim=-1)
    assert len(set(lengths.tolist())) > 1, "the bias should give responses of several lengths"
    assert rollout.ended.any() and not rollout.ended.all()
    for b in range(len(rollout)):
        n = int(lengths[b])
        if rollout.ended[b]:
            assert ids[b, n - 1] == eos and (ids[b, : n - 1] != eos).all()
        else:
            assert n == 10 and (ids[b] != eos).all()
        assert (ids[b, n:] == pad).all()
        assert "<|endoftext|>" not in rollout.responses[b] and "<|pad|>" not in rollout.responses[b]
        assert rollout.responses[b] == tokenizer.decode(ids[b, :n], skip_special_tokens=True)

    # A huge bias: every row ends on its first token and the loop stops there.
    always_eos = _with_token_bias(model, eos, 1e4)
    done = generate(
        always_eos, tokenizer, PROMPTS, max_new_tokens=10, generator=torch.Generator().manual_seed(0)
    )
    assert done.response_ids.shape == (len(PROMPTS), 1)
    assert (done.response_ids == eos).all() and done.ended.all() and (done.response_mask == 1).all()
    assert done.responses == [""] * len(PROMPTS)


def test_generation_is_deterministic_given_the_generator(tokenizer, model):
    def run(seed: int) -> Rollout:
        return generate(
            model, tokenizer, PROMPTS, max_new_tokens=8, generator=torch.Generator().manual_seed(seed)
        )

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logprobs, b.logprobs)
    assert a.responses == b.responses
    assert not torch.equal(a.response_ids, c.response_ids)


def test_nucleus_filter_hand():
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    assert torch.equal(_nucleus_filter(probs, 0.75) > 0, torch.tensor([[False, True, False, True]]))
    assert torch.equal(_nucleus_filter(probs, 0.85) > 0, torch.tensor([[True, True, False, True]]))
    assert torch.equal(_nucleus_filter(probs, 1e-6) > 0, torch.tensor([[False, True, False, False]]))
    assert torch.equal(_nucleus_filter(probs, 1.0), probs)


def test_top_p_changes_the_sampling_distribution(tokenizer, model):
    prompts = [PROMPTS[0]] * 64

    def first_tokens(top_p: float) -> Rollout:
        return generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=1,
            top_p=top_p,
            generator=torch.Generator().manual_seed(0),
        )

    full, half, greedy = first_tokens(1.0), first_tokens(0.5), first_tokens(1e-6)
    with torch.no_grad():
        query = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
        logp = torch.log_softmax(model(query).logits[0, -1], dim=-1)
    nucleus = set(_nucleus_filter(logp.exp()[None], 0.5)[0].nonzero().flatten().tolist())
    assert 1 < len(nucleus) < len(tokenizer) // 2
    full_tokens, half_tokens = set(full.response_ids[:, 0].tolist()), set(half.response_ids[:, 0].tolist())
    assert not full_tokens <= nucleus, "top_p=1 samples outside the 0.5 nucleus"
    assert half_tokens <= nucleus and len(half_tokens) > 1
    # A tiny nucleus holds only the most likely token: sampling becomes greedy.
    assert (greedy.response_ids[:, 0] == logp.argmax()).all()
    # Stored log-probs are those of the unfiltered distribution, whatever top_p was.
    torch.testing.assert_close(greedy.logprobs[:, 0], logp[logp.argmax()].expand(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(half.logprobs[:, 0], logp[half.response_ids[:, 0]], atol=1e-5, rtol=0)


def test_batched_generation_equals_one_prompt_at_a_time(tokenizer, model):
    # Greedy (tiny top_p) so that sampling noise cannot hide a padding or position bug in the
    # KV-cached loop.
    batched = generate(model, tokenizer, PROMPTS, max_new_tokens=10, top_p=1e-6)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(model, tokenizer, [prompt], max_new_tokens=10, top_p=1e-6)
        n = alone.response_ids.shape[1]
        assert torch.equal(batched.response_ids[i, :n], alone.response_ids[0])
        torch.testing.assert_close(batched.logprobs[i, :n], alone.logprobs[0], atol=1e-5, rtol=0)


def test_generate_accepts_prompt_batch_and_restores_mode(tokenizer, model):
    query_ids, query_mask = tokenize_prompts(tokenizer, PROMPTS)
    batch = PromptBatch(list(range(len(PROMPTS))), PROMPTS, query_ids, query_mask)
    model.train()
    try:
        rollout = generate(
            model, tokenizer, batch, max_new_tokens=3, generator=torch.Generator().manual_seed(0)
        )
        assert model.training
    finally:
        model.eval()
    from_strings = generate(
        model, tokenizer, PROMPTS, max_new_tokens=3, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(rollout.response_ids, from_strings.response_ids)
    assert rollout.prompts == PROMPTS


@pytest.fixture(scope="module")
def value_model(model):
    torch.manual_seed(1)
    return ValueModel(copy.deepcopy(model.transformer)).eval()


def test_value_head_init(value_model):
    d = value_model.head.in_features
    assert value_model.head.weight.shape == (1, d) and (value_model.head.bias == 0).all()
    assert 0.3 < value_model.head.weight.std().item() * (d + 1) ** 0.5 < 2.0


def test_values_are_aligned_with_the_state_before_each_token(tokenizer, value_model):
    query_ids, query_mask = tokenize_prompts(tokenizer, PROMPTS)
    response_ids, response_mask = _random_responses(tokenizer, len(PROMPTS), 6, seed=4)
    response_mask = torch.ones_like(response_mask)  # every position real: compare all of them
    with torch.no_grad():
        values = response_values(value_model, query_ids, query_mask, response_ids, response_mask)
        assert values.shape == (1, *response_ids.shape)
        values = values[0]
        # value[t] is V(query, response_<t): the value model's output on that prefix alone.
        for i, prompt in enumerate(PROMPTS):
            q = tokenizer(prompt)["input_ids"]
            for t in range(response_ids.shape[1]):
                prefix = torch.tensor([q + response_ids[i, :t].tolist()])
                alone = value_model(prefix, torch.ones_like(prefix))[0, -1, 0]
                torch.testing.assert_close(values[i, t], alone, atol=1e-5, rtol=0)
        # Changing response token k changes values after k only.
        k = 2
        changed = response_ids.clone()
        changed[:, k] = (changed[:, k] + 1) % len(tokenizer)
        values2 = response_values(value_model, query_ids, query_mask, changed, response_mask)[0]
    torch.testing.assert_close(values[:, : k + 1], values2[:, : k + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(values[:, k + 1 :], values2[:, k + 1 :], atol=1e-4)


def test_values_masked_and_differentiable(tokenizer, value_model):
    trainable = copy.deepcopy(value_model).train()
    query_ids, query_mask = tokenize_prompts(tokenizer, PROMPTS)
    response_ids, response_mask = _random_responses(tokenizer, len(PROMPTS), 6, seed=5)
    values = response_values(trainable, query_ids, query_mask, response_ids, response_mask)
    assert (values[0][response_mask == 0] == 0).all()
    values.sum().backward()
    assert trainable.head.weight.grad is not None and torch.isfinite(trainable.head.weight.grad).all()


def test_value_heads_are_independent_single_head_models(tokenizer, value_model):
    """A 3-head value model (the composite methods' streams) equals 3 one-head models sharing the
    backbone, one per head row; save/load keeps the head count."""
    from rlhf_overopt.values import ValueModel

    multi = ValueModel(copy.deepcopy(value_model.backbone), n_heads=3).eval()
    query_ids, query_mask = tokenize_prompts(tokenizer, PROMPTS)
    response_ids, response_mask = _random_responses(tokenizer, len(PROMPTS), 5, seed=6)
    with torch.no_grad():
        values = response_values(multi, query_ids, query_mask, response_ids, response_mask)
        assert values.shape == (3, *response_ids.shape)
        for s in range(3):
            one = ValueModel(multi.backbone, n_heads=1).eval()
            one.head.weight.copy_(multi.head.weight[s:s + 1])
            one.head.bias.copy_(multi.head.bias[s:s + 1])
            torch.testing.assert_close(response_values(one, query_ids, query_mask, response_ids, response_mask)[0],
                                       values[s], atol=1e-6, rtol=0)


def test_value_model_save_load_and_backbone_from_policy(tmp_path, model, value_model, tokenizer):
    value_model.save_pretrained(tmp_path / "value")
    loaded = ValueModel.from_pretrained(tmp_path / "value").eval()
    ids, mask = tokenize_prompts(tokenizer, PROMPTS)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), value_model(ids, mask))
    model.save_pretrained(tmp_path / "policy")
    from_policy = ValueModel.from_pretrained_backbone(tmp_path / "policy")
    torch.testing.assert_close(from_policy.backbone.wte.weight, model.transformer.wte.weight)


def _toy_rollout(batch: int, tq: int, tr: int, pad: int = 1) -> Rollout:
    return Rollout(
        query_ids=torch.arange(batch * tq).reshape(batch, tq),
        query_mask=torch.ones(batch, tq, dtype=torch.long),
        response_ids=torch.arange(batch * tr).reshape(batch, tr),
        response_mask=torch.ones(batch, tr, dtype=torch.long),
        logprobs=-torch.rand(batch, tr),
        ended=torch.zeros(batch, dtype=torch.bool),
        prompts=[f"p{i}" for i in range(batch)],
        responses=[f"r{i}" for i in range(batch)],
        pad_token_id=pad,
    )


def test_rollout_select_and_cat():
    a, b = _toy_rollout(4, 3, 5), _toy_rollout(2, 6, 2)
    both = Rollout.cat([a, b])
    assert both.query_ids.shape == (6, 6) and both.response_ids.shape == (6, 5)
    assert both.ended.shape == (6,) and len(both.prompts) == 6 and len(both) == 6
    # Queries pad on the left, responses on the right.
    assert torch.equal(both.query_ids[:4, :3], torch.full((4, 3), 1)) and (both.query_mask[:4, :3] == 0).all()
    assert torch.equal(both.query_ids[:4, 3:], a.query_ids)
    assert torch.equal(both.response_ids[4:, 2:], torch.full((2, 3), 1))
    assert (both.response_mask[4:, 2:] == 0).all() and (both.logprobs[4:, 2:] == 0).all()
    assert torch.equal(both.response_length, torch.tensor([5, 5, 5, 5, 2, 2]))

    mini = both.select([5, 0])
    assert mini.query_ids.shape == (2, 6) and mini.prompts == ["p1", "p0"]
    assert torch.equal(mini.response_ids[1], both.response_ids[0])
    assert both[1:3].responses == ["r1", "r2"] and both[1:3].logprobs.shape == (2, 5)
    assert len(both.select(torch.tensor([True, False, True, False, False, True]))) == 3
    assert both.to("cpu").query_ids.device.type == "cpu"
    with pytest.raises(ValueError):
        Rollout.cat([a, _toy_rollout(2, 3, 5, pad=7)])
    with pytest.raises(ValueError, match="logprobs"):
        Rollout(**{**a.__dict__, "logprobs": torch.zeros(4, 4)})
