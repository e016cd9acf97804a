"""The worlds a run reads from: where the initial policy lives and which prompts it is trained
and evaluated on.

    policy_path(cfg, testbed)                         the testbed's SFT policy folder, or policy.path
    load_prompts(cfg, testbed, world, rank, ...)      train prompts, and this rank's share of the eval prompts
    check_prompts(cfg, testbed=None, tokenizer=None)  the same prompts loaded and checked, unsharded: the
                                                      entry point's pre-flight, before any model is loaded

`data.prompts` is the testbed, a local .jsonl/.json/.csv/.parquet file, a `datasets.save_to_disk`
folder (a Dataset, or a DatasetDict of splits), or a hub name (`datasets.load_dataset(name,
split=...)`; it needs a network and is never the default). A file or a saved Dataset is one split,
named "train". Each row becomes one prompt string: its `data.prompt_column`, or
`data.prompt_template` filled from its columns, then optionally the policy tokenizer's chat template.
Eval prompts come from `data.eval_split`, or are `data.eval_size` rows held out of the train split
by a choice seeded by cfg.seed (and removed from it). What the config alone says about its
prompts is checked earlier, by config.validate.validate_prompt_config. Every problem is one InputError line naming
the key, the source and, for a bad row, the split and row index.
"""

from __future__ import annotations

import json
import logging
import random
import string
from pathlib import Path
from typing import Any

from rlhf_overopt.config.validate import FILE_TYPES, is_local_source
from rlhf_overopt.errors import InputError
from rlhf_overopt.run import dist

log = logging.getLogger("rlhf_overopt")

"""Local file suffixes read as prompts, and the `datasets` builder that reads each."""


def policy_path(cfg, testbed) -> str:
    """The initial policy: the testbed's SFT policy, or a local folder / hub name."""
    if cfg.policy.path == "testbed":
        if testbed is None:
            raise InputError("policy.path is 'testbed' but no testbed was opened")
        return str(testbed.policy_dir)
    return cfg.policy.path


def load_prompts(cfg, testbed, world: int, rank: int, min_train: int = 1,
                 tokenizer=None) -> tuple[list[str], list[str]]:
    """(train prompts, this rank's contiguous share of the first eval.n_prompts eval prompts).

    With data.prompts == "testbed": the testbed's "train" and "eval" prompt splits, exactly as
    read before datasets were supported. Otherwise see the module docstring; `tokenizer` (the
    policy's) is needed for data.chat_template.
    """
    train, evaluation = check_prompts(cfg, testbed, tokenizer, required=True)
    if len(train) < min_train:
        raise InputError(f"the train prompt split has {len(train)} prompts, fewer than one batch ({min_train})")
    if len(evaluation) % world:
        raise InputError(f"{len(evaluation)} eval prompts cannot be split evenly over {world} ranks")
    return train, [evaluation[i] for i in dist.shard_indices(len(evaluation), rank, world)]


def check_prompts(cfg, testbed=None, tokenizer=None, *, required: bool = False):
    """Load and check every prompt, unsharded: (train prompts, the first eval.n_prompts eval prompts).

    launch/train.py calls this before any model is loaded or proxy trained, so that bad prompt
    data costs seconds, not a proxy training; load_prompts repeats it in the driver. With the
    testbed's prompts and no testbed opened yet it returns None (the testbed is built later and
    its prompts are known good), unless `required`. Without `tokenizer`, data.chat_template loads
    the policy tokenizer (cheap: no model weights) when policy.path names one.
    """
    d = cfg.data
    if d.prompts == "testbed":
        if testbed is None:
            if required:
                raise InputError("prompts come from the testbed, and no testbed was opened")
            return None
        prompts = testbed.load_prompts()
        train = list(prompts["train"]["prompt"])
        evaluation = list(prompts["eval"]["prompt"])
    else:
        if d.chat_template and tokenizer is None:
            tokenizer = _policy_tokenizer(cfg, testbed)
        train, evaluation = _dataset_prompts(cfg, tokenizer, required)
    if d.chat_template and d.prompts == "testbed":
        _require_chat_template(tokenizer)
        train = [_chat(tokenizer, p, "testbed train", i) for i, p in enumerate(train)]
        evaluation = [_chat(tokenizer, p, "testbed eval", i) for i, p in enumerate(evaluation)]
    if _evaluates(cfg) and len(evaluation) < cfg.eval.n_prompts:
        raise InputError(f"data.prompts: {d.prompts}: {len(evaluation)} eval prompts, fewer than "
                         f"eval.n_prompts ({cfg.eval.n_prompts})")
    return train, evaluation[: cfg.eval.n_prompts]


