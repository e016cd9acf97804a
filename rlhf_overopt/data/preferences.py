"""Preference pairs for direct alignment and proxy training: reading, normalizing, validating,
quality tiers, tokenizing, batching.

This module owns what a preference dataset is, for every consumer (dpo.dataset, MADPO margins,
proxy.dataset): `load_preference_dataset` reads a file, a saved folder or a hub dataset in
either of TRL's formats ("Dataset formats": explicit prompt, string columns prompt / chosen /
rejected; or implicit prompt, chosen / rejected full texts whose shared prompt is their longest
common prefix cut back to a word boundary) and returns the explicit one. Optional columns:
boolean chosen_ended / rejected_ended say whether a response ended with EOS (default True: a
finished text, as TRL assumes); gold_chosen / gold_rejected (the testbed's chosen_gold /
rejected_gold) are gold scores, giving clean-label accuracy; flipped (label_flipped) marks a
label flipped by noise. These names are the schema, declared once below (PREFERENCE_COLUMNS). Rows are checked one by one and a bad row is reported by its index and
field.

Testbed quality tiers (the MADPO experiment, Rho 2025): the high tier is the testbed's pairs as
sampled, both responses from the SFT policy. The medium and low tiers replace one response (a fair
coin picks which) in a growing share of pairs by a *corpus response*: the human-written
continuation of the pair's prompt — the rest of the generated review the prompt was cut from (the
testbed keeps it as the prompt's `reference`). It is off-policy text in the style of the corpus the
SFT policy learned from. It is cut to the policy's response budget (`max_new_tokens` tokens, EOS
counted, exactly as a sampled response is cut), scored by gold, and the pair is relabelled with
the testbed's rule (higher gold wins, then a seeded `label_noise` fraction of the relabelled pairs
is flipped). Every draw comes from one seeded generator.

Tokenization follows TRL's DPOTrainer so the two agree token for token: prompt and prompt +
response are tokenized separately and the response starts where they diverge; EOS is appended
(as a token id) to responses that ended. Pairs are batched as one block of 2b rows, chosen rows
first: left-padded queries (B, Tq) and right-padded responses (B, Tr), as `sequence_logprobs`
expects.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# The preference schema, declared once: every writer (label_preferences, the testbed) names its
# columns from here, and every reader finds them through `column_of`.
REQUIRED_COLUMNS: tuple[str, ...] = ("prompt", "chosen", "rejected")
ENDED_COLUMNS: tuple[str, ...] = ("chosen_ended", "rejected_ended")
"""Whether each response ended with EOS (optional; default True, a finished text)."""
GOLD_COLUMNS: tuple[str, ...] = ("gold_chosen", "gold_rejected")
"""Gold score of each response (optional): clean labels, for accuracy against them."""
FLIPPED_COLUMN = "flipped"
"""Whether label noise flipped the pair (optional)."""
PREFERENCE_COLUMNS: tuple[str, ...] = (*REQUIRED_COLUMNS, *ENDED_COLUMNS, *GOLD_COLUMNS, FLIPPED_COLUMN)
"""Every column of the schema, in order, under its one name (what normalize_preferences returns)."""
TESTBED_NAMES: dict[str, str] = {"gold_chosen": "chosen_gold", "gold_rejected": "rejected_gold",
                                 "flipped": "label_flipped"}
"""The testbed's spelling of three schema columns, kept on purpose: testbed preference datasets are
cached on disk in folders keyed by the testbed's config and TESTBED_VERSION, so renaming them would
break every existing cache (or, with a new version, rebuild every testbed and its proxies). Readers accept it in one place, `column_of`."""
ALIASES: dict[str, str] = {spelled: name for name, spelled in TESTBED_NAMES.items()}
"""The testbed's names -> the schema's, renamed by normalize_preferences."""


def column_of(names: Sequence[str], column: str) -> str | None:
    """The name under which a dataset with columns `names` holds schema `column`: the schema's own
    name, else the testbed's spelling (TESTBED_NAMES); None when it has neither."""
    if column in names:
        return column
    spelled = TESTBED_NAMES.get(column)
    return spelled if spelled is not None and spelled in names else None


