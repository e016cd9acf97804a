"""Proxies from any preference dataset (proxy.dataset) with a backbone of their own (proxy.backbone).

Covers rlhf_overopt/data/preferences.py's reader (TRL's explicit and implicit-prompt formats, column
aliases, one-line errors) and rlhf_overopt/rewards/cache.py / rm_training.py training on it: a Llama
proxy backbone whose tokenizer is not the policy's and has no pad token, the cache key, proxy.dtype.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import pytest
import torch

from rlhf_overopt.data.preferences import (
    PreferenceDataError,
    ended_flags,
    implicit_prompt,
    load_preference_dataset,
    read_preference_source,
)

ROOT = Path(__file__).resolve().parents[1]
TRAIN_RM = ROOT / "configs" / "tiny" / "train_rm.yaml"

GOOD = ("great fun", "good story", "very good acting", "fun ending")  # no first word shared with BAD
BAD = ("boring", "awful plot", "not good at all", "bad score")
PROMPTS = ("Write a short review of the movie:", "Explain why the film was", "Summarize this text about the plot:")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread on a shared CPU; restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pairs(n: int = 60, seed: int = 0, gold: bool = True) -> list[dict]:
    """Explicit-format rows: a good response beats a bad one, except every 10th (a flipped label)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        good, bad = " " + rng.choice(GOOD), " " + rng.choice(BAD)
        flipped = i % 10 == 9
        row = {"prompt": rng.choice(PROMPTS), "chosen": bad if flipped else good, "rejected": good if flipped else bad}
        if gold:
            row.update(chosen_gold=0.0 if flipped else 1.0, rejected_gold=1.0 if flipped else 0.0,
                       label_flipped=flipped)
        rows.append(row)
    return rows


def implicit(rows: list[dict]) -> list[dict]:
    """The same pairs in TRL's implicit-prompt format: full texts, no prompt column."""
    return [{**{k: v for k, v in r.items() if k != "prompt"}, "chosen": r["prompt"] + r["chosen"],
             "rejected": r["prompt"] + r["rejected"]} for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# (a) formats and aliases
# ---------------------------------------------------------------------------------------------


def test_explicit_and_implicit_formats_load_the_same_pairs(tmp_path):
    rows = pairs(30)
    explicit = load_preference_dataset(write_jsonl(tmp_path / "explicit.jsonl", rows))
    inferred = load_preference_dataset(write_jsonl(tmp_path / "implicit.jsonl", implicit(rows)))
    for column in ("prompt", "chosen", "rejected", "gold_chosen", "gold_rejected", "flipped"):
        assert list(inferred[column]) == list(explicit[column]), column
    assert explicit["prompt"][0] == rows[0]["prompt"] and explicit["chosen"][0] == rows[0]["chosen"]
    # aliases: the testbed's names map to label_preferences' names; ended flags default to True
    assert "chosen_gold" not in explicit.column_names and explicit["gold_chosen"][9] == 0.0
    assert explicit["flipped"][9] is True and explicit["flipped"][0] is False
    assert ended_flags(explicit, "chosen_ended") == [True] * 30


def test_implicit_prompt_is_cut_at_a_word_boundary(tmp_path):
    # hand-checked: the shared prefix "The film was great" would cut "greatly" mid-word
    rows = [{"chosen": "The film was great", "rejected": "The film was greatly good"},
            {"chosen": "Q: the plot?\nA: fun", "rejected": "Q: the plot?\nA: boring"},
            {"chosen": "It was good.", "rejected": "It was good!"}]
    data = load_preference_dataset(write_jsonl(tmp_path / "implicit.jsonl", rows))
    assert list(data["prompt"]) == ["The film was", "Q: the plot?\nA:", "It was"]
    assert list(data["chosen"]) == [" great", " fun", " good."]
    assert list(data["rejected"]) == [" greatly good", " boring", " good!"]
    assert implicit_prompt("abc", "abd") == 0


def test_other_containers_and_names_read_alike(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = pairs(20)
    want = load_preference_dataset(write_jsonl(tmp_path / "p.jsonl", rows))
    table = Dataset.from_list(rows)
    table.to_parquet(str(tmp_path / "p.parquet"))
    table.to_csv(str(tmp_path / "p.csv"), index=False)
    DatasetDict({"train": Dataset.from_list(implicit(rows))}).save_to_disk(str(tmp_path / "saved"))
    for source in ("p.parquet", "p.csv", "saved"):
        got = load_preference_dataset(tmp_path / source)
        assert list(got["prompt"]) == list(want["prompt"]) and list(got["rejected"]) == list(want["rejected"])
    # label_preferences' own names pass through unchanged
    own = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"], "gold_chosen": 2.0,
            "gold_rejected": 1.0, "flipped": False, "chosen_ended": True, "rejected_ended": False} for r in rows]
    got = load_preference_dataset(write_jsonl(tmp_path / "own.jsonl", own))
    assert got["gold_rejected"][0] == 1.0 and ended_flags(got, "rejected_ended") == [False] * 20
    # identities: a file by its bytes, a saved folder by its datasets fingerprint
    _, ident = read_preference_source(tmp_path / "p.jsonl")
    assert ident == {"dataset": str((tmp_path / "p.jsonl").resolve()),
                     "fingerprint": hashlib.sha256((tmp_path / "p.jsonl").read_bytes()).hexdigest()}
    assert read_preference_source(tmp_path / "saved")[1]["fingerprint"]


