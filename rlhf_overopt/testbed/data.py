"""Prompts and the gold-labelled preference dataset of the testbed.

Prompts are the opening `prompt_words` words of freshly generated reviews (a seed stream of
their own, so they are not the SFT corpus' reviews). Every prompt string occurs once: each
distinct opening belongs to exactly one split, drawn by a seeded coin, so the train and eval
splits never share a prompt.

Preferences follow Gao et al. 2022 §2 and Coste et al. 2023 §4: two responses of the initial
policy per train prompt, the higher gold score wins, then a seeded `label_noise` fraction of the
labels is flipped. The pairing itself is `rlhf_overopt.data.labeling.pair_and_label`, shared with the
label_preferences method; sampling here stays the testbed's own seeded HF generate.
"""

from __future__ import annotations

import json
import logging
import random
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_overopt.config.sections import TestbedConfig
from rlhf_overopt.data.labeling import pair_and_label
from rlhf_overopt.data.preferences import PREFERENCE_COLUMNS, testbed_column
from rlhf_overopt.run.progress import bar
from rlhf_overopt.testbed.corpus import generate_reviews
from rlhf_overopt.testbed.gold import TestbedGold, response_length

logger = logging.getLogger(__name__)

PREFS_STATS_FILE = "pairs_clean_agreement.json"
"""Statistics of the preference dataset (agreement with clean gold, ties, flips), in prefs_dir."""
PREF_COLUMNS: tuple[str, ...] = ("prompt_id", *map(testbed_column, PREFERENCE_COLUMNS), "chosen_ids", "rejected_ids")
"""Columns of the preference dataset, in order: the preference schema (rlhf_overopt.data.preferences) in the
testbed's spelling (chosen_gold, rejected_gold, label_flipped), between the prompt id and the response token ids."""





# -- prompts ---------------------------------------------------------------------------------------


def split_prompt(review: str, prompt_words: int) -> tuple[str, str] | None:
    """(prompt, reference): the first `prompt_words` words and the rest (starting with a space).

    `prompt + reference == review`. None when the review has no word after the prompt.
    """
    parts = review.split(" ")
    if len(parts) <= prompt_words:
        return None
    prompt = " ".join(parts[:prompt_words])
    return prompt, review[len(prompt):]


def make_prompts(n_train: int, n_eval: int, prompt_words: int, seed: int) -> datasets.DatasetDict:
    """Train and eval prompt splits with distinct prompt strings, disjoint between the splits.

    Columns: prompt_id (int, unique over both splits), prompt (str), reference (str, the rest of
    the review the prompt was cut from: a corpus continuation of the prompt). Reviews are drawn
    in chunks from `generate_reviews`; the first time an opening is seen a seeded coin assigns it
    to a split, which takes it while not full. Should the generator run out of new openings
    (a very short `prompt_words`), the splits are topped up with repeats of their own openings,
    which keeps them disjoint.
    """
    coin = random.Random(seed + 1)  # the split coin has its own stream; reviews use `seed`
    p_eval = n_eval / max(1, n_train + n_eval)
    side: dict[str, str] = {}
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "eval": []}
    repeats: dict[str, list[tuple[str, str]]] = {"train": [], "eval": []}
    want = {"train": n_train, "eval": n_eval}
    chunk = max(1024, n_train + n_eval)
    max_chunks = 60  # the default config needs ~10 chunks; the generator has ~12k 4-word openings
    for c in range(max_chunks):
        if all(len(rows[s]) >= want[s] for s in rows):
            break
        # Chunk c comes from its own seed, so drawing more chunks never changes earlier ones.
        for review in generate_reviews(chunk, seed * 1_000_003 + c):
            cut = split_prompt(review, prompt_words)
            if cut is None:
                continue
            s = side.get(cut[0])
            if s is not None:
                repeats[s].append(cut)
                continue
            s = side[cut[0]] = "eval" if coin.random() < p_eval else "train"
            if len(rows[s]) < want[s]:
                rows[s].append(cut)
    for name, got in rows.items():
        missing = want[name] - len(got)
        if missing > 0:
            if len(repeats[name]) < missing:
                raise RuntimeError(f"make_prompts: cannot find {want[name]} {name} prompts of {prompt_words} words")
            logger.warning("make_prompts: only %d distinct %s prompts of %d words; %d repeats added",
                           len(got), name, prompt_words, missing)
            got.extend(repeats[name][:missing])
    next_id = 0
    splits = {}
    for name in ("train", "eval"):
        ids = list(range(next_id, next_id + len(rows[name])))
        next_id += len(ids)
        splits[name] = datasets.Dataset.from_dict({
            "prompt_id": ids,
            "prompt": [p for p, _ in rows[name]],
            "reference": [r for _, r in rows[name]],
        })
    return datasets.DatasetDict(splits)


