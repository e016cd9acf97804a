"""Generalized advantage estimation over response tokens."""

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, batch-vectorized with one reverse loop over T.

    `delta_t = r_t + gamma * V_{t+1} - V_t`,  `A_t = delta_t + gamma * lam * A_{t+1}`,
    `R_t = A_t + V_t` (the value target). Positions with mask 0 (after EOS) are outside the
    episode: the value and advantage after the last valid token are 0 (the episode ends there),
    and advantages and returns at masked positions are 0. Each mask 0 ends the episode, so masks
    are expected to be prefixes (ones, then zeros) as from `response_mask_after_eos`.
    Inputs are used as given; pass detached tensors (the targets carry no gradient in PPO).
    Source: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
    Advantage Estimation", §3; per-token use in RLHF as in Ziegler et al. 2019.
    rewards: (B, T); values: (B, T); mask: (B, T) 0/1; gamma, lam in [0, 1].
    Returns (advantages (B, T), returns (B, T)), in the dtype of rewards.
    """
    if not rewards.shape == values.shape == mask.shape:
        raise ValueError(
            f"rewards {tuple(rewards.shape)}, values {tuple(values.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape"
        )
    if rewards.dim() != 2:
        raise ValueError(f"gae expects (B, T) inputs, got shape {tuple(rewards.shape)}")
    keep = mask.bool()
    zeros = torch.zeros_like(rewards)
    rewards = torch.where(keep, rewards, zeros)
    values = torch.where(keep, values.to(rewards.dtype), zeros)
    T = rewards.shape[-1]
    next_value = zeros[:, 0]
    next_advantage = zeros[:, 0]
    advantages_reversed = []
    for t in reversed(range(T)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(keep[:, t], delta + gamma * lam * next_advantage, zeros[:, 0])
        advantages_reversed.append(advantage)
        next_value = values[:, t]
        next_advantage = advantage
    advantages = torch.stack(advantages_reversed[::-1], dim=-1)
    returns = torch.where(keep, advantages + values, zeros)
    return advantages, returns