def test_dpo_and_madpo_read_an_implicit_file(tmp_path):
    """dpo.dataset (loops/dpo.load_pairs) and MADPO's margins read the pairs through
    load_preference_dataset: an implicit-format file gives the pair text columns they use."""
    from rlhf_overopt.rewards.margins import PAIR_TEXT_COLUMNS

    rows = pairs(12, gold=False)
    data = load_preference_dataset(write_jsonl(tmp_path / "implicit.jsonl", implicit(rows)))
    columns = {c: list(data[c]) for c in data.column_names}
    columns["chosen_ended"] = ended_flags(data, "chosen_ended")
    columns["rejected_ended"] = ended_flags(data, "rejected_ended")
    assert all(c in columns for c in PAIR_TEXT_COLUMNS)
    assert columns["prompt"] == [r["prompt"] for r in rows] and columns["chosen"] == [r["chosen"] for r in rows]

    # MADPO's margins on those columns; a user dataset's `flipped` is reported like the testbed's
    from rlhf_overopt.config.load import load_config
    from rlhf_overopt.rewards.margins import margin_weights

    class Ensemble:
        k = 2

        def score_texts(self, prompts, responses, ended, standardized=None):
            good = torch.tensor([float(any(g in r for g in GOOD)) for r in responses])
            return torch.stack([good, 2 * good])

    columns["flipped"] = [i % 3 == 0 for i in range(12)]
    cfg = load_config(None, ["method=madpo", "proxy.k=2", "madpo.margin_aggregator=mean"], check_paths=False)
    weights, stats = margin_weights(cfg, Ensemble(), columns, rank=0, world=1)
    assert weights.shape == (12,) and "weight_mean_flipped_labels" in stats


# ---------------------------------------------------------------------------------------------
# (c) bad input: one line each
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, expected", [
    ([{"text": "a b", "label": 1}], ("missing column(s) prompt, chosen, rejected; a preference dataset needs "
                                     "prompt, chosen, rejected (explicit prompt) or chosen, rejected (implicit prompt")),
    ([{"prompt": "a", "chosen": " b"}], "missing column(s) rejected"),
    ([{"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "a", "chosen": 3, "rejected": " c"}],
     "row 1: field 'chosen' must be a string"),
    ([{"chosen": "x y", "rejected": "x z"}, {"chosen": "good", "rejected": "bad"}],
     "row 1: implicit-prompt pair whose chosen and rejected texts share no prompt"),
    ([{"chosen": "x y", "rejected": "x  "}], "row 0: field 'rejected' is empty"),
    ([{"prompt": "a", "chosen": " b", "rejected": " c", "chosen_gold": "high", "rejected_gold": 0.0}],
     "row 0: field 'gold_chosen' must be a finite number"),
])
def test_bad_datasets_are_one_line(rows, expected, tmp_path):
    with pytest.raises(PreferenceDataError) as err:
        load_preference_dataset(write_jsonl(tmp_path / "bad.jsonl", rows))
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_empty_dataset_missing_split_and_hub_without_network(tmp_path, monkeypatch):
    from datasets import Dataset, DatasetDict

    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(PreferenceDataError, match="holds no rows"):
        load_preference_dataset(tmp_path / "empty.jsonl")
    Dataset.from_dict({"chosen": [], "rejected": []}).save_to_disk(str(tmp_path / "empty_ds"))
    with pytest.raises(PreferenceDataError, match="holds no rows"):
        load_preference_dataset(tmp_path / "empty_ds")
    DatasetDict({"test": Dataset.from_list(pairs(3))}).save_to_disk(str(tmp_path / "only_test"))
    with pytest.raises(PreferenceDataError, match=r"has splits \['test'\], no 'train' split"):
        load_preference_dataset(tmp_path / "only_test")

    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someorg/prefs' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PreferenceDataError) as err:
        load_preference_dataset("someorg/prefs")
    assert "hub dataset cannot be loaded" in str(err.value) and "needs a network" in str(err.value)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------
