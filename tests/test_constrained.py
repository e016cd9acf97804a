"""Composite rewards: Lagrangian math, multipliers, hypervolume, gradient-based weights, components,
proxy-point fits, and the constrained_ppo / nm_ppo / dynamic_ppo / proxy_points command lines."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rlhf_overopt.ops.constrained import (
    combine_streams,
    gradient_weight_update,
    hypervolume,
    hypervolume_gain,
    hypervolume_scale,
    lagrangian_coefficients,
    mixed_advantages,
    multiplier_loss,
    objective_influence,
    pareto_buffer_add,
    pareto_mask,
    quadratic_peak,
    squash_multipliers,
    stream_returns,
)
from rlhf_overopt.rewards.components import component_preferences, component_values
from rlhf_overopt.run.directory import CURVE_REQUIRED_KEYS, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny"
CONFIGS = ("constrained_ppo", "nm_ppo", "dynamic_weighting", "proxy_points")


# ---------------------------------------------------------------------------------------------
# Lagrangian mixing and multipliers (Moskovitz et al. 2023, §4)
# ---------------------------------------------------------------------------------------------


def test_squash_and_lagrangian_coefficients():
    mu = torch.tensor([0.0, math.log(3.0)])  # sigmoid: 0.5, 0.75; tanh: 0, 0.8
    assert torch.allclose(squash_multipliers(mu, "inequality"), torch.tensor([0.5, 0.75]))
    assert torch.allclose(squash_multipliers(mu, "equality"), torch.tensor([0.0, 0.8]))
    assert torch.allclose(lagrangian_coefficients(torch.tensor([0.5, 0.75])), torch.tensor([0.75, 0.5, 0.75]))
    with pytest.raises(ValueError):
        squash_multipliers(mu, "both")


def test_mixed_advantages_by_hand():
    a0 = torch.tensor([[1.0, 2.0]])
    a = torch.tensor([[[0.0, 1.0]], [[2.0, -2.0]]])
    mu = torch.tensor([0.0, math.log(3.0)])  # f = 0.5, 0.75; objective weight 2 - 1.25 = 0.75
    # position 0: 0.75*1 + 0.5*0 + 0.75*2 = 2.25; position 1: 0.75*2 + 0.5*1 - 0.75*2 = 0.5
    assert torch.allclose(mixed_advantages(a0, a, mu, "inequality"), torch.tensor([[2.25, 0.5]]))
    # equality: f = 0, 0.8; objective weight 2 - 0.8 = 1.2
    assert torch.allclose(mixed_advantages(a0, a, mu, "equality"), torch.tensor([[1.2 + 1.6, 2.4 - 1.6]]))
    assert torch.allclose(combine_streams(torch.cat([a0[None], a]), torch.tensor([1.0, 0.0, 0.5])),
                          torch.tensor([[2.0, 1.0]]))


def test_stream_returns_discount_and_mask():
    rewards = torch.tensor([[[1.0, 2.0, 3.0]], [[0.0, 0.0, 5.0]]])  # (S=2, B=1, T=3)
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(stream_returns(rewards, mask, 0.5), torch.tensor([[2.0], [0.0]]))
    assert torch.allclose(stream_returns(rewards, torch.ones(1, 3), 1.0), torch.tensor([[6.0], [5.0]]))


def test_multiplier_loss_gradient_by_hand():
    mu = torch.zeros(2, requires_grad=True)
    loss = multiplier_loss(mu, torch.tensor([0.2, 0.8]), torch.tensor([1.0, 0.0]), "inequality")
    loss.backward()
    # d/dmu_i = sigmoid'(0) * (v_i - theta_i) = 0.25 * (-0.8, 0.8); loss = 0.5*(-0.8) + 0.5*0.8 = 0
    assert torch.allclose(mu.grad, torch.tensor([-0.2, 0.2]))
    assert abs(float(loss.detach())) < 1e-7


def test_violated_inequality_grows_its_multiplier_and_slack_one_shrinks():
    from rlhf_overopt.ops.constrained import Multipliers

    m = Multipliers(2, "inequality", [1.0, 0.0], init=0.0, lr=0.1, momentum=0.1, grad_clip=0.5)
    values = torch.tensor([0.2, 0.8])  # component 0 below its threshold, component 1 above
    m.step(values)
    # first SGD step: mu = -lr * grad = -0.1 * (-0.2, 0.2) (grad norm 0.28 < 0.5: no clipping)
    assert torch.allclose(m.mu.detach(), torch.tensor([0.02, -0.02]))
    before = m.weights()
    for _ in range(20):
        m.step(values)
    after = m.weights()
    assert after[0] > before[0] > 0.5 and after[1] < before[1] < 0.5
    # the state round-trips (momentum included): continuing from a copy gives the same numbers
    clone = Multipliers(2, "inequality", [0.0, 0.0], init=0.0, lr=0.1, momentum=0.1, grad_clip=0.5)
    clone.load_state_dict(json.loads(json.dumps(m.state_dict())))
    m.step(values)
    clone.step(values)
    assert torch.equal(m.mu.detach(), clone.mu.detach())


def test_multiplier_step_is_clipped():
    from rlhf_overopt.ops.constrained import Multipliers

    m = Multipliers(1, "inequality", [100.0], init=0.0, lr=1.0, momentum=0.0, grad_clip=0.5)
    m.step(torch.tensor([0.0]))  # gradient 0.25 * -100 = -25, clipped to norm 0.5
    assert torch.allclose(m.mu.detach(), torch.tensor([0.5]))


def test_equality_overshoot_turns_the_weight_negative():
    from rlhf_overopt.ops.constrained import Multipliers

    m = Multipliers(1, "equality", [0.0], init=0.0, lr=0.1, momentum=0.1, grad_clip=0.5)
    for _ in range(5):
        m.step(torch.tensor([1.0]))  # v above theta: tanh(mu) < 0 pushes the component down
    assert m.weights()[0] < 0


# ---------------------------------------------------------------------------------------------
# Hypervolume and gradient-based weights (Lu et al. 2025)
# ---------------------------------------------------------------------------------------------


def test_hypervolume_2d_by_hand():
    pts = torch.tensor([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0]])
    # staircase: 1*3 + (2-1)*2 + (3-2)*1 = 6
    assert float(hypervolume(pts, torch.zeros(2))) == pytest.approx(6.0)
    # reference (1, 0): boxes (0..1)x... lose the first column: 0 + 1*2 + 1*1 = 3
    assert float(hypervolume(pts, torch.tensor([1.0, 0.0]))) == pytest.approx(3.0)
    # a point below the reference in one objective adds nothing; an empty set has volume 0
    assert float(hypervolume(torch.tensor([[-1.0, 5.0]]), torch.zeros(2))) == 0.0
    assert float(hypervolume(torch.zeros(0, 2), torch.zeros(2))) == 0.0


def test_hypervolume_3d_by_hand():
    ref = torch.zeros(3)
    # three boxes of volume 2 overlapping pairwise and all together in the unit cube: 6 - 3 + 1 = 4
    pts = torch.tensor([[2.0, 1.0, 1.0], [1.0, 2.0, 1.0], [1.0, 1.0, 2.0]])
    assert float(hypervolume(pts, ref)) == pytest.approx(4.0)
    # volumes 6 and 3 sharing the unit cube: 8
    assert float(hypervolume(torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 3.0]]), ref)) == pytest.approx(8.0)
    # a dominated point changes nothing
    assert float(hypervolume(torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 3.0], [1.0, 1.0, 1.0]]), ref)) == \
        pytest.approx(8.0)


def test_hypervolume_equals_counting_unit_cells():
    gen = torch.Generator().manual_seed(0)
    for d in (2, 3):
        pts = torch.randint(0, 5, (6, d), generator=gen).float()
        cells = sum(bool((pts >= torch.tensor(c) + 1).all(-1).any())
                    for c in itertools.product(range(5), repeat=d))
        assert float(hypervolume(pts, torch.zeros(d))) == pytest.approx(cells)


def test_hypervolume_gain_pareto_and_scale():
    buffer = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    ref = torch.zeros(2)
    assert float(hypervolume_gain(torch.tensor([1.0, 1.0]), buffer, ref)) == 0.0  # dominated
    assert float(hypervolume_gain(torch.tensor([2.0, 2.0]), buffer, ref)) == pytest.approx(1.0)
    assert float(hypervolume_gain(torch.tensor([2.0, 2.0]), torch.zeros(0, 2), ref)) == pytest.approx(4.0)
    mask = pareto_mask(torch.tensor([[1.0, 3.0], [1.0, 1.0], [3.0, 1.0], [3.0, 1.0]]))
    assert mask.tolist() == [True, False, True, True]  # duplicates do not dominate each other
    assert float(hypervolume_scale(0.0)) == pytest.approx(0.5)
    assert float(hypervolume_scale(1.0)) == pytest.approx(0.5 + 1.5 * math.tanh(1.0))
    assert float(hypervolume_scale(50.0)) == pytest.approx(2.0)


def test_pareto_buffer_add_by_hand():
    ref = torch.tensor([-1.0, -1.0], dtype=torch.float64)
    front, gain = pareto_buffer_add(torch.zeros(0, 2), torch.tensor([0.0, 0.0]), ref)
    assert gain == 1.0 and front.tolist() == [[0.0, 0.0]]
    front, gain = pareto_buffer_add(front, torch.tensor([1.0, 1.0]), ref)  # dominates the first point
    assert gain == 3.0 and front.tolist() == [[1.0, 1.0]]
    front, gain = pareto_buffer_add(front, torch.tensor([0.5, 0.5]), ref)  # dominated: adds nothing
    assert gain == 0.0 and front.tolist() == [[1.0, 1.0]]
    front, gain = pareto_buffer_add(front, torch.tensor([2.0, 0.0]), ref)  # beside it: adds the 1 x 1 strip
    assert gain == 1.0 and front.tolist() == [[1.0, 1.0], [2.0, 0.0]]


def test_gradient_weight_update_by_hand():
    grads = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # sum = (2, 1): I = (2, 3)
    assert objective_influence(grads).tolist() == [2.0, 3.0]
    # eta/mu = 1: w ∝ (0.5 e^2, 0.5 e^3) = (1, e) / (1 + e)
    w = gradient_weight_update(torch.tensor([0.5, 0.5]), grads, eta=1e-4, mu=1e-4)
    e = math.e
    assert torch.allclose(w, torch.tensor([1 / (1 + e), e / (1 + e)]))
    # unequal start, eta/mu = 0.5: w ∝ (0.2 e^1, 0.8 e^1.5)
    w = gradient_weight_update(torch.tensor([0.2, 0.8]), grads, eta=1e-5, mu=2e-5)
    raw = torch.tensor([0.2 * math.exp(1.0), 0.8 * math.exp(1.5)])
    assert torch.allclose(w, raw / raw.sum())
    # huge influences do not overflow
    w = gradient_weight_update(torch.tensor([0.5, 0.5]), grads * 1e3, eta=1.0, mu=1e-5)
    assert torch.isfinite(w).all() and w[1] == pytest.approx(1.0)


def test_quadratic_peak():
    coef = (2.0, 2.0, -1.0)  # -(x - 1)^2 + 3
    assert quadratic_peak(coef, 0.0, 3.0) == pytest.approx(1.0)
    assert quadratic_peak(coef, 2.0, 3.0) == 2.0  # vertex outside: the better end
    assert quadratic_peak((0.0, -1.0, 1.0), -1.0, 2.0) == 2.0  # convex: the better end


def test_fit_proxy_point_recovers_the_vertex():
    from rlhf_overopt.rewards.components import fit_proxy_point

    xs = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    fit = fit_proxy_point(xs, [0.3 + 1.2 * x - 0.4 * x * x for x in xs])  # vertex at 1.5
    assert fit["proxy_point"] == pytest.approx(1.5)
    assert fit["coefficients"] == pytest.approx([0.3, 1.2, -0.4])
    assert fit["observed_peak_value"] == 1.5


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


def test_component_values_sum_their_terms():
    parts = {"sentiment": torch.tensor([0.5, -0.2]), "repetition": torch.tensor([0.0, -0.3]),
             "eos": torch.tensor([-2.0, 0.0]), "length": torch.tensor([0.0, -0.1])}
    values = component_values(parts, ["sentiment", "repetition+eos+length"])
    assert torch.allclose(values, torch.tensor([[0.5, -0.2], [-2.0, -0.4]]))


def test_component_preferences_drop_ties_and_flip_exactly():
    n = 40
    prefs = component_preferences(["p"] * n, [f"a{i}" for i in range(n)], [f"b{i}" for i in range(n)],
                                  [True] * n, [i % 2 == 0 for i in range(n)],
                                  [float(i % 4) for i in range(n)], [1.0] * n, label_noise=0.25, seed=0)
    assert len(prefs) == 30  # value 1.0 ties in a quarter of the pairs
    assert sum(prefs["label_flipped"]) == round(0.25 * 30)
    for row in prefs:
        assert (row["chosen_gold"] > row["rejected_gold"]) != row["label_flipped"]
        assert row["chosen"][1:] == row["rejected"][1:]  # the two responses of one pair stay together


def test_tiny_configs_share_the_tiny_testbed():
    section = yaml.safe_load((TINY / "build_testbed.yaml").read_text())["testbed"]
    for name in CONFIGS:
        assert yaml.safe_load((TINY / f"{name}.yaml").read_text())["testbed"] == section, name


def test_component_cache_key_ignores_train_pairs_at_its_default():
    """Component proxies trained before proxy.train_pairs existed keep their cache folder (the key
    is the old formula's); a subset of the pairs gets a folder of its own."""
    import hashlib

    from rlhf_overopt.config.experiment import to_dict
    from rlhf_overopt.config.load import load_config
    from rlhf_overopt.rewards.cache import COMPONENTS_CACHE_VERSION, components_cache_dir

    class FakeTestbed:
        root = Path("/cache/testbed-0123")

    cfg = load_config(ROOT / "configs" / "constrained_ppo.yaml", check_paths=False)
    proxy = to_dict(cfg.proxy)
    for key in ("path", "score_batch_size", "on_failed_member", "train_pairs", "train_workers", "dataset", "dtype"):
        proxy.pop(key)  # the last four did not exist when the old caches were written
    comp = to_dict(cfg.components)
    comp.pop("path")
    old_key = json.dumps({"components": comp, "proxy": proxy, "policy": cfg.policy.path, "testbed": "testbed-0123",
                          "seed": cfg.seed, "version": COMPONENTS_CACHE_VERSION}, sort_keys=True)
    expected = Path("/cache") / f"components-{hashlib.sha256(old_key.encode()).hexdigest()[:16]}"
    assert components_cache_dir(cfg, FakeTestbed) == expected
    subset = load_config(ROOT / "configs" / "constrained_ppo.yaml", ["proxy.train_pairs=500"], check_paths=False)
    assert components_cache_dir(subset, FakeTestbed) != expected


def test_configs_load_and_reject_bad_combinations():
    from rlhf_overopt.config.load import load_config
    from rlhf_overopt.errors import ConfigError

    for name in CONFIGS:
        over = ["constrained.thresholds=[0.5, 0.5]"] if name == "constrained_ppo" else []
        load_config(ROOT / "configs" / f"{name}.yaml", over, check_paths=False)
        load_config(TINY / f"{name}.yaml")
    bad = {
        "components.terms=[sentiment]": "components.terms",
        "components.terms=[sentiment, fluency]": "components.terms[1]",
        "constrained.thresholds=[0.1]": "constrained.thresholds",
        "constrained.objective=style": "constrained.objective",
        "nm.stretch_steps=3": "nm.stretch_steps",
    }
    for override, key in bad.items():
        with pytest.raises(ConfigError, match=f"^{re.escape(key)}:"):
            load_config(TINY / "nm_ppo.yaml", [override])
    with pytest.raises(ConfigError, match="^weighting.mode"):
        load_config(TINY / "dynamic_weighting.yaml", ["weighting.mode=gradient", "deepspeed.zero_stage=3"])


# ---------------------------------------------------------------------------------------------
# Command lines on the tiny testbed
# ---------------------------------------------------------------------------------------------


def train(config: str, *args: str, cache: Path, launcher: list[str] | None = None):
    cmd = [*(launcher or [sys.executable]), str(ROOT / "launch" / "train.py"), "--config", str(TINY / f"{config}.yaml"),
           f"testbed.cache_dir={cache}", *args]
    result = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]


