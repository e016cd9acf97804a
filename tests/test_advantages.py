import torch

from rlhf_overopt.advantages import gae


def gae_naive(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain double loop; a 0 in the mask ends the episode, nothing after it is bootstrapped."""
    B, T = rewards.shape
    advantages = torch.zeros(B, T, dtype=torch.float64)
    returns = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        next_value = 0.0
        next_advantage = 0.0
        for t in reversed(range(T)):
            if mask[b, t] == 0:
                next_value = 0.0
                next_advantage = 0.0
                continue
            delta = rewards[b, t].item() + gamma * next_value - values[b, t].item()
            advantage = delta + gamma * lam * next_advantage
            advantages[b, t] = advantage
            returns[b, t] = advantage + values[b, t].item()
            next_value = values[b, t].item()
            next_advantage = advantage
    return advantages, returns


def test_gae_hand_t3():
    # gamma 0.9, lam 0.5 (gamma * lam = 0.45)
    # row 0, all valid, rewards [0, 0, 1], values [0.5, 0.6, 0.7]:
    #   t=2: delta = 1 + 0 - 0.7 = 0.3                 A = 0.3
    #   t=1: delta = 0 + 0.9*0.7 - 0.6 = 0.03          A = 0.03 + 0.45*0.3 = 0.165
    #   t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04          A = 0.04 + 0.45*0.165 = 0.11425
    #   returns = A + V = [0.61425, 0.765, 1.0]
    # row 1, mask [1, 1, 0], rewards [0, 1, 5], values [0.5, 0.6, 9] (position 2 ignored):
    #   t=2: masked                                     A = 0
    #   t=1: delta = 1 + 0.9*0 - 0.6 = 0.4              A = 0.4
    #   t=0: delta = 0 + 0.9*0.6 - 0.5 = 0.04           A = 0.04 + 0.45*0.4 = 0.22
    #   returns = [0.72, 1.0, 0]
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    torch.testing.assert_close(
        adv, torch.tensor([[0.11425, 0.165, 0.3], [0.22, 0.4, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        ret, torch.tensor([[0.61425, 0.765, 1.0], [0.72, 1.0, 0.0]], dtype=torch.float64)
    )


def test_gae_matches_naive_prefix_masks():
    torch.manual_seed(0)
    B, T = 8, 11
    rewards = torch.randn(B, T, dtype=torch.float64)
    values = torch.randn(B, T, dtype=torch.float64)
    lengths = torch.randint(0, T + 1, (B,))
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    for gamma, lam in [(1.0, 0.95), (0.99, 0.9), (0.5, 0.0), (1.0, 1.0)]:
        adv, ret = gae(rewards, values, mask, gamma, lam)
        adv_ref, ret_ref = gae_naive(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(adv, adv_ref)
        torch.testing.assert_close(ret, ret_ref)


def test_gae_matches_naive_arbitrary_masks():
    torch.manual_seed(1)
    B, T = 6, 9
    rewards = torch.randn(B, T, dtype=torch.float64)
    values = torch.randn(B, T, dtype=torch.float64)
    mask = (torch.rand(B, T) > 0.3).long()
    adv, ret = gae(rewards, values, mask, 0.97, 0.9)
    adv_ref, ret_ref = gae_naive(rewards, values, mask, 0.97, 0.9)
    torch.testing.assert_close(adv, adv_ref)
    torch.testing.assert_close(ret, ret_ref)


def test_gae_gamma1_lam1_is_reward_to_go_minus_value():
    torch.manual_seed(2)
    rewards = torch.randn(3, 5, dtype=torch.float64)
    values = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, 1.0, 1.0)
    masked_rewards = rewards * mask
    reward_to_go = masked_rewards.flip(-1).cumsum(-1).flip(-1) * mask
    torch.testing.assert_close(ret, reward_to_go)
    torch.testing.assert_close(adv, (reward_to_go - values) * mask)


def test_gae_ignores_garbage_after_eos():
    torch.manual_seed(3)
    rewards = torch.randn(4, 6)
    values = torch.randn(4, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 4)
    adv, ret = gae(rewards, values, mask, 1.0, 0.95)
    rewards2 = rewards.clone()
    values2 = values.clone()
    rewards2[:, 3:] = float("nan")
    values2[:, 3:] = 1e6
    adv2, ret2 = gae(rewards2, values2, mask, 1.0, 0.95)
    torch.testing.assert_close(adv, adv2)
    torch.testing.assert_close(ret, ret2)
    assert (adv[:, 3:] == 0).all() and (ret[:, 3:] == 0).all()
