import pytest
import torch

from rlhf_overopt.ops.masking import (
    has_eos,
    last_index,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    response_mask_after_eos,
    whiten_from_moments,
)

EOS = 2


def test_response_mask_after_eos_hand():
    ids = torch.tensor(
        [
            [5, 2, 7, 2],  # EOS at 1: keep 0..1
            [5, 6, 7, 8],  # no EOS: keep all
            [2, 2, 3, 4],  # EOS at 0: keep only 0
            [5, 6, 7, 2],  # EOS at the end
        ]
    )
    mask = response_mask_after_eos(ids, EOS)
    expected = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert mask.dtype == torch.int64
    assert torch.equal(mask, expected)
    assert torch.equal(has_eos(ids, EOS), torch.tensor([True, False, True, True]))


def test_response_mask_matches_loop():
    torch.manual_seed(0)
    ids = torch.randint(0, 5, (16, 12))
    mask = response_mask_after_eos(ids, EOS)
    for b in range(16):
        seen = False
        for t in range(12):
            assert mask[b, t].item() == (0 if seen else 1)
            seen = seen or ids[b, t].item() == EOS


def test_masked_sum_and_mean_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # all: 1 + 2 + 4 = 7 over 3 -> 7/3 ; rows: [3, 4] / [2, 1] -> [1.5, 4]
    assert masked_sum(x, mask).item() == pytest.approx(7.0)
    assert masked_mean(x, mask).item() == pytest.approx(7.0 / 3.0)
    torch.testing.assert_close(masked_sum(x, mask, dim=-1), torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=-1), torch.tensor([1.5, 4.0]))
    torch.testing.assert_close(masked_mean(x, mask, dim=0), torch.tensor([2.5, 2.0, 0.0]))
    # bool and float masks give the same answer
    torch.testing.assert_close(masked_mean(x, mask.bool()), masked_mean(x, mask.float()))


def test_masked_stats_ignore_garbage_at_masked_positions():
    x = torch.tensor([[1.0, 2.0, float("inf")], [4.0, float("nan"), -float("inf")]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = masked_mean(x, mask) + masked_var(x, mask) + masked_whiten(x, mask).sum()
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[mask == 0] == 0).all()


def test_masked_var_hand():
    x = torch.tensor([1.0, 2.0, 4.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    # valid [1, 2, 4]: mean 7/3, squared deviations 16/9 + 1/9 + 25/9 = 42/9 = 14/3
    # unbiased 14/3 / 2 = 7/3 ; biased 14/3 / 3 = 14/9
    assert masked_var(x, mask).item() == pytest.approx(7.0 / 3.0)
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(14.0 / 9.0)
    with pytest.raises(ValueError):
        masked_var(x, torch.tensor([1, 0, 0, 0]))
    with pytest.raises(ValueError):
        masked_var(x, torch.zeros(4), unbiased=False)
    with pytest.raises(ValueError, match="shape"):
        masked_var(x, torch.ones(3))


def test_masked_whiten_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 50.0])
    mask = torch.tensor([1, 1, 1, 0])
    # valid [1, 2, 3]: mean 2, unbiased var 1 -> whitened [-1, 0, 1], masked -> 0
    w = masked_whiten(x, mask, eps=0.0)
    torch.testing.assert_close(w, torch.tensor([-1.0, 0.0, 1.0, 0.0]))
    # shift_mean=False adds the mean back: [1, 2, 3], masked -> 0
    w_keep = masked_whiten(x, mask, shift_mean=False, eps=0.0)
    torch.testing.assert_close(w_keep, torch.tensor([1.0, 2.0, 3.0, 0.0]))


def test_masked_whiten_random_has_unit_stats_and_matches_unmasked():
    torch.manual_seed(1)
    x = torch.randn(6, 10, dtype=torch.float64) * 3 + 2
    mask = (torch.rand(6, 10) > 0.3).long()
    w = masked_whiten(x, mask, eps=0.0)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-10)
    assert masked_var(w, mask).item() == pytest.approx(1.0, abs=1e-10)
    valid = x[mask.bool()]
    torch.testing.assert_close(w[mask.bool()], (valid - valid.mean()) / valid.std())


def test_last_index():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0, 1, 1, 0]])
    assert torch.equal(last_index(mask), torch.tensor([1, 3, -1, 2]))
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    assert torch.equal(last_index(response_mask_after_eos(ids, EOS)), torch.tensor([1, 3]))


def test_whiten_from_moments_equals_masked_whiten_and_splits_over_shards():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, generator=g)
    mask = (torch.rand(6, 5, generator=g) > 0.3).long()
    mask[:, 0] = 1
    m = mask.float()
    whole = masked_whiten(x, mask)
    moments = (m.sum(), (x * m).sum(), (x * x * m).sum())
    assert torch.allclose(whiten_from_moments(x, mask, *moments), whole, atol=1e-5)
    # two "ranks" holding rows 0-2 and 3-5: summed moments reproduce whole-batch whitening
    halves = [(x[:3], mask[:3]), (x[3:], mask[3:])]
    summed = [sum(t) for t in zip(*[(mk.float().sum(), (xs * mk).sum(), (xs * xs * mk).sum()) for xs, mk in halves])]
    parts = torch.cat([whiten_from_moments(xs, mk, *summed) for xs, mk in halves])
    assert torch.allclose(parts, whole, atol=1e-5)
    kept_mean = whiten_from_moments(x, mask, *moments, shift_mean=False)
    assert torch.allclose(kept_mean, masked_whiten(x, mask, shift_mean=False), atol=1e-5)
