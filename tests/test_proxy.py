"""Tests of the proxy ensemble (rlhf_overopt.rewards.ensemble, .members, .rm_training): training every ensemble kind, failed members, standardization,
batched scoring against member-by-member scoring, save/load.

A tiny offline world is built once per module: a byte-level BPE tokenizer, a random-init
2-layer GPT-2 (32 dims) and synthetic preference pairs whose label is learnable (the chosen
response ends in a positive word, the rejected one in a negative word; 10% of labels flipped).
"""

from __future__ import annotations

import copy
import json
import logging
import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from rlhf_overopt.config.sections import ProxyConfig
from rlhf_overopt.rewards.ensemble import ENSEMBLE_FILE, FailedMemberError, ProxyEnsemble
from rlhf_overopt.rewards.training import encode_pairs, reference_responses, train_ensemble
from rlhf_overopt.run.models import left_pad, reward_head, tokenize_for_reward

GOOD = ["good", "great", "lovely", "superb"]
BAD = ["bad", "awful", "boring", "dull"]
FILLER = [
    "the",
    "plot",
    "was",
    "and",
    "acting",
    "film",
    "story",
    "really",
    "quite",
    "music",
    "scenes",
    "cast",
]
PROMPTS = ["the movie was", "i think this film", "overall the story", "my friend said it"]
COLUMNS = [
    "prompt_id",
    "prompt",
    "chosen",
    "rejected",
    "chosen_ended",
    "rejected_ended",
    "chosen_gold",
    "rejected_gold",
    "label_flipped",
]


def _response(rng: random.Random, word: str) -> str:
    return " " + " ".join(rng.choice(FILLER) for _ in range(rng.randint(2, 6))) + " " + word


def _preferences(rng: random.Random, n: int, flip: float = 0.1) -> Dataset:
    rows: dict[str, list] = {c: [] for c in COLUMNS}
    for i in range(n):
        good, bad = _response(rng, rng.choice(GOOD)), _response(rng, rng.choice(BAD))
        good_ended, bad_ended = rng.random() < 0.3, rng.random() < 0.3
        good_gold, bad_gold = 1.0 + rng.random(), rng.random() - 0.5
        flipped = rng.random() < flip
        if flipped:  # label noise: the dataset's "chosen" is the gold-worse response
            good, bad, good_ended, bad_ended, good_gold, bad_gold = (
                bad,
                good,
                bad_ended,
                good_ended,
                bad_gold,
                good_gold,
            )
        for column, value in zip(
            COLUMNS, [i, rng.choice(PROMPTS), good, bad, good_ended, bad_ended, good_gold, bad_gold, flipped]
        ):
            rows[column].append(value)
    return Dataset.from_dict(rows)