# (b) the cache key
# ---------------------------------------------------------------------------------------------


class FakeTestbed:
    root = Path("/cache/testbed-0123")


def _config(*overrides: str):
    from rlhf_overopt.config.load import load_config

    return load_config(TRAIN_RM, list(overrides), check_paths=False)


def test_testbed_cache_key_is_unchanged():
    """The key for proxy.dataset=testbed is the formula of the code before proxy.dataset was read
    (rebuilt here from the config, nothing hard-coded), whatever proxy.dtype."""
    from rlhf_overopt.config.experiment import to_dict
    from rlhf_overopt.rewards.cache import PROXY_CACHE_VERSION, proxy_cache_dir

    for cfg in (_config(), _config("proxy.train_pairs=40", "proxy.k=3")):
        settings = to_dict(cfg.proxy)
        for key in ("path", "score_batch_size", "on_failed_member", "train_workers", "dataset", "dtype"):
            settings.pop(key)  # dataset and dtype did not exist when the caches before them were written
        if settings["train_pairs"] == 0:
            settings.pop("train_pairs")
        key = json.dumps({"proxy": settings, "policy": cfg.policy.path, "testbed": FakeTestbed.root.name,
                          "seed": cfg.seed, "version": PROXY_CACHE_VERSION}, sort_keys=True)
        expected = Path("/cache") / f"proxies-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
        assert proxy_cache_dir(cfg, FakeTestbed) == expected
    # members train in float32 whatever proxy.dtype: one cache for every dtype
    assert proxy_cache_dir(_config("proxy.dtype=bfloat16"), FakeTestbed) == proxy_cache_dir(_config(), FakeTestbed)


def test_dataset_cache_key_follows_the_file(tmp_path):
    from rlhf_overopt.rewards.cache import proxy_cache_dir

    data = write_jsonl(tmp_path / "prefs.jsonl", pairs(30))
    cfg = _config(f"proxy.dataset={data}", f"testbed.cache_dir={tmp_path / 'cache'}")
    first = proxy_cache_dir(cfg, FakeTestbed)
    assert first != proxy_cache_dir(_config(), FakeTestbed)
    assert proxy_cache_dir(cfg, None).parent == tmp_path / "cache"  # no testbed: the cache root
    assert proxy_cache_dir(cfg, FakeTestbed) == first  # stable
    write_jsonl(data, pairs(30, seed=1))
    assert proxy_cache_dir(cfg, FakeTestbed) != first  # edited file, new key


# ---------------------------------------------------------------------------------------------
# (b) training on a dataset with the backbone's own tokenizer
# ---------------------------------------------------------------------------------------------


def _foreign_cfg(foreign_world, data: Path, cache: Path, *overrides: str):
    return _config(f"proxy.dataset={data}", f"proxy.backbone={foreign_world['proxy_backbone']}",
                   f"testbed.cache_dir={cache}", "proxy.k=2", "proxy.epochs=1", "proxy.batch_size=16",
                   "proxy.train_workers=1", "proxy.lr=0.003", *overrides)


def test_proxies_train_on_a_dataset_with_their_own_tokenizer(foreign_world, tmp_path):
    from transformers import AutoTokenizer

    from rlhf_overopt.rewards.cache import ensure_proxies, proxy_cache_dir
    from rlhf_overopt.rewards.ensemble import ProxyEnsemble
    from rlhf_overopt.run.directory import RunDir
    from rlhf_overopt.run.dist import DistInfo

    assert AutoTokenizer.from_pretrained(foreign_world["proxy_backbone"]).pad_token is None
    data = write_jsonl(tmp_path / "prefs.jsonl", pairs(60))
    cfg = _foreign_cfg(foreign_world, data, tmp_path / "cache")
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    ensemble = ensure_proxies(cfg, None, info, run)

    out = proxy_cache_dir(cfg, None)
    saved = ProxyEnsemble.load(out)
    tok = saved.tokenizer
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id != tok.eos_token_id
    for model in saved.members.models:
        assert model.get_input_embeddings().num_embeddings == len(tok)
    texts = ensemble.score_texts(["Write a short review of the movie:"] * 3, [" great fun", " boring", " ok"],
                                 [True, True, False])
    assert texts.shape == (2, 3) and torch.isfinite(texts).all()
    report = json.loads((run.root / "proxies.json").read_text())
    assert report["dataset"] == str(data) and report["k"] == 2
    assert all(isinstance(v, float) for v in report["val_accuracy_clean"].values())

    # proxy.dtype: the same cache, members loaded in bfloat16, scores finite float32
    half = ensure_proxies(_foreign_cfg(foreign_world, data, tmp_path / "cache", "proxy.dtype=bfloat16"), None,
                          info, run)
    assert next(half.members.models[0].parameters()).dtype == torch.bfloat16
    scores = half.score_texts(["Explain why the film was"], [" a good story"], [True])
    assert scores.dtype == torch.float32 and torch.isfinite(scores).all()