def testbed_column(column: str) -> str:
    """The name the testbed writes schema `column` under (TESTBED_NAMES, else the schema's name)."""
    return TESTBED_NAMES.get(column, column)
FORMATS = "prompt, chosen, rejected (explicit prompt) or chosen, rejected (implicit prompt; TRL's formats)"
FILE_KINDS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class PreferenceDataError(ValueError):
    """A preference dataset that cannot be used; the message names the row and field."""


# ---------------------------------------------------------------------------------------------
# Reading and validating a user dataset
# ---------------------------------------------------------------------------------------------


def load_preference_dataset(source: str | Path, split: str = "train"):
    """Read a preference dataset (a path or a hub name), normalize it and validate every row.

    `source` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (the
    `split` is taken from a DatasetDict), a .json/.jsonl/.csv/.parquet file, or a hub name
    (`datasets.load_dataset`; needs a network). Either of TRL's formats is read ("explicit vs
    implicit prompt", `normalize_preferences`). Returns a `datasets.Dataset` with string columns
    prompt, chosen, rejected and any other columns under their canonical names. Raises
    PreferenceDataError naming the first bad row.
    """
    data, _ = read_preference_source(source, split)
    return normalize_preferences(data, source=str(source))


def is_hub_name(source: str) -> bool:
    """'org/name' or 'name' that is no local path: a hub dataset (config._is_model_ref's rule)."""
    return (not Path(source).expanduser().exists() and not source.startswith((".", "/", "~"))
            and source.count("/") <= 1 and Path(source).suffix not in FILE_KINDS)


def read_preference_source(source: str | Path, split: str = "train") -> tuple[Any, dict[str, str]]:
    """The raw dataset behind `source` (as read: not yet normalized or validated) and its identity.

    The identity, {"dataset": resolved path or hub name, "fingerprint": ...}, changes whenever the
    data may: the sha256 of a file's bytes, or the `datasets` fingerprint of a saved folder's or a
    hub dataset's split (stored with the data, stable across loads). Cache keys use it.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    text = str(source)
    p = Path(text).expanduser()
    if p.is_dir():
        try:
            data = load_from_disk(str(p))
        except Exception as exc:  # noqa: BLE001 -- datasets raises assorted errors (even IndexError for 0 shards)
            if _saved_without_rows(p):
                raise PreferenceDataError(f"{p}: holds no rows") from None
            raise PreferenceDataError(f"{p}: cannot be read as a saved dataset ({type(exc).__name__}: {exc})") from None
        if isinstance(data, DatasetDict):
            if split not in data:
                raise PreferenceDataError(f"{p}: has splits {sorted(data)}, no {split!r} split")
            data = data[split]
        return data, {"dataset": str(p.resolve()), "fingerprint": data._fingerprint}
    if p.is_file():
        if p.suffix not in FILE_KINDS:
            raise PreferenceDataError(f"{p}: unsupported file type {p.suffix!r} (use {', '.join(FILE_KINDS)})")
        kind = FILE_KINDS[p.suffix]
        if kind != "parquet":
            lines = _text_lines(p)
            if lines <= (1 if kind == "csv" else 0):  # a CSV's first line is its header
                raise PreferenceDataError(f"{p}: holds no rows")
        quiet = logging.getLogger("datasets")  # it logs its own copy of the parse error
        level, quiet.level = quiet.level, logging.CRITICAL
        try:
            data = load_dataset(kind, data_files=str(p), split="train")
        except Exception as exc:  # noqa: BLE001 -- datasets wraps parse errors in DatasetGenerationError
            raise PreferenceDataError(f"{p}: cannot be read as {kind} ({_first_line(exc)})") from None
        finally:
            quiet.setLevel(level)
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        return data, {"dataset": str(p.resolve()), "fingerprint": digest}
    if not is_hub_name(text):
        raise PreferenceDataError(f"{p}: no such file or folder")
    try:
        loaded = load_dataset(text)
    except Exception as exc:  # noqa: BLE001 -- no network: ConnectionError, OfflineModeIsEnabled, a hub error
        raise PreferenceDataError(f"{text}: no such local path, and the hub dataset cannot be loaded "
                                  f"({_first_line(exc)}); a hub name needs a network") from None
    if split not in loaded:
        raise PreferenceDataError(f"{text}: has splits {sorted(loaded)}, no {split!r} split")
    data = loaded[split]
    return data, {"dataset": text, "fingerprint": data._fingerprint}


def _saved_without_rows(folder: Path) -> bool:
    """A save_to_disk folder of an empty dataset: its state lists no data files (datasets then
    fails to read it back)."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return state.get("_data_files") == []


