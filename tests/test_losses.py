import math

import pytest
import torch

from rlhf_overopt.ops.losses import (
    bradley_terry_loss,
    madpo_weights,
    ppo_policy_loss,
    ppo_value_loss,
    preference_loss,
)


def t64(values: list) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# ---------------------------------------------------------------- PPO policy loss


def test_ppo_policy_loss_hand():
    # ratios [1.5, 0.5, 1.0], advantages [1, 1, -1], clip 0.2
    #   t0: -A*rho = -1.5, -A*clip = -1.2 -> max -1.2 (clipped)
    #   t1: -0.5, -0.8 -> -0.5
    #   t2: 1, 1 -> 1 (equal, not counted as clipped)
    # loss = (-1.2 - 0.5 + 1)/3 = -0.7/3 ; clipfrac 1/3 ; ratio_mean 1
    # approx_kl = 0.5 * (log(1.5)^2 + log(0.5)^2 + 0)/3
    logprobs = t64([[math.log(1.5), math.log(0.5), 0.0]])
    old = torch.zeros(1, 3, dtype=torch.float64)
    adv = t64([[1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3)
    loss, stats = ppo_policy_loss(logprobs, old, adv, mask, 0.2)
    assert loss.item() == pytest.approx(-0.7 / 3)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["ratio_mean"].item() == pytest.approx(1.0)
    assert stats["approx_kl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 3)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_ppo_policy_loss_negative_advantage_clips_low_ratio():
    # ratio 0.5, A = -1: -A*rho = 0.5, -A*clip(rho) = 0.8 -> 0.8 (clipped)
    # ratio 1.1, A = -2: 2.2 vs 2.2 (inside the clip range) -> 2.2
    # loss = (0.8 + 2.2)/2 = 1.5 ; clipfrac 0.5
    logprobs = t64([[math.log(0.5), math.log(1.1)]])
    loss, stats = ppo_policy_loss(
        logprobs, torch.zeros_like(logprobs), t64([[-1.0, -2.0]]), torch.ones(1, 2), 0.2
    )
    assert loss.item() == pytest.approx(1.5)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_ppo_clipped_ratio_has_zero_gradient():
    # ratio 1.5 > 1 + eps with A > 0: clipped term is constant -> zero gradient.
    # ratio 0.5 with A > 0: unclipped, d/dlogp (-A * rho)/2 = -A * rho / 2 = -0.25.
    logprobs = t64([[math.log(1.5), math.log(0.5)]]).requires_grad_()
    loss, _ = ppo_policy_loss(
        logprobs, torch.zeros(1, 2, dtype=torch.float64), t64([[1.0, 1.0]]), torch.ones(1, 2), 0.2
    )
    loss.backward()
    assert logprobs.grad[0, 0].item() == 0.0
    assert logprobs.grad[0, 1].item() == pytest.approx(-0.25)


def test_ppo_policy_loss_ignores_masked_positions():
    torch.manual_seed(0)
    logprobs = torch.randn(3, 5, dtype=torch.float64) * 0.1
    old = logprobs + torch.randn(3, 5, dtype=torch.float64) * 0.3
    adv = torch.randn(3, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    lp1 = logprobs.clone().requires_grad_()
    loss1, stats1 = ppo_policy_loss(lp1, old, adv, mask, 0.2)
    loss1.backward()
    lp2 = logprobs.clone()
    old2 = old.clone()
    adv2 = adv.clone()
    lp2[mask == 0] = -float("inf")
    old2[mask == 0] = 50.0
    adv2[mask == 0] = float("nan")
    lp2.requires_grad_()
    loss2, stats2 = ppo_policy_loss(lp2, old2, adv2, mask, 0.2)
    loss2.backward()
    torch.testing.assert_close(loss1, loss2)
    for key in stats1:
        torch.testing.assert_close(stats1[key], stats2[key])
    torch.testing.assert_close(lp1.grad, lp2.grad)
    assert (lp2.grad[mask == 0] == 0).all()


# ---------------------------------------------------------------- PPO value loss


def test_ppo_value_loss_hand():
    # values [1, 1, 2], old [0.5, 0.5, 2], returns [0, 2, 3], clip 0.2 -> clipped values [0.7, 0.7, 2]
    #   t0: (1-0)^2 = 1,   (0.7-0)^2 = 0.49 -> 1
    #   t1: (1-2)^2 = 1,   (0.7-2)^2 = 1.69 -> 1.69 (clipped)
    #   t2: (2-3)^2 = 1,   (2-3)^2 = 1      -> 1
    # loss = 0.5 * 3.69/3 = 0.615 ; vf_clipfrac 1/3 ; without clipping 0.5 * 3/3 = 0.5
    values = t64([[1.0, 1.0, 2.0]])
    old = t64([[0.5, 0.5, 2.0]])
    returns = t64([[0.0, 2.0, 3.0]])
    mask = torch.ones(1, 3)
    loss, stats = ppo_value_loss(values, old, returns, mask, 0.2)
    assert loss.item() == pytest.approx(0.615)
    assert stats["vf_clipfrac"].item() == pytest.approx(1 / 3)
    loss_noclip, stats_noclip = ppo_value_loss(values, old, returns, mask, None)
    assert loss_noclip.item() == pytest.approx(0.5)
    assert stats_noclip["vf_clipfrac"].item() == 0.0


def test_ppo_value_loss_ignores_masked_positions():
    torch.manual_seed(1)
    values = torch.randn(2, 4, dtype=torch.float64)
    old = values + 0.3 * torch.randn(2, 4, dtype=torch.float64)
    returns = torch.randn(2, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    loss1, _ = ppo_value_loss(values, old, returns, mask, 0.2)
    values2, returns2 = values.clone(), returns.clone()
    values2[mask == 0] = 1e4
    returns2[mask == 0] = float("nan")
    loss2, _ = ppo_value_loss(values2, old, returns2, mask, 0.2)
    torch.testing.assert_close(loss1, loss2)


# ---------------------------------------------------------------- Bradley-Terry


def test_bradley_terry_hand():
    # chosen [1, 0], rejected [0, 2]: margins [1, -2]
    # -log sigmoid(1) = log(1 + e^-1) = 0.3132617 ; -log sigmoid(-2) = log(1 + e^2) = 2.1269280
    # mean 1.2200948 ; accuracy 1/2
    # offset eta 0.1: (1 + 0)^2 = 1, (0 + 2)^2 = 4, mean 2.5 -> +0.25
    chosen, rejected = t64([1.0, 0.0]), t64([0.0, 2.0])
    loss, acc = bradley_terry_loss(chosen, rejected)
    expected = (math.log1p(math.exp(-1)) + math.log1p(math.exp(2))) / 2
    assert loss.item() == pytest.approx(expected)
    assert loss.item() == pytest.approx(1.2200948, abs=1e-6)
    assert acc.item() == 0.5
    loss_eta, _ = bradley_terry_loss(chosen, rejected, offset_eta=0.1)
    assert loss_eta.item() == pytest.approx(expected + 0.25)


def test_bradley_terry_shapes():
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError):
        bradley_terry_loss(torch.zeros(2), torch.zeros(3))


# ---------------------------------------------------------------- DPO / IPO / SLiC

# beta 0.5; chosen log-ratios [1, 0]; rejected log-ratios [-1, 1]; h = [2, -1]
POLICY_CHOSEN = t64([-1.0, -2.0])
POLICY_REJECTED = t64([-3.0, -1.0])
REF_CHOSEN = t64([-2.0, -2.0])
REF_REJECTED = t64([-2.0, -2.0])


def test_dpo_hand():
    # -log sigmoid(beta h) = -log sigmoid([1, -0.5]) = [log(1 + e^-1), log(1 + e^0.5)]
    #                      = [0.3132617, 0.9740770]; mean 0.6436693
    loss, per_pair, chosen_r, rejected_r = preference_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5
    )
    torch.testing.assert_close(per_pair, t64([math.log1p(math.exp(-1)), math.log1p(math.exp(0.5))]))
    assert loss.item() == pytest.approx(0.6436693, abs=1e-6)
    # rewards: beta * log-ratio = [0.5, 0] and [-0.5, 0.5]
    torch.testing.assert_close(chosen_r, t64([0.5, 0.0]))
    torch.testing.assert_close(rejected_r, t64([-0.5, 0.5]))


def test_ipo_hand():
    # (h - 1/(2 beta))^2 = ([2, -1] - 1)^2 = [1, 4]; mean 2.5
    loss, per_pair, _, _ = preference_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, loss_type="ipo"
    )
    torch.testing.assert_close(per_pair, t64([1.0, 4.0]))
    assert loss.item() == pytest.approx(2.5)


def test_slic_hand():
    # max(0, 1 - beta h) = max(0, [0, 1.5]) = [0, 1.5]; mean 0.75
    loss, per_pair, _, _ = preference_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, loss_type="slic"
    )
    torch.testing.assert_close(per_pair, t64([0.0, 1.5]))
    assert loss.item() == pytest.approx(0.75)


def test_weighted_dpo_hand():
    # weights [2, 0.5]: (2 * 0.3132617 + 0.5 * 0.9740770)/2 = 0.5567810
    loss, _, _, _ = preference_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, weights=t64([2.0, 0.5])
    )
    assert loss.item() == pytest.approx(0.5567810, abs=1e-6)
    with pytest.raises(ValueError):
        preference_loss(
            POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, weights=t64([1.0])
        )


