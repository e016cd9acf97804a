"""Prompts from any dataset (rlhf_overopt.data.prompts): every format loads, templates follow AlpacaFarm,
chat templates apply, the held-out eval split is seeded, sharding partitions, the testbed path is
unchanged, and every bad input is one line naming the problem."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from rlhf_overopt.config.load import load_config
from rlhf_overopt.data.prompts import check_prompts, load_prompts
from rlhf_overopt.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[1]
TINY_PPO = ROOT / "configs" / "tiny" / "ppo_ensemble.yaml"
TINY_BON = ROOT / "configs" / "tiny" / "bon_ensemble.yaml"
ROWS = [{"prompt": f"prompt number {i}", "instruction": f"Do task {i}.", "input": "" if i % 3 else f"data {i}"}
        for i in range(24)]


def config(*overrides: str, base: Path = TINY_PPO):
    return load_config(base, ["eval.n_prompts=4", *overrides])


def replace_data(cfg, **changes):
    """A config the validation would refuse, to reach the run-time checks."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes))


def write(path: Path, rows: list[dict], kind: str | None = None) -> Path:
    from datasets import Dataset

    kind = kind or path.suffix.lstrip(".")
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif kind == "csv":
        Dataset.from_list(rows).to_csv(str(path), index=False)
    elif kind == "parquet":
        Dataset.from_list(rows).to_parquet(str(path))
    elif kind == "disk":
        Dataset.from_list(rows).save_to_disk(str(path))
    return path