# -- sampling from the policy ----------------------------------------------------------------------


@dataclass(frozen=True)
class Samples:
    """Responses sampled for a list of prompts, one entry per prompt, in order."""

    response_ids: list[list[int]]
    """Response token ids, ending with EOS when the response ended, never padded."""
    responses: list[str]
    """Decoded response texts without the EOS token."""
    ended: list[bool]
    """Whether each response emitted EOS before the length cap."""


@torch.no_grad()
def sample_responses(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                     max_new_tokens: int, batch_size: int, seed: int, progress: bool = True,
                     temperature: float = 1.0, desc: str = "sampling") -> Samples:
    """Sample one response per prompt: pure temperature sampling (no top-k/top-p), KV cache on.

    Prompts are left-padded in batches of `batch_size`; batch b is sampled under
    `torch.manual_seed(seed + b)` inside a forked RNG, so the result depends only on the inputs
    (and the caller's global RNG is untouched). Generation stops at EOS.
    """
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if tokenizer.padding_side != "left":
        raise ValueError("sample_responses: the tokenizer must pad on the left")
    gen_cfg = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
        eos_token_id=eos, pad_token_id=pad, use_cache=True,
    )
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out_ids: list[list[int]] = []
    show = progress and sys.stderr.isatty()
    starts = range(0, len(prompts), batch_size)
    for b, start in enumerate(bar(starts, desc=desc, disable=not show, leave=False)):
        batch = list(prompts[start : start + batch_size])
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed + b)
            seqs = model.generate(**enc, generation_config=gen_cfg)
        new = seqs[:, enc["input_ids"].shape[1]:].tolist()
        for row in new:
            # Keep tokens up to and including the first EOS; what follows is padding.
            if eos in row:
                row = row[: row.index(eos) + 1]
            out_ids.append(row)
    model.train(was_training)
    ended = [len(r) > 0 and r[-1] == eos for r in out_ids]
    texts = [tokenizer.decode(r[:-1] if e else r, skip_special_tokens=False) for r, e in zip(out_ids, ended)]
    return Samples(response_ids=out_ids, responses=texts, ended=ended)


# -- preferences -----------------------------------------------------------------------------------


