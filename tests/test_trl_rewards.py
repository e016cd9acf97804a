"""TRL reward functions, checked against hand-worked numbers, their errors and real GRPO + RLOO runs:
WeightedComponentReward (fixed and hypervolume-guided weights, the ComponentRewards adapter) and
EnsembleReward (a proxy ensemble under one aggregator)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf_overopt.config.sections import AggregateConfig
from rlhf_overopt.errors import NonFiniteError
from rlhf_overopt.ops.constrained import weighted_reward
from rlhf_overopt.rewards.components import ComponentRewards
from rlhf_overopt.rewards.trl_rewards import EnsembleReward, WeightedComponentReward, completion_ended

ROOT = Path(__file__).resolve().parents[1]


def table_scorer(batches: list[list[list[float]]]):
    """A score_fn returning the given (N, B) tables in turn."""
    it = iter(batches)

    def score_fn(prompts, completions):
        return torch.tensor(next(it))

    return score_fn


def call(reward: WeightedComponentReward, b: int, **kwargs) -> list[float]:
    """Call the reward the way TRL does: keyword arguments only, plus extra columns and TRL's hooks."""
    return reward(prompts=["p"] * b, completions=["c"] * b, completion_ids=[[1, 2]] * b, topic=["x"] * b,
                  trainer_state=None, log_extra=lambda *a: None, **kwargs)


# ---------------------------------------------------------------------------------------------
# Fixed weights
# ---------------------------------------------------------------------------------------------


def test_fixed_weights_against_a_hand_computed_sum():
    # weights [1, 3] normalize to [0.25, 0.75]
    scores = [[1.0, 2.0, -4.0], [4.0, 0.0, 2.0]]
    reward = WeightedComponentReward(table_scorer([scores, scores]), ["a", "b"], [1.0, 3.0])
    expected = [0.25 * 1 + 0.75 * 4, 0.25 * 2 + 0.75 * 0, 0.25 * -4 + 0.75 * 2]  # [3.25, 0.5, 0.5]
    assert call(reward, 3) == pytest.approx(expected)
    assert call(reward, 3) == pytest.approx(expected)  # fixed: the scale never moves
    assert [h["scale"] for h in reward.history] == [1.0, 1.0]
    assert reward.history[0]["component_means"] == pytest.approx([-1 / 3, 2.0])
    assert reward.history[0]["weights"] == pytest.approx([0.25, 0.75])
    assert reward.__name__ == "weighted_components"


def test_uniform_weights_by_default_and_pure_weighted_reward():
    reward = WeightedComponentReward(table_scorer([[[2.0], [4.0], [6.0]]]), ["a", "b", "c"])
    assert call(reward, 1) == pytest.approx([4.0])
    out = weighted_reward(torch.tensor([[1.0, 2.0], [3.0, 5.0]]), torch.tensor([0.5, 0.5]), 2.0)
    assert out.tolist() == pytest.approx([4.0, 7.0])


# ---------------------------------------------------------------------------------------------
# Hypervolume-guided scale (Lu et al. 2025)
# ---------------------------------------------------------------------------------------------


