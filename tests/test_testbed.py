"""The embedded testbed on its tiny config: determinism, caching, atomicity, locking, and the
contracts of each artifact (tokenizer, SFT policy, prompts, preferences)."""

from __future__ import annotations

import dataclasses
import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rlhf_overopt.testbed import build as build_mod
from rlhf_overopt.testbed.build import Testbed, build_testbed, config_hash, resolve_root
from rlhf_overopt.testbed.corpus import MAX_WORDS, MIN_WORDS, generate_reviews
from rlhf_overopt.testbed.data import PREF_COLUMNS, PREFS_STATS_FILE, split_prompt
from rlhf_overopt.testbed.gold import TestbedGold

ROOT = Path(__file__).resolve().parents[1]


# -- corpus ----------------------------------------------------------------------------------------


def test_corpus_is_seeded_and_shaped():
    reviews = generate_reviews(400, seed=3)
    assert reviews == generate_reviews(400, seed=3)
    assert reviews != generate_reviews(400, seed=4)
    assert all(MIN_WORDS <= len(r.split()) <= MAX_WORDS for r in reviews)
    assert all(1 <= sum(r.count(c) for c in ".!") <= 4 for r in reviews)
    text = " ".join(reviews)
    for marker in (" not ", " never ", " but ", "Although ", " very ", " barely "):
        assert marker in text, marker
    assert len(set(reviews)) > 350  # varied, not a handful of templates


# -- build, cache, determinism ---------------------------------------------------------------------


def test_build_reuses_the_cache(tiny_testbed, tiny_testbed_config, monkeypatch):
    import rlhf_overopt.testbed.build as build_mod

    def must_not_build(*args, **kwargs):
        raise AssertionError("a cached testbed was built again")

    monkeypatch.setattr(build_mod, "_build_into", must_not_build)
    again = build_testbed(tiny_testbed_config, progress=False)
    assert again == tiny_testbed
    assert tiny_testbed.root == resolve_root(tiny_testbed_config)
    assert tiny_testbed.root.name == f"testbed-{config_hash(tiny_testbed_config)[:16]}"
    manifest = tiny_testbed.manifest()
    assert manifest["testbed_version"] == build_mod.TESTBED_VERSION
    assert tiny_testbed.config() == tiny_testbed_config
    for stage in ("corpus", "tokenizer", "sft", "prompts", "preferences", "eval_stats"):
        assert manifest["timings"][stage]["wall_s"] >= 0
    # no leftovers of the temporary build folder or other entries than the lock
    leftovers = [p.name for p in tiny_testbed.root.parent.iterdir() if ".tmp-" in p.name]
    assert leftovers == []


def test_cache_key_ignores_cache_dir_only(tiny_testbed_config, tmp_path):
    moved = dataclasses.replace(tiny_testbed_config, cache_dir=str(tmp_path))
    assert config_hash(moved) == config_hash(tiny_testbed_config)
    assert config_hash(dataclasses.replace(tiny_testbed_config, label_noise=0.1)) != config_hash(tiny_testbed_config)


def test_cache_dir_from_environment(tiny_testbed_config, tmp_path, monkeypatch):
    monkeypatch.setenv(build_mod.CACHE_ENV, str(tmp_path))
    cfg = dataclasses.replace(tiny_testbed_config, cache_dir="")
    assert resolve_root(cfg).parent == tmp_path.resolve()


def test_same_seed_same_artifacts_other_seed_different(tiny_testbed, tiny_testbed_config, tmp_path):
    twin = build_testbed(dataclasses.replace(tiny_testbed_config, cache_dir=str(tmp_path / "a")), progress=False)
    assert twin.root != tiny_testbed.root
    assert twin.manifest()["hashes"] == tiny_testbed.manifest()["hashes"]
    other = build_testbed(dataclasses.replace(tiny_testbed_config, cache_dir=str(tmp_path / "b"), seed=1),
                          progress=False)
    h0, h1 = tiny_testbed.manifest()["hashes"], other.manifest()["hashes"]
    for artifact in ("corpus.txt", "tokenizer/tokenizer.json", "policy/model.safetensors",
                     "prompts/train/data-00000-of-00001.arrow", "prefs/data-00000-of-00001.arrow"):
        assert h0[artifact] != h1[artifact], artifact


