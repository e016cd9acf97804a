import pytest
import torch

from rlhf_overopt.ops.advantages import gae


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


# -- GRPO / Dr. GRPO / RLOO advantages and the per-token reward, worked by hand ----------------

def test_group_advantages_hand():
    from rlhf_overopt.ops.advantages import group_advantages

    # group 1: rewards 1, 2, 3 -> mean 2, sample std 1 -> (-1, 0, 1) / (1 + eps)
    # group 2: rewards 5, 5, 5 -> all equal -> 0 (no learning signal)
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    got = group_advantages(r, 3, eps=1e-4)
    assert torch.allclose(got, torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, 0.0, 0.0, 0.0]))
    # Dr. GRPO drops the std: r - mean
    assert torch.equal(group_advantages(r, 3, std_normalize=False), torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    # group of 2: rewards 0, 4 -> mean 2, sample std sqrt(8) = 2.828 -> -/+ 2 / 2.828 = 0.7071
    got = group_advantages(torch.tensor([0.0, 4.0]), 2, eps=0.0)
    assert torch.allclose(got, torch.tensor([-0.70711, 0.70711]), atol=1e-5)


def test_leave_one_out_advantages_hand():
    from rlhf_overopt.ops.advantages import leave_one_out_advantages

    # rewards 1, 2, 6 (one group of 3): baselines (2+6)/2 = 4, (1+6)/2 = 3.5, (1+2)/2 = 1.5
    got = leave_one_out_advantages(torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0]), 3)
    # second group 0, 0, 3: baselines 1.5, 1.5, 0
    assert torch.equal(got, torch.tensor([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0]))
    # = G / (G - 1) * (r - mean): 3/2 * (1 - 3) = -3
    r = torch.randn(12)
    assert torch.allclose(leave_one_out_advantages(r, 4),
                          4 / 3 * (r.view(3, 4) - r.view(3, 4).mean(1, keepdim=True)).reshape(-1), atol=1e-6)


def test_constant_groups_get_exactly_zero_advantage():
    """All-equal rewards have no learning signal; in float32 the group mean of 16 x 9.9 is an ulp off
    (9.9 - mean = -9.5e-7) and the std of one such group ~1e-6, so (r - mean) / (std + 1e-4) gave
    -0.0094 for every member (-0.37 at 1000.1), and RLOO's r_i - mean_{j != i} gave -6.1e-5 at 1000.1."""
    from rlhf_overopt.ops.advantages import group_advantages, leave_one_out_advantages

    for value in (9.9, 1000.1):
        r = torch.full((16,), value)
        assert torch.equal(group_advantages(r, 16), torch.zeros(16))
        assert torch.equal(group_advantages(r, 16, std_normalize=False), torch.zeros(16))
        assert torch.equal(leave_one_out_advantages(r, 16), torch.zeros(16))
    # beside a varying group: the constant group is 0, the other one untouched (mean 2, std 1)
    mixed = torch.tensor([9.9, 9.9, 9.9, 1.0, 2.0, 3.0])
    assert torch.equal(group_advantages(mixed, 3, eps=0.0), torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0, 1.0]))


def test_constant_group_fraction():
    """One test, max == min, counts the groups with no learning signal. `std == 0` (the driver's old
    test) missed a lone constant group: torch's std of one row of 16 x 9.9 is 9.8e-7, not 0."""
    from rlhf_overopt.ops.advantages import constant_group_fraction, constant_groups

    lone = torch.full((16,), 9.9)
    assert float(constant_group_fraction(lone, 16)) == 1.0
    assert float((lone.reshape(-1, 16).std(dim=1) == 0).float().mean()) == 0.0  # what the old test saw
    # groups of 4: constant, varying, constant (1000.1), varying by one ulp-sized step -> 2 of 4
    r = torch.tensor([9.9] * 4 + [0.0, 1.0, 2.0, 3.0] + [1000.1] * 4 + [5.0, 5.0, 5.0, 5.0000005])
    assert constant_groups(r, 4).tolist() == [True, False, True, False]
    assert float(constant_group_fraction(r, 4)) == 0.5


def test_group_advantages_reject_partial_groups():
    from rlhf_overopt.ops.advantages import group_advantages, leave_one_out_advantages

    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(torch.zeros(6), 4)
    with pytest.raises(ValueError, match="groups of 1"):
        leave_one_out_advantages(torch.zeros(3), 1)


def test_token_rewards_hand():
    from rlhf_overopt.ops.advantages import stream_token_rewards, token_rewards

    # two responses of 3 and 2 tokens; KL per token k, beta 0.5; scores 1 and -2 at the last token
    kl = torch.tensor([[0.2, 0.4, 0.6], [1.0, -0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    got = token_rewards(torch.tensor([1.0, -2.0]), kl, 0.5, mask)
    assert torch.allclose(got, torch.tensor([[-0.1, -0.2, -0.3 + 1.0], [-0.5, 0.1 - 2.0, 0.0]]))
    streams = stream_token_rewards(torch.tensor([[1.0, -2.0], [3.0, 4.0]]), kl, mask)
    assert streams.shape == (3, 2, 3)
    assert torch.equal(streams[0], -kl)
    assert torch.equal(streams[2], torch.tensor([[0.0, 0.0, 3.0], [0.0, 4.0, 0.0]]))
    # the linear combination of streams is token_rewards of the combined score
    combined = 0.5 * streams[0] + streams[1]
    assert torch.allclose(combined, got)
