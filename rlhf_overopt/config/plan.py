"""Derived sizes, computed once with exact division: how a config's global batch sizes split over
ranks and minibatches, how many optimizer updates a run makes, when it evaluates and saves.

    make_plan(cfg, world_size)      RL methods (ppo.* rollouts: PPO, GRPO/RLOO, composite methods)
    preference_schedule(...)        DPO family, once the number of pairs is known

A size that does not divide exactly is a configuration error, raised before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf_overopt.config.methods import METHODS
from rlhf_overopt.errors import ConfigError


def _exact(total: int, parts: int, key: str, what: str) -> int:
    if parts <= 0 or total % parts:
        raise ConfigError(f"{key}: {total} cannot be split evenly into {parts} {what}")
    return total // parts


@dataclass(frozen=True)
class Plan:
    """Sizes of one RL run on `world_size` ranks."""

    world_size: int
    local_batch: int
    """Rollouts per rank per iteration (ppo.batch_size / world_size)."""
    micro_batch: int
    """Rollouts per rank per optimizer step (ppo.mini_batch_size / world_size)."""
    updates_per_iteration: int
    """Optimizer steps per iteration: ppo_epochs * batch_size / mini_batch_size."""
    total_updates: int
    """Optimizer steps of the whole run (the learning-rate schedule's length)."""
    eval_steps: tuple[int, ...]
    """Iterations after which an evaluation runs (0: the initial policy)."""
    save_steps: tuple[int, ...]
    """Iterations after which a checkpoint is written."""
    eval_per_rank: int
    """Held-out prompts each rank evaluates (eval.n_prompts / world_size)."""
    group_size: int = 1
    """Responses per prompt (GRPO / RLOO; 1 otherwise)."""
    prompts_per_rank: int = 0
    """Distinct prompts per rank per iteration (local_batch / group_size)."""
    loss_normalization: str = "sequence"
    """How the group update averages its token loss: grpo.loss_normalization with auto resolved by method."""


def make_plan(cfg, world_size: int) -> Plan:
    """The plan of an RL method's run (see Plan); ConfigError when a size does not divide."""
    p = cfg.ppo
    local = _exact(p.batch_size, world_size, "ppo.batch_size", "ranks")
    micro = _exact(p.mini_batch_size, world_size, "ppo.mini_batch_size", "ranks")
    minibatches = _exact(p.batch_size, p.mini_batch_size, "ppo.mini_batch_size", "minibatches of the batch")
    group = cfg.grpo.group_size if METHODS[cfg.method].groups else 1
    prompts = _exact(local, group, "grpo.group_size", "whole groups per rank") if group > 1 else local
    loss_normalization = (resolve_loss_normalization(cfg.grpo.loss_normalization, METHODS[cfg.method].advantage)
                          if group > 1 else "sequence")
    every, steps = cfg.eval.every, p.steps
    return Plan(
        world_size=world_size, local_batch=local, micro_batch=micro, updates_per_iteration=p.ppo_epochs * minibatches,
        total_updates=steps * p.ppo_epochs * minibatches,
        eval_steps=tuple(s for s in range(steps + 1) if s % every == 0 or s == steps),
        save_steps=tuple(s for s in range(1, steps + 1) if s % p.save_every == 0 or s == steps),
        eval_per_rank=_exact(cfg.eval.n_prompts, world_size, "eval.n_prompts", "ranks"),
        group_size=group, prompts_per_rank=prompts, loss_normalization=loss_normalization)


AUTO_LOSS_NORMALIZATION = {"group": "sequence", "leave_one_out": "constant"}
"""grpo.loss_normalization=auto by the method's advantage column. GRPO averages each response's token loss
over its length (Shao et al. 2024, Eq. 3). RLOO is REINFORCE: each response's summed token log-prob gradient
times its advantage, averaged over the batch, with no division by the response's length (Ahmadian et al.
2024, §3.2), which is `constant` up to the fixed factor 1 / ppo.max_new_tokens; `sequence` would add GRPO's
length bias (Liu et al. 2025, §3.1)."""


def resolve_loss_normalization(value: str, advantage: str | None) -> str:
    """grpo.loss_normalization as the update uses it: an explicit value as given, auto by the advantage."""
    return AUTO_LOSS_NORMALIZATION[advantage] if value == "auto" else value


def preference_schedule(n_pairs: int, batch_size: int, epochs: float, evals_per_epoch: int
                        ) -> tuple[int, int, list[int]]:
    """(steps per epoch, total steps, evaluation steps) of a DPO-family run. The last partial batch
    of an epoch is dropped; evaluations at step 0, every 1/evals_per_epoch of an epoch, and the last step."""
    steps_per_epoch = n_pairs // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{n_pairs} pairs are fewer than one batch of {batch_size}")
    total = max(1, round(epochs * steps_per_epoch))
    per_eval = steps_per_epoch / evals_per_epoch
    evals = {0, total, *(round(k * per_eval) for k in range(1, math.ceil(total / per_eval)))}
    return steps_per_epoch, total, sorted(evals)
