"""Preference pairs for direct alignment: reading, validating, quality tiers, tokenizing, batching.

A preference dataset is any `datasets` dataset with string columns prompt, chosen, rejected
(TRL's "standard" preference format); optional boolean columns chosen_ended / rejected_ended say
whether a response ended with EOS (default True: a finished text, as TRL assumes). Rows are
checked one by one and a bad row is reported by its index and field.

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

import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REQUIRED_COLUMNS: tuple[str, ...] = ("prompt", "chosen", "rejected")
ENDED_COLUMNS: tuple[str, ...] = ("chosen_ended", "rejected_ended")


class PreferenceDataError(ValueError):
    """A preference dataset that cannot be used; the message names the row and field."""


# ---------------------------------------------------------------------------------------------
# Reading and validating a user dataset
# ---------------------------------------------------------------------------------------------


def load_preference_dataset(path: str | Path, split: str = "train"):
    """Read a preference dataset from disk and validate every row.

    `path` is a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (the
    `split` is taken from a DatasetDict), or a .json/.jsonl/.csv/.parquet file.
    Returns a `datasets.Dataset`. Raises PreferenceDataError naming the first bad row.
    """
    from datasets import DatasetDict, load_dataset, load_from_disk

    p = Path(path).expanduser()
    if p.is_dir():
        try:
            data = load_from_disk(str(p))
        except Exception as exc:  # datasets raises assorted errors (even IndexError for 0 shards)
            raise PreferenceDataError(f"{p}: cannot be read as a saved dataset ({type(exc).__name__}: {exc})") from None
        if isinstance(data, DatasetDict):
            if split not in data:
                raise PreferenceDataError(f"{p}: has splits {sorted(data)}, no {split!r} split")
            data = data[split]
    elif p.is_file():
        kinds = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
        if p.suffix not in kinds:
            raise PreferenceDataError(f"{p}: unsupported file type {p.suffix!r} (use {', '.join(kinds)})")
        if kinds[p.suffix] != "parquet":
            lines = _text_lines(p)
            if lines <= (1 if kinds[p.suffix] == "csv" else 0):  # a CSV's first line is its header
                raise PreferenceDataError(f"{p}: holds no rows")
        quiet = logging.getLogger("datasets")  # it logs its own copy of the parse error
        level, quiet.level = quiet.level, logging.CRITICAL
        try:
            data = load_dataset(kinds[p.suffix], data_files=str(p), split="train")
        except Exception as exc:  # datasets wraps parse errors in DatasetGenerationError
            cause = exc.__cause__ or exc
            detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise PreferenceDataError(f"{p}: cannot be read as {kinds[p.suffix]} ({detail})") from None
        finally:
            quiet.setLevel(level)
    else:
        raise PreferenceDataError(f"{p}: no such file or folder")
    validate_preference_rows(data, source=str(p))
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


def validate_preference_rows(data, source: str = "dataset") -> None:
    """Check columns and every row: prompt/chosen/rejected non-empty strings, ended flags booleans.

    Raises PreferenceDataError('<source> row <i>: ...') at the first problem.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in data.column_names]
    if missing:
        raise PreferenceDataError(
            f"{source}: missing column(s) {', '.join(missing)}; a preference dataset needs "
            f"{', '.join(REQUIRED_COLUMNS)} (has {', '.join(data.column_names)})"
        )
    if len(data) == 0:
        raise PreferenceDataError(f"{source}: holds no rows")
    columns = {c: data[c] for c in (*REQUIRED_COLUMNS, *ENDED_COLUMNS) if c in data.column_names}
    for i in range(len(data)):
        for name in REQUIRED_COLUMNS:
            value = columns[name][i]
            if value is None:
                raise PreferenceDataError(f"{source} row {i}: field {name!r} is missing")
            if not isinstance(value, str):
                raise PreferenceDataError(
                    f"{source} row {i}: field {name!r} must be a string, got {type(value).__name__} "
                    "(conversational message lists are not supported)"
                )
            if not value.strip():
                raise PreferenceDataError(f"{source} row {i}: field {name!r} is empty")
        for name in ENDED_COLUMNS:
            if name in columns and not isinstance(columns[name][i], bool):
                raise PreferenceDataError(
                    f"{source} row {i}: field {name!r} must be true or false, got {columns[name][i]!r}"
                )


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