def test_hypervolume_scale_against_hand_worked_numbers():
    # batch means per call: (0, 0), (1, 1), (0.5, 0.5) [dominated], (2, 0)
    batches = [[[-1.0, 1.0], [0.5, -0.5]],    # mean (0, 0): founds the buffer, reference (-1, -1)
               [[1.0, 1.0], [0.0, 2.0]],      # mean (1, 1): HV 4 - 1 = 3
               [[0.5, 0.5], [0.5, 0.5]],      # mean (0.5, 0.5): dominated by (1, 1), adds 0
               [[2.0, 2.0], [0.0, 0.0]],      # mean (2, 0): adds the box [1, 2] x [-1, 0] = 1
               [[0.0, 0.0], [0.0, 0.0]]]
    reward = WeightedComponentReward(table_scorer(batches), ["a", "b"], [1.0, 1.0], mode="hypervolume",
                                     reference_offset=1.0)
    rewards = [call(reward, 2) for _ in range(5)]
    s3 = 0.5 + 1.5 * math.tanh(3.0)
    s1 = 0.5 + 1.5 * math.tanh(1.0)
    h = reward.history
    assert [x["scale"] for x in h] == pytest.approx([1.0, 1.0, s3, 0.5, s1])
    assert [x["gain"] for x in h] == pytest.approx([1.0, 3.0, 0.0, 1.0, 0.0])
    assert [x["hypervolume"] for x in h] == pytest.approx([1.0, 4.0, 4.0, 5.0, 5.0])
    assert [x["pareto_buffer_size"] for x in h] == [1, 1, 1, 2, 2]
    assert reward.reference.tolist() == [-1.0, -1.0]
    assert reward.front.tolist() == [[1.0, 1.0], [2.0, 0.0]]
    # the reward of a call is scale * (w . s), w = (0.5, 0.5)
    assert rewards[0] == pytest.approx([-0.25, 0.25])
    assert rewards[1] == pytest.approx([0.5, 1.5])
    assert rewards[2] == pytest.approx([0.5 * s3, 0.5 * s3])
    assert rewards[3] == pytest.approx([0.5, 0.5])
    assert rewards[4] == pytest.approx([0.0, 0.0])


def test_hypervolume_update_every_pools_the_window():
    # update_every=2: the point is the mean over both calls' completions
    batches = [[[0.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]],   # window mean (0, 0)
               [[2.0, 2.0], [2.0, 2.0]], [[0.0], [0.0]],               # window mean over 3: (4/3, 4/3)
               [[1.0], [1.0]]]
    reward = WeightedComponentReward(table_scorer(batches), ["a", "b"], mode="hypervolume", update_every=2)
    for b in (2, 2, 2, 1, 1):
        call(reward, b)
    h = reward.history
    assert [x["observed"] for x in h] == [False, True, False, True, False]
    assert h[0]["gain"] is None and h[1]["gain"] == pytest.approx(1.0)
    gain = (4 / 3 + 1) ** 2 - 1
    assert h[3]["gain"] == pytest.approx(gain)
    assert [x["scale"] for x in h] == pytest.approx([1.0, 1.0, 1.0, 1.0, 0.5 + 1.5 * math.tanh(gain)])


def test_fixed_mode_tracks_the_front_but_keeps_scale_one():
    reward = WeightedComponentReward(table_scorer([[[0.0], [0.0]], [[1.0], [1.0]], [[2.0], [2.0]]]), ["a", "b"])
    for _ in range(3):
        call(reward, 1)
    assert [x["scale"] for x in reward.history] == [1.0, 1.0, 1.0]
    assert [x["hypervolume"] for x in reward.history] == pytest.approx([1.0, 4.0, 9.0])


def test_state_dict_round_trip_resumes_the_scale():
    batches = [[[0.0], [0.0]], [[1.0], [1.0]], [[0.5], [0.5]]]
    a = WeightedComponentReward(table_scorer(batches), ["a", "b"], mode="hypervolume")
    call(a, 1)
    call(a, 1)
    b = WeightedComponentReward(table_scorer(batches[2:]), ["a", "b"], mode="hypervolume")
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert call(b, 1) == pytest.approx([0.5 * (0.5 + 1.5 * math.tanh(3.0))])
    assert b.scale == 0.5 and b.history[0]["call"] == 2


def test_log_metric_gets_scale_hypervolume_and_means():
    logged: dict[str, float] = {}
    reward = WeightedComponentReward(table_scorer([[[1.0], [3.0]]]), ["a", "b"], mode="hypervolume", name="mix")
    call(reward, 1, log_metric=lambda key, value: logged.__setitem__(key, value))
    assert logged == pytest.approx({"mix/scale": 1.0, "mix/hypervolume": 1.0, "mix/a": 1.0, "mix/b": 3.0})


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_gradient_mode_is_refused_with_a_pointer_to_dynamic_ppo():
    with pytest.raises(ValueError, match=r"method: dynamic_ppo.*weighting\.mode=gradient"):
        WeightedComponentReward(table_scorer([]), ["a", "b"], mode="gradient")
    with pytest.raises(ValueError, match="unknown weighting mode 'pareto'"):
        WeightedComponentReward(table_scorer([]), ["a", "b"], mode="pareto")


