"""The labelling stage: gold-labelled preference pairs from the initial policy's own responses,
the data step of Gao et al. 2022 §2 and Coste et al. 2023 §4.

    prompts ──▶ sample R responses each ──▶ gold scores ──▶ pair_and_label ──▶ Dataset + card
               (rollout.generate,           (GoldScorer)    (pairs, ties,     (preferences/)
                seeds.label_generator)                       seeded flips)

What is shared with the testbed (rlhf_overopt/testbed/data.py:make_preferences): `pair_and_label`,
the one place where responses become pairs. Consecutive responses of a prompt form disjoint pairs
(0,1), (2,3), ...; the higher gold score is chosen; an exact gold tie carries no preference and is
dropped (and counted); then exactly round(noise * n_pairs) pairs, drawn by
random.Random(seed).sample over the kept pairs, have chosen and rejected swapped. The testbed
calls it with two responses per prompt and its own seed + 2, which leaves its cached preference
data bit-identical to what it was before the function was shared.

What differs: the testbed samples with its own seeded Hugging Face `model.generate` (one seed per
generation batch, so a testbed build is reproducible without this package's run machinery), and
labels with its own rule-based gold. This stage samples with `rlhf_overopt.rollout.generate`
(label.temperature, label.top_p, label.max_new_tokens) under `seeds.label_generator(seed, chunk)`,
scores with whatever gold the config names (`GoldScorer`), works in resumable chunks of
label.chunk_prompts prompts split over ranks, and writes TRL's explicit-prompt format
(prompt, chosen, rejected) with gold_chosen, gold_rejected, flipped, chosen_ended, rejected_ended.

Chunk c always covers prompts [c * chunk_prompts, (c + 1) * chunk_prompts) and is sampled under
a generator of (seed, c) alone, whichever rank draws it: the dataset does not depend on the rank
count, and a resumed run (which skips the chunks already on disk) equals an uninterrupted one.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_overopt.data.preferences import ENDED_COLUMNS, FLIPPED_COLUMN, GOLD_COLUMNS, REQUIRED_COLUMNS
from rlhf_overopt.run.directory import atomic_write_json, atomic_write_text

CHUNK_DIR = "preferences_chunks"
"""Per-chunk samples and gold scores of a label_preferences run, under the run directory."""
DATASET_DIR = "preferences"
"""The labelled dataset (save_to_disk), its README.md card and stats.json, under the run directory."""
COLUMNS: tuple[str, ...] = ("prompt_index", *REQUIRED_COLUMNS, *GOLD_COLUMNS, FLIPPED_COLUMN, *ENDED_COLUMNS)
"""Columns of the labelled dataset, in order: the prompt's index, then the preference schema
(rlhf_overopt.data.preferences: TRL's explicit-prompt format plus gold and flags)."""


# -- pairing: shared with the testbed ---------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    """One labelled pair; indices point into the flat list of responses (prompt-major)."""

    prompt: int
    """Index of the prompt."""
    chosen: int
    """Index of the response labelled chosen (the lower-gold one when flipped)."""
    rejected: int
    """Index of the response labelled rejected."""
    flipped: bool
    """Whether label noise swapped this pair: then gold[chosen] < gold[rejected]."""


def pair_and_label(scores: Sequence[float], responses_per_prompt: int, noise: float,
                   seed: int) -> tuple[list[Pair], int]:
    """Gold-labelled pairs with seeded label noise (Gao et al. 2022 §2; Coste et al. 2023 §4).

    `scores` are the gold scores of n_prompts * responses_per_prompt responses, prompt-major
    (responses r of prompt i at i * responses_per_prompt + r). Within a prompt, consecutive
    responses form disjoint pairs (0,1), (2,3), ... (an odd last response is left out); the one
    with the higher gold score is chosen. A pair whose two scores are exactly equal carries no
    preference and is dropped. Then exactly round(noise * n_pairs) of the kept pairs, drawn by
    random.Random(seed).sample(range(n_pairs), k), are flipped: chosen and rejected swapped.

    Returns (pairs in prompt order, then pair order within a prompt; number of ties dropped).
    """
    if responses_per_prompt < 2:
        raise ValueError(f"responses_per_prompt must be >= 2, got {responses_per_prompt}")
    if len(scores) % responses_per_prompt:
        raise ValueError(f"{len(scores)} scores are not a whole number of prompts of {responses_per_prompt}")
    if not 0 <= noise <= 1:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    pairs: list[Pair] = []
    n_ties = 0
    for i in range(len(scores) // responses_per_prompt):
        base = i * responses_per_prompt
        for j in range(0, responses_per_prompt - 1, 2):
            a, b = base + j, base + j + 1
            if scores[a] == scores[b]:
                n_ties += 1
                continue
            win, lose = (a, b) if scores[a] > scores[b] else (b, a)
            pairs.append(Pair(i, win, lose, False))
    n_flip = round(noise * len(pairs))
    for k in random.Random(seed).sample(range(len(pairs)), n_flip):
        p = pairs[k]
        pairs[k] = Pair(p.prompt, p.rejected, p.chosen, True)
    return pairs, n_ties


# -- chunks: the unit of work and of resume ---------------------------------------------------------


def chunk_ranges(n_prompts: int, chunk_prompts: int) -> list[range]:
    """Prompt index ranges of the chunks: chunk c is [c * chunk_prompts, (c + 1) * chunk_prompts)."""
    return [range(s, min(s + chunk_prompts, n_prompts)) for s in range(0, n_prompts, chunk_prompts)]


def rank_chunks(n_chunks: int, rank: int, world: int) -> range:
    """This rank's contiguous share of the chunks (the first n_chunks % world ranks take one more)."""
    per, extra = divmod(n_chunks, world)
    start = rank * per + min(rank, extra)
    return range(start, start + per + (rank < extra))


def chunk_path(root: Path, chunk: int) -> Path:
    """Where chunk `chunk` is stored; named by its global index, so any rank count can resume it."""
    return root / CHUNK_DIR / f"chunk{chunk:05d}.json"


def save_chunk(path: Path, record: dict[str, Any]) -> None:
    """Write a chunk record atomically: a killed run leaves the whole chunk or nothing."""
    atomic_write_json(path, record)


def load_chunk(path: Path, prompts: Sequence[str], responses_per_prompt: int) -> dict[str, Any] | None:
    """The stored chunk at `path` when it holds exactly these prompts' responses; None when absent.

    A chunk of other prompts (the data or label.chunk_prompts changed) is an error, not a silent redo.
    """
    if not path.exists():
        return None
    record = json.loads(path.read_text(encoding="utf-8"))
    n = len(prompts) * responses_per_prompt
    if record.get("prompts") != list(prompts) or not (
            len(record["responses"]) == len(record["ended"]) == len(record["gold"]) == n):
        raise ValueError(f"{path}: holds another chunk than the one this run would label; "
                         "remove it or start a new run")
    return record


def label_chunk(policy: torch.nn.Module, tokenizer, gold, prompts: Sequence[str], *, responses_per_prompt: int,
                max_new_tokens: int, temperature: float, top_p: float, batch_size: int,
                generator: torch.Generator) -> dict[str, Any]:
    """Sample `responses_per_prompt` responses per prompt (all of a prompt's responses in one batch
    of `batch_size` prompts) and score each with gold. Returns the chunk record:
    {"prompts", "responses", "ended", "gold"}, responses prompt-major."""
    from rlhf_overopt.rollout import generate

    repeated = [p for p in prompts for _ in range(responses_per_prompt)]
    ro = generate(policy, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=temperature,
                  top_p=top_p, generator=generator, batch_size=batch_size * responses_per_prompt)
    ended = [bool(e) for e in ro.ended.cpu().tolist()]
    scores = gold.score(repeated, ro.responses, ended)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("gold returned a non-finite score")
    return {"prompts": list(prompts), "responses": list(ro.responses), "ended": ended,
            "gold": [float(s) for s in scores.tolist()]}


# -- the dataset, its statistics and its card ----------------------------------------------------------


def pair_rows(prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool], scores: Sequence[float],
              pairs: Sequence[Pair]) -> dict[str, list]:
    """Columns (COLUMNS) of the labelled pairs; prompts has one entry per prompt, the rest one per response."""
    rows = [(p.prompt, prompts[p.prompt], responses[p.chosen], responses[p.rejected], scores[p.chosen],
             scores[p.rejected], p.flipped, ended[p.chosen], ended[p.rejected]) for p in pairs]
    return {c: [r[k] for r in rows] for k, c in enumerate(COLUMNS)}


def to_dataset(columns: dict[str, list]):
    """The `datasets.Dataset` of the labelled pairs, with fixed features (stable on empty input)."""
    import datasets

    features = datasets.Features({
        "prompt_index": datasets.Value("int64"), "prompt": datasets.Value("string"),
        "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
        "gold_chosen": datasets.Value("float64"), "gold_rejected": datasets.Value("float64"),
        "flipped": datasets.Value("bool"), "chosen_ended": datasets.Value("bool"),
        "rejected_ended": datasets.Value("bool"),
    })
    return datasets.Dataset.from_dict(columns, features=features)


def quantiles(values: Sequence[float], qs: Sequence[float] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, float]:
    """Linear-interpolation quantiles {"q05": ..., ...}; NaN-free (0.0 for no values)."""
    if not values:
        return {f"q{round(q * 100):02d}": 0.0 for q in qs}
    t = torch.tensor(list(values), dtype=torch.float64)
    return {f"q{round(q * 100):02d}": float(torch.quantile(t, q)) for q in qs}


def label_stats(columns: dict[str, list], *, n_prompts: int, responses_per_prompt: int, n_ties: int,
                scores: Sequence[float], ended: Sequence[bool], noise: float) -> dict[str, Any]:
    """Counts and label quality of a labelled set (Coste et al. 2023 §4 report the same: how many
    pairs, how noisy, how often the chosen response really is the better one by gold).

    clean_agreement is the fraction of pairs whose chosen has the higher gold: 1 - flipped_fraction
    by construction, reported so that a reader need not trust the construction."""
    n = len(columns["flipped"])
    n_flipped = sum(columns["flipped"])
    margins = [abs(c - r) for c, r in zip(columns["gold_chosen"], columns["gold_rejected"])]
    return {
        "n_prompts": n_prompts,
        "responses_per_prompt": responses_per_prompt,
        "n_responses": len(scores),
        "n_pairs": n,
        "n_ties_dropped": n_ties,
        "n_flipped": n_flipped,
        "noise": noise,
        "flipped_fraction": n_flipped / max(1, n),
        "clean_agreement": sum(c > r for c, r in zip(columns["gold_chosen"], columns["gold_rejected"])) / max(1, n),
        "mean_abs_gold_margin": sum(margins) / max(1, n),
        "gold_mean": sum(scores) / max(1, len(scores)),
        "gold_quantiles": quantiles(scores),
        "eos_rate": sum(ended) / max(1, len(ended)),
    }


def _cell(text: Any, limit: int = 80) -> str:
    """A markdown table cell: one line, pipes escaped, long texts cut."""
    s = str(text).replace("\n", " ").replace("|", "\\|")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def dataset_card(stats: dict[str, Any], columns: dict[str, list], *, policy: str, gold: str, seed: int,
                 sampling: dict[str, Any], n_rows: int = 5) -> str:
    """The README.md beside the dataset: what it is, how it was made, counts, gold, a few rows."""
    q = stats["gold_quantiles"]
    lines = [
        "# Gold-labelled preference pairs",
        "",
        ("Responses of the initial policy, paired and labelled by a gold reward with seeded label noise "
         "(Gao et al. 2022 §2; Coste et al. 2023 §4). TRL's explicit-prompt format (`prompt`, `chosen`, "
         "`rejected`) plus `gold_chosen`, `gold_rejected`, `flipped`, `chosen_ended`, `rejected_ended` and "
         "`prompt_index` (the prompt's index in the train split). Load with `datasets.load_from_disk`."),
        "",
        f"- policy: `{policy}`",
        f"- gold: `{gold}`",
        f"- sampling: {', '.join(f'{k}={v}' for k, v in sampling.items())}; seed {seed}",
        "- pairing: consecutive responses of a prompt, (0,1), (2,3), ...; chosen = higher gold; exact ties dropped",
        f"- label noise: {stats['noise']} (exactly round(noise * pairs) pairs flipped)",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| prompts | {stats['n_prompts']} |",
        f"| responses | {stats['n_responses']} ({stats['responses_per_prompt']} per prompt) |",
        f"| pairs | {stats['n_pairs']} |",
        f"| ties dropped | {stats['n_ties_dropped']} |",
        f"| flipped | {stats['n_flipped']} ({stats['flipped_fraction']:.3f}) |",
        f"| clean agreement | {stats['clean_agreement']:.3f} |",
        f"| mean \\|gold margin\\| | {stats['mean_abs_gold_margin']:.4f} |",
        f"| EOS rate | {stats['eos_rate']:.3f} |",
        f"| gold mean | {stats['gold_mean']:.4f} |",
        "| gold q05 / q25 / q50 / q75 / q95 | "
        + " / ".join(f"{q[k]:.4f}" for k in ("q05", "q25", "q50", "q75", "q95")) + " |",
        "",
        f"## First {min(n_rows, stats['n_pairs'])} rows",
        "",
        "| prompt | chosen | rejected | gold chosen | gold rejected | flipped |",
        "|---|---|---|---|---|---|",
    ]
    for i in range(min(n_rows, stats["n_pairs"])):
        lines.append(f"| {_cell(columns['prompt'][i])} | {_cell(columns['chosen'][i])} | "
                     f"{_cell(columns['rejected'][i])} | {columns['gold_chosen'][i]:.4f} | "
                     f"{columns['gold_rejected'][i]:.4f} | {columns['flipped'][i]} |")
    return "\n".join(lines) + "\n"


def write_dataset(root: Path, columns: dict[str, list], stats: dict[str, Any], card: str) -> Path:
    """Save the dataset to <root>/preferences (via a temporary sibling renamed into place, so a
    killed run never leaves half a dataset there), with README.md and stats.json beside it."""
    out = root / DATASET_DIR
    tmp = root / f".{DATASET_DIR}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    from rlhf_overopt.run.progress import quiet_datasets

    with quiet_datasets():
        to_dataset(columns).save_to_disk(str(tmp))
    atomic_write_text(tmp / "README.md", card)
    atomic_write_json(tmp / "stats.json", stats)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out