# ---------------------------------------------------------------------------------------------
# A dataset's prompts
# ---------------------------------------------------------------------------------------------


def _evaluates(cfg) -> bool:
    from rlhf_overopt.config.methods import METHODS

    method = METHODS.get(cfg.method)
    return method is None or method.evaluates


def _dataset_prompts(cfg, tokenizer, required: bool) -> tuple[list[str], list[str]]:
    """Train and (all) eval prompts of data.prompts, every row checked."""
    d = cfg.data
    if d.chat_template and (tokenizer is not None or required):
        _require_chat_template(tokenizer)
    splits = _open_splits(d.prompts, d.subset)
    train = _split_prompts(splits, d.train_split, "data.train_split", cfg, tokenizer)
    if d.eval_split:
        evaluation = _split_prompts(splits, d.eval_split, "data.eval_split", cfg, tokenizer)
    elif d.eval_size:
        if d.eval_size > len(train):
            raise InputError(f"data.eval_size: asks to hold out {d.eval_size} prompts of {d.prompts}'s "
                             f"{d.train_split!r} split, which holds {len(train)}")
        # a seeded choice of rows, kept in dataset order; the same seed always holds out the same rows
        held = set(random.Random(cfg.seed).sample(range(len(train)), d.eval_size))
        evaluation = [p for i, p in enumerate(train) if i in held]
        train = [p for i, p in enumerate(train) if i not in held]
    elif _evaluates(cfg):
        raise InputError(f"data.prompts: {d.prompts} gives no eval prompts; set data.eval_split to a split "
                         f"of it, or data.eval_size to hold out that many train prompts")
    else:
        evaluation = []
    overlap = len(set(evaluation) & set(train))
    if overlap:
        log.warning("data.prompts: %d of the %d eval prompts also occur among the train prompts (duplicate rows)",
                    overlap, len(evaluation))
    return train, evaluation


