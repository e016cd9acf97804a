import math

import pytest
import torch

from rlhf_overopt.ops.kl import AdaptiveKLController, FixedKLController, kl_penalty_per_token, sequence_kl

# r = logprobs - ref_logprobs = [-1, 0, 0.5]
LOGPROBS = torch.tensor([[-2.0, -1.0, -0.5]], dtype=torch.float64)
REF_LOGPROBS = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)


def test_estimators_hand():
    # k1 = r
    torch.testing.assert_close(
        kl_penalty_per_token(LOGPROBS, REF_LOGPROBS, "k1"),
        torch.tensor([[-1.0, 0.0, 0.5]], dtype=torch.float64),
    )
    # k2 = r^2 / 2 = [0.5, 0, 0.125]
    torch.testing.assert_close(
        kl_penalty_per_token(LOGPROBS, REF_LOGPROBS, "k2"),
        torch.tensor([[0.5, 0.0, 0.125]], dtype=torch.float64),
    )
    # k3 = exp(-r) - 1 + r = [e - 2, 0, exp(-0.5) - 0.5]
    torch.testing.assert_close(
        kl_penalty_per_token(LOGPROBS, REF_LOGPROBS, "k3"),
        torch.tensor([[math.e - 2.0, 0.0, math.exp(-0.5) - 0.5]], dtype=torch.float64),
    )


def test_unknown_estimator_and_shape_mismatch():
    with pytest.raises(ValueError, match="k4"):
        kl_penalty_per_token(LOGPROBS, REF_LOGPROBS, "k4")
    with pytest.raises(ValueError):
        kl_penalty_per_token(LOGPROBS, REF_LOGPROBS[:, :2], "k1")


def test_k3_nonnegative_and_k2_nonnegative():
    torch.manual_seed(0)
    lp = torch.randn(50, 40) * 3
    ref = torch.randn(50, 40) * 3
    assert (kl_penalty_per_token(lp, ref, "k3") >= 0).all()
    assert (kl_penalty_per_token(lp, ref, "k2") >= 0).all()
    # identical distributions give 0 for every estimator
    for est in ("k1", "k2", "k3"):
        assert (kl_penalty_per_token(lp, lp, est) == 0).all()


def test_k1_and_k3_are_unbiased_monte_carlo():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    q = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    true_kl = (p * (p / q).log()).sum().item()  # KL(p || q) ~= 0.2332
    gen = torch.Generator().manual_seed(1)
    samples = torch.multinomial(p, 200_000, replacement=True, generator=gen)
    lp = p.log()[samples][None, :]
    ref = q.log()[samples][None, :]
    for est in ("k1", "k3"):
        mc = kl_penalty_per_token(lp, ref, est).mean().item()
        assert mc == pytest.approx(true_kl, abs=0.01)


def test_sequence_kl_masks_and_sums():
    lp = torch.tensor([[-2.0, -1.0, -0.5], [-2.0, -1.0, float("nan")]], dtype=torch.float64)
    ref = torch.full((2, 3), -1.0, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    # k1 rows: -1 + 0 + 0.5 = -0.5 ; -1 + 0 = -1
    torch.testing.assert_close(
        sequence_kl(lp, ref, mask, "k1"), torch.tensor([-0.5, -1.0], dtype=torch.float64)
    )
    # k2 rows: 0.5 + 0 + 0.125 = 0.625 ; 0.5
    torch.testing.assert_close(
        sequence_kl(lp, ref, mask, "k2"), torch.tensor([0.625, 0.5], dtype=torch.float64)
    )


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 256)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
    with pytest.raises(ValueError):
        FixedKLController(-0.1)


def test_adaptive_controller_hand():
    # target 6, horizon 10000, n_steps 256
    # KL 7: error = 7/6 - 1 = 1/6, coef = 0.1 * (1 + (1/6) * 256 / 10000) = 0.1 * 1.0042667
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(7.0, 256)
    assert ctl.value == pytest.approx(0.1 * (1 + (1 / 6) * 256 / 10000))
    assert ctl.value == pytest.approx(0.10042667, abs=1e-8)


def test_adaptive_controller_clips_error():
    # KL 12: error 12/6 - 1 = 1 clipped to 0.2 -> 0.1 * (1 + 0.2 * 0.0256) = 0.100512
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(torch.tensor(12.0), 256)
    assert ctl.value == pytest.approx(0.100512)
    # KL 0: error -1 clipped to -0.2 -> 0.1 * (1 - 0.2 * 0.0256) = 0.099488
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(0.0, 256)
    assert ctl.value == pytest.approx(0.099488)


def test_adaptive_controller_exact_resume():
    kls = [3.0, 9.0, 6.5, 5.0, 20.0, 0.1]
    full = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    for kl in kls:
        full.update(kl, 64)
    first = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    for kl in kls[:3]:
        first.update(kl, 64)
    resumed = AdaptiveKLController(0.2, target=6.0, horizon=1000)
    resumed.load_state_dict(first.state_dict())
    for kl in kls[3:]:
        resumed.update(kl, 64)
    assert resumed.value == full.value
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
