"""The PAR reference stage: k reference responses per prompt, sampled once from the initial policy,
scored once by the proxy members, cached in the run directory (Fu et al. 2025, arXiv:2502.18770).

    prompts the run draws ──▶ chunks ──▶ sample k responses each ──▶ member scores ──▶ <run>/par_references/
    (+ the eval prompts)      of 32      (the frozen reference,       (K, k) a prompt   <split>_<chunk>.json
                                         ppo.temperature/max_new)

Chunk c of a split ("train" or "eval") always covers prompts [32 c, 32 (c + 1)) of that split and
is sampled under a generator of (seed, split, c) alone, whichever rank draws it: the references do
not depend on the rank count, and a chunk on disk is read back, never sampled again (a resumed run,
or one asked for more ppo.steps that draws prompts of new chunks, samples only the missing ones).
Rank 0 decides which chunks are missing; each rank samples an equal share (under ZeRO-3 every rank
must join every gathered generation), the shares are gathered to every rank and rank 0 writes them.

Member scores are cached, not the aggregate, so a chunk holds what the proxies said; the driver
aggregates them with the run's rule (`ParReferences.aggregated`) into the (n, k) reference scores
that `shaping.par_reward` compares against.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from rlhf_overopt.errors import InputError, check_finite
from rlhf_overopt.rollout import generate
from rlhf_overopt.run import dist, seeds
from rlhf_overopt.run.directory import atomic_write_json
from rlhf_overopt.run.engines import gathered

log = logging.getLogger("rlhf_overopt")

REFERENCE_DIR = "par_references"
"""The cached reference chunks, under the run directory."""
CHUNK_PROMPTS = 32
"""Prompts per reference chunk (fixed: a chunk's file name is its place in the split)."""
SPLITS = ("train", "eval")


def chunk_path(root: Path, split: str, chunk: int) -> Path:
    """Where chunk `chunk` of `split` is stored, named by its global index (any rank count reads it)."""
    return root / REFERENCE_DIR / f"{split}_{chunk:05d}.json"


def chunk_range(split_size: int, chunk: int) -> range:
    """Prompt indices of chunk `chunk`: [CHUNK_PROMPTS * chunk, CHUNK_PROMPTS * (chunk + 1)) within the split."""
    return range(chunk * CHUNK_PROMPTS, min((chunk + 1) * CHUNK_PROMPTS, split_size))


def drawn_chunks(n_prompts: int, prompts_per_step: int, seed: int, steps: int) -> list[int]:
    """Train chunks holding a prompt that iterations 0..steps-1 draw (seeds.prompt_draw's global draw)."""
    drawn: set[int] = set()
    for step in range(steps):
        drawn.update(i // CHUNK_PROMPTS for i in seeds.prompt_draw(n_prompts, prompts_per_step, seed, step, 0,
                                                                   prompts_per_step))
    return sorted(drawn)


def reference_generator(seed: int, split: str, chunk: int, device: torch.device) -> torch.Generator:
    """Sampling generator of reference chunk `chunk` of `split`: free of the rank and the step."""
    salt = 2_502_187 + SPLITS.index(split)
    return torch.Generator(device=device).manual_seed(int(seeds.step_generator(seed, salt, chunk).initial_seed()))


@dataclass
class ParReferences:
    """Member scores of the k references of every prompt of a split that has them.

    member_scores: (n, K, k), NaN for prompts of chunks the run never draws.
    """

    member_scores: dict[str, torch.Tensor]
    k: int

    def aggregated(self, split: str, aggregate_fn) -> torch.Tensor:
        """(n, k) aggregated reference scores r(x, y_ref,j) of `split` (NaN where not sampled)."""
        scores = self.member_scores[split]  # (n, K, k)
        n, members, k = scores.shape
        flat = scores.permute(1, 0, 2).reshape(members, n * k)
        return aggregate_fn(flat).reshape(n, k)


def lookup(reference_scores: torch.Tensor, indices: list[int], split: str) -> torch.Tensor:
    """The (B, k) rows of `reference_scores` for prompt `indices`; a prompt without references is an error."""
    rows = reference_scores[torch.tensor(indices, dtype=torch.long)]
    if torch.isnan(rows).any():
        missing = sorted({indices[i] for i in torch.isnan(rows).any(dim=1).nonzero().flatten().tolist()})
        raise RuntimeError(f"PAR: {split} prompt(s) {missing[:5]} have no cached references")
    return rows


def _load_chunk(path: Path, prompts: list[str], k: int, n_members: int) -> dict[str, Any]:
    record = json.loads(path.read_text(encoding="utf-8"))
    scores = record.get("member_scores", [])
    if record.get("prompts") != prompts or record.get("k") != k or len(scores) != n_members or any(
            len(s) != len(prompts) * k for s in scores):
        raise InputError(f"{path}: holds other PAR references than this run's (prompts, "
                         f"aggregate.par_references={k} or the {n_members} proxy members changed); "
                         "remove the folder or start a new run")
    return record


