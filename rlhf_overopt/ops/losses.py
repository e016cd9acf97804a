"""Losses: PPO policy and value losses, Bradley-Terry reward-model loss, direct preference losses
(DPO, IPO, SLiC) and MADPO per-pair weights."""

import math

import torch
import torch.nn.functional as F

from rlhf_overopt.ops.masking import masked_mean

PREFERENCE_LOSS_TYPES: tuple[str, ...] = ("dpo", "ipo", "slic")


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per token, before any averaging.

    `rho = exp(logprobs - old_logprobs)`, `l_t = max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps))`,
    0 where masked. Stats (detached 0-d tensors, token means): clipfrac = fraction of valid tokens
    where the clipped term is the larger; approx_kl = masked_mean(0.5 * (logprobs - old_logprobs)^2);
    ratio_mean.
    Source: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", §3 (Eq. 7).
    logprobs, old_logprobs, advantages, mask: (B, T). Returns ((B, T) per-token loss, stats).
    """
    keep = mask.bool()
    # Zero the masked positions before exp, so garbage there cannot produce inf/NaN gradients.
    logratio = torch.where(keep, logprobs - old_logprobs, torch.zeros_like(logprobs))
    advantages = torch.where(keep, advantages, torch.zeros_like(advantages))
    ratio = torch.exp(logratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.where(keep, torch.maximum(unclipped, clipped), torch.zeros_like(unclipped))
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), keep),
            "approx_kl": masked_mean(0.5 * logratio**2, keep),
            "ratio_mean": masked_mean(ratio, keep),
        }
    return per_token, stats


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate loss averaged over every valid response token of the batch:
    `loss = masked_mean(clipped_surrogate)` (Schulman et al. 2017, Eq. 7).
    logprobs, old_logprobs, advantages, mask: (B, T). Returns (0-d loss, stats of `clipped_surrogate`).
    """
    per_token, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range)
    return masked_mean(per_token, mask.bool()), stats


TOKEN_LOSS_NORMALIZATIONS: tuple[str, ...] = ("sequence", "token", "constant")


