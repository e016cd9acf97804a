"""The update stage: optimizer steps of the trained engines on one batch of experience.

    ppo_update         PPO (and the composite methods): ppo_epochs over minibatches, clipped
                       policy loss, clipped value loss on every value head
    group_update       GRPO / RLOO: ppo_epochs over minibatches, clipped policy loss with the
                       response-level advantage, optional k3 KL to the reference in the loss
    preference_step    one optimizer step of the DPO family (DPO / IPO / SLiC, MADPO weights)

Every rank takes an equal share of each minibatch. DeepSpeed averages gradients over ranks, so a
token-mean loss is rescaled by (this rank's tokens / mean tokens per rank): the averaged gradient
is then the masked mean over the global minibatch, as in a one-rank run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from rlhf_overopt.errors import check_finite
from rlhf_overopt.ops.kl import kl_penalty_per_token
from rlhf_overopt.ops.losses import clipped_surrogate, normalize_token_loss, ppo_value_loss, preference_loss
from rlhf_overopt.ops.masking import masked_mean
from rlhf_overopt.records import Rollout
from rlhf_overopt.rollout import sequence_logprobs
from rlhf_overopt.run import dist
from rlhf_overopt.run.engines import checked_step
from rlhf_overopt.values import response_values


def _mean_stats(stats: dict[str, list[float]], values: dict[str, Any]) -> None:
    for key, value in values.items():
        stats.setdefault(key, []).append(float(value.detach()) if torch.is_tensor(value) else float(value))


def ppo_update(policy_engine, value_engine, rollout: Rollout, *, old_logprobs: torch.Tensor,
               old_values: torch.Tensor, returns: torch.Tensor,
               advantages_for: Callable[[torch.Tensor], torch.Tensor], epochs: int, micro_batch: int,
               clip_range: float, clip_range_value: float, vf_coef: float, temperature: float,
               generator: torch.Generator, step: int,
               after_minibatch: Callable[[torch.Tensor], dict[str, float]] | None = None) -> dict[str, float]:
    """`epochs` passes over this rank's batch in minibatches of `micro_batch` rows.

    old_logprobs: (B, Tr); old_values, returns: (S, B, Tr), one row per value head.
    `advantages_for(idx)` gives the minibatch's (b, Tr) advantages, so a combiner may change
    between minibatches (Lagrange multipliers step once per minibatch); `after_minibatch(idx)`
    runs after the policy and value steps and returns stats to average.
    Returns the mean of every statistic over minibatches.
    """
    n = len(rollout)
    n_heads = old_values.shape[0]
    stats: dict[str, list[float]] = {}
    policy_engine.train()
    value_engine.train()
    for _epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, micro_batch):
            idx = order[start:start + micro_batch]
            mb = rollout.select(idx)
            mask = mb.response_mask
            scale = mask.float().sum() / dist.global_token_count(mask).clamp(min=1.0)
            # policy: clipped surrogate, token mean (Schulman et al. 2017, Eq. 7)
            logprobs, entropy = sequence_logprobs(policy_engine, mb.query_ids, mb.query_mask, mb.response_ids,
                                                  mask, temperature=temperature, return_entropy=True)
            per_token, pg_stats = clipped_surrogate(logprobs, old_logprobs[idx], advantages_for(idx), mask,
                                                    clip_range)
            pg_loss = masked_mean(per_token, mask.bool())
            check_finite(pg_loss, "policy loss", step)
            policy_engine.backward(pg_loss * scale)
            checked_step(policy_engine, "policy", step)
            # value: clipped value loss on every head
            values = response_values(value_engine, mb.query_ids, mb.query_mask, mb.response_ids, mask)
            heads_mask = mask.repeat(n_heads, 1)
            vf_loss, vf_stats = ppo_value_loss(values.flatten(0, 1), old_values[:, idx].flatten(0, 1),
                                               returns[:, idx].flatten(0, 1), heads_mask, clip_range_value)
            check_finite(vf_loss, "value loss", step)
            value_engine.backward(vf_coef * vf_loss * scale)
            checked_step(value_engine, "value", step)

            extra = after_minibatch(idx) if after_minibatch is not None else {}
            value_error = masked_mean((values.detach().flatten(0, 1) - returns[:, idx].flatten(0, 1)) ** 2, heads_mask)
            _mean_stats(stats, {"policy_loss": pg_loss, "value_loss": vf_loss,
                                "entropy": masked_mean(entropy.detach(), mask), "value_error": value_error,
                                **pg_stats, **vf_stats, **extra})
    return {k: sum(v) / len(v) for k, v in stats.items()}


def group_update(policy_engine, rollout: Rollout, *, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                 advantages: torch.Tensor, epochs: int, micro_batch: int, clip_range: float, temperature: float,
                 kl_coef: float, loss_normalization: str, max_new_tokens: int, generator: torch.Generator,
                 step: int) -> dict[str, float]:
    """GRPO / RLOO policy update: `epochs` passes over this rank's batch in minibatches.

    The per-token loss is the clipped surrogate with each response's advantage broadcast to its
    tokens, plus `kl_coef` times the k3 estimate `exp(r) - r - 1`, r = log pi_ref - log pi, of the
    KL to the reference (Shao et al. 2024, DeepSeekMath, Eq. 3-4), averaged by
    `normalize_token_loss(loss_normalization)`. old_logprobs, ref_logprobs: (B, Tr);
    advantages: (B,). The sequence and constant normalizations are means over responses, so
    DeepSpeed's average over ranks of equal shares is already the global mean; the token mean is
    rescaled as in `ppo_update`.
    """
    n = len(rollout)
    stats: dict[str, list[float]] = {}
    policy_engine.train()
    for _epoch in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, micro_batch):
            idx = order[start:start + micro_batch]
            mb = rollout.select(idx)
            mask = mb.response_mask
            logprobs, entropy = sequence_logprobs(policy_engine, mb.query_ids, mb.query_mask, mb.response_ids,
                                                  mask, temperature=temperature, return_entropy=True)
            token_adv = advantages[idx].to(logprobs.dtype)[:, None].expand_as(logprobs)
            per_token, pg_stats = clipped_surrogate(logprobs, old_logprobs[idx], token_adv, mask, clip_range)
            kl = kl_penalty_per_token(logprobs, ref_logprobs[idx], "k3")
            loss = normalize_token_loss(per_token + kl_coef * kl if kl_coef else per_token, mask, loss_normalization,
                                        max_new_tokens)
            check_finite(loss, "policy loss", step)
            scale = (mask.float().sum() / dist.global_token_count(mask).clamp(min=1.0)
                     if loss_normalization == "token" else 1.0)
            policy_engine.backward(loss * scale)
            checked_step(policy_engine, "policy", step)
            _mean_stats(stats, {"policy_loss": loss, "entropy": masked_mean(entropy.detach(), mask),
                                "kl_ref_k3": masked_mean(kl.detach(), mask), **pg_stats})
    return {k: sum(v) / len(v) for k, v in stats.items()}


def pair_logprobs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of a PairBatch's chosen and rejected rows: (b,), (b,)."""
    logprobs = sequence_logprobs(model, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
    return logprobs.sum(-1).chunk(2)


def pair_lengths(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Response token counts of a PairBatch's chosen and rejected rows: (b,), (b,) float."""
    return batch.response_mask.sum(-1).float().clamp(min=1.0).chunk(2)


def preference_step(policy_engine, reference, batch, idx: torch.Tensor, ref_logps: torch.Tensor | None,
                    weights: torch.Tensor | None, d, step: int) -> dict[str, float]:
    """One optimizer step of the DPO family on this rank's pairs `batch` (global indices `idx`).

    Log-probs of chosen and rejected under the policy (with gradients) and the reference (from
    `ref_logps (2, M)` when precomputed, else a no-grad forward), optional length normalization,
    the family loss with optional MADPO weights (`d` is the dpo config section), backward and step.
    Returns the step's statistics averaged over ranks: loss, reward accuracy (implicit reward
    margin > 0), chosen and rejected implicit rewards beta * (log pi - log pi_ref), their margin.
    """
    policy_engine.train()
    policy_chosen, policy_rejected = pair_logprobs(policy_engine, batch)
    if ref_logps is not None:
        ref_chosen, ref_rejected = (ref_logps[:, idx].to(policy_chosen.device)).unbind(0)
    else:
        with torch.no_grad():
            ref_chosen, ref_rejected = pair_logprobs(reference, batch)
    if d.length_normalize:
        len_chosen, len_rejected = pair_lengths(batch)
        policy_chosen, ref_chosen = policy_chosen / len_chosen, ref_chosen / len_chosen
        policy_rejected, ref_rejected = policy_rejected / len_rejected, ref_rejected / len_rejected
    w = weights[idx].to(policy_chosen.device) if weights is not None else None
    loss, _, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=d.beta, loss_type=d.loss_type, weights=w)
    check_finite(loss, f"{d.loss_type} loss", step)
    policy_engine.backward(loss)
    checked_step(policy_engine, "policy", step)
    margin = chosen_rewards - rejected_rewards
    local = torch.stack([loss.detach(), (margin > 0).float().mean(), chosen_rewards.mean(),
                         rejected_rewards.mean(), margin.mean()]).cpu()
    means = dist.all_reduce_mean(local)
    return {"loss": float(means[0]), "reward_accuracy": float(means[1]), "chosen_reward": float(means[2]),
            "rejected_reward": float(means[3]), "reward_margin": float(means[4])}