@pytest.mark.parametrize("weights, match", [
    ([1.0], "one weight per component"),
    ([1.0, 2.0, 3.0], "one weight per component"),
    ([1.0, -0.5], "non-negative"),
    ([0.0, 0.0], "positive sum"),
    ([float("nan"), 1.0], "finite"),
])
def test_bad_weights_raise(weights, match):
    with pytest.raises(ValueError, match=match):
        WeightedComponentReward(table_scorer([]), ["a", "b"], weights)


@pytest.mark.parametrize("kwargs, match", [
    ({"update_every": 0}, "update_every"),
    ({"reference_offset": 0.0}, "reference_offset"),
    ({"names": []}, "at least one component"),
    ({"names": ["a", "a"]}, "distinct"),
])
def test_bad_settings_raise(kwargs, match):
    args = {"names": ["a", "b"], **kwargs}
    with pytest.raises(ValueError, match=match):
        WeightedComponentReward(table_scorer([]), **args)


def test_nan_score_raises_non_finite_error_naming_the_component():
    reward = WeightedComponentReward(table_scorer([[[1.0, 2.0], [0.0, float("nan")]]]), ["sentiment", "fluency"])
    with pytest.raises(NonFiniteError, match="component fluency score is not finite at completion 1"):
        call(reward, 2)
    assert reward.history == []


def test_wrong_score_shape_raises():
    reward = WeightedComponentReward(table_scorer([[[1.0, 2.0]]]), ["a", "b"])
    with pytest.raises(ValueError, match=r"\(N, B\) = \(2, 2\).*\(1, 2\)"):
        call(reward, 2)


# ---------------------------------------------------------------------------------------------
# ComponentRewards adapter
# ---------------------------------------------------------------------------------------------


class FakeEnsemble:
    """K members scoring `offset + len(response)`, member k adding k; records what it was given."""

    def __init__(self, k: int, offset: float) -> None:
        self.k, self.offset, self.seen = k, offset, []

    def score_texts(self, prompts, responses, ended):
        self.seen.append((list(responses), list(ended)))
        base = torch.tensor([self.offset + len(r) for r in responses])
        return torch.stack([base + i for i in range(self.k)])


def test_from_components_reads_ended_off_completion_ids():
    eos = 0
    ensembles = [FakeEnsemble(2, 0.0), FakeEnsemble(3, 10.0)]
    components = ComponentRewards(["sentiment", "fluency"], ["vader", "eos"], ensembles)
    reward = WeightedComponentReward.from_components(components, AggregateConfig(name="mean"), eos,
                                                     weights=[3.0, 1.0])
    # TRL strips the EOS text: "ab" ended (ids end with EOS), "abcd" was cut off
    out = reward(prompts=["p", "q"], completions=["ab", "abcd"], completion_ids=[[5, 6, eos], [5, 6, 7, 8]])
    assert ensembles[0].seen == [(["ab", "abcd"], [True, False])]
    # component means over members: sentiment len + 0.5, fluency 10 + len + 1
    assert out == pytest.approx([0.75 * 2.5 + 0.25 * 13.0, 0.75 * 4.5 + 0.25 * 15.0])
    assert completion_ended([[1, 2], [], [3, 9]], [9, 2]) == [True, False, True]
    with pytest.raises(ValueError, match="completion_ids"):
        reward(prompts=["p"], completions=["ab"])
    with pytest.raises(ValueError, match="conversational"):
        reward(prompts=["p"], completions=[[{"role": "assistant", "content": "ab"}]], completion_ids=[[1]])
    with pytest.raises(ValueError, match="eos_token_ids"):
        WeightedComponentReward.from_components(components, AggregateConfig(), [])


