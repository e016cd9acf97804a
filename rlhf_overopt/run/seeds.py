"""Every seed a run draws from, in one place: a resumed run repeats exactly what an uninterrupted
one does because each random draw comes from a generator determined by (seed, step, rank) alone.

    step_generator(seed, *parts)      CPU generator for data order (prompt draws, minibatch order)
    rollout_generator(...)            sampling of one iteration's rollouts on this rank
    eval_generator(...)               sampling at evaluation: the same draw at every evaluation
                                      (common random numbers), so steps differ by the policy alone
    pool_generator(...)               the best-of-n pool of this rank
    label_generator(seed, chunk, ...) sampling of label_preferences chunk `chunk` (no rank: a chunk
                                      is sampled alike whichever rank draws it)
    label_flip_seed(seed)             the label-noise draw over all gathered pairs
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch's global generators (each rank passes seed + rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator determined by (seed, parts) alone: the basis of exact resume."""
    value = seed
    for p in parts:
        value = (value * 1_000_003 + p + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def rollout_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    """Sampling generator of iteration `step`'s rollouts on `rank`."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step * 7919 + rank)


def eval_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """Sampling generator of an evaluation on `rank`, the same at every evaluation."""
    return torch.Generator(device=device).manual_seed(seed * 7919 + rank)


def pool_generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """Sampling generator of this rank's best-of-n pool."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + rank)


def label_generator(seed: int, chunk: int, device: torch.device) -> torch.Generator:
    """Sampling generator of label_preferences chunk `chunk` (a global index over the prompts).

    Deliberately free of the rank: which rank samples a chunk depends on the rank count, and the
    labelled dataset must not."""
    return torch.Generator(device=device).manual_seed(
        int(step_generator(seed, 104_729, chunk).initial_seed()))


def label_flip_seed(seed: int) -> int:
    """Seed of the label-noise flips, drawn once over the whole gathered set of pairs."""
    return int(step_generator(seed, 104_729, -2).initial_seed())


def prompt_draw(n_prompts: int, batch_size: int, seed: int, step: int, rank: int, local_batch: int) -> list[int]:
    """Indices of this rank's contiguous share of iteration `step`'s global draw of `batch_size`
    prompts (without replacement) from `n_prompts`."""
    draw = torch.randperm(n_prompts, generator=step_generator(seed, step))[:batch_size]
    return [int(i) for i in draw[rank * local_batch:(rank + 1) * local_batch]]


def batch_indices(step: int, steps_per_epoch: int, batch_size: int, n_pairs: int, seed: int, rank: int,
                  world: int) -> torch.Tensor:
    """This rank's contiguous share of the step's global batch; the epoch's permutation depends on
    (seed, epoch) only."""
    epoch, position = divmod(step, steps_per_epoch)
    order = torch.randperm(n_pairs, generator=step_generator(seed, epoch))
    batch = order[position * batch_size:(position + 1) * batch_size]
    local = batch_size // world
    return batch[rank * local:(rank + 1) * local]