def test_clean_accuracy_is_none_without_gold(foreign_world, tmp_path):
    from datasets import Dataset

    from rlhf_overopt.config.sections import ProxyConfig
    from rlhf_overopt.rewards.cache import split_prefs
    from rlhf_overopt.rewards.training import proxy_tokenizer, train_ensemble

    train, val = split_prefs(Dataset.from_list(pairs(40, gold=False)), 0)
    tok = proxy_tokenizer(foreign_world["proxy_backbone"])
    ensemble = train_ensemble("multihead", foreign_world["proxy_backbone"], tok, train, val, None,
                              ProxyConfig(k=2, epochs=1, batch_size=16), progress=False)
    assert ensemble.val_accuracy_clean == {"member_0": None, "member_1": None}
    assert ensemble.members.model.backbone.get_input_embeddings().num_embeddings == len(tok)


def test_bad_proxy_inputs_stop_before_training(foreign_world, tmp_path):
    """Each is one line: a dataset in neither format (through ensure_proxies' reader), a bad
    row, and a token cap too short for the responses."""
    from datasets import Dataset

    from rlhf_overopt.config.sections import ProxyConfig
    from rlhf_overopt.errors import InputError
    from rlhf_overopt.rewards.cache import proxy_dataset, split_prefs
    from rlhf_overopt.rewards.training import proxy_tokenizer, train_ensemble

    cases = [([{"text": "a", "score": 1}], "proxy.dataset: ", "(has text, score)"),
             (pairs(3)[:2] + [{"prompt": "a", "chosen": "", "rejected": " b"}], "row 2", "field 'chosen' is empty")]
    for rows, first, second in cases:
        cfg = _foreign_cfg(foreign_world, write_jsonl(tmp_path / "bad.jsonl", rows), tmp_path / "cache")
        with pytest.raises(InputError) as err:
            proxy_dataset(cfg)
        assert first in str(err.value) and second in str(err.value) and "\n" not in str(err.value)

    train, val = split_prefs(Dataset.from_list(pairs(30)), 0)
    tok = proxy_tokenizer(foreign_world["proxy_backbone"])
    for max_length, expected in ((3, "proxy.max_length: proxies read at most 3 tokens"),
                                 (10_000, "proxy.max_length=10000 exceeds the 256 positions")):
        with pytest.raises(InputError) as err:
            train_ensemble("independent", foreign_world["proxy_backbone"], tok, train, val, None,
                           ProxyConfig(k=1, epochs=1, max_length=max_length), progress=False)
        assert expected in str(err.value) and "\n" not in str(err.value)


def test_policy_backbone_of_a_foreign_policy_uses_its_checkpoint_and_tokenizer(foreign_world, tmp_path):
    """proxy.backbone=policy with a policy that is not the testbed's: the policy's own checkpoint
    and tokenizer (GPT-NeoX without a pad: one is added), no testbed needed."""
    from rlhf_overopt.rewards.cache import _proxy_backbone, _proxy_tokenizer

    data = write_jsonl(tmp_path / "prefs.jsonl", pairs(30))
    cfg = _config(f"policy.path={foreign_world['policy']}", f"proxy.dataset={data}", "gold.path=testbed")
    backbone = _proxy_backbone(cfg, None)
    assert backbone == str(foreign_world["policy"])
    tok = _proxy_tokenizer(cfg, None, backbone)
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>" and tok.padding_side == "left"


def test_an_eos_only_response_is_a_valid_row():
    """label_preferences can sample a response that is only EOS (empty text, ended): a real sample;
    an empty response that did not end, or an empty prompt, is still refused."""
    import datasets

    from rlhf_overopt.data.preferences import PreferenceDataError, validate_preference_rows

    def rows(chosen_ended: bool, prompt: str = "The film"):
        return datasets.Dataset.from_dict({"prompt": [prompt], "chosen": [""], "rejected": [" was fine."],
                                           "chosen_ended": [chosen_ended], "rejected_ended": [True]})

    validate_preference_rows(rows(True))
    with pytest.raises(PreferenceDataError, match="row 0: field 'chosen' is empty"):
        validate_preference_rows(rows(False))
    with pytest.raises(PreferenceDataError, match="field 'prompt' is empty"):
        validate_preference_rows(rows(True, prompt=" "))
