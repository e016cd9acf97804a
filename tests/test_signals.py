"""Overoptimization signals: Spearman with ties and member std on hand-worked numbers, against
scipy where installed, and present in every row of a tiny run's curves.jsonl."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_overopt.ops.signals import average_ranks, member_std, spearman
from rlhf_overopt.run.directory import read_jsonl


def test_average_ranks_share_ties():
    assert average_ranks(torch.tensor([10.0, 20.0, 20.0, 30.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks(torch.tensor([3.0, 1.0, 3.0, 3.0])).tolist() == [3.0, 1.0, 3.0, 3.0]
    assert average_ranks(torch.tensor([2.0, 1.0])).tolist() == [2.0, 1.0]


def test_spearman_hand_worked_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]; centred: [-1.5, 0, 0, 1.5], [-1.5, .5, -.5, 1.5]
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9)
    x, y = torch.tensor([1.0, 2.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert spearman(x, y) == pytest.approx(math.sqrt(0.9), abs=1e-12)
    assert spearman(x, -y) == pytest.approx(-math.sqrt(0.9), abs=1e-12)
    # a monotone transform changes nothing; reversing the order flips the sign
    z = torch.tensor([0.1, 0.5, 0.2, 0.9])
    assert spearman(z, z.exp()) == pytest.approx(1.0) and spearman(z, -z) == pytest.approx(-1.0)


def test_spearman_undefined_is_nan():
    assert math.isnan(spearman(torch.tensor([1.0]), torch.tensor([2.0])))
    assert math.isnan(spearman(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([1.0, 2.0, 3.0])))
    with pytest.raises(ValueError, match="one length"):
        spearman(torch.zeros(3), torch.zeros(4))


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        # rounded values: many ties on both sides
        x = torch.randint(0, 5, (30,), generator=g).float()
        y = (x + torch.randn(30, generator=g) * 2).round()
        assert spearman(x, y) == pytest.approx(float(stats.spearmanr(x.numpy(), y.numpy()).statistic), abs=1e-10)


def test_member_std_is_the_population_std():
    scores = torch.tensor([[1.0, 3.0, 0.0], [3.0, 3.0, 6.0]])  # (K=2, B=3)
    assert member_std(scores).tolist() == [1.0, 0.0, 3.0]


@pytest.mark.slow
def test_signals_in_every_curves_row(tiny_ppo_run):
    """The session's tiny PPO run (tests/conftest.py): every RL method's evaluation rows come from
    the one evaluate_policy, so one method's run shows the signals are written."""
    out = tiny_ppo_run
    rows = read_jsonl(out / "curves.jsonl")
    assert rows
    for row in rows:
        assert row["proxy_member_std"] > 0  # an ensemble of 3 independent members disagrees
        assert row["proxy_gold_spearman"] is None or -1 <= row["proxy_gold_spearman"] <= 1
        assert 0 < row["response_length"] <= 16
        assert "proxy_shaped" not in row  # shaping is off
    samples = read_jsonl(out / "samples.jsonl")
    assert all("proxy_shaped" not in s for s in samples)