def _first_line(exc: BaseException) -> str:
    """One line of an exception (or of its cause, which datasets wraps)."""
    cause = exc.__cause__ or exc
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def implicit_prompt(chosen: str, rejected: str) -> int:
    """Where the shared prompt of two full texts ends: their longest common prefix, cut back so that
    both responses start at a whitespace character (a response never starts mid-word).

    As TRL's `extract_prompt`, the space before the first differing word goes to the responses
    (prompt "The film was", responses " great." / " bad."). Returns the prompt's length; 0 when
    the texts share no prefix ending at a word boundary.
    """
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    # j <= n with chosen[j] and rejected[j] whitespace: both are then equal for j < n
    for j in range(n, 0, -1):
        if j < len(chosen) and j < len(rejected) and chosen[j].isspace() and rejected[j].isspace():
            return j
    return 0


def normalize_preferences(data, source: str = "dataset"):
    """One dataset in either of TRL's preference formats -> the explicit one, validated.

    TRL ("Dataset formats", explicit vs implicit prompt): explicit rows carry prompt, chosen and
    rejected; implicit rows carry only chosen and rejected full texts, whose shared prompt is
    recovered here (`implicit_prompt`). The testbed's spellings (TESTBED_NAMES: chosen_gold /
    rejected_gold / label_flipped) are renamed to the schema's (gold_chosen / gold_rejected / flipped). Every row is then checked (`validate_preference_rows`).
    """
    for alias, name in ALIASES.items():
        if alias in data.column_names and name not in data.column_names:
            data = data.rename_column(alias, name)
    if "prompt" not in data.column_names and {"chosen", "rejected"} <= set(data.column_names):
        validate_preference_rows(data, source=source, columns=("chosen", "rejected"))
        chosen, rejected = list(data["chosen"]), list(data["rejected"])
        cuts = []
        for i, (c, r) in enumerate(zip(chosen, rejected)):
            cut = implicit_prompt(c, r)
            if cut == 0 or not c[:cut].strip():
                raise PreferenceDataError(
                    f"{source} row {i}: implicit-prompt pair whose chosen and rejected texts share no prompt "
                    "(no common prefix ending at a word boundary); give a prompt column")
            cuts.append(cut)
        rest = data.remove_columns(["chosen", "rejected"])
        columns = {"prompt": [c[:k] for c, k in zip(chosen, cuts)], "chosen": [c[k:] for c, k in zip(chosen, cuts)],
                   "rejected": [r[k:] for r, k in zip(rejected, cuts)]}
        from datasets import Dataset

        data = Dataset.from_dict({**columns, **rest.to_dict()})
    validate_preference_rows(data, source=source)
    return data


def _text_lines(path: Path) -> int:
    """Non-blank lines of a text file; raises PreferenceDataError naming the first line that is
    not valid UTF-8."""
    count = 0
    with path.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                count += bool(line.decode("utf-8").strip())
            except UnicodeDecodeError as exc:
                raise PreferenceDataError(
                    f"{path} line {lineno}: not valid UTF-8 text (byte {line[exc.start]:#04x} at column {exc.start + 1})"
                ) from None
    return count