def _open_splits(name: str, subset: str = "") -> dict[str, Any]:
    """{split name: Dataset} for a local source; for a hub name, a _HubSplits that loads on demand."""
    if not is_local_source(name):
        return _HubSplits(name, subset)
    from datasets import Dataset, DatasetDict, load_from_disk

    p = Path(name).expanduser()
    if p.is_dir():
        if not ((p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists()):
            raise InputError(f"data.prompts: {p} is a folder but not a saved dataset (no dataset_info.json or "
                             "dataset_dict.json; write one with datasets' save_to_disk)")
        try:
            data = load_from_disk(str(p))
        except Exception as exc:  # noqa: BLE001 — datasets raises assorted errors (even IndexError for 0 shards)
            if _no_shards(p):
                raise InputError(f"data.prompts: {p}: holds no rows (a saved dataset of 0 shards)") from None
            raise InputError(f"data.prompts: {p} cannot be read as a saved dataset "
                             f"({type(exc).__name__}: {_first_line(exc)})") from None
        if isinstance(data, DatasetDict):
            return dict(data)
        assert isinstance(data, Dataset)
        return {"train": data}
    if not p.is_file():
        raise InputError(f"data.prompts: {p}: no such file or folder")
    return {"train": _read_file(p)}


def _no_shards(p: Path) -> bool:
    """A saved Dataset of no rows: datasets writes it with 0 shards, and cannot read it back."""
    try:
        return json.loads((p / "state.json").read_text(encoding="utf-8")).get("_data_files") == []
    except (OSError, ValueError):
        return False


def _read_file(p: Path):
    """One .jsonl/.json/.csv/.parquet file as a Dataset; a file that is not UTF-8 text, holds no
    rows or does not parse is one line naming the file (and the line, where known)."""
    from datasets import load_dataset

    kind = FILE_TYPES.get(p.suffix.lower())
    if kind is None:
        raise InputError(f"data.prompts: {p}: unsupported file type {p.suffix!r} (use {', '.join(FILE_TYPES)}, "
                         "or a save_to_disk folder)")
    if kind != "parquet" and _text_lines(p) <= (1 if kind == "csv" else 0):  # a CSV's first line is its header
        raise InputError(f"data.prompts: {p}: holds no rows")
    quiet = logging.getLogger("datasets")  # it logs its own copy of the parse error
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        return load_dataset(kind, data_files=str(p), split="train")
    except Exception as exc:  # noqa: BLE001 — datasets wraps parse errors in DatasetGenerationError
        raise InputError(f"data.prompts: {p}: cannot be read as {kind} ({_first_line(exc.__cause__ or exc)})") from None
    finally:
        quiet.setLevel(level)


def _text_lines(path: Path) -> int:
    """Non-blank lines of a text file; the first line that is not UTF-8 is an InputError."""
    count = 0
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                count += bool(line.decode("utf-8").strip())
            except UnicodeDecodeError as exc:
                raise InputError(f"data.prompts: {path} line {lineno}: not valid UTF-8 text "
                                 f"(byte {line[exc.start]:#04x} at column {exc.start + 1})") from None
    return count


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _HubSplits:
    """The splits of a hub dataset, each loaded with datasets.load_dataset(name, split=...) when asked
    for; no network (or offline mode) is one line saying so."""

    def __init__(self, name: str, subset: str = ""):
        self.name, self.subset = name, subset

    def get(self, split: str):
        from datasets import load_dataset

        try:
            return load_dataset(self.name, self.subset or None, split=split)
        except (ConnectionError, TimeoutError) as exc:  # datasets re-raises hub/offline errors as these
            raise InputError(f"data.prompts: could not load {self.name} from the hub (no network?): "
                             f"{_first_line(exc)}") from None
        except Exception as exc:  # noqa: BLE001 — unknown split, unknown dataset, ...: one line each
            if _is_offline(exc):
                raise InputError(f"data.prompts: could not load {self.name} from the hub (no network?): "
                                 f"{_first_line(exc)}") from None
            if "split" in str(exc).lower():
                raise InputError(f"data.prompts: {self.name} has no split {split!r} ({_first_line(exc)})") from None
            raise InputError(f"data.prompts: could not load {self.name} from the hub: "
                             f"{type(exc).__name__}: {_first_line(exc)}") from None


def _is_offline(exc: BaseException) -> bool:
    """A huggingface_hub / httpx / requests error that means the hub could not be reached."""
    names = {t.__name__ for e in (exc, exc.__cause__, exc.__context__) if e is not None for t in type(e).__mro__}
    return bool(names & {"OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout",
                         "ConnectionError", "Timeout", "ReadTimeout"})


def _split_prompts(splits, split: str, key: str, cfg, tokenizer) -> list[str]:
    """The prompts of one split, every row checked."""
    name = cfg.data.prompts
    if isinstance(splits, _HubSplits):
        data = splits.get(split)
    elif split not in splits:
        raise InputError(f"{key}: {name} has no split {split!r} (splits: {', '.join(sorted(splits))})")
    else:
        data = splits[split]
    source = f"data.prompts: {name} split {split!r}"
    if len(data) == 0:
        raise InputError(f"{source}: holds no rows")
    return rows_to_prompts(data, cfg.data, source, tokenizer)


def template_fields(template: str) -> list[str]:
    """The column names a format string fills in, in order."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def fill_template(template: str, row: dict[str, Any]) -> str:
    """`template` filled from `row`, AlpacaFarm's rule (Dubois et al. 2023): the template splits
    into paragraphs on blank lines, and a paragraph whose fields are all empty is left out — the
    prompt for an instruction with an empty input is the instruction alone. None counts as empty."""
    kept = []
    for paragraph in template.split("\n\n"):
        fields = template_fields(paragraph)
        if fields and all(row[f] is None or row[f] == "" for f in fields):
            continue
        kept.append(paragraph.format(**{f: "" if row[f] is None else row[f] for f in fields}))
    return "\n\n".join(kept)


def rows_to_prompts(data, d, source: str, tokenizer=None) -> list[str]:
    """One prompt string per row of `data` (a datasets.Dataset) under DataConfig `d`; the first
    bad row is an InputError '<source> row <i>: ...'."""
    columns = list(data.column_names)
    if d.prompt_template:
        fields = list(dict.fromkeys(template_fields(d.prompt_template)))
        missing = [f for f in fields if f not in columns]
        if missing:
            raise InputError(f"{source}: data.prompt_template names column(s) {', '.join(missing)} that it "
                             f"lacks (columns: {', '.join(columns)})")
        values = {f: list(data[f]) for f in fields}
        raw = []
        for i in range(len(data)):
            row = {f: values[f][i] for f in fields}
            for f, v in row.items():
                if isinstance(v, (list, dict)):
                    raise InputError(f"{source} row {i}: column {f!r} is a {type(v).__name__}; "
                                     "data.prompt_template fills in text")
            raw.append(fill_template(d.prompt_template, row))
    else:
        if d.prompt_column not in columns:
            raise InputError(f"{source}: no column {d.prompt_column!r} (data.prompt_column); "
                             f"columns: {', '.join(columns)}")
        raw = list(data[d.prompt_column])
    if d.prompt_words:
        # the opening words of a text as its prompt: IMDB sentiment continuation takes a review's first words
        raw = [" ".join(v.split(" ")[: d.prompt_words]) if isinstance(v, str) else v for v in raw]
    return [_chat(tokenizer, v, source, i) if d.chat_template else _text(v, source, i) for i, v in enumerate(raw)]


def _text(value: Any, source: str, i: int) -> str:
    if value is None:
        raise InputError(f"{source} row {i}: the prompt is missing")
    if not isinstance(value, str):
        hint = " (chat messages need data.chat_template=true)" if isinstance(value, list) else ""
        raise InputError(f"{source} row {i}: the prompt is a {type(value).__name__}, not a string{hint}")
    if not value.strip():
        raise InputError(f"{source} row {i}: the prompt is empty")
    return value


def _chat(tokenizer, value: Any, source: str, i: int) -> str:
    """A string (one user message) or a list of {"role", "content"} messages, through the policy
    tokenizer's chat template with the assistant turn opened (add_generation_prompt)."""
    if isinstance(value, str) or value is None:
        messages = [{"role": "user", "content": _text(value, source, i)}]
    elif isinstance(value, list):
        if not value:
            raise InputError(f"{source} row {i}: the prompt is an empty list of messages")
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise InputError(f"{source} row {i}: message {j} is not a {{'role': str, 'content': str}} "
                                 f"message, got {m!r:.80}")
        if not any(m["content"].strip() for m in value):
            raise InputError(f"{source} row {i}: the prompt is empty (every message's content is empty)")
        messages = [{"role": m["role"], "content": m["content"]} for m in value]
    else:
        raise InputError(f"{source} row {i}: the prompt is a {type(value).__name__}, neither a string nor "
                         "a list of chat messages")
    if tokenizer is None:  # the pre-flight without a policy tokenizer yet: the messages are checked
        return "\n\n".join(m["content"] for m in messages)
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 — a template error (jinja, a role it refuses) is the row's problem
        raise InputError(f"{source} row {i}: the chat template failed ({type(exc).__name__}: {_first_line(exc)})") from None
    return text


def _require_chat_template(tokenizer) -> None:
    if tokenizer is None:
        raise InputError("data.chat_template is true, but no policy tokenizer was given to apply it")
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise InputError(f"data.chat_template is true, but the policy tokenizer ({name}) has no chat template")


def _policy_tokenizer(cfg, testbed):
    """The policy tokenizer for the pre-flight's chat template, when it can be had without a testbed."""
    if cfg.policy.path == "testbed" and testbed is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(policy_path(cfg, testbed), trust_remote_code=cfg.policy.trust_remote_code)
    except Exception:  # noqa: BLE001 — a tokenizer that does not load is the driver's to report, precisely
        return None
