"""WARM proxies (proxy.kind=warm; Ramé et al. 2024, arXiv:2401.12187): the weight average by hand,
members from one initialization, the averaged ensemble's single member, its records, the k >= 2
rule, the cache key, the worker pool, and best-of-n through the real command line.

The tiny offline world (a BPE tokenizer, a random-init 2-layer GPT-2, learnable synthetic
preferences) is tests/test_proxy.py's.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_proxy import GOOD, PROMPTS, _cfg, _preferences, _response, _tiny_lm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhf_overopt.config.load import load_config
from rlhf_overopt.config.sections import ProxyConfig
from rlhf_overopt.errors import ConfigError
from rlhf_overopt.ops.warm import average_state_dicts, state_dict_hash
from rlhf_overopt.rewards.cache import proxy_cache_dir
from rlhf_overopt.rewards.ensemble import ENSEMBLE_FILE, ProxyEnsemble
from rlhf_overopt.rewards.members import WARM_MEMBERS_DIR, SeparateMembers
from rlhf_overopt.rewards.training import _member_model, reference_responses, train_ensemble
from rlhf_overopt.run.directory import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
K = 3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for these tiny models (see tests/test_proxy.py); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """dict with root, tokenizer, lm (path), train and val preference datasets."""
    root = tmp_path_factory.mktemp("warm_world")
    rng = random.Random(0)
    texts = [p + _response(rng, rng.choice(GOOD)) for p in PROMPTS for _ in range(60)]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainer=trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>",
                                        padding_side="left")
    return {"root": root, "tokenizer": tokenizer, "lm": _tiny_lm(tokenizer, root / "lm", seed=0),
            "train": _preferences(rng, 256), "val": _preferences(rng, 128)}


def _train(world, out_dir, **overrides) -> ProxyEnsemble:
    cfg = _cfg("warm", **{"k": K, "train_workers": 1, **overrides})
    return train_ensemble("warm", world["lm"], world["tokenizer"], world["train"], world["val"], out_dir, cfg,
                          seed=0, progress=False)


@pytest.fixture(scope="module")
def warm(world):
    """(ensemble as trained, its saved folder)."""
    out = world["root"] / "ens_warm"
    return _train(world, out), out


# ------------------------------------------------------------------------------------ the math


def test_average_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5), "pos": torch.tensor([0, 1])}
    b = {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor(1.5), "pos": torch.tensor([0, 1])}
    c = {"w": torch.tensor([2.0, 3.0]), "b": torch.tensor(-2.0), "pos": torch.tensor([0, 1])}
    avg = average_state_dicts([a, b, c])
    assert torch.equal(avg["w"], torch.tensor([2.0, 1.0]))
    assert torch.equal(avg["b"], torch.tensor(0.0))
    assert torch.equal(avg["pos"], torch.tensor([0, 1])) and avg["pos"].dtype == torch.int64
    assert list(avg) == ["w", "b", "pos"]
    half = average_state_dicts([{"h": torch.tensor([1.0], dtype=torch.bfloat16)},
                                {"h": torch.tensor([2.0], dtype=torch.bfloat16)}])
    assert half["h"].dtype == torch.bfloat16 and float(half["h"]) == 1.5
    assert torch.equal(average_state_dicts([a])["w"], a["w"])  # one member: itself
    with pytest.raises(ValueError, match="at least one"):
        average_state_dicts([])
    with pytest.raises(ValueError, match="other keys"):
        average_state_dicts([a, {"w": a["w"], "b": a["b"]}])
    with pytest.raises(ValueError, match="w: state dict 1"):
        average_state_dicts([a, {**b, "w": torch.zeros(3)}])
    with pytest.raises(ValueError, match="non-floating"):
        average_state_dicts([a, {**b, "pos": torch.tensor([1, 0])}])


def test_state_dict_hash_sees_every_bit():
    a = {"w": torch.tensor([1.0, 2.0]), "s": torch.tensor(3.0)}
    assert state_dict_hash(a) == state_dict_hash({"s": torch.tensor(3.0), "w": torch.tensor([1.0, 2.0])})
    assert state_dict_hash(a) != state_dict_hash({**a, "w": torch.tensor([1.0, 2.0000002])})
    assert state_dict_hash(a) != state_dict_hash({**a, "w": torch.tensor([1.0, 2.0], dtype=torch.float64)})


# ------------------------------------------------------------------------------------ training


def test_warm_is_one_member_that_scores(warm, world):
    ensemble, _ = warm
    assert ensemble.kind == "warm" and ensemble.k == 1 and ensemble.member_names == ["member_0"]
    val = world["val"].select(range(40))
    scores = ensemble.score_texts(list(val["prompt"]), list(val["chosen"]), list(val["chosen_ended"]))
    assert scores.shape == (1, 40) and torch.isfinite(scores).all()
    # standardized on the reference responses exactly as any other kind
    ref = reference_responses(world["val"])
    standardized = ensemble.score_texts(*ref)
    assert abs(float(standardized.mean())) < 1e-4 and abs(float(standardized.std(unbiased=False)) - 1) < 1e-4


def test_averaged_weights_are_the_mean_of_the_saved_members(warm):
    ensemble, out = warm
    names = [f"member_{i}" for i in range(K)]
    saved = SeparateMembers.load(out / WARM_MEMBERS_DIR, names, kind="independent", dtype=torch.float32,
                                 trust_remote_code=False)
    states = [m.state_dict() for m in saved.models]
    loaded = ProxyEnsemble.load(out)
    averaged = loaded.members.models[0].state_dict()
    assert averaged.keys() == states[0].keys()
    recomputed = average_state_dicts(states)
    for key, value in averaged.items():
        assert torch.equal(value, recomputed[key]), key
        if value.is_floating_point():  # against the naive elementwise mean, too
            torch.testing.assert_close(value, torch.stack([s[key] for s in states]).mean(dim=0))
    # the in-memory average is the saved one, and the members did move apart (own data order)
    for key, value in ensemble.members.models[0].state_dict().items():
        assert torch.equal(value, averaged[key]), key
    head = [s["score.weight"] for s in states]
    assert not torch.equal(head[0], head[1]) and not torch.equal(head[1], head[2])


def test_members_started_from_one_initialization(warm, world):
    ensemble, _ = warm
    record = ensemble.warm
    assert record["k_averaged"] == K and record["init_seed"] == 0 and record["data_seeds"] == [0, 1, 2]
    tokenizer, cfg = world["tokenizer"], _cfg("warm", k=K)
    # re-derive the shared init: the backbone + the head seeded with the ensemble seed (not seed + i)
    init = _member_model(str(world["lm"]), len(tokenizer), tokenizer.pad_token_id, 0, cfg)
    assert state_dict_hash(init.state_dict()) == record["init_hash"]
    other = _member_model(str(world["lm"]), len(tokenizer), tokenizer.pad_token_id, 1, cfg)
    assert state_dict_hash(other.state_dict()) != record["init_hash"]  # an independent member 1's init


def test_val_accuracies_are_recorded(warm):
    ensemble, out = warm
    record = ensemble.warm
    assert set(record["member_val_accuracy"]) == {f"member_{i}" for i in range(K)}
    assert all(a > 0.75 for a in record["member_val_accuracy"].values()), record
    assert record["averaged_val_accuracy"] == ensemble.val_accuracy["member_0"] > 0.75
    assert record["averaged_val_accuracy_clean"] == ensemble.val_accuracy_clean["member_0"]
    assert all(a is not None for a in record["member_val_accuracy_clean"].values())
    meta = json.loads((out / ENSEMBLE_FILE).read_text())
    assert meta["kind"] == "warm" and meta["k"] == 1 and meta["warm"] == record
    assert ProxyEnsemble.load(out).warm == record


def test_save_of_a_loaded_warm_ensemble_keeps_its_members(warm, world, tmp_path):
    _, out = warm
    loaded = ProxyEnsemble.load(out)
    again = loaded.save(tmp_path / "copy")
    for i in range(K):
        assert (again / WARM_MEMBERS_DIR / f"member_{i}" / "model.safetensors").is_file()
    val = world["val"].select(range(16))
    args = (list(val["prompt"]), list(val["chosen"]), list(val["chosen_ended"]))
    assert torch.equal(ProxyEnsemble.load(again).score_texts(*args), loaded.score_texts(*args))
    loaded.save(out)  # over itself: the members/ folder survives the atomic replace
    assert (out / WARM_MEMBERS_DIR / "member_0" / "model.safetensors").is_file()


def test_k_below_two_is_rejected(world):
    with pytest.raises(ConfigError, match=r"^proxy\.k: kind=warm .* at least 2, got 1"):
        ProxyConfig(kind="warm", k=1).check()
    with pytest.raises(ConfigError, match=r"^proxy\.k: kind=warm"):
        load_config(None, ["proxy.kind=warm", "proxy.k=1"], check_paths=False)
    load_config(None, ["proxy.kind=warm", "proxy.k=2"], check_paths=False)
    with pytest.raises(ValueError, match="proxy.k must be >= 2 for kind=warm"):
        train_ensemble("warm", world["lm"], world["tokenizer"], world["train"], world["val"], None,
                       _cfg("warm", k=1), progress=False)


def test_cache_key_differs_from_independent():
    testbed = SimpleNamespace(root=Path("/cache/testbed-abc"))
    dirs = {kind: proxy_cache_dir(load_config(None, [f"proxy.kind={kind}"], check_paths=False), testbed)
            for kind in ("independent", "warm")}
    assert dirs["independent"] != dirs["warm"] and dirs["warm"].parent == testbed.root.parent


@pytest.mark.slow
def test_warm_members_trained_in_processes_equal_members_trained_here(warm, world):
    """proxy.train_workers=2 (the spawned pool of independent members) gives the same average."""
    here, _ = warm
    spawned = _train(world, None, train_workers=2)
    assert spawned.warm["init_hash"] == here.warm["init_hash"]
    a, b = here.members.models[0].state_dict(), spawned.members.models[0].state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_bon_with_warm_proxies_on_the_tiny_testbed(tiny_testbed, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(ROOT / "configs/tiny/bon_ensemble.yaml"),
           f"output_dir={out}", f"testbed.cache_dir={tiny_testbed.root.parent}", "proxy.kind=warm", "proxy.k=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    preflight = subprocess.run(cmd + ["--check"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
                               check=False)
    assert preflight.returncode == 0, preflight.stderr[-4000:]
    assert "2 warm member(s)" in preflight.stdout
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = read_jsonl(out / "curves.jsonl")
    assert {r["aggregator"] for r in rows} == {"member_0", "mean", "wco", "uwo", "median", "mean_minus_std"}
    assert all(len(r["proxy_member_scores"]) == 1 for r in rows)
    at16 = {r["aggregator"]: r["gold_score"] for r in rows if r["n"] == 16}
    assert len(set(at16.values())) == 1  # one member: every aggregator selects the same samples
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    proxies = json.loads((out / "proxies.json").read_text())
    assert proxies["kind"] == "warm" and proxies["k"] == 1 and proxies["warm"]["k_averaged"] == 2
    assert (Path(proxies["path"]) / WARM_MEMBERS_DIR / "member_1" / "config.json").is_file()


def test_warm_member_names_beyond_member_0_are_rejected_before_work():
    from rlhf_overopt.config.load import load_config
    from rlhf_overopt.errors import ConfigError

    with pytest.raises(ConfigError, match=r"bon.aggregators\[0\].*member_2 is out of range for a warm ensemble"):
        load_config("configs/tiny/bon_ensemble.yaml", ["proxy.kind=warm", "bon.aggregators=[member_2]"])
    load_config("configs/tiny/bon_ensemble.yaml", ["proxy.kind=warm", "bon.aggregators=[member_0, uwo]"])