def validate_preference_rows(data, source: str = "dataset",
                             columns: Sequence[str] = REQUIRED_COLUMNS) -> None:
    """Check columns and every row: `columns` (prompt/chosen/rejected) non-empty strings, ended
    flags booleans, gold scores finite numbers.

    Raises PreferenceDataError('<source> row <i>: ...') at the first problem.
    """
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise PreferenceDataError(
            f"{source}: missing column(s) {', '.join(missing)}; a preference dataset needs "
            f"{FORMATS} (has {', '.join(data.column_names) or 'no columns'})"
        )
    if len(data) == 0:
        raise PreferenceDataError(f"{source}: holds no rows")
    values = {c: data[c] for c in (*columns, *ENDED_COLUMNS, *GOLD_COLUMNS) if c in data.column_names}
    for i in range(len(data)):
        for name in columns:
            value = values[name][i]
            if value is None:
                raise PreferenceDataError(f"{source} row {i}: field {name!r} is missing")
            if not isinstance(value, str):
                raise PreferenceDataError(
                    f"{source} row {i}: field {name!r} must be a string, got {type(value).__name__} "
                    "(conversational message lists are not supported)"
                )
            # a response that is only EOS is a real sample (the policy ended at once): empty text
            # is fine where its ended flag says so; an empty prompt, or an empty unended response, is not
            ended = values.get(f"{name}_ended")
            if not value.strip() and not (name != "prompt" and ended is not None and ended[i] is True):
                raise PreferenceDataError(f"{source} row {i}: field {name!r} is empty")
        for name in ENDED_COLUMNS:
            if name in values and not isinstance(values[name][i], bool):
                raise PreferenceDataError(
                    f"{source} row {i}: field {name!r} must be true or false, got {values[name][i]!r}"
                )
        for name in GOLD_COLUMNS:
            v = values[name][i] if name in values else 0.0
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise PreferenceDataError(f"{source} row {i}: field {name!r} must be a finite number, got {v!r}")


def ended_flags(data, column: str) -> list[bool]:
    """The column's flags, or all True when the dataset has no such column."""
    if column in data.column_names:
        return [bool(v) for v in data[column]]
    return [True] * len(data)


# ---------------------------------------------------------------------------------------------
# Quality tiers of the testbed preferences
# ---------------------------------------------------------------------------------------------