def normalize_token_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str, constant: int = 0) -> torch.Tensor:
    """Average a per-token loss into one number, as the GRPO family variants do.

    sequence: `(1/B) sum_i (1/|o_i|) sum_t l_it` — GRPO's objective (Shao et al. 2024, DeepSeekMath,
    Eq. 3), which weighs a token of a short response more than one of a long response;
    token: `sum_it l_it / sum_i |o_i|` — one mean over every valid token (as PPO here and DAPO);
    constant: `(1/B) sum_i (1/L) sum_t l_it` with L = `constant` (the response cap) — Dr. GRPO
    (Liu et al. 2025, §3.1), which removes GRPO's length bias.
    per_token, mask: (B, T). Returns a 0-d tensor.
    """
    keep = mask.bool()
    if mode == "token":
        return masked_mean(per_token, keep)
    sums = torch.where(keep, per_token, torch.zeros_like(per_token)).sum(dim=-1)
    if mode == "sequence":
        return (sums / keep.sum(dim=-1).clamp(min=1).to(per_token.dtype)).mean()
    if mode == "constant":
        if constant < 1:
            raise ValueError(f"constant normalization needs a response cap >= 1, got {constant}")
        return (sums / constant).mean()
    raise ValueError(f"unknown loss normalization {mode!r} (known: {', '.join(TOKEN_LOSS_NORMALIZATIONS)})")


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range_value: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss over valid response tokens.

    `v_clip = old_v + clip(v - old_v, -c, c)`,
    `loss = 0.5 * masked_mean(max((v - R)^2, (v_clip - R)^2))`; with c None, no clipping.
    Stats (detached 0-d): vf_clipfrac = fraction of valid tokens where the clipped term is larger.
    Source: the PPO value clipping of OpenAI baselines ppo2, kept by Ziegler et al. 2019 and the
    RLHF PPO implementations (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO").
    values, old_values, returns, mask: (B, T). Returns (0-d loss, stats).
    """
    keep = mask.bool()
    zeros = torch.zeros_like(values)
    values = torch.where(keep, values, zeros)
    old_values = torch.where(keep, old_values, zeros)
    returns = torch.where(keep, returns, zeros)
    unclipped = (values - returns) ** 2
    if clip_range_value is None:
        clipped = unclipped
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
        clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), keep)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), keep)}
    return loss, stats


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, offset_eta: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bradley-Terry reward-model loss with the optional offset regularizer.

    `loss = mean(-log sigmoid(r+ - r-)) + eta * mean((r+ + r-)^2)`; the second term pins each
    prompt's reward offset so min/median aggregation across members is meaningful.
    accuracy = fraction of pairs with r+ > r- (ties count as wrong), detached.
    Source: Ouyang et al. 2022 / Stiennon et al. 2020 (BT loss); Eisenstein et al. 2023,
    "Helping or Herding?" (arXiv:2312.09244), reward-model
    training (offset regularizer).
    chosen_rewards, rejected_rewards: (B,). Returns (0-d loss, 0-d accuracy).
    """
    if chosen_rewards.dim() != 1 or chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(
            f"chosen {tuple(chosen_rewards.shape)} and rejected {tuple(rejected_rewards.shape)} "
            "rewards must both be (B,)"
        )
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
    if offset_eta != 0.0:
        loss = loss + offset_eta * ((chosen_rewards + rejected_rewards) ** 2).mean()
    accuracy = (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean().detach()
    return loss, accuracy


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "dpo",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct-alignment preference losses on sequence log-probs.

    `h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))`; per pair:
    dpo: `-log sigmoid(beta * h)` (Rafailov et al. 2023, "Direct Preference Optimization", §4);
    ipo: `(h - 1/(2 beta))^2` (Azar et al. 2023, "A General Theoretical Paradigm to Understand
    Learning from Human Preferences", Eq. 17; this is TRL's convention, beta acting as tau. TRL 1.x
    also divides each sequence's log-ratio by its completion length for IPO: pass per-token
    averaged log-probs to match it);
    slic: `max(0, 1 - beta * h)` (Zhao et al. 2023, SLiC-HF; form as in Rafailov et al. 2024,
    "Scaling Laws for RM Overoptimization in Direct Alignment Algorithms").
    loss = mean_i(w_i * per_pair_i), w = 1 unless `weights` is given (MADPO, Rho 2025).
    chosen/rejected rewards = beta * (log pi - log pi_ref), detached.
    All log-prob inputs: (B,); weights: (B,) or None.
    Returns (0-d loss, per_pair_losses (B,), chosen_rewards (B,), rejected_rewards (B,)).
    """
    shape = policy_chosen_logps.shape
    if len(shape) != 1 or any(
        t.shape != shape for t in (policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    ):
        raise ValueError("preference_loss: all log-prob inputs must be (B,) with the same B")
    chosen_logratio = policy_chosen_logps - ref_chosen_logps
    rejected_logratio = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratio - rejected_logratio
    per_pair_fns = {
        "dpo": lambda: -F.logsigmoid(beta * h),
        "ipo": lambda: (h - 1.0 / (2.0 * beta)) ** 2,
        "slic": lambda: torch.relu(1.0 - beta * h),
    }
    if loss_type not in per_pair_fns:
        raise ValueError(
            f"unknown preference loss_type {loss_type!r}; expected one of {PREFERENCE_LOSS_TYPES}"
        )
    per_pair = per_pair_fns[loss_type]()
    if weights is None:
        loss = per_pair.mean()
    else:
        if weights.shape != shape:
            raise ValueError(f"weights shape {tuple(weights.shape)} must be {tuple(shape)}")
        loss = (weights * per_pair).mean()
    chosen_rewards = (beta * chosen_logratio).detach()
    rejected_rewards = (beta * rejected_logratio).detach()
    return loss, per_pair, chosen_rewards, rejected_rewards


def madpo_weights(
    margins: torch.Tensor,
    c_max: float = 2.0,
    c_min: float | None = None,
    lam: float = 1.0,
    tau: float = math.log(999),
) -> torch.Tensor:
    """MADPO per-pair weights from reward-model margins h = r(x, y_w) - r(x, y_l).

    `m = |h|`, `c(m) = c_min + (c_max - c_min) / (1 + ((c_max - 1)/(1 - c_min)) * exp(lam * (m - tau)))`,
    `w(h) = sigmoid(c(m) * h) / sigmoid(h)` where `h > -tau`, else 1. c(m) falls from about c_max
    at small margins to c_min at large ones. c_min defaults to 1 / c_max. The ratio is computed as
    exp of a log-sigmoid difference for stability. Output is detached (weights carry no gradient).
    Source: Rho 2025, "Margin-Adaptive DPO", as in the official code.
    margins: (B,). Returns (B,) in the dtype of margins.
    """
    if c_min is None:
        c_min = 1.0 / c_max
    if not c_max > 1.0:
        raise ValueError(f"madpo_weights: c_max must be > 1, got {c_max}")
    if not 0.0 < c_min < 1.0:
        raise ValueError(f"madpo_weights: c_min must be in (0, 1), got {c_min}")
    h = margins.detach()
    m = h.abs()
    c = c_min + (c_max - c_min) / (1.0 + ((c_max - 1.0) / (1.0 - c_min)) * torch.exp(lam * (m - tau)))
    w = torch.exp(F.logsigmoid(c * h) - F.logsigmoid(h))
    return torch.where(h > -tau, w, torch.ones_like(w))