# ---------------------------------------------------------------------------------------------
# EnsembleReward: a proxy ensemble under one aggregator (Coste et al. 2023)
# ---------------------------------------------------------------------------------------------

# K = 3 members, B = 2 completions.
#   completion 0: members (1, 2, 6): mean 3, min 1, population var ((-2)^2 + (-1)^2 + 3^2) / 3 = 14/3
#   completion 1: members (4, 0, 2): mean 2, min 0, population var (2^2 + (-2)^2 + 0^2) / 3 = 8/3
FIXED_SCORES = [[1.0, 4.0], [2.0, 0.0], [6.0, 2.0]]
EOS = 0


class FixedEnsemble:
    """An 'ensemble' returning a fixed (K, B) table; records the ended flags it was given."""

    def __init__(self, table) -> None:
        self.table = torch.tensor(table)
        self.k = self.table.shape[0]
        self.seen: list[tuple[list[str], list[bool]]] = []

    def score_texts(self, prompts, responses, ended):
        self.seen.append((list(responses), list(ended)))
        return self.table.clone()


def call_ensemble(reward: EnsembleReward, **kwargs) -> list[float]:
    """Two completions, as TRL passes them: the first ended with EOS (TRL keeps the EOS id as the last
    id and strips its text), the second was cut off; plus an extra dataset column and TRL's hooks."""
    return reward(prompts=["p", "q"], completions=["good", "bad film"], completion_ids=[[5, 6, EOS], [5, 7, 8]],
                  topic=["x", "y"], trainer_state=None, log_extra=lambda *a: None, **kwargs)


@pytest.mark.parametrize("aggregator, kwargs, expected", [
    ("mean", {}, [3.0, 2.0]),
    ("wco", {}, [1.0, 0.0]),
    # uwo, lambda 0.75, population variance: 3 - 0.75 * 14/3 = 3 - 3.5 = -0.5; 2 - 0.75 * 8/3 = 2 - 2 = 0
    ("uwo", {"uwo_lambda": 0.75}, [-0.5, 0.0]),
    # default lambda 0.5: 3 - 7/3 = 2/3; 2 - 4/3 = 2/3
    ("uwo", {}, [2 / 3, 2 / 3]),
    # sample variance divides by K - 1 = 2: 3 - 0.75 * 7 = -2.25; 2 - 0.75 * 4 = -1
    ("uwo", {"uwo_lambda": 0.75, "variance": "sample"}, [-2.25, -1.0]),
    ("member_1", {}, [2.0, 0.0]),
    ("median", {}, [2.0, 2.0]),
    # mean - 1 * std: std = sqrt(14/3), sqrt(8/3)
    ("mean_minus_std", {}, [3.0 - math.sqrt(14 / 3), 2.0 - math.sqrt(8 / 3)]),
])
def test_ensemble_reward_aggregators_against_hand_worked_numbers(aggregator, kwargs, expected):
    reward = EnsembleReward(FixedEnsemble(FIXED_SCORES), aggregator, eos_token_ids=EOS, **kwargs)
    assert call_ensemble(reward) == pytest.approx(expected)
    assert reward.__name__ == f"ensemble_{aggregator}"


def test_ensemble_reward_reads_ended_off_completion_ids_and_logs_member_stats():
    ensemble = FixedEnsemble(FIXED_SCORES)
    reward = EnsembleReward(ensemble, "uwo", uwo_lambda=0.75, eos_token_ids=[EOS, 99], name="ens")
    logged: dict[str, float] = {}
    out = call_ensemble(reward, log_metric=lambda key, value: logged.__setitem__(key, value))
    # the first completion's last id is EOS: ended; the second's is not
    assert ensemble.seen == [(["good", "bad film"], [True, False])]
    assert out == pytest.approx([-0.5, 0.0])
    # member means over the two completions: (1 + 4) / 2, (2 + 0) / 2, (6 + 2) / 2; disagreement: the
    # population std across members, averaged over completions; score: mean of the uwo rewards
    member_std = (math.sqrt(14 / 3) + math.sqrt(8 / 3)) / 2
    assert logged == pytest.approx({"ens/member_0": 2.5, "ens/member_1": 1.0, "ens/member_2": 4.0,
                                    "ens/member_std": member_std, "ens/score": -0.25})
    assert reward.history == [{"call": 0, "global_step": None, "member_means": pytest.approx([2.5, 1.0, 4.0]),
                               "member_std": pytest.approx(member_std), "score_mean": pytest.approx(-0.25)}]
    call_ensemble(reward)
    assert [h["call"] for h in reward.history] == [0, 1] and reward.calls == 2


