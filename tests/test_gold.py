"""The gold reward: the testbed's rule-based scorer on hand-written reviews, and the gold stage
with a Hugging Face sequence-classification checkpoint."""

from __future__ import annotations

import pytest
import torch

from rlhf_overopt.config.load import load_config
from rlhf_overopt.config.sections import TestbedConfig
from rlhf_overopt.rewards.gold import GoldScorer
from rlhf_overopt.testbed.gold import TestbedGold, distinct_bigram_ratio, words


@pytest.fixture(scope="module")
def gold() -> TestbedGold:
    return TestbedGold.from_config(TestbedConfig())


def one(gold: TestbedGold, review: str, ended: bool = True, prompt: str = "") -> float:
    """Gold of one review, given as (prompt, response) with the whole text as the response."""
    return float(gold.score([prompt], [review], [ended])[0])


def test_sentiment_orders_positive_neutral_negative(gold):
    pos = one(gold, "The acting was wonderful and the story was great.")
    neu = one(gold, "The film is set in a small town and runs two hours.")
    neg = one(gold, "The acting was terrible and the story was awful.")
    assert pos > neu > neg
    assert pos > 0.5 and neg < -0.5 and abs(neu) < 0.1


def test_negation_and_contrast_are_not_a_bag_of_words(gold):
    assert one(gold, "The plot was not good.") < one(gold, "The plot was good.")
    assert one(gold, "The plot was not bad.") > one(gold, "The plot was bad.")
    # Same words, other order: the clause after "but" carries the verdict.
    a = one(gold, "The acting was bad but the story was wonderful.")
    b = one(gold, "The acting was wonderful but the story was bad.")
    assert a > 0 > b


def test_repetition_scores_below_its_fluent_twin(gold):
    fluent = "The music was great and the acting was wonderful."
    repeated = "The music was great great great great great great great."
    assert one(gold, repeated) < one(gold, fluent)
    parts = gold.components([""], [repeated], [True])
    assert parts["repetition"][0] < 0
    assert gold.components([""], [fluent], [True])["repetition"][0] == 0
    assert distinct_bigram_ratio(words("a b a b")) == pytest.approx(2 / 3)
    assert distinct_bigram_ratio(["one"]) == 1.0


def test_missing_eos_costs_the_eos_penalty(gold):
    prompt, response = "The acting was", " superb and the plot was clever."
    ended = one(gold, response, True, prompt)
    cut = one(gold, response, False, prompt)
    assert cut < ended
    assert ended - cut == pytest.approx(gold.eos_penalty)


def test_length_band_is_free_and_outside_costs_linearly():
    g = TestbedGold(length_target=10, length_tolerance=5, length_weight=1.0)

    def length_term(n_words: int) -> float:
        return float(g.components(["The film"], [" word" * n_words], [True])["length"][0])

    assert length_term(5) == 0.0 and length_term(10) == 0.0 and length_term(15) == 0.0
    assert length_term(16) == pytest.approx(-0.1)
    assert length_term(25) == pytest.approx(-1.0)
    assert length_term(3) == pytest.approx(-0.2)  # too short costs as well


def test_components_sum_to_score_and_shapes(gold):
    prompts = ["The acting was", "I would never", "Honestly, the plot"]
    responses = [" great great great", " recommend it.", " was dull, but the ending was lovely" + " and fun" * 12]
    ended = [True, False, True]
    parts = gold.components(prompts, responses, ended)
    score = gold.score(prompts, responses, ended)
    assert set(parts) == {"sentiment", "repetition", "eos", "length"}
    assert score.shape == (3,) and score.dtype == torch.float32
    assert all(v.shape == (3,) and v.dtype == torch.float32 for v in parts.values())
    assert torch.equal(score, parts["sentiment"] + parts["repetition"] + parts["eos"] + parts["length"])
    assert torch.equal(score, gold.score(prompts, responses, ended))  # deterministic
    assert parts["length"][2] < 0  # 30 words leave the default band
    with pytest.raises(ValueError):
        gold.score(prompts, responses[:2], ended)


def test_gold_batch_equals_one_by_one(gold):
    """The batched scorer (one pass over thousands of responses) equals scoring each alone; its
    speed is measured by bench/, not asserted here."""
    prompts = ["The acting was"] * 400
    responses = [f" very good, but the plot was dull and the ending took {i} minutes." for i in range(400)]
    ended = [i % 3 != 0 for i in range(400)]
    batch = gold.score(prompts, responses, ended)
    alone = torch.cat([gold.score([p], [r], [e]) for p, r, e in zip(prompts[:40], responses[:40], ended[:40])])
    assert torch.equal(batch[:40], alone)
    assert len(set(batch.tolist())) > 1  # not a constant


def test_gold_scorer_testbed_path_is_the_testbed_gold(gold):
    cfg = load_config(None, [])
    scorer = GoldScorer.from_config(cfg)
    prompts, responses, ended = ["The plot was"], [" wonderful."], [False]
    assert torch.equal(scorer.score(prompts, responses, ended), gold.score(prompts, responses, ended))
    assert set(scorer.components(prompts, responses, ended)) == {"sentiment", "repetition", "eos", "length"}