def tiny_chat_tokenizer():
    """A word-level tokenizer built in memory, with a small chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    return tok


# ---- formats, splits, templates ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "disk"])
def test_every_format_loads(kind, tmp_path):
    path = write(tmp_path / (f"p.{kind}" if kind != "disk" else "saved"), ROWS, kind)
    cfg = config(f"data.prompts={path}", "data.eval_size=8")
    train, share = load_prompts(cfg, None, world=1, rank=0)
    assert len(train) == 16 and len(share) == 4
    held = check_prompts(cfg)[1]  # eval.n_prompts of the 8 held out
    assert len(held) == 4 and held[:4] == share
    assert set(train) | set(share) <= {r["prompt"] for r in ROWS} and not set(train) & set(share)


def test_dataset_dict_splits(tmp_path):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list(ROWS[:16]), "test": Dataset.from_list(ROWS[16:])}).save_to_disk(
        str(tmp_path / "dd"))
    cfg = config(f"data.prompts={tmp_path / 'dd'}", "data.eval_split=test")
    train, share = load_prompts(cfg, None, world=1, rank=0)
    assert train == [r["prompt"] for r in ROWS[:16]]
    assert share == [r["prompt"] for r in ROWS[16:20]]  # the first eval.n_prompts of the eval split
    with pytest.raises(InputError, match=r"data.eval_split: .* has no split 'validation' \(splits: test, train\)"):
        load_prompts(replace_data(cfg, eval_split="validation"), None, 1, 0)


def test_alpacafarm_template_drops_an_empty_input(tmp_path):
    path = write(tmp_path / "p.jsonl", ROWS)
    cfg = config(f"data.prompts={path}", "data.prompt_template={instruction}\n\n{input}", "data.prompt_column=",
                 "data.eval_size=8")
    train, evaluation = check_prompts(cfg)
    texts = {p: None for p in train + evaluation}
    assert "Do task 1." in texts  # empty input: the instruction alone
    assert "Do task 0.\n\ndata 0" in texts  # otherwise instruction, blank line, input


def test_chat_template_on_strings_and_message_lists(tmp_path):
    tok = tiny_chat_tokenizer()
    rows = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Q{i}"}]}
            for i in range(12)]
    path = write(tmp_path / "chat.jsonl", rows)
    cfg = config(f"data.prompts={path}", "data.prompt_column=messages", "data.chat_template=true", "data.eval_size=4")
    train, share = load_prompts(cfg, None, 1, 0, tokenizer=tok)
    assert len(train) == 8
    assert all(p.startswith("<system>Be brief.</system><user>Q") and p.endswith("</user><assistant>")
               for p in train + share)
    path = write(tmp_path / "plain.jsonl", ROWS)
    cfg = config(f"data.prompts={path}", "data.chat_template=true", "data.eval_size=8")
    train, _ = load_prompts(cfg, None, 1, 0, tokenizer=tok)
    assert all(p.startswith("<user>prompt number ") and p.endswith("</user><assistant>") for p in train)


def test_held_out_eval_is_seeded_and_disjoint(tmp_path):
    path = write(tmp_path / "p.jsonl", ROWS)
    cfg = config(f"data.prompts={path}", "data.eval_size=8", "eval.n_prompts=8")
    train, evaluation = check_prompts(cfg)
    assert check_prompts(cfg) == (train, evaluation)  # deterministic
    assert not set(train) & set(evaluation) and len(set(train) | set(evaluation)) == len(ROWS)
    other = check_prompts(dataclasses.replace(cfg, seed=cfg.seed + 1))
    assert other[1] != evaluation and not set(other[0]) & set(other[1])


def test_two_rank_shards_concatenate_to_one_rank(tmp_path):
    path = write(tmp_path / "p.jsonl", ROWS)
    cfg = config(f"data.prompts={path}", "data.eval_size=8", "eval.n_prompts=8")
    train, whole = load_prompts(cfg, None, 1, 0)
    halves = [load_prompts(cfg, None, 2, r) for r in (0, 1)]
    assert halves[0][1] + halves[1][1] == whole and len(whole) == 8
    assert halves[0][0] == halves[1][0] == train


def test_testbed_prompts_unchanged(tiny_testbed):
    cfg = config()
    prompts = tiny_testbed.load_prompts()
    expected = list(prompts["eval"]["prompt"])[:4]
    train, share = load_prompts(cfg, tiny_testbed, 1, 0)
    assert train == list(prompts["train"]["prompt"]) and share == expected
    assert load_prompts(cfg, tiny_testbed, 2, 1)[1] == expected[2:]
    assert check_prompts(cfg) is None  # the pre-flight has no testbed to read yet


# ---- bad input: one line each -------------------------------------------------------------------


def _bad(tmp_path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def _jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


GOOD = [{"prompt": f"p {i}", "instruction": f"i {i}"} for i in range(12)]
# (case, file name, bytes, extra overrides, text of the one-line InputError)
RUNTIME_CASES = [
    ("missing-column", "p.jsonl", _jsonl(GOOD), ["data.prompt_column=nope"],
     "no column 'nope' (data.prompt_column); columns: prompt, instruction"),
    ("template-missing-column", "p.jsonl", _jsonl(GOOD), ["data.prompt_template={instruction}\n\n{input}"],
     "data.prompt_template names column(s) input that it lacks (columns: prompt, instruction)"),
    ("empty-prompt", "p.jsonl", _jsonl([*GOOD[:5], {"prompt": "  ", "instruction": "x"}, *GOOD[5:]]), [],
     "split 'train' row 5: the prompt is empty"),
    ("message-list-without-chat", "p.jsonl",
     _jsonl([*GOOD[:2], {"prompt": [{"role": "user", "content": "hi"}], "instruction": "x"}]), [],
     "row 2: the prompt is a list, not a string (chat messages need data.chat_template=true)"),
    ("non-utf8", "p.jsonl", b'{"prompt": "caf\xe9"}\n', [], "line 1: not valid UTF-8 text"),
    ("malformed-json", "p.jsonl", b'{"prompt": "a" "b"}\n', [], "cannot be read as json"),
    ("empty-csv", "p.csv", b"prompt\n", [], "holds no rows"),
]


@pytest.mark.parametrize("case, name, content, overrides, expected", RUNTIME_CASES, ids=[c[0] for c in RUNTIME_CASES])
def test_bad_prompt_data(case, name, content, overrides, expected, tmp_path):
    path = _bad(tmp_path, name, content)
    cfg = config(f"data.prompts={path}", "data.eval_size=4", *overrides)
    with pytest.raises(InputError) as err:
        check_prompts(cfg)
    message = str(err.value)
    assert expected in message and "\n" not in message and message.startswith("data.prompts: ")


def test_bad_sources(tmp_path):
    cfg = config(f"data.prompts={write(tmp_path / 'p.jsonl', GOOD)}", "data.eval_size=4")
    folder = tmp_path / "not_a_dataset"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    text = _bad(tmp_path, "p.txt", b"hello\n")
    empty = tmp_path / "empty"
    from datasets import Dataset

    Dataset.from_dict({"prompt": []}).save_to_disk(str(empty))
    cases = [
        (replace_data(cfg, prompts=str(folder)), "is a folder but not a saved dataset"),
        (replace_data(cfg, prompts=str(text)), "unsupported file type '.txt'"),
        (replace_data(cfg, prompts=str(empty)), "empty: holds no rows"),
        (replace_data(cfg, eval_size=0), "gives no eval prompts; set data.eval_split"),
        (replace_data(cfg, eval_size=2), "2 eval prompts, fewer than eval.n_prompts (4)"),
        (replace_data(cfg, eval_size=40), "asks to hold out 40 prompts"),
        (replace_data(cfg, train_split="training"), "has no split 'training' (splits: train)"),
        (replace_data(cfg, chat_template=True), "no policy tokenizer was given"),
    ]
    for bad, expected in cases:
        with pytest.raises(InputError) as err:
            load_prompts(bad, None, 1, 0)
        assert expected in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(InputError, match="fewer than one batch"):
        load_prompts(cfg, None, 1, 0, min_train=100)


def test_chat_template_needs_one(tmp_path):
    tok = tiny_chat_tokenizer()
    tok.chat_template = None
    cfg = config(f"data.prompts={write(tmp_path / 'p.jsonl', GOOD)}", "data.eval_size=4", "data.chat_template=true")
    with pytest.raises(InputError, match=r"data.chat_template is true, but the policy tokenizer \(.*\) has no chat "
                                         r"template$"):
        load_prompts(cfg, None, 1, 0, tokenizer=tok)


def test_hub_without_network(monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = config("data.prompts=someorg/some-prompts", "data.eval_size=4")
    with pytest.raises(InputError) as err:
        check_prompts(cfg)
    assert str(err.value).startswith("data.prompts: could not load someorg/some-prompts from the hub (no network?): ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, expected", [
    (["data.eval_size=0"], "data.eval_size: data.prompts is a dataset"),
    (["data.eval_size=2"], "data.eval_size: holds out 2 prompts, fewer than eval.n_prompts (4)"),
    (["data.eval_size=4", "data.eval_split=test"], "data.eval_size: give data.eval_split ('test') or data.eval_size"),
    (["data.eval_split=train"], "data.eval_split: is the train split ('train')"),
])
def test_config_errors(overrides, expected, tmp_path):
    path = write(tmp_path / "p.jsonl", GOOD)
    with pytest.raises(ConfigError) as err:
        config(f"data.prompts={path}", *overrides)
    assert str(err.value).startswith(expected)


def test_config_errors_on_paths_and_testbed_keys(tmp_path):
    with pytest.raises(ConfigError, match="data.prompts: no such file or folder"):
        config(f"data.prompts={tmp_path / 'missing.jsonl'}", "data.eval_size=4")
    with pytest.raises(ConfigError, match=r"data.prompts: unsupported file type '.txt'"):
        config(f"data.prompts={_bad(tmp_path, 'p.txt', b'x')}", "data.eval_size=4")
    with pytest.raises(ConfigError, match="data.eval_size: applies to a dataset, and data.prompts is 'testbed'"):
        config("data.eval_size=4")


def test_testbed_prompt_files_through_the_general_path_equal_the_testbed_path(tiny_testbed):
    """data.prompts = the testbed's own prompts folder (a DatasetDict on disk) reads exactly the
    prompts the testbed path reads: the two worlds share one code path for prompts."""
    from rlhf_overopt.config.load import load_config
    from rlhf_overopt.data.prompts import load_prompts

    base = ["eval.n_prompts=16", f"testbed.cache_dir={tiny_testbed.root.parent}"]
    testbed_cfg = load_config(None, base, check_paths=False)
    general_cfg = load_config(None, [*base, f"data.prompts={tiny_testbed.prompts_dir}", "data.eval_split=eval"],
                              check_paths=False)
    for world, rank in ((1, 0), (2, 1)):
        assert load_prompts(general_cfg, None, world, rank) == load_prompts(testbed_cfg, tiny_testbed, world, rank)