def test_ensemble_reward_nan_member_score_names_the_member_and_completion():
    table = [[1.0, 4.0], [2.0, float("nan")], [6.0, 2.0]]
    reward = EnsembleReward(FixedEnsemble(table), "mean", eos_token_ids=EOS)
    with pytest.raises(NonFiniteError, match="member_1 score is not finite at completion 1"):
        call_ensemble(reward)
    assert reward.history == [] and reward.calls == 0


@pytest.mark.parametrize("kwargs, error, match", [
    ({"aggregator": "bogus"}, ValueError, "unknown aggregator 'bogus'"),
    ({"aggregator": "member_3"}, ValueError, "member index 3 out of range for an ensemble of size 3"),
    ({"variance": "unbiased"}, ValueError, "variance"),
    ({"uwo_lambda": -1.0}, ValueError, "uwo_lambda"),
    ({"eos_token_ids": []}, ValueError, "eos_token_ids"),
])
def test_ensemble_reward_bad_settings_raise_at_construction(kwargs, error, match):
    args = {"aggregator": "uwo", "eos_token_ids": EOS, **kwargs}
    ensemble = FixedEnsemble(FIXED_SCORES)
    with pytest.raises(error, match=match):
        EnsembleReward(ensemble, **args)
    assert ensemble.seen == []


def test_ensemble_reward_refuses_conversational_input_and_missing_ids():
    reward = EnsembleReward(FixedEnsemble(FIXED_SCORES), "mean", eos_token_ids=EOS)
    chat = [[{"role": "assistant", "content": "good"}], [{"role": "assistant", "content": "bad"}]]
    with pytest.raises(ValueError, match="conversational"):
        reward(prompts=["p", "q"], completions=chat, completion_ids=[[1], [2]])
    with pytest.raises(ValueError, match="conversational"):
        reward(prompts=[[{"role": "user", "content": "p"}]] * 2, completions=["a", "b"], completion_ids=[[1], [2]])
    with pytest.raises(ValueError, match="completion_ids"):
        reward(prompts=["p", "q"], completions=["a", "b"])
    wrong_k = EnsembleReward(FixedEnsemble(FIXED_SCORES[:2]), "mean", eos_token_ids=EOS)
    wrong_k.k = 3  # claims more members than it returns
    with pytest.raises(ValueError, match=r"\(K, B\) = \(3, 2\).*\(2, 2\)"):
        call_ensemble(wrong_k)


# ---------------------------------------------------------------------------------------------
# End to end: TRL's GRPOTrainer and RLOOTrainer on a tiny random GPT-2 (in a subprocess, so that
# accelerate / torch.distributed state does not leak into the rest of the session)
# ---------------------------------------------------------------------------------------------

E2E_SETUP = r"""
import json, math, sys
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from rlhf_overopt.testbed.tokenizer import train_tokenizer

out = sys.argv[1]
words = ["the", "film", "was", "good", "bad", "plot", "fun", "boring", "great", "acting"]
tok = train_tokenizer([" ".join(words[(i * 7 + j) % len(words)] for j in range(8)) for i in range(50)], 300,
                      out + "/model")
torch.manual_seed(0)
GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                           eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)).save_pretrained(out + "/model")
prompts = ["the film was", "the plot", "acting was", "but the", "great", "a bad", "fun", "the score"]
dataset = Dataset.from_dict({"prompt": prompts, "topic": ["film"] * len(prompts)})  # an extra column
common = dict(report_to=[], use_cpu=True, bf16=False, max_steps=2, per_device_train_batch_size=4,
              num_generations=2, max_completion_length=6, logging_steps=1, save_strategy="no",
              learning_rate=1e-3, generation_kwargs={"forced_eos_token_id": tok.eos_token_id})
"""

