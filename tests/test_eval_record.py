"""The typed evaluation record (EvalSamples) reduced to one curves row, and the one curves-row builder."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_overopt.evaluate import eval_point, gather_samples, sample_rows
from rlhf_overopt.records import EvalSamples
from rlhf_overopt.run.directory import CURVE_REQUIRED_KEYS, check_curve_row, curve_row


def _ensemble_samples(**over) -> EvalSamples:
    fields = {"kl": torch.tensor([1.0, 3.0]), "gold_score": torch.tensor([0.0, 2.0]),
              "response_length": torch.tensor([4.0, 6.0]), "ended": torch.tensor([1.0, 0.0]),
              "proxy_score": torch.tensor([1.0, 2.0]), "member_scores": torch.tensor([[0.0, 1.0], [2.0, 3.0]]),
              "member_names": ["m0", "m1"], "member_groups": [2]}
    return EvalSamples(**{**fields, **over})


def test_ensemble_record_reduces_to_the_hand_worked_row():
    point = eval_point(_ensemble_samples(), method="ppo", step=5, kl_estimator="k1", aggregator="mean",
                       extra={"kl_coef": 0.1})
    row = point.row()
    # means over the 2 samples; member std per sample: |0-2|/2 = 1 and |1-3|/2 = 1
    assert row["kl"] == 2.0 and row["sqrt_kl"] == math.sqrt(2.0) and row["gold_score"] == 1.0
    assert row["proxy_score"] == 1.5 and row["proxy_member_scores"] == [0.5, 2.5] and row["proxy_member_std"] == 1.0
    assert row["eos_rate"] == 0.5 and row["response_length"] == 5.0 and row["n_eval"] == 2
    assert row["gold_stderr"] == pytest.approx(math.sqrt(2.0) / math.sqrt(2))  # sample std of [0, 2] is sqrt 2
    assert row["proxy_gold_spearman"] == pytest.approx(1.0) and row["kl_coef"] == 0.1
    assert "proxy_shaped" not in row and "component_scores" not in row
    assert list(row)[:len(CURVE_REQUIRED_KEYS)] == list(CURVE_REQUIRED_KEYS)
    check_curve_row(row)
    shaped = eval_point(_ensemble_samples(proxy_shaped=torch.tensor([0.25, 0.75])), method="ppo", step=5,
                        kl_estimator="k1", aggregator="mean").row()
    assert shaped["proxy_shaped"] == 0.5 and shaped["proxy_score"] == 1.5


def test_composite_record_weights_component_means():
    s = _ensemble_samples(member_scores=torch.tensor([[0.0, 2.0], [1.0, 1.0], [3.0, 5.0]]),
                          member_names=["a/m0", "a/m1", "b/m0"], member_groups=[2, 1], component_names=["a", "b"],
                          component_scores=torch.tensor([[0.0, 2.0], [4.0, 6.0]]),
                          gold_components=torch.tensor([[1.0, 1.0], [0.0, -2.0]]))
    row = eval_point(s, method="constrained_ppo", step=0, kl_estimator="k1", aggregator="mean",
                     component_weights=[0.5, 2.0]).row()
    # component means 1 and 5: proxy = 0.5 * 1 + 2 * 5; disagreement = mean(group a's std [0.5, 0.5], b's [0, 0])
    assert row["proxy_score"] == 10.5 and row["component_scores"] == [1.0, 5.0]
    assert row["component_names"] == ["a", "b"] and row["gold_components"] == [1.0, -1.0]
    assert row["proxy_member_std"] == 0.25 and row["proxy_member_scores"] == [1.0, 1.0, 4.0]
    model_gold = eval_point(EvalSamples(**{**s.__dict__, "gold_components": None}), method="constrained_ppo",
                            step=0, kl_estimator="k1", aggregator="mean", component_weights=[0.5, 2.0]).row()
    assert "gold_components" not in model_gold


def test_record_checks_shapes_and_one_rank_gather_is_identity():
    with pytest.raises(ValueError, match="member_scores"):
        _ensemble_samples(member_names=["m0"], member_groups=[1])
    with pytest.raises(ValueError, match="kl"):
        _ensemble_samples(kl=torch.zeros(3))
    s = _ensemble_samples()
    g = gather_samples(s)
    assert torch.equal(g.member_scores, s.member_scores) and torch.equal(g.kl, s.kl) and g.proxy_shaped is None
    rows = sample_rows(s, ["p0", "p1"], [" a", " b"], step=3, n=1)
    assert rows == [{"step": 3, "prompt": "p0", "response": " a", "ended": True, "gold_score": 0.0,
                     "proxy_score": 1.0, "proxy_member_scores": [0.0, 2.0], "kl": 1.0}]


def test_curve_row_puts_the_contract_first_and_derives_sqrt_kl():
    row = curve_row(method="bon", step=4, kl=-1e-9, proxy_score=1.0, proxy_member_scores=[1.0], gold_score=0.5,
                    n=4, aggregator="mean")
    assert list(row) == [*CURVE_REQUIRED_KEYS, "n", "aggregator"] and row["sqrt_kl"] == 0.0
    with pytest.raises(TypeError, match="sqrt_kl"):
        curve_row(method="bon", step=4, kl=1.0, proxy_score=1.0, proxy_member_scores=[1.0], gold_score=0.5,
                  sqrt_kl=1.0)


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        full = _composite_like(8)
        half = slice(rank * 4, rank * 4 + 4)
        mine = EvalSamples(kl=full.kl[half], gold_score=full.gold_score[half],
                           response_length=full.response_length[half], ended=full.ended[half],
                           proxy_score=full.proxy_score[half], member_scores=full.member_scores[:, half],
                           member_names=full.member_names, member_groups=full.member_groups,
                           component_names=full.component_names, component_scores=full.component_scores[:, half],
                           gold_components=full.gold_components[:, half])
        row = eval_point(gather_samples(mine), method="m", step=0, kl_estimator="k1", aggregator="mean",
                         component_weights=[0.3, 0.7]).row()
        if rank == 0:
            torch.save(row, out)
    finally:
        tdist.destroy_process_group()


def _composite_like(b: int) -> EvalSamples:
    g = torch.Generator().manual_seed(0)
    comps = torch.randn(2, b, generator=g)
    return EvalSamples(kl=torch.rand(b, generator=g), gold_score=torch.randn(b, generator=g),
                       response_length=torch.randint(1, 9, (b,), generator=g).float(),
                       ended=(torch.rand(b, generator=g) > 0.5).float(), proxy_score=torch.tensor([0.3, 0.7]) @ comps,
                       member_scores=torch.randn(5, b, generator=g), member_names=[f"m{i}" for i in range(5)],
                       member_groups=[3, 2], component_names=["a", "b"], component_scores=comps,
                       gold_components=torch.randn(2, b, generator=g))


def test_two_ranks_gathered_field_by_field_give_the_one_rank_row(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "row.pt"
    mp.spawn(_rank_main, args=(2, port, str(out)), nprocs=2, join=True)
    one = eval_point(_composite_like(8), method="m", step=0, kl_estimator="k1", aggregator="mean",
                     component_weights=[0.3, 0.7]).row()
    assert torch.load(out) == one  # bit for bit: the same numbers reduced in the same layout