def fit_response_budget(text: str, tokenizer, max_new_tokens: int) -> tuple[str, bool]:
    """Cut a response as sampling cuts one: EOS is a token of the `max_new_tokens` budget.

    Returns (text, ended): the whole text and ended=True when its tokens plus EOS fit the budget,
    else its first `max_new_tokens` tokens decoded and ended=False.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) + 1 <= max_new_tokens:
        return text, True
    return tokenizer.decode(ids[:max_new_tokens], skip_special_tokens=False), False


@dataclass
class TierStats:
    """What a quality tier changed."""

    n_pairs: int
    n_replaced: int
    n_replaced_chosen_side: int
    """Replaced pairs whose replaced response was the chosen one."""
    n_corpus_response_chosen: int
    """Replaced pairs whose corpus response is chosen after relabelling (with noise)."""
    n_corpus_response_ended: int
    n_flipped: int
    """Relabelled pairs whose label was flipped."""

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def corpus_tier(
    prefs: dict[str, list[Any]],
    continuations: Sequence[str],
    *,
    share: float,
    seed: int,
    fit_budget: Callable[[str], tuple[str, bool]],
    gold_fn: Callable[[list[str], list[str], list[bool]], torch.Tensor],
    label_noise: float,
) -> tuple[dict[str, list[Any]], TierStats]:
    """Replace one response in round(share * N) pairs by a corpus continuation and relabel them.

    prefs: columns of the testbed preferences (prompt, chosen, rejected, chosen_ended,
    rejected_ended, chosen_gold, rejected_gold, label_flipped, ...); continuations[i]: the
    human-written continuation of pair i's prompt (the rest of the review it was cut from).
    Per replaced pair a coin picks the side to replace; the new response is the continuation cut by
    `fit_budget(text) -> (text, ended)` and scored by `gold_fn(prompts, responses, ended)`. The
    replaced pairs are relabelled by the testbed's rule: the higher gold wins (an exact tie, which
    the testbed drops, is broken by a coin here so every tier keeps N pairs), then exactly
    round(label_noise * n_replaced) seeded pairs are flipped. Token-id columns no longer match
    replaced texts and are dropped; untouched pairs keep everything. Returns (new columns, stats);
    the input is not modified. Deterministic in `seed`.
    """
    n = len(prefs["prompt"])
    if len(continuations) != n:
        raise ValueError(f"{len(continuations)} continuations for {n} pairs")
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must be in [0, 1], got {share}")
    rng = random.Random(seed)
    rows = sorted(rng.sample(range(n), round(share * n)))
    empty = [i for i in rows if not continuations[i].strip()]
    if empty:
        raise ValueError(f"pair {empty[0]} has no continuation to take a corpus response from")

    # 1. the new responses: side to replace, text cut to the response budget, gold score
    sides = ["chosen" if rng.random() < 0.5 else "rejected" for _ in rows]
    cut = [fit_budget(continuations[i]) for i in rows]
    texts, ended = [c[0] for c in cut], [c[1] for c in cut]
    new_gold = gold_fn([prefs["prompt"][i] for i in rows], texts, ended).tolist() if rows else []

    # 2. relabel: higher gold wins (ties by a coin), then exactly round(label_noise * n) flips
    flips = set(rng.sample(range(len(rows)), round(label_noise * len(rows))))
    out = {k: list(v) for k, v in prefs.items() if k not in ("chosen_ids", "rejected_ids")}
    out["corpus_side"] = [""] * n
    n_corpus_chosen = 0
    for j, i in enumerate(rows):
        keep = "rejected" if sides[j] == "chosen" else "chosen"
        kept = (prefs[keep][i], bool(prefs[f"{keep}_ended"][i]), float(prefs[f"{keep}_gold"][i]))
        new = (texts[j], ended[j], float(new_gold[j]))
        new_wins = new[2] > kept[2] or (new[2] == kept[2] and rng.random() < 0.5)
        corpus_chosen = new_wins != (j in flips)
        first, second = (new, kept) if corpus_chosen else (kept, new)
        out["chosen"][i], out["chosen_ended"][i], out["chosen_gold"][i] = first
        out["rejected"][i], out["rejected_ended"][i], out["rejected_gold"][i] = second
        if "label_flipped" in out:
            out["label_flipped"][i] = j in flips
        out["corpus_side"][i] = "chosen" if corpus_chosen else "rejected"
        n_corpus_chosen += corpus_chosen
    stats = TierStats(
        n_pairs=n, n_replaced=len(rows), n_replaced_chosen_side=sum(s == "chosen" for s in sides),
        n_corpus_response_chosen=n_corpus_chosen, n_corpus_response_ended=sum(ended), n_flipped=len(flips),
    )
    return out, stats


# ---------------------------------------------------------------------------------------------
# Tokenizing and batching
# ---------------------------------------------------------------------------------------------


@dataclass
class TokenizedPairs:
    """Token ids of N preference pairs, unpadded (EOS included where a response ended)."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    n_truncated: int = 0
    """Pairs cut to max_length."""

    def __len__(self) -> int:
        return len(self.prompt_ids)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_pairs(
    tokenizer,
    prompts: Sequence[str],
    chosen: Sequence[str],
    rejected: Sequence[str],
    chosen_ended: Sequence[bool],
    rejected_ended: Sequence[bool],
    max_length: int,
) -> TokenizedPairs:
    """Tokenize pairs the way TRL's DPOTrainer does, plus EOS ids and a length cap.

    The prompt's tokens are the common prefix of tokenize(prompt), tokenize(prompt + chosen) and
    tokenize(prompt + rejected) (a token merging across the boundary moves to the responses);
    each response is the rest of its joint tokenization, + EOS where it ended. When a pair does
    not fit `max_length` tokens (prompt + longer response), the prompt keeps its last tokens
    (at least max_length // 2 of them, more if the responses leave room) and the responses their
    first ones. Raises PreferenceDataError naming a row whose prompt or response has no tokens.
    """
    n = len(prompts)
    if not n == len(chosen) == len(rejected) == len(chosen_ended) == len(rejected_ended):
        raise ValueError("prompts, chosen, rejected and the ended flags must have the same length")
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token")
    p_ids = tokenizer(list(prompts))["input_ids"]
    pc_ids = tokenizer([p + c for p, c in zip(prompts, chosen)])["input_ids"]
    pr_ids = tokenizer([p + r for p, r in zip(prompts, rejected)])["input_ids"]
    out_p, out_c, out_r, truncated = [], [], [], 0
    for i in range(n):
        cut = min(_common_prefix(p_ids[i], pc_ids[i]), _common_prefix(p_ids[i], pr_ids[i]))
        prompt = list(p_ids[i][:cut])
        c = list(pc_ids[i][cut:]) + ([eos] if chosen_ended[i] else [])
        r = list(pr_ids[i][cut:]) + ([eos] if rejected_ended[i] else [])
        if not prompt:
            raise PreferenceDataError(f"row {i}: the prompt has no tokens of its own ({prompts[i]!r})")
        for name, ids in (("chosen", c), ("rejected", r)):
            if not ids:
                raise PreferenceDataError(f"row {i}: the {name} response has no tokens and did not end")
        longest = max(len(c), len(r))
        if len(prompt) + longest > max_length:
            truncated += 1
            keep = min(len(prompt), max(max_length - longest, max_length // 2))
            prompt = prompt[-keep:]
            c, r = c[: max_length - keep], r[: max_length - keep]
        out_p.append(prompt)
        out_c.append(c)
        out_r.append(r)
    return TokenizedPairs(out_p, out_c, out_r, truncated)


@dataclass
class PairBatch:
    """b pairs as one block of 2b rows, chosen rows first. Tensors (2b, T) int64."""

    query_ids: torch.Tensor
    """(2b, Tq) left-padded prompts (each prompt twice)."""
    query_mask: torch.Tensor
    """(2b, Tq) 1 on prompt tokens."""
    response_ids: torch.Tensor
    """(2b, Tr) right-padded responses: chosen for rows < b, rejected after."""
    response_mask: torch.Tensor
    """(2b, Tr) 1 on response tokens."""

    def __len__(self) -> int:
        return self.query_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(*(t.to(device) for t in (self.query_ids, self.query_mask, self.response_ids,
                                                   self.response_mask)))


def collate_pairs(pairs: TokenizedPairs, indices: Sequence[int], pad_token_id: int) -> PairBatch:
    """Batch the pairs at `indices`: queries left-padded, responses right-padded, chosen first."""
    idx = [int(i) for i in indices]
    if not idx:
        raise ValueError("collate_pairs: no pairs to batch")
    queries = [pairs.prompt_ids[i] for i in idx] * 2
    responses = [pairs.chosen_ids[i] for i in idx] + [pairs.rejected_ids[i] for i in idx]
    tq, tr = max(map(len, queries)), max(map(len, responses))
    query_ids = torch.full((len(queries), tq), pad_token_id, dtype=torch.long)
    query_mask = torch.zeros((len(queries), tq), dtype=torch.long)
    response_ids = torch.full((len(responses), tr), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((len(responses), tr), dtype=torch.long)
    for row, (q, r) in enumerate(zip(queries, responses)):
        query_ids[row, tq - len(q):] = torch.tensor(q, dtype=torch.long)
        query_mask[row, tq - len(q):] = 1
        response_ids[row, : len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[row, : len(r)] = 1
    return PairBatch(query_ids, query_mask, response_ids, response_mask)


@dataclass
class EncodedPairs:
    """Tokenized preference pairs (unpadded id lists) and their clean labels."""

    chosen: list[list[int]]
    """Token ids of prompt + chosen (+ EOS when the chosen response ended), one list per pair."""
    rejected: list[list[int]]
    """Token ids of prompt + rejected (+ EOS when it ended)."""
    gold_chosen_better: torch.Tensor | None
    """(N,) bool: the gold score of chosen beats rejected (None without gold columns)."""
    gold_tie: torch.Tensor | None
    """(N,) bool: equal gold scores; such pairs have no clean label and are left out of it."""

    def __len__(self) -> int:
        return len(self.chosen)