E2E_SCRIPT = E2E_SETUP + r"""
from rlhf_overopt.rewards.components import ComponentRewards
from rlhf_overopt.config.experiment import AggregateConfig
from rlhf_overopt.rewards.trl_rewards import WeightedComponentReward


class TextFeatures:  # an 'ensemble' of one member scoring a text feature
    k = 1

    def __init__(self, feature):
        self.feature, self.seen = feature, []

    def score_texts(self, prompts, responses, ended):
        self.seen += list(zip(responses, ended))
        return torch.tensor([[float(self.feature(r)) for r in responses]])


spaces, length = TextFeatures(lambda r: r.count(" ")), TextFeatures(lambda r: -len(r) / 10)
components = ComponentRewards(["spaces", "length"], ["a", "b"], [spaces, length])
result = {}
for kind, config, trainer_cls in (("grpo", GRPOConfig, GRPOTrainer), ("rloo", RLOOConfig, RLOOTrainer)):
    extra = {"scale_rewards": "none"} if kind == "grpo" else {}
    reward = WeightedComponentReward.from_components(components, AggregateConfig(), tok.eos_token_id,
                                                     weights=[1.0, 1.0], mode="hypervolume")
    trainer = trainer_cls(model=out + "/model", reward_funcs=[reward], train_dataset=dataset, processing_class=tok,
                          args=config(output_dir=f"{out}/{kind}", **common, **extra))
    trainer.train()
    logged = [row for row in trainer.state.log_history if "weighted_components/scale" in row]
    result[kind] = {"global_step": trainer.state.global_step, "calls": reward.calls, "history": reward.history,
                    "reward_logged": any("rewards/weighted_components/mean" in row
                                         for row in trainer.state.log_history),
                    "scale_logged": len(logged)}
seen = spaces.seen
result["ended"] = [e for _, e in seen]
result["eos_text_in_completions"] = any(tok.eos_token in r for r, _ in seen)
print("RESULT " + json.dumps(result))
"""