def test_preference_loss_rewards_detached_and_gradients():
    pc = POLICY_CHOSEN.clone().requires_grad_()
    pr = POLICY_REJECTED.clone().requires_grad_()
    loss, _, chosen_r, rejected_r = preference_loss(pc, pr, REF_CHOSEN, REF_REJECTED, beta=0.5)
    assert not chosen_r.requires_grad and not rejected_r.requires_grad
    loss.backward()
    # DPO raises the chosen log-prob and lowers the rejected one
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_preference_loss_bad_type():
    with pytest.raises(ValueError, match="kto"):
        preference_loss(POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, 0.1, loss_type="kto")


# ---------------------------------------------------------------- MADPO weights


def test_madpo_weights_hand():
    # c_max 2, c_min 0.5, lam 1, tau ln 999; (c_max - 1)/(1 - c_min) = 2
    # h = 0.5: c = 0.5 + 1.5 / (1 + 2 exp(0.5 - 6.9068)) = 1.99506; sigmoid(0.99753)/sigmoid(0.5) = 1.174
    # h = 1:   c = 1.99188; sigmoid(1.99188)/sigmoid(1) = 1.204
    # h = -1:  c = 1.99188; sigmoid(-1.99188)/sigmoid(-1) = 0.12003/0.26894 = 0.446
    # h = 8:   c = 0.5 + 1.5 / (1 + 2 exp(1.0932)) = 0.7153; sigmoid(5.722)/sigmoid(8) = 0.997
    # h = -8 < -tau: w = 1
    h = t64([0.0, 0.5, 1.0, -1.0, 8.0, -8.0])
    w = madpo_weights(h)
    torch.testing.assert_close(w, t64([1.0, 1.174, 1.204, 0.446, 0.997, 1.0]), atol=1e-3, rtol=0)


