"""method: label_preferences — the gold-labelled preference data of Gao et al. 2022 §2 and Coste
et al. 2023 §4 on any world: responses of the initial policy, paired, labelled by gold, with
seeded label noise. The output (<run>/preferences/, TRL's explicit-prompt format) is what
proxy.dataset and dpo.dataset read.

    1. models     tokenizer, initial policy (label.* sampling settings), gold
    2. prompts    the train prompts (the first label.max_prompts), cut into chunks of
                  label.chunk_prompts; each rank takes a contiguous share of the chunks
    3. label      per chunk: label.responses_per_prompt responses per prompt under
                  seeds.label_generator(seed, chunk), gold scores, saved atomically to
                  <run>/preferences_chunks/; a resumed run loads the chunks already there
    4. gather     every chunk on rank 0, in prompt order
    5. pair       labeling.pair_and_label over the whole set: disjoint consecutive pairs, chosen =
                  higher gold, exact ties dropped, exactly round(label.noise * pairs) flips
                  (decided over the gathered set, so the result does not depend on the rank count)
    6. write      rank 0: the Dataset (save_to_disk), README.md card and stats.json in <run>/preferences/
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
import torch.distributed as tdist

from rlhf_overopt.data.labeling import (
    chunk_path,
    chunk_ranges,
    dataset_card,
    label_chunk,
    label_stats,
    load_chunk,
    pair_and_label,
    pair_rows,
    rank_chunks,
    save_chunk,
    write_dataset,
)
from rlhf_overopt.data.prompts import load_prompts, policy_path
from rlhf_overopt.errors import InputError
from rlhf_overopt.rewards.gold import GoldScorer
from rlhf_overopt.run import dist, seeds
from rlhf_overopt.run.engines import load_policy_model
from rlhf_overopt.run.lifecycle import RunContext
from rlhf_overopt.run.models import load_tokenizer
from rlhf_overopt.run.progress import bar

log = logging.getLogger("rlhf_overopt")


def _gather_to_main(records: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Every rank's {chunk: record}, merged on every rank (small: texts and floats)."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return records
    parts: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(parts, records)
    return {c: r for part in parts for c, r in part.items()}


def run(ctx: RunContext) -> dict[str, Any]:
    cfg, lab, info = ctx.cfg, ctx.cfg.label, ctx.dist
    t_start = time.time()

    # 1. models: the initial policy samples with label.* settings; gold scores
    path = policy_path(cfg, ctx.testbed)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.policy.trust_remote_code)
    policy = load_policy_model(cfg, path).to(info.device)
    gold = GoldScorer.from_config(cfg, ctx.testbed)

    # 2. prompts: every rank reads the whole train split (the eval share is not used here; asking
    # for a one-rank share of it keeps an eval.n_prompts that does not divide by the rank count
    # from failing a method that never evaluates)
    train, _ = load_prompts(cfg, ctx.testbed, 1, 0)
    prompts = train[: lab.max_prompts] if lab.max_prompts else train
    if not prompts:
        raise InputError("label_preferences: no train prompts to label")
    chunks = chunk_ranges(len(prompts), lab.chunk_prompts)
    mine = rank_chunks(len(chunks), info.rank, info.world_size)
    log.info("label_preferences: %d prompts x %d responses in %d chunk(s) of %d over %d rank(s)",
             len(prompts), lab.responses_per_prompt, len(chunks), lab.chunk_prompts, info.world_size)

    # 3. label this rank's chunks, each saved as soon as it is done; resume loads finished ones
    records: dict[int, dict[str, Any]] = {}
    resumed = 0
    for c in bar(mine, desc="labelling", unit="chunk", disable=not info.is_main):
        chunk_prompts = [prompts[i] for i in chunks[c]]
        file = chunk_path(ctx.run.root, c)
        try:
            record = load_chunk(file, chunk_prompts, lab.responses_per_prompt) if ctx.state == "resume" else None
        except ValueError as exc:
            raise InputError(str(exc)) from None
        if record is not None:
            resumed += 1
            log.info("chunk %d/%d: on disk, skipped", c + 1, len(chunks))
        else:
            t0 = time.time()
            record = label_chunk(policy, tokenizer, gold, chunk_prompts, responses_per_prompt=lab.responses_per_prompt,
                                 max_new_tokens=lab.max_new_tokens, temperature=lab.temperature, top_p=lab.top_p,
                                 batch_size=lab.batch_size, generator=seeds.label_generator(cfg.seed, c, info.device))
            save_chunk(file, {**record, "chunk": c, "rank": info.rank})
            log.info("chunk %d/%d: %d prompts, gold mean %.4f, EOS rate %.3f, %.1f s", c + 1, len(chunks),
                     len(chunk_prompts), sum(record["gold"]) / len(record["gold"]),
                     sum(record["ended"]) / len(record["ended"]), time.time() - t0)
        records[c] = record
    del policy
    if info.device.type == "cuda":
        torch.cuda.empty_cache()

    # 4. gather every chunk, in prompt order
    gathered = _gather_to_main(records)
    resumed_all = round(float(dist.all_reduce_mean(torch.tensor(float(resumed)))) * info.world_size)
    summary: dict[str, Any] = {}
    if info.is_main:
        if sorted(gathered) != list(range(len(chunks))):
            raise RuntimeError(f"label_preferences: gathered chunks {sorted(gathered)}, expected 0-{len(chunks) - 1}")
        responses = [r for c in range(len(chunks)) for r in gathered[c]["responses"]]
        ended = [e for c in range(len(chunks)) for e in gathered[c]["ended"]]
        scores = [s for c in range(len(chunks)) for s in gathered[c]["gold"]]

        # 5. pair and label over the whole set (one flip draw, whatever the rank count)
        pairs, n_ties = pair_and_label(scores, lab.responses_per_prompt, lab.noise, seeds.label_flip_seed(cfg.seed))
        columns = pair_rows(prompts, responses, ended, scores, pairs)
        stats = label_stats(columns, n_prompts=len(prompts), responses_per_prompt=lab.responses_per_prompt,
                            n_ties=n_ties, scores=scores, ended=ended, noise=lab.noise)

        # 6. write the dataset, its card and stats
        sampling = {"responses_per_prompt": lab.responses_per_prompt, "temperature": lab.temperature,
                    "top_p": lab.top_p, "max_new_tokens": lab.max_new_tokens}
        card = dataset_card(stats, columns, policy=cfg.policy.path, gold=cfg.gold.path, seed=cfg.seed,
                            sampling=sampling, n_rows=lab.card_rows)
        out = write_dataset(ctx.run.root, columns, stats, card)
        log.info("%d pairs (%d ties dropped, %d flipped), clean agreement %.3f -> %s", stats["n_pairs"],
                 n_ties, stats["n_flipped"], stats["clean_agreement"], out)
        summary = {**{k: v for k, v in stats.items() if k != "gold_quantiles"}, "dataset": str(out),
                   "chunks_resumed": resumed_all,
                   "label_time_s": round(time.time() - t_start, 2)}
    return dist.broadcast_object(summary)