def _sample_chunk(model, tokenizer, ensemble, prompts: list[str], *, k: int, max_new_tokens: int,
                  temperature: float, generator: torch.Generator, batch_size: int) -> dict[str, Any]:
    """k responses per prompt (prompt-major) and their (K, len(prompts) * k) member scores."""
    repeated = [p for p in prompts for _ in range(k)]
    ro = generate(model, tokenizer, repeated, max_new_tokens=max_new_tokens, temperature=temperature,
                  generator=generator, batch_size=batch_size)
    ended = ro.ended.cpu().tolist()
    scores = ensemble.score_texts(ro.prompts, ro.responses, ended).float().cpu()
    for i in range(scores.shape[0]):
        check_finite(scores[i], f"PAR reference score of proxy member {i}", 0)
    return {"prompts": prompts, "k": k, "responses": ro.responses, "ended": [bool(e) for e in ended],
            "member_scores": scores.tolist()}


def _all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return [obj]
    parts: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(parts, obj)
    return parts


def gather_list(items: list[Any]) -> list[Any]:
    """Every rank's list concatenated in rank order (e.g. the whole eval split from the shares)."""
    return [x for part in _all_gather(items) for x in part]


def ensure_references(*, run_root: Path, reference, tokenizer, ensemble, splits: dict[str, list[str]],
                      train_chunks: list[int], k: int, max_new_tokens: int, temperature: float, seed: int,
                      zero_stage: int, batch_size: int, info) -> ParReferences:
    """The run's PAR references: read from <run>/par_references/, the missing chunks sampled first.

    splits: {"train": every train prompt, "eval": every eval prompt (all ranks' shares)}; the
    train split gets `train_chunks` (drawn_chunks), the eval split all its chunks. `reference` is
    the frozen initial policy. The same ParReferences on every rank.
    """
    wanted = [("train", c) for c in train_chunks]
    wanted += [("eval", c) for c in range(math.ceil(len(splits["eval"]) / CHUNK_PROMPTS))]
    # 1. which chunks are missing: decided once, on rank 0 (which alone writes), for every rank
    missing = dist.broadcast_object([w for w in wanted if not chunk_path(run_root, *w).exists()])
    # 2. sample this rank's equal share (padded with a repeat, dropped, so collectives stay in step)
    per = math.ceil(len(missing) / info.world_size)
    share = [missing[i] if i < len(missing) else None for i in range(info.rank * per, (info.rank + 1) * per)]
    sampled: dict[tuple[str, int], dict[str, Any]] = {}
    if per:
        log.info("PAR: sampling %d reference chunk(s) of %d prompts x %d responses over %d rank(s) "
                 "(%d on disk)", len(missing), CHUNK_PROMPTS, k, info.world_size, len(wanted) - len(missing))
        with gathered(reference, zero_stage):
            for item in share:
                if item is None and zero_stage != 3:
                    continue  # padding is needed only where every rank must join every forward
                split, c = item if item is not None else missing[0]
                prompts = [splits[split][i] for i in chunk_range(len(splits[split]), c)]
                record = _sample_chunk(reference, tokenizer, ensemble, prompts, k=k, max_new_tokens=max_new_tokens,
                                       temperature=temperature, batch_size=batch_size,
                                       generator=reference_generator(seed, split, c, info.device))
                if item is not None:
                    sampled[item] = record
    # 3. gather every rank's chunks; rank 0 writes them
    for part in _all_gather(sampled):
        sampled.update(part)
    if info.is_main:
        for (split, c), record in sampled.items():
            atomic_write_json(chunk_path(run_root, split, c), {**record, "split": split, "chunk": c})
    if not per:
        log.info("PAR: %d reference chunk(s) read from %s", len(wanted), run_root / REFERENCE_DIR)
    # 4. every wanted chunk, sampled now or read back, into (n, K, k) per split
    members = ensemble.k
    out = {s: torch.full((len(splits[s]), members, k), math.nan) for s in SPLITS}
    for split, c in wanted:
        idx = chunk_range(len(splits[split]), c)
        prompts = [splits[split][i] for i in idx]
        record = sampled.get((split, c)) or _load_chunk(chunk_path(run_root, split, c), prompts, k, members)
        scores = torch.tensor(record["member_scores"], dtype=torch.float32)  # (K, len(idx) * k)
        out[split][idx.start:idx.stop] = scores.reshape(members, len(idx), k).permute(1, 0, 2)
    return ParReferences(out, k)


def run_references(ctx, actors, tokenizer, ensemble, objective, *, train_prompts: list[str], eval_share: list[str],
                   prompts_per_step: int, zero_stage: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """A PPO/GRPO/RLOO run's PAR references under aggregate.shaping=par, else (None, None): the
    aggregated reference scores (P_train, k) of every train prompt the run's steps draw, and (this
    rank's eval prompts, k), sampled once from the frozen initial policy and cached in the run."""
    cfg, info, p = ctx.cfg, ctx.dist, ctx.cfg.ppo
    if cfg.aggregate.shaping != "par":
        return None, None
    eval_all = gather_list(eval_share)
    refs = ensure_references(
        run_root=ctx.run.root, reference=actors.reference, tokenizer=tokenizer, ensemble=ensemble,
        splits={"train": train_prompts, "eval": eval_all},
        train_chunks=drawn_chunks(len(train_prompts), prompts_per_step, cfg.seed, p.steps),
        k=cfg.aggregate.par_references, max_new_tokens=p.max_new_tokens, temperature=p.temperature, seed=cfg.seed,
        zero_stage=zero_stage, batch_size=cfg.eval.batch_size, info=info)
    eval_refs = refs.aggregated("eval", objective)[dist.shard_indices(len(eval_all), info.rank, info.world_size)]
    return refs.aggregated("train", objective), eval_refs