@pytest.fixture(scope="module")
def proxy_points_run(tmp_path_factory, tiny_testbed):
    out = tmp_path_factory.mktemp("proxy_points") / "run"
    train("proxy_points", f"output_dir={out}", cache=tiny_testbed.root.parent)
    return out


@pytest.mark.slow
def test_proxy_points_cli_writes_thresholds(proxy_points_run):
    data = json.loads((proxy_points_run / "thresholds.json").read_text())
    assert data["names"] == ["sentiment", "fluency"] and len(data["thresholds"]) == 2
    for i, name in enumerate(data["names"]):
        fit = data["components"][name]
        xs = [x for x, _ in fit["points"]]
        assert min(xs) <= data["thresholds"][i] <= max(xs)
        rows = read_jsonl(proxy_points_run / "runs" / name / "curves.jsonl")
        assert [r["step"] for r in rows] == [0, 1, 2, 3]
        assert all(r["reward_weights"] == [float(j == i) for j in range(2)] for r in rows)
    assert json.loads((proxy_points_run / "summary.json").read_text())["status"] == "completed"
    assert (proxy_points_run / "report" / "proxy_points.png").stat().st_size > 1000


@pytest.mark.slow
def test_constrained_ppo_cli_reads_thresholds_and_logs_multipliers(proxy_points_run, tiny_testbed, tmp_path):
    out = tmp_path / "run"
    train("constrained_ppo", f"output_dir={out}", "constrained.thresholds=[]",
          f"constrained.thresholds_file={proxy_points_run}", cache=tiny_testbed.root.parent)
    thresholds = json.loads((proxy_points_run / "thresholds.json").read_text())["thresholds"]
    rows = read_jsonl(out / "curves.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows:
        assert all(k in row for k in CURVE_REQUIRED_KEYS)
        assert row["method"] == "constrained_ppo" and len(row["lagrange_multipliers"]) == 2
        assert row["thresholds"] == pytest.approx(thresholds)
        assert len(row["constraint_values"]) == 2 and len(row["reward_weights"]) == 2
        assert len(row["component_scores"]) == 2 and len(row["gold_components"]) == 2
    assert rows[0]["lagrange_multipliers"] == [0.5, 0.5] and rows[-1]["lagrange_multipliers"] != [0.5, 0.5]
    stats = read_jsonl(out / "train_stats.jsonl")
    assert [s["step"] for s in stats] == [1, 2, 3, 4] and "multiplier_loss" in stats[0]
    # each multiplier moved in the direction its constraint asked for (on the rollout batches)
    for i in range(2):
        moved = stats[-1]["multiplier_params"][i]
        mean_violation = sum(s["constraint_values"][i] - thresholds[i] for s in stats) / len(stats)
        if abs(mean_violation) > 0.2:
            assert (moved > 0) == (mean_violation < 0)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and (out / "policy" / "model.safetensors").exists()
    assert (out / "report" / "composite.png").stat().st_size > 1000
    assert "| run | method |" in (out / "report" / "composite.md").read_text()


@pytest.fixture(scope="module")
def nm_run(tmp_path_factory, tiny_testbed):
    out = tmp_path_factory.mktemp("nm_ppo") / "run"
    train("nm_ppo", f"output_dir={out}", cache=tiny_testbed.root.parent)
    return out


@pytest.mark.slow
def test_nm_ppo_cli_runs_scipy_nelder_mead(nm_run):
    out = nm_run
    path = read_jsonl(out / "nm_path.jsonl")
    assert [p["step"] for p in path] == [1, 2, 3, 4]
    # scipy's initial simplex: x0, then x0 + 0.3 along each axis
    assert [p["thresholds"] for p in path[:3]] == [[0.0, 0.0], [0.3, 0.0], [0.0, 0.3]]
    rows = read_jsonl(out / "curves.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["thresholds"] for r in rows[1:]] == [p["thresholds"] for p in path]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["nm_evaluations"] == 4


@pytest.mark.slow
def test_nm_ppo_resume_replays_the_search_exactly(nm_run, tiny_testbed, tmp_path):
    out = tmp_path / "run"
    cache = tiny_testbed.root.parent
    train("nm_ppo", f"output_dir={out}", "ppo.steps=2", cache=cache)
    assert len(read_jsonl(out / "nm_path.jsonl")) == 2
    train("nm_ppo", f"output_dir={out}", "ppo.steps=4", "resume=true", cache=cache)

    def strip(rows):
        return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]

    for name in ("nm_path.jsonl", "curves.jsonl", "train_stats.jsonl"):
        assert strip(read_jsonl(out / name)) == strip(read_jsonl(nm_run / name)), name


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["hypervolume", "gradient"])
def test_dynamic_weighting_cli(mode, tiny_testbed, tmp_path):
    out = tmp_path / "run"
    train("dynamic_weighting", f"output_dir={out}", f"weighting.mode={mode}", cache=tiny_testbed.root.parent)
    rows = read_jsonl(out / "curves.jsonl")
    assert [r["step"] for r in rows] == [0, 2, 4]
    for row in rows:
        assert all(k in row for k in CURVE_REQUIRED_KEYS) and row["weighting"] == mode
        assert sum(row["reward_weights"]) == pytest.approx(1.0) and row["hypervolume"] > 0
    if mode == "hypervolume":
        # the scale after each later evaluation is 0.5 + 1.5 tanh(its hypervolume gain)
        for row in rows[1:]:
            assert row["reward_scale_next"] == pytest.approx(0.5 + 1.5 * math.tanh(row["hypervolume_gain"]))
    else:
        stats = read_jsonl(out / "train_stats.jsonl")
        assert all(len(s["objective_influence"]) == 2 for s in stats)
        assert stats[-1]["reward_weights"] != [0.5, 0.5]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("deepspeed") is None, reason="the deepspeed launcher is not on PATH")