@pytest.fixture(scope="module")
def model_gold_dir(tmp_path_factory):
    """A randomly initialized GPT2ForSequenceClassification saved with a testbed tokenizer."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    from rlhf_overopt.testbed.corpus import generate_reviews
    from rlhf_overopt.testbed.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("model_gold")
    tok = train_tokenizer(generate_reviews(300, 3), 300, path)
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=1,
                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    GPT2ForSequenceClassification(config).save_pretrained(str(path))
    return path


def test_gold_scorer_with_a_model_checkpoint(model_gold_dir):
    from transformers import AutoModelForSequenceClassification

    cfg = load_config(None, [f"gold.path={model_gold_dir}", "gold.batch_size=2"])
    scorer = GoldScorer.from_config(cfg)
    prompts = ["The acting was", "I would never", "It is a", "The plot was not", "Honestly,"]
    responses = [" good.", " recommend it to anyone.", " slow film about two brothers.", " bad", " fine"]
    ended = [True, True, False, True, False]
    score = scorer.score(prompts, responses, ended)
    assert score.shape == (5,) and score.dtype == torch.float32 and torch.isfinite(score).all()
    assert scorer.texts(prompts[:1], responses[:1], [True]) == ["The acting was good.<|endoftext|>"]

    # Batching (and so left padding) does not change a score: compare with one text at a time.
    model = AutoModelForSequenceClassification.from_pretrained(str(model_gold_dir)).eval()
    for i, text in enumerate(scorer.texts(prompts, responses, ended)):
        ids = scorer.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            expected = model(**ids).logits[0, 0]
        assert score[i] == pytest.approx(float(expected), abs=1e-5)

    # The EOS text is part of what the model reads.
    cut = scorer.score(prompts[:1], responses[:1], [False])
    assert float(cut[0]) != pytest.approx(float(score[0]), abs=1e-6)
    assert scorer.score([], [], []).shape == (0,)


def test_testbed_gold_defaults_follow_the_config():
    assert TestbedGold() == TestbedGold.from_config(TestbedConfig())


# ------------------------------------------------------------------ a Llama gold without a pad token


def test_llama_gold_without_pad_reads_the_eos_and_ignores_padding(foreign_world):
    """The foreign world's gold (Llama architecture, tokenizer with EOS and no pad): an added pad
    distinct from EOS makes the appended EOS a real token that the head reads, and right padding
    in a batch leaves each row's score as it is alone."""
    scorer = GoldScorer.from_pretrained(foreign_world["gold"], batch_size=8)
    tok = scorer.tokenizer
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert scorer.model.config.pad_token_id == tok.pad_token_id
    prompts = ["write a short review of the movie", "the film", "explain why the plot was", "fun"]
    responses = [" it was good", " was bad not very fun but the ending was great", " boring", " story"]
    ended = [True, False, True, True]
    batched = scorer.score(prompts, responses, ended)
    alone = torch.cat([scorer.score([p], [r], [e]) for p, r, e in zip(prompts, responses, ended)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    cut = scorer.score(prompts, responses, [False] * 4)
    for i, e in enumerate(ended):  # without the EOS the ended rows score differently; row 1 did not end
        assert (float(cut[i]) != pytest.approx(float(batched[i]), abs=1e-6)) == e, (i, cut, batched)
    # The raw checkpoint agrees on an unpadded text that ends with EOS.
    from transformers import AutoModelForSequenceClassification

    raw = AutoModelForSequenceClassification.from_pretrained(str(foreign_world["gold"])).eval()
    ids = tok(scorer.texts(prompts[:1], responses[:1], [True]), return_tensors="pt")["input_ids"]
    assert int(ids[0, -1]) == tok.eos_token_id
    with torch.no_grad():
        expected = raw(input_ids=ids).logits[0, 0]
    assert float(batched[0]) == pytest.approx(float(expected), abs=1e-5)


def test_model_gold_dtype_and_float32_scores(foreign_world):
    cfg = load_config(None, [f"gold.path={foreign_world['gold']}", "gold.dtype=bfloat16", "device=cpu"])
    scorer = GoldScorer.from_config(cfg)
    assert next(scorer.model.parameters()).dtype == torch.bfloat16
    score = scorer.score(["the film"], [" was good"], [True])
    assert score.dtype == torch.float32 and score.device.type == "cpu"


def test_gold_context_too_short_for_responses_is_refused(tmp_path):
    import sys
    from pathlib import Path

    from rlhf_overopt.errors import InputError

    sys.path.insert(0, str(Path(__file__).parent))
    import foreign_world as fw

    path = fw.llama_model(tmp_path / "short_gold", kind="classifier", max_positions=8)
    scorer = GoldScorer.from_pretrained(path)
    assert scorer.context_limit() == 8
    with pytest.raises(InputError, match=r"short_gold.*8 tokens.*16 new tokens"):
        scorer.check_context(prompt_tokens_max=10, max_new_tokens=16)
    scorer.check_context(prompt_tokens_max=2, max_new_tokens=7)  # fits: prompt 2 (cut) + 7 + EOS
    testbed = GoldScorer.from_config(load_config(None, []))
    testbed.check_context(prompt_tokens_max=10**6, max_new_tokens=10**6)  # the rule-based gold has no context