def test_failed_build_leaves_nothing(tiny_testbed_config, tmp_path, monkeypatch):
    cfg = dataclasses.replace(tiny_testbed_config, cache_dir=str(tmp_path), seed=7)

    def broken(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(build_mod, "train_sft_policy", broken)
    with pytest.raises(RuntimeError, match="killed mid-build"):
        build_testbed(cfg, progress=False)
    assert not resolve_root(cfg).exists()
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def test_second_builder_waits_for_the_lock_and_reuses(tiny_testbed, tiny_testbed_config, tmp_path, monkeypatch):
    """While another builder holds the lock, a build waits; it then reuses what that one made."""
    cfg = dataclasses.replace(tiny_testbed_config, cache_dir=str(tmp_path))
    root = resolve_root(cfg)
    lock_path = tmp_path / f".{root.name}.lock"
    held, release = threading.Event(), threading.Event()

    def other_builder():
        with lock_path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            held.set()
            release.wait(10)
            shutil.copytree(tiny_testbed.root, tmp_path / "staging")
            os.replace(tmp_path / "staging", root)
            fcntl.flock(fh, fcntl.LOCK_UN)

    def must_not_build(*args, **kwargs):
        raise AssertionError("the waiting process built the testbed a second time")

    monkeypatch.setattr(build_mod, "_build_into", must_not_build)
    thread = threading.Thread(target=other_builder)
    thread.start()
    assert held.wait(10)
    threading.Timer(0.3, release.set).start()
    start = time.perf_counter()
    got = build_testbed(cfg, progress=False)
    thread.join()
    assert time.perf_counter() - start >= 0.25  # it did wait
    assert got.root == root and got.manifest()["hashes"] == tiny_testbed.manifest()["hashes"]


# -- artifacts -------------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_special_tokens(tiny_testbed):
    tok = tiny_testbed.load_tokenizer()
    assert tok.pad_token_id is not None and tok.eos_token_id is not None
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.padding_side == "left"
    assert len(tok) == tiny_testbed.config().vocab_size
    texts = tiny_testbed.load_corpus()[:200] + ["  odd  spacing,\ttabs\nand é ünïcode 日本!", ""]
    for text in texts:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    batch = tok(["The acting was", "It is"], padding=True, return_tensors="pt")
    assert batch["input_ids"][1, 0] == tok.pad_token_id  # shorter row padded on the left


def test_sft_policy_beats_unigram_and_has_dropout_off(tiny_testbed):
    sft = tiny_testbed.manifest()["sft"]
    assert sft["heldout_loss"] < sft["unigram_loss"] - 0.25
    model = tiny_testbed.load_policy()
    tok = tiny_testbed.load_tokenizer()
    cfg = model.config
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.0
    assert cfg.eos_token_id == tok.eos_token_id and cfg.pad_token_id == tok.pad_token_id
    assert not model.training
    assert (tiny_testbed.policy_dir / "model.safetensors").is_file()


def test_prompt_splits_are_disjoint(tiny_testbed, tiny_testbed_config):
    prompts = tiny_testbed.load_prompts()
    assert set(prompts) == {"train", "eval"}
    train, ev = prompts["train"], prompts["eval"]
    assert len(train) == tiny_testbed_config.n_train_prompts and len(ev) == tiny_testbed_config.n_eval_prompts
    assert not set(train["prompt"]) & set(ev["prompt"])
    ids = list(train["prompt_id"]) + list(ev["prompt_id"])
    assert len(set(ids)) == len(ids)
    for row in list(train)[:50]:
        assert len(row["prompt"].split(" ")) == tiny_testbed_config.prompt_words
        assert row["reference"].startswith(" ")
    assert split_prompt("one two three", 3) is None
    assert split_prompt("one two three four", 2) == ("one two", " three four")


def test_preference_dataset(tiny_testbed, tiny_testbed_config):
    prefs = tiny_testbed.load_prefs()
    tok = tiny_testbed.load_tokenizer()
    cfg = tiny_testbed_config
    assert tuple(prefs.column_names) == PREF_COLUMNS
    n = len(prefs)
    assert 0 < n <= cfg.n_train_prompts
    flipped = list(prefs["label_flipped"])
    assert sum(flipped) == round(cfg.label_noise * n)
    train_prompts = dict(zip(tiny_testbed.load_prompts()["train"]["prompt_id"],
                             tiny_testbed.load_prompts()["train"]["prompt"]))
    gold = TestbedGold.from_config(cfg)
    for row in prefs:
        assert train_prompts[row["prompt_id"]] == row["prompt"]
        assert row["chosen_gold"] != row["rejected_gold"]  # ties are dropped
        assert (row["chosen_gold"] < row["rejected_gold"]) == row["label_flipped"]
        for side in ("chosen", "rejected"):
            ids, ended = row[f"{side}_ids"], row[f"{side}_ended"]
            assert (ids[-1] == tok.eos_token_id) == ended
            assert tok.pad_token_id not in ids
            assert len(ids) <= cfg.max_new_tokens
            assert tok.decode(ids[:-1] if ended else ids) == row[side]
    first = prefs[0]
    expected = gold.score([first["prompt"]] * 2, [first["chosen"], first["rejected"]],
                          [first["chosen_ended"], first["rejected_ended"]])
    assert expected.tolist() == pytest.approx([first["chosen_gold"], first["rejected_gold"]], abs=1e-6)
    stats = tiny_testbed.manifest()["preferences"]
    assert stats["n_pairs"] == n
    assert stats["n_pairs"] + stats["n_ties_dropped"] == cfg.n_train_prompts
    assert stats["clean_agreement"] == pytest.approx(1 - sum(flipped) / n)
    assert (tiny_testbed.prefs_dir / PREFS_STATS_FILE).is_file()


def test_manifest_has_quality_numbers_and_samples(tiny_testbed):
    m = tiny_testbed.manifest()
    assert set(m["sizes"]) >= {"corpus_reviews", "corpus_words", "vocab_size", "policy_parameters"}
    g = m["sft_gold_on_eval"]
    assert g["n"] == tiny_testbed.config().n_eval_prompts
    assert 0.0 <= g["eos_rate"] <= 1.0 and g["quantiles"]["q05"] <= g["quantiles"]["q95"]
    assert m["samples"] and {"prompt", "response", "ended", "gold"} <= set(m["samples"][0])
    assert m["hashes"]["corpus.txt"] and "manifest.json" not in m["hashes"]


def test_testbed_layout_round_trips(tiny_testbed):
    assert Testbed.at(tiny_testbed.root) == tiny_testbed
    assert len(tiny_testbed.load_corpus()) == tiny_testbed.config().n_reviews


def test_cli_reuses_and_summarizes(tiny_testbed, tiny_testbed_config):
    cfg = tiny_testbed_config
    overrides = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg) if f.name != "seed"]
    result = subprocess.run([sys.executable, "-m", "rlhf_overopt.testbed", "--seed", str(cfg.seed), "--quiet",
                             *overrides], check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert f"testbed: {tiny_testbed.root}" in result.stdout
    assert "SFT held-out loss" in result.stdout and "agreement with clean gold" in result.stdout


def test_cli_refuses_unknown_keys(capsys):
    from rlhf_overopt.testbed.__main__ import main

    assert main(["no_such_key=1"]) == 2
    assert "testbed.no_such_key: unknown key" in capsys.readouterr().err


def test_every_tiny_config_names_the_fixture_testbed(tiny_testbed_config):
    """CLI tests pass testbed.cache_dir=<fixture cache>: they must hit the same cache entry."""
    from rlhf_overopt.config.load import load_config

    for path in sorted((ROOT / "configs" / "tiny").glob("*.yaml")):
        cfg = load_config(path, [f"testbed.cache_dir={tiny_testbed_config.cache_dir}"], check_paths=False)
        assert config_hash(cfg.testbed) == config_hash(tiny_testbed_config), path.name