def _tiny_lm(tokenizer, path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(str(path))
    return path


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
    """dict with root, tokenizer, lm (path), train and val preference datasets."""
    root = tmp_path_factory.mktemp("proxy_world")
    rng = random.Random(0)
    texts = [p + _response(rng, rng.choice(GOOD + BAD)) for p in PROMPTS for _ in range(60)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainer=trainers.BpeTrainer(
            vocab_size=320,
            special_tokens=["<|endoftext|>", "<|pad|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>", padding_side="left"
    )
    return {
        "root": root,
        "tokenizer": tokenizer,
        "lm": _tiny_lm(tokenizer, root / "lm", seed=0),
        "train": _preferences(rng, 256),
        "val": _preferences(rng, 128),
    }


def _cfg(kind: str, **overrides) -> ProxyConfig:
    base = {
        "kind": kind,
        "k": 3,
        "epochs": 3,
        "lr": 1e-2 if kind == "lora" else 3e-3,
        "batch_size": 32,
        "min_accuracy": 0.6,
        "on_failed_member": "error",
        "score_batch_size": 64,
    }
    base.update(overrides)
    return ProxyConfig(**base)


@pytest.fixture(scope="module")
def trained(world):
    """Lazily trained ensembles, one per kind, saved under the world root."""
    cache: dict[str, ProxyEnsemble] = {}
    calls: list[int] = []

    def make_backbone(seed: int) -> Path:
        calls.append(seed)
        return _tiny_lm(world["tokenizer"], world["root"] / f"pretrained_{seed}", seed=seed)

    def get(kind: str) -> ProxyEnsemble:
        if kind not in cache:
            cache[kind] = train_ensemble(
                kind,
                None if kind == "pretrain" else world["lm"],
                world["tokenizer"],
                world["train"],
                world["val"],
                world["root"] / f"ens_{kind}",
                _cfg(kind),
                make_backbone=make_backbone if kind == "pretrain" else None,
                progress=False,
            )
        return cache[kind]

    get.pretrain_calls = calls  # type: ignore[attr-defined]
    get.world_root = world["root"]  # type: ignore[attr-defined]
    return get


def _val_batch(world, n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    val = world["val"].select(range(n))
    tokenizer = world["tokenizer"]
    rows = tokenize_for_reward(tokenizer, list(val["prompt"]), list(val["chosen"]), list(val["chosen_ended"]),
                               max_length=64)
    return left_pad(rows, tokenizer.pad_token_id)


KINDS = ["independent", "pretrain", "multihead", "lora"]


# ------------------------------------------------------------------------------------ training


@pytest.mark.parametrize("kind", KINDS)
def test_training_learns_the_preference(trained, kind):
    ensemble = trained(kind)
    assert ensemble.k == 3 and ensemble.member_names == ["member_0", "member_1", "member_2"]
    assert ensemble.failed_members == []
    for name in ensemble.member_names:
        # Chance is 0.5; 10% label noise caps accuracy vs noisy labels near 0.9.
        assert ensemble.val_accuracy[name] > 0.75, (name, ensemble.val_accuracy)
        assert ensemble.val_accuracy_clean[name] > 0.8, (name, ensemble.val_accuracy_clean)


def test_members_differ_by_seed(trained, world):
    ids, mask = _val_batch(world)
    for kind in ("independent", "multihead", "lora"):
        scores = trained(kind).score_ids(ids, mask, standardized=False)
        assert not torch.allclose(scores[0], scores[1], atol=1e-4), kind


def test_offset_regularizer_pins_pair_sums(trained, world):
    # Eisenstein et al.: eta * (r+ + r-)^2 keeps each pair's reward offset near 0.
    pinned = train_ensemble(
        "multihead",
        world["lm"],
        world["tokenizer"],
        world["train"],
        world["val"],
        None,
        _cfg("multihead", offset_eta=0.1),
        progress=False,
    )
    pairs = encode_pairs(world["val"], world["tokenizer"], pinned.max_length)

    def mean_sq_sum(ensemble: ProxyEnsemble) -> float:
        chosen = ensemble.score_sequences(pairs.chosen, standardized=False)
        rejected = ensemble.score_sequences(pairs.rejected, standardized=False)
        return float(((chosen + rejected) ** 2).mean())

    assert min(pinned.val_accuracy.values()) > 0.65
    assert mean_sq_sum(pinned) < 0.5 * mean_sq_sum(trained("multihead"))


def test_pretrain_members_use_their_own_backbones(trained):
    ensemble = trained("pretrain")
    assert trained.pretrain_calls == [1000, 1001, 1002]
    assert ensemble.train_config["member_backbones"] == [
        str(trained.world_root / f"pretrained_{s}") for s in (1000, 1001, 1002)
    ]
    embeddings = [m.transformer.wte.weight for m in ensemble.members.models]
    assert not torch.allclose(embeddings[0], embeddings[1])


# ------------------------------------------------------------------------------------ scoring


@pytest.mark.parametrize("kind", KINDS)
def test_scores_equal_member_by_member(trained, world, kind):
    ensemble = trained(kind)
    ids, mask = _val_batch(world)
    assert (mask == 0).any()
    scores = ensemble.score_ids(ids, mask, standardized=False)
    assert scores.shape == (3, ids.shape[0])
    with torch.no_grad():
        alone = torch.stack([ensemble.members.member_scores(i, ids, mask) for i in range(ensemble.k)])
    torch.testing.assert_close(scores, alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_equals_no_padding(trained, world, kind):
    ensemble = trained(kind)
    ids, mask = _val_batch(world, n=12)
    batched = ensemble.score_ids(ids, mask)
    for i in range(ids.shape[0]):
        alone = ids[i][mask[i].bool()][None]
        torch.testing.assert_close(
            ensemble.score_ids(alone, torch.ones_like(alone))[:, 0], batched[:, i], atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("kind", ["independent", "pretrain"])
def test_vmap_equals_loop(trained, world, kind):
    ensemble = trained(kind)
    ids, mask = _val_batch(world)
    loop = ensemble.score_ids(ids, mask, method="loop")
    batched = ensemble.score_ids(ids, mask, method="vmap")
    torch.testing.assert_close(batched, loop, atol=1e-5, rtol=0)


def test_score_texts_matches_score_ids_and_chunking(trained, world):
    ensemble = copy.copy(trained("independent"))
    val = world["val"].select(range(50))
    prompts, responses, ended = list(val["prompt"]), list(val["rejected"]), list(val["rejected_ended"])
    from_texts = ensemble.score_texts(prompts, responses, ended)
    ids, mask = left_pad(tokenize_for_reward(world["tokenizer"], prompts, responses, ended,
                                             max_length=ensemble.max_length), world["tokenizer"].pad_token_id)
    torch.testing.assert_close(from_texts, ensemble.score_ids(ids, mask), atol=1e-5, rtol=0)
    ensemble.score_batch_size = 7  # chunking and length-sorting must not change any score
    torch.testing.assert_close(ensemble.score_texts(prompts, responses, ended), from_texts, atol=1e-5, rtol=0)
    assert ensemble.score_texts([], [], []).shape == (3, 0)


# ------------------------------------------------------------------------------------ standardization


@pytest.mark.parametrize("kind", ["independent", "multihead"])
def test_standardization_on_reference_set(trained, world, kind):
    ensemble = trained(kind)
    scores = ensemble.score_texts(*reference_responses(world["val"]))  # the default reference
    assert scores.shape == (3, 2 * len(world["val"]))
    torch.testing.assert_close(scores.mean(dim=1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(scores.std(dim=1, unbiased=False), torch.ones(3), atol=1e-4, rtol=0)
    raw = ensemble.score_texts(*reference_responses(world["val"]), standardized=False)
    torch.testing.assert_close(
        raw, scores * ensemble.score_std[:, None] + ensemble.score_mean[:, None], atol=1e-4, rtol=0
    )


# ------------------------------------------------------------------------------------ save / load


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_gives_identical_scores(trained, world, kind):
    ensemble = trained(kind)
    directory = world["root"] / f"ens_{kind}"  # written by train_ensemble
    meta = json.loads((directory / ENSEMBLE_FILE).read_text())
    assert meta["kind"] == kind and meta["k"] == 3 and len(meta["score_std"]) == 3
    assert meta["train_config"]["lr"] == _cfg(kind).lr
    assert not list(directory.parent.glob(f".ens_{kind}.*"))  # no temporary folders left
    loaded = ProxyEnsemble.load(directory)
    ids, mask = _val_batch(world)
    torch.testing.assert_close(loaded.score_ids(ids, mask), ensemble.score_ids(ids, mask), atol=1e-6, rtol=0)
    assert loaded.val_accuracy == ensemble.val_accuracy
    assert loaded.member_names == ensemble.member_names
    # Saving over an existing ensemble replaces it whole.
    loaded.save(directory)
    again = ProxyEnsemble.load(directory)
    torch.testing.assert_close(again.score_ids(ids, mask), ensemble.score_ids(ids, mask), atol=1e-6, rtol=0)


def test_load_never_reads_pickle(trained, world, tmp_path):
    trained("independent").save(tmp_path / "ens")
    weights = tmp_path / "ens" / "member_0" / "model.safetensors"
    weights.rename(weights.with_name("pytorch_model.bin"))
    with pytest.raises(OSError):
        ProxyEnsemble.load(tmp_path / "ens")


# ------------------------------------------------------------------------------------ failed members


def _break_member(ensemble: ProxyEnsemble, index: int) -> ProxyEnsemble:
    """A copy whose member `index` outputs a constant: every pair a tie, accuracy 0 (< chance)."""
    broken = copy.deepcopy(ensemble)
    with torch.no_grad():
        if broken.kind == "multihead":
            broken.members.model.heads.weight[index].zero_()
        elif broken.kind == "lora":
            broken.members.peft_model.set_adapter(broken.member_names[index])
            reward_head(broken.members.peft_model).weight.zero_()
        else:
            reward_head(broken.members.models[index]).weight.zero_()
            broken.members._stacked = None  # the vmap path's stacked copy of the old weights
    return broken


def test_failed_member_error(trained, world):
    broken = _break_member(trained("independent"), 1)
    pairs = encode_pairs(world["val"], world["tokenizer"], broken.max_length)
    with pytest.raises(FailedMemberError, match="member_1"):
        broken.check_members(pairs, min_accuracy=0.6, on_failed_member="error")


def test_failed_member_warn(trained, world, caplog):
    broken = _break_member(trained("independent"), 1)
    pairs = encode_pairs(world["val"], world["tokenizer"], broken.max_length)
    with caplog.at_level(logging.WARNING, logger="rlhf_overopt.rewards.ensemble"):
        failed = broken.check_members(pairs, min_accuracy=0.6, on_failed_member="warn")
    assert failed == ["member_1"] and broken.failed_members == ["member_1"]
    assert broken.k == 3 and broken.val_accuracy["member_1"] < 0.6
    assert any("member_1" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


@pytest.mark.parametrize("kind", ["independent", "multihead", "lora"])
def test_failed_member_drop(trained, world, kind, caplog):
    original = trained(kind)
    broken = _break_member(original, 1)
    pairs = encode_pairs(world["val"], world["tokenizer"], broken.max_length)
    with caplog.at_level(logging.WARNING, logger="rlhf_overopt.rewards.ensemble"):
        failed = broken.check_members(pairs, min_accuracy=0.6, on_failed_member="drop")
    assert failed == ["member_1"] and any("dropped" in r.getMessage() for r in caplog.records)
    assert broken.member_names == ["member_0", "member_2"] and broken.dropped_members == ["member_1"]
    assert broken.score_mean.shape == (2,)
    ids, mask = _val_batch(world)
    expected = original.score_ids(ids, mask)[[0, 2]]
    torch.testing.assert_close(broken.score_ids(ids, mask), expected, atol=1e-5, rtol=0)
    # Every member failing leaves nothing to keep.
    with pytest.raises(FailedMemberError, match="every member failed"):
        broken.check_members(pairs, min_accuracy=1.01, on_failed_member="drop")


def test_train_ensemble_stops_on_failed_members(world, tmp_path):
    # lr=0 learns nothing (and 0.99 is out of reach anyway): every member fails.
    cfg = _cfg("multihead", lr=0.0, epochs=1, min_accuracy=0.99, on_failed_member="error")
    with pytest.raises(FailedMemberError):
        train_ensemble(
            "multihead",
            world["lm"],
            world["tokenizer"],
            world["train"],
            world["val"],
            tmp_path / "ens",
            cfg,
            progress=False,
        )
    assert not (tmp_path / "ens").exists()  # nothing half-written


def test_train_ensemble_argument_errors(world, tmp_path):
    with pytest.raises(ValueError, match="make_backbone"):
        train_ensemble(
            "pretrain", None, world["tokenizer"], world["train"], world["val"], None, _cfg("pretrain")
        )
    with pytest.raises(ValueError, match="unknown proxy kind"):
        train_ensemble(
            "bagging",
            world["lm"],
            world["tokenizer"],
            world["train"],
            world["val"],
            None,
            _cfg("independent"),
        )


def test_members_trained_in_processes_equal_members_trained_here(trained, world):
    """proxy.train_workers changes where members train, not their weights: two spawned worker
    processes give bit-identical members to training them one after another in this process. The
    module's trained ensemble (train_workers=0: as many workers as the cores allow) stands in for the
    worker count it used; only the other one is trained here."""
    from rlhf_overopt.rewards.training import member_workers

    def fresh(workers: int) -> ProxyEnsemble:
        return train_ensemble("independent", world["lm"], world["tokenizer"], world["train"], world["val"], None,
                              _cfg("independent", train_workers=workers), progress=False)

    auto = member_workers(0, 3, "cpu")
    here = trained("independent") if auto == 1 else fresh(1)
    spawned = trained("independent") if auto == 2 else fresh(2)
    for a, b in zip(here.members.models, spawned.members.models):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key
    assert member_workers(0, 5, "cuda") == 1 and member_workers(3, 2, "cpu") == 2 and member_workers(0, 1, "cpu") == 1