def make_preferences(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: datasets.Dataset,
                     gold: TestbedGold, cfg: TestbedConfig, seed: int,
                     progress: bool = True) -> tuple[datasets.Dataset, dict]:
    """The gold-labelled preference dataset over the train prompts, and its statistics.

    Two samples per prompt (temperature 1, `cfg.max_new_tokens` cap); chosen = higher gold.
    Ties rule: a pair whose two gold scores are exactly equal (identical texts, mostly) carries
    no preference and is dropped, so the dataset can hold fewer rows than prompts. Then exactly
    `round(label_noise * n_pairs)` seeded rows are flipped (chosen and rejected swapped,
    `label_flipped` True): `chosen_gold < rejected_gold` on exactly those rows.
    """
    texts = list(prompts["prompt"])
    doubled = [p for p in texts for _ in range(2)]  # both samples of a prompt share a batch
    samples = sample_responses(model, tokenizer, doubled, cfg.max_new_tokens, cfg.gen_batch_size,
                               seed, progress, desc="preference samples")
    scores = gold.score(doubled, samples.responses, samples.ended).tolist()

    # Pairing, tie-dropping and the seeded flips are the label_preferences stage's own function,
    # so the testbed and a run on your own world label pairs by one code path.
    pairs, n_ties = pair_and_label(scores, responses_per_prompt=2, noise=cfg.label_noise, seed=seed + 2)
    ids = list(prompts["prompt_id"])
    rows: list[dict] = [{
        "prompt_id": ids[p.prompt], "prompt": texts[p.prompt],
        "chosen": samples.responses[p.chosen], "rejected": samples.responses[p.rejected],
        "chosen_ended": samples.ended[p.chosen], "rejected_ended": samples.ended[p.rejected],
        "chosen_gold": scores[p.chosen], "rejected_gold": scores[p.rejected], "label_flipped": p.flipped,
        "chosen_ids": samples.response_ids[p.chosen], "rejected_ids": samples.response_ids[p.rejected],
    } for p in pairs]

    columns = {c: [r[c] for r in rows] for c in PREF_COLUMNS}
    features = datasets.Features({
        "prompt_id": datasets.Value("int64"), "prompt": datasets.Value("string"),
        "chosen": datasets.Value("string"), "rejected": datasets.Value("string"),
        "chosen_ended": datasets.Value("bool"), "rejected_ended": datasets.Value("bool"),
        "chosen_gold": datasets.Value("float32"), "rejected_gold": datasets.Value("float32"),
        "label_flipped": datasets.Value("bool"),
        "chosen_ids": datasets.List(datasets.Value("int32")),
        "rejected_ids": datasets.List(datasets.Value("int32")),
    })
    prefs = datasets.Dataset.from_dict(columns, features=features)
    stats = preference_stats(rows, n_prompts=len(texts), n_ties=n_ties, samples=samples, scores=scores,
                             gold=gold, prompts=doubled)
    return prefs, stats


def preference_stats(rows: list[dict], n_prompts: int, n_ties: int, samples: Samples, scores: list[float],
                     gold: TestbedGold, prompts: list[str]) -> dict:
    """Label quality and how often each gold term is visible in the pairs."""
    n = len(rows)
    agree = sum(r["chosen_gold"] > r["rejected_gold"] for r in rows)
    parts = gold.components(prompts, samples.responses, samples.ended)
    lengths = [response_length(t) for t in samples.responses]
    # A term is "visible" in a pair when it differs between the two responses.
    eos_differs = sum(r["chosen_ended"] != r["rejected_ended"] for r in rows)
    length_pen = parts["length"].tolist()
    length_differs = sum(length_pen[2 * i] != length_pen[2 * i + 1] for i in range(len(length_pen) // 2))
    return {
        "n_prompts": n_prompts,
        "n_pairs": n,
        "n_ties_dropped": n_ties,
        "n_flipped": sum(r["label_flipped"] for r in rows),
        "flipped_fraction": sum(r["label_flipped"] for r in rows) / max(1, n),
        "clean_agreement": agree / max(1, n),
        "mean_abs_gold_margin": sum(abs(r["chosen_gold"] - r["rejected_gold"]) for r in rows) / max(1, n),
        "sample_eos_rate": sum(samples.ended) / max(1, len(samples.ended)),
        "sample_mean_words": sum(lengths) / max(1, len(lengths)),
        "sample_gold_mean": sum(scores) / max(1, len(scores)),
        "pairs_eos_differs_fraction": eos_differs / max(1, n),
        "prompts_length_term_differs_fraction": length_differs / max(1, n_prompts),
        "sample_component_means": {k: float(v.mean()) if v.numel() else 0.0 for k, v in parts.items()},
    }


def save_json(path: Path, obj: dict) -> None:
    """Write `obj` as sorted, indented json (byte-stable for hashing)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