def test_constrained_ppo_two_ranks_zero2(tiny_testbed, tmp_path):
    """Two ranks at ZeRO-2, one PPO step (as small as the property: an evaluation before and after
    the step, whose multiplier update reads the all-reduced constraint values)."""
    out = tmp_path / "run"
    small = ("deepspeed.zero_stage=2", "ppo.steps=1", "eval.every=1")
    train("constrained_ppo", f"output_dir={out}", *small,
          cache=tiny_testbed.root.parent, launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port())])
    rows = read_jsonl(out / "curves.jsonl")
    assert [r["step"] for r in rows] == [0, 1] and rows[0]["n_eval"] == 16
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    # the multipliers stepped on the all-reduced constraint values, and the policy moved
    assert rows[-1]["multiplier_params"] != rows[0]["multiplier_params"] and rows[-1]["kl"] != rows[0]["kl"]
    # the same 2-rank run again gives the same curves: gathers and all-reduces are deterministic
    again = tmp_path / "again"
    train("constrained_ppo", f"output_dir={again}", *small,
          cache=tiny_testbed.root.parent, launcher=["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port())])
    timing = ("time_generate_s", "time_step_s")
    assert ([{k: v for k, v in r.items() if k not in timing} for r in read_jsonl(again / "curves.jsonl")]
            == [{k: v for k, v in r.items() if k not in timing} for r in rows])


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