def test_madpo_weights_detached_and_validated():
    h = t64([0.3, -2.0]).requires_grad_()
    w = madpo_weights(h)
    assert not w.requires_grad
    with pytest.raises(ValueError, match="c_max"):
        madpo_weights(h, c_max=1.0)
    with pytest.raises(ValueError, match="c_min"):
        madpo_weights(h, c_max=2.0, c_min=1.0)
    with pytest.raises(ValueError, match="c_min"):
        madpo_weights(h, c_max=2.0, c_min=0.0)


def test_madpo_weights_large_margins_are_finite():
    h = t64([-1e4, -6.9, 6.9, 1e4, 50.0])
    w = madpo_weights(h)
    assert torch.isfinite(w).all()
    assert w[0].item() == 1.0
    assert w[3].item() == pytest.approx(1.0)


def test_madpo_weights_feed_weighted_dpo():
    # MADPO loss = mean_i w(h_i) * (-log sigmoid(beta h_theta_i))
    margins = t64([0.5, -1.0])
    w = madpo_weights(margins)
    loss, per_pair, _, _ = preference_loss(
        POLICY_CHOSEN, POLICY_REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5, weights=w
    )
    assert loss.item() == pytest.approx((w * per_pair).mean().item())


# -- GRPO loss normalizations, worked by hand ---------------------------------------------------

def test_normalize_token_loss_hand():
    from rlhf_overopt.ops.losses import normalize_token_loss

    # response 1: 3 tokens with losses 1, 2, 3 (sum 6); response 2: 1 token with loss 4 (sum 4)
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # sequence (GRPO): mean of per-response means = (6/3 + 4/1) / 2 = 3
    assert normalize_token_loss(per_token, mask, "sequence").item() == pytest.approx(3.0)
    # token: one mean over the 4 valid tokens = 10 / 4
    assert normalize_token_loss(per_token, mask, "token").item() == pytest.approx(2.5)
    # constant (Dr. GRPO), L = 5: (6/5 + 4/5) / 2 = 1
    assert normalize_token_loss(per_token, mask, "constant", 5).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown loss normalization"):
        normalize_token_loss(per_token, mask, "mean")


def test_ppo_policy_loss_is_the_token_mean_of_the_clipped_surrogate():
    from rlhf_overopt.ops.losses import clipped_surrogate, normalize_token_loss, ppo_policy_loss

    g = torch.Generator().manual_seed(0)
    logp, old, adv = (torch.randn(3, 5, generator=g) for _ in range(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    per_token, _ = clipped_surrogate(logp, old, adv, mask, 0.2)
    assert torch.all(per_token[mask == 0] == 0)
    loss, _ = ppo_policy_loss(logp, old, adv, mask, 0.2)
    assert torch.equal(loss, normalize_token_loss(per_token, mask, "token"))