def _run_e2e(script: str, tmp_path: Path) -> dict:
    env = {**os.environ, "WANDB_MODE": "disabled", "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_grpo_and_rloo_trainers_run_with_the_weighted_reward(tmp_path):
    result = _run_e2e(E2E_SCRIPT, tmp_path)
    for kind in ("grpo", "rloo"):
        r = result[kind]
        assert r["global_step"] == 2, r
        assert r["calls"] >= 2 and len(r["history"]) == r["calls"]
        assert r["reward_logged"] and r["scale_logged"] >= 1
        for h in r["history"]:
            numbers = [h["scale"], h["hypervolume"], h["scale_next"], *h["weights"], *h["component_means"]]
            numbers += [] if h["gain"] is None else [h["gain"]]
            assert all(math.isfinite(x) for x in numbers), h
        assert r["history"][0]["scale"] == 1.0 and r["history"][0]["observed"]
        second = r["history"][1]
        assert second["scale_next"] == pytest.approx(0.5 + 1.5 * math.tanh(second["gain"]))
    # forced_eos_token_id makes every completion end with EOS: TRL strips its text, the ids show it
    assert result["ended"] and all(result["ended"])
    assert not result["eos_text_in_completions"]


ENSEMBLE_E2E_SCRIPT = E2E_SETUP + r"""
from transformers import GPT2ForSequenceClassification

from rlhf_overopt.rewards.ensemble import ProxyEnsemble
from rlhf_overopt.rewards.members import SeparateMembers
from rlhf_overopt.rewards.trl_rewards import EnsembleReward

# a real (untrained) proxy ensemble: three independent tiny GPT-2 reward models, raw scores
members = []
for i in range(3):
    torch.manual_seed(100 + i)
    members.append(GPT2ForSequenceClassification(GPT2Config(
        vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2, num_labels=1,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval())
ensemble = ProxyEnsemble(SeparateMembers("independent", [f"member_{i}" for i in range(3)], members), tok,
                         max_length=32, standardize=False)
result = {}
for kind, config, trainer_cls, aggregator in (("grpo", GRPOConfig, GRPOTrainer, "uwo"),
                                              ("rloo", RLOOConfig, RLOOTrainer, "wco")):
    reward = EnsembleReward(ensemble, aggregator, eos_token_ids=tok.eos_token_id)
    trainer = trainer_cls(model=out + "/model", reward_funcs=[reward], train_dataset=dataset, processing_class=tok,
                          args=config(output_dir=f"{out}/{kind}", **common))
    trainer.train()
    keys = set().union(*(row.keys() for row in trainer.state.log_history))
    result[kind] = {"name": reward.__name__, "global_step": trainer.state.global_step, "calls": reward.calls,
                    "history": reward.history, "logged": sorted(k for k in keys if reward.__name__ in k)}
print("RESULT " + json.dumps(result))
"""


@pytest.mark.slow
def test_grpo_and_rloo_trainers_run_with_the_ensemble_reward(tmp_path):
    result = _run_e2e(ENSEMBLE_E2E_SCRIPT, tmp_path)
    for kind, name in (("grpo", "ensemble_uwo"), ("rloo", "ensemble_wco")):
        r = result[kind]
        assert r["name"] == name and r["global_step"] == 2, r
        assert f"rewards/{name}/mean" in r["logged"], r["logged"]
        assert {f"{name}/member_std", f"{name}/score", f"{name}/member_2"} <= set(r["logged"]), r["logged"]
        assert r["calls"] >= 2 and len(r["history"]) == r["calls"]
        for h in r["history"]:
            assert len(h["member_means"]) == 3
            assert all(math.isfinite(x) for x in [*h["member_means"], h["member_std"], h["score_mean"]]), h
            assert h["member_std"] > 0  # three differently initialized members disagree
        assert [h["call"] for h in r["history"]] == list(range(r["calls"]))


DIST_SCRIPT = r"""
import json, socket, sys
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from rlhf_overopt.rewards.trl_rewards import WeightedComponentReward


def worker(rank, port, out):
    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    # rank 0 scores 2 completions at (0, 0) then 1 at (3, 3); rank 1 scores 2 at (2, 2) then 3 at (1, 1):
    # the points over both ranks are (1, 1) and (6/4, 6/4)
    tables = {0: [[[0.0, 0.0], [0.0, 0.0]], [[3.0], [3.0]]], 1: [[[2.0, 2.0], [2.0, 2.0]], [[1.0] * 3, [1.0] * 3]]}
    batches = iter(tables[rank])
    reward = WeightedComponentReward(lambda p, c: torch.tensor(next(batches)), ["a", "b"], mode="hypervolume")
    for table in tables[rank]:
        b = len(table[0])
        reward(prompts=["p"] * b, completions=["c"] * b, completion_ids=[[1]] * b)
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"reference": reward.reference.tolist(), "front": reward.front.tolist(), "scale": reward.scale}, f)
    tdist.destroy_process_group()


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, sys.argv[1]), nprocs=2)
"""


@pytest.mark.slow
def test_two_processes_share_one_point_and_scale(tmp_path):
    script = tmp_path / "dist_check.py"
    script.write_text(DIST_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in (0, 1)]
    assert results[0] == results[1]
    assert results[0]["reference"] == pytest.approx([0.0, 0.0])
    assert results[0]["front"] == [[1.5, 1.5]]
    assert results[0]["scale"] == pytest.approx(0.5 + 1.5 * math.tanh(1.5 ** 2 - 1.0 ** 2))
