"""Advantages: generalized advantage estimation over response tokens (PPO), and the group-relative
advantages of GRPO and RLOO with the constant-group test they share."""

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


def token_rewards(score: torch.Tensor, kl_tokens: torch.Tensor, kl_coef: float, mask: torch.Tensor) -> torch.Tensor:
    """The KL-penalised per-token reward of RLHF PPO: `r_t = -beta * KL_t + score * [t = last]`.

    The sequence score (proxy objective) is added at each response's last valid token, and every
    token pays `beta` times its KL estimate to the reference policy.
    Source: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2;
    Stiennon et al. 2020, Eq. 2.
    score: (B,); kl_tokens: (B, T), 0 where masked; mask: (B, T). Returns (B, T).
    """
    from rlhf_overopt.ops.masking import last_index

    rewards = -kl_coef * kl_tokens
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last_index(mask)] += score.to(rewards.device, rewards.dtype)
    return rewards


def stream_token_rewards(scores: torch.Tensor, kl_tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token rewards of S = N + 1 streams for the composite methods: stream 0 is minus the KL
    per token, stream i the score of component i at the last response token.

    Any linear combination `c_0 * stream_0 + sum_i c_i * stream_i` is `token_rewards` of the score
    `sum_i c_i s_i` with beta = c_0, and GAE is linear, so per-stream advantages combine exactly
    (Moskovitz et al. 2023, "Confronting Reward Model Overoptimization with Constrained RLHF", §4).
    scores: (N, B); kl_tokens, mask: (B, T). Returns (S, B, T) in kl_tokens' dtype.
    """
    from rlhf_overopt.ops.masking import last_index

    rewards = torch.zeros((scores.shape[0] + 1, *mask.shape), dtype=kl_tokens.dtype, device=mask.device)
    rewards[0] = -kl_tokens
    rows = torch.arange(mask.shape[0], device=mask.device)
    rewards[1:, rows, last_index(mask)] = scores.to(rewards.device, rewards.dtype)
    return rewards


def group_advantages(rewards: torch.Tensor, group_size: int, *, std_normalize: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantage, one per response: `A_i = (r_i - mean(r_g)) / (std(r_g) + eps)`
    over the G responses of the same prompt; with `std_normalize=False` the Dr. GRPO variant
    `A_i = r_i - mean(r_g)`, which drops the division that favours groups of near-equal rewards.
    std is the sample standard deviation (unbiased, as torch.std and the public implementations).
    A group whose rewards are all equal (`constant_groups`) gets exactly zero advantage (no learning
    signal): in float32 its mean and std are off by an ulp, and (r - mean) / (std + eps) would not be 0
    (-0.0094 for 16 rewards of 9.9, -0.37 for 16 of 1000.1).
    Source: Shao et al. 2024, "DeepSeekMath", §4.1.2 (outcome supervision); Liu et al. 2025,
    "Understanding R1-Zero-Like Training: A Critical Perspective", §3.1.
    rewards: (B,) with the G responses of a prompt contiguous, B = n_groups * G. Returns (B,).
    """
    groups = _grouped(rewards, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if std_normalize:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return _zero_constant(centred, groups).reshape(-1)


def leave_one_out_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO's advantage: each response's reward minus the mean reward of the other G - 1 responses
    to the same prompt, `A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j = G / (G - 1) * (r_i - mean(r_g))`.
    Source: Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for
    Learning from Human Feedback in LLMs", §3.2 (Kool et al. 2019's leave-one-out baseline).
    A group whose rewards are all equal gets exactly zero advantage, as in `group_advantages`.
    rewards: (B,) with groups contiguous. Returns (B,).
    """
    groups = _grouped(rewards, group_size)
    others = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return _zero_constant(groups - others, groups).reshape(-1)


def constant_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups have all rewards equal, `max(r_g) == min(r_g)`: the groups without a learning
    signal in GRPO and RLOO (their advantage is 0 whatever the baseline). Tested exactly, not by
    `std == 0` (a float32 std of equal values can be an ulp above 0).
    rewards: (B,) with the G responses of a prompt contiguous. Returns (B / G,) bool.
    """
    groups = _grouped(rewards, group_size)
    return groups.amax(dim=1) == groups.amin(dim=1)


def constant_group_fraction(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fraction of groups whose rewards are all equal (`constant_groups`), a 0-d float tensor:
    the share of the batch that gives no gradient (Shao et al. 2024; DAPO's dynamic sampling
    filters such groups, Yu et al. 2025, §3.2). rewards: (B,) with groups contiguous."""
    return constant_groups(rewards, group_size).float().mean()


def _zero_constant(advantages: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(n_groups, G) advantages with the rows of constant groups set to exactly 0."""
    constant = constant_groups(groups.reshape(-1), groups.shape[1]).unsqueeze(1)
    return torch.where(constant, torch.zeros_like(advantages), advantages)


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be (B,), got shape {tuple(rewards.shape)}")
    if group_size < 2 or rewards.shape[0] % group_size:
        raise ValueError(f"{rewards.shape[0]} rewards cannot be split into groups of {group_size} (>= 2)")
    return rewards.reshape(-1, group_size)
