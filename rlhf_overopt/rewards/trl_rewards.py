"""Reward functions for TRL's `GRPOTrainer` and `RLOOTrainer` (entries of `reward_funcs`).

`EnsembleReward`: a proxy ensemble combined by one aggregator. For every generation batch it
scores the B completions with the K members of a proxy ensemble, (K, B), and returns
`rlhf_overopt.ops.aggregate.aggregate(scores, aggregator)`, one of the rules of Coste et al. 2023,
"Reward Model Ensembles Help Mitigate Overoptimization" (arXiv:2310.02743): mean, worst-case (wco,
min over members) and uncertainty-weighted (uwo, mean - lambda * Var over members, population
variance by default); or median, mean_minus_std (mean - k * std) or member_<i> (a single reward
model, the baseline they compare against). It logs every member's mean score and the ensemble's
disagreement (the population std across members, averaged over completions), which Coste et al.
follow as the sign of overoptimization, and the mean aggregated score. It keeps no state across
calls besides a call count and its history.

`WeightedComponentReward`: component rewards with fixed or hypervolume-guided weights (Lu et al.
2025, "Learning to Optimize Multi-Objective Alignment Through Dynamic Reward Weighting"). For every
generation batch it scores the B completions with N component scorers and returns

    r_b = scale * sum_j w_j * s_jb            (w = weights / sum(weights), constant)

weighting mode:
- fixed:        scale = 1 throughout (the fixed linear-weight baseline).
- hypervolume:  every `update_every` calls, the mean component vector of the completions scored
                since the last update is a point of the objective space; its hypervolume gain
                delta_HV over the Pareto buffer of earlier points sets `scale = 0.5 + 1.5 tanh(delta_HV)`
                for the calls that follow, and the buffer keeps the non-dominated points. The
                reference point is the first point minus `reference_offset` in every objective;
                the first point only founds the buffer (scale stays 1).
- gradient:     not available here. The gradient-based update needs per-objective policy gradients,
                which a reward function never sees; use `method: dynamic_ppo` with
                `weighting.mode=gradient` (the dynamic_ppo driver, loops/dynamic_ppo.py).

The buffer is tracked in fixed mode too (history only), as dynamic_ppo does, so a fixed-weight run
reports the front it reaches. The math is rlhf_overopt.ops.constrained's (`hypervolume`,
`pareto_buffer_add`, `hypervolume_scale`); this module is bookkeeping around it.

How TRL 1.16 calls a custom (non-module, non-async) reward function
(trl/trainer/grpo_trainer.py `_calculate_rewards`; rloo_trainer.py is the same):

    reward_func(prompts=prompts, completions=completions, completion_ids=completion_ids_list,
                **reward_kwargs)

- all keyword arguments; `reward_kwargs` holds every dataset column except prompt / completion /
  completion_ids (one value per completion) plus `trainer_state`, `log_extra`, `log_metric`
  (and `environments` with an environment factory), so the function must take **kwargs;
- it must return one float per completion (None becomes NaN: "no reward from this function");
- its display name is `__name__` if present, else the class name (trl.trainer.utils.get_callable_name),
  and TRL logs `rewards/<name>/mean`;
- `completions` are decoded with `skip_special_tokens=True`, so the EOS text is stripped; whether a
  completion ended is only visible in `completion_ids`, which TRL cuts after the first EOS (the EOS
  id is kept as the last id). `EnsembleReward` and `WeightedComponentReward.from_components`
  therefore read `ended` off `completion_ids`;
- each process scores its own share of the generation batch, and calls happen once per generation
  batch (in eval too), so "calls" count generation batches, not optimizer steps. Values given to
  `log_metric` are averaged over processes by TRL. With several processes the component reward's
  window sums are all-reduced (when torch.distributed is initialized) so every rank sees the same
  point and scale.

Note on where the component reward's scale matters: a positive scale on the only reward is
cancelled by reward standardization. In GRPO it acts only with `scale_rewards="none"` (default
"group" divides by the group std) and `multi_objective_aggregation="sum_then_normalize"`, or next
to other reward functions; in RLOO it acts against the KL penalty (`beta > 0`) unless
`normalize_advantages=True`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist

from rlhf_overopt.errors import NonFiniteError
from rlhf_overopt.ops.aggregate import aggregate, parse_aggregator_name
from rlhf_overopt.ops.constrained import (
    hypervolume,
    hypervolume_scale,
    normalized_weights,
    pareto_buffer_add,
    weighted_reward,
)

if TYPE_CHECKING:
    from rlhf_overopt.config.sections import AggregateConfig
    from rlhf_overopt.rewards.components import ComponentRewards
    from rlhf_overopt.rewards.ensemble import ProxyEnsemble

WEIGHTING_MODES: tuple[str, ...] = ("fixed", "hypervolume")
"""Modes a reward function can implement (gradient weighting lives in dynamic_ppo)."""

GRADIENT_MODE_MESSAGE = (
    "weighting mode 'gradient' needs per-objective policy gradients, which a TRL reward function never sees; "
    "use `method: dynamic_ppo` with `weighting.mode=gradient` instead")

ScoreFn = Callable[..., Any]
"""`score_fn(prompts, completions) -> (N, B)` component scores (tensor or nested list of floats);
called as `score_fn(prompts, completions, completion_ids)` when `needs_completion_ids=True`."""


def completion_ended(completion_ids: Sequence[Sequence[int]], eos_token_ids: Sequence[int]) -> list[bool]:
    """Whether each completion ended with EOS: its last token id is one of `eos_token_ids`.

    TRL keeps the completion's ids up to and including the first EOS, and strips the EOS text from
    the decoded completion, so the ids are where this shows.
    """
    eos = {int(i) for i in eos_token_ids}
    return [len(ids) > 0 and int(ids[-1]) in eos for ids in completion_ids]


def _eos_id_list(eos_token_ids: int | Sequence[int]) -> list[int]:
    """`eos_token_ids` as a non-empty list of ints (ValueError otherwise)."""
    ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"eos_token_ids: need an int or a non-empty sequence of ints, got {eos_token_ids!r}")
    return ids


def _check_plain_text(scorer: str, prompts: Sequence[Any], completions: Sequence[Any]) -> None:
    """Raise ValueError unless every prompt and completion is a string (not a chat message list)."""
    for what, texts in (("prompts", prompts), ("completions", completions)):
        if not all(isinstance(t, str) for t in texts):
            raise ValueError(f"{scorer} score plain text; got conversational (non-string) {what}. "
                             "Use a standard (non-chat) prompt dataset")


class _ComponentScorer:
    """ComponentRewards as a score_fn: `(prompts, completions, completion_ids) -> (N, B)`."""

    def __init__(self, components: ComponentRewards, agg: AggregateConfig, eos_token_ids: Sequence[int]) -> None:
        self.components, self.agg, self.eos_token_ids = components, agg, list(eos_token_ids)
        self.calls = 0

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 completion_ids: Sequence[Sequence[int]] | None) -> torch.Tensor:
        if completion_ids is None:
            raise ValueError("scoring ComponentRewards needs completion_ids (whether a completion ended with EOS "
                             "shows only there: TRL strips the EOS text from completions)")
        _check_plain_text("ComponentRewards", prompts, completions)
        ended = completion_ended(completion_ids, self.eos_token_ids)
        _, component_scores = self.components.score(list(prompts), list(completions), ended, self.agg, self.calls)
        self.calls += 1
        return component_scores


class WeightedComponentReward:
    """A TRL reward function: N component scores, weighted, optionally hypervolume-scaled.

    score_fn: `(prompts, completions) -> (N, B)` component scores, N = len(names); with
        needs_completion_ids, `(prompts, completions, completion_ids)`.
    names: the N component names (for errors, history and logged metrics).
    weights: N non-negative weights with a positive sum, normalized to sum 1; None means uniform.
    mode: "fixed" or "hypervolume" ("gradient" raises ValueError: see the module docstring).
    update_every: in hypervolume mode, observe a point (and set the scale) every this many calls.
    reference_offset: the reference point is the first point minus this in every objective (> 0).
    name: the `__name__` TRL logs the reward under (`rewards/<name>/mean`).
    """

    def __init__(self, score_fn: ScoreFn, names: Sequence[str], weights: Sequence[float] | None = None,
                 mode: str = "fixed", *, update_every: int = 1, reference_offset: float = 1.0,
                 name: str = "weighted_components", needs_completion_ids: bool = False) -> None:
        if mode == "gradient":
            raise ValueError(GRADIENT_MODE_MESSAGE)
        if mode not in WEIGHTING_MODES:
            raise ValueError(f"unknown weighting mode {mode!r} (known: {', '.join(WEIGHTING_MODES)}; "
                             "gradient only through method: dynamic_ppo)")
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        self.names = [str(x) for x in names]
        if not self.names or len(set(self.names)) != len(self.names):
            raise ValueError(f"names: need at least one component and distinct names, got {self.names}")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"update_every must be an integer >= 1, got {update_every!r}")
        if not (math.isfinite(reference_offset) and reference_offset > 0):
            raise ValueError(f"reference_offset must be finite and > 0, got {reference_offset}")
        n = len(self.names)
        self.score_fn = score_fn
        self.mode = mode
        self.weights = normalized_weights(weights, n)
        self.update_every = update_every
        self.reference_offset = float(reference_offset)
        self.needs_completion_ids = needs_completion_ids
        self.__name__ = name
        self.scale = 1.0
        self.front = torch.zeros(0, n, dtype=torch.float64)
        """The Pareto buffer: non-dominated points, (P, N)."""
        self.reference: torch.Tensor | None = None
        self.calls = 0
        self.history: list[dict[str, Any]] = []
        """One dict per call: call, global_step, weights, scale (applied to this call), component_means
        (this process's batch), observed, hypervolume (of the buffer after the call), gain (None
        unless observed), scale_next, pareto_buffer_size."""
        self._window_sum = torch.zeros(n, dtype=torch.float64)
        self._window_count = 0

    @property
    def n(self) -> int:
        return len(self.names)

    @classmethod
    def from_components(cls, components: ComponentRewards, agg: AggregateConfig,
                        eos_token_ids: int | Sequence[int], weights: Sequence[float] | None = None,
                        mode: str = "fixed", **kwargs: Any) -> WeightedComponentReward:
        """The weighted reward of a ComponentRewards (each component's ensemble aggregated by `agg`).

        eos_token_ids: the tokenizer's EOS id (or the ids TRL stops at, `trainer.eos_token_ids`): a
        completion ended when its last id is one of them (TRL strips the EOS text, see the module
        docstring). Other keyword arguments go to the constructor.
        """
        return cls(_ComponentScorer(components, agg, _eos_id_list(eos_token_ids)), components.names, weights, mode,
                   needs_completion_ids=True, **kwargs)

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[float]:
        """One reward per completion (TRL's calling convention; extra keyword arguments are ignored
        except `trainer_state`, whose global_step goes into the history, and `log_metric`, which
        gets the scale, the buffer's hypervolume and the component means)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if self.needs_completion_ids:
            raw = self.score_fn(prompts, completions, completion_ids)
        else:
            raw = self.score_fn(prompts, completions)
        scores = torch.as_tensor(raw).double().cpu()
        if scores.shape != (self.n, len(completions)):
            raise ValueError(f"score_fn must return (N, B) = ({self.n}, {len(completions)}) component scores, "
                             f"got shape {tuple(scores.shape)}")
        for j, component in enumerate(self.names):
            bad = (~torch.isfinite(scores[j])).nonzero()
            if bad.numel():
                raise NonFiniteError(f"call {self.calls}: component {component} score is not finite at completion "
                                     f"{int(bad[0])} ({int(bad.shape[0])} value(s))")
        scale = self.scale
        rewards = weighted_reward(scores, self.weights, scale)
        # the point is the mean over every completion scored since the last observation
        self._window_sum += scores.sum(1)
        self._window_count += scores.shape[1]
        observed = (self.calls + 1) % self.update_every == 0
        gain = self.observe(*self._synced_window()) if observed else None
        if observed:
            self._window_sum.zero_()
            self._window_count = 0
        state = kwargs.get("trainer_state")
        hv = 0.0 if self.reference is None else float(hypervolume(self.front, self.reference))
        means = scores.mean(1).tolist()
        self.history.append({
            "call": self.calls, "global_step": getattr(state, "global_step", None),
            "weights": self.weights.tolist(), "scale": scale, "component_means": means, "observed": observed,
            "hypervolume": hv, "gain": gain, "scale_next": self.scale, "pareto_buffer_size": int(self.front.shape[0]),
        })
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            log_metric(f"{self.__name__}/scale", scale)
            log_metric(f"{self.__name__}/hypervolume", hv)
            for component, value in zip(self.names, means):
                log_metric(f"{self.__name__}/{component}", value)
        self.calls += 1
        return rewards.tolist()

    def _synced_window(self) -> tuple[torch.Tensor, int]:
        """The window's component sums (N,) and completion count, summed over processes when a
        torch.distributed group is up (each rank scores only its share of a generation batch)."""
        if not tdist.is_initialized() or tdist.get_world_size() == 1:
            return self._window_sum.clone(), self._window_count
        device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else "cpu"
        packed = torch.cat([self._window_sum, torch.tensor([float(self._window_count)], dtype=torch.float64)])
        packed = packed.to(device)
        tdist.all_reduce(packed, op=tdist.ReduceOp.SUM)
        packed = packed.cpu()
        return packed[:-1], round(float(packed[-1]))

    def observe(self, sums: torch.Tensor, count: int) -> float:
        """Add the point `sums / count` (N,) to the buffer; returns its hypervolume gain.

        The first point sets the reference (point - reference_offset) and leaves the scale at 1; in
        hypervolume mode each later point sets `scale = 0.5 + 1.5 tanh(gain)` (Lu et al. 2025).
        """
        if count <= 0:
            raise ValueError(f"observe: need a positive completion count, got {count}")
        point = sums.double() / count
        first = self.reference is None
        if first:
            self.reference = point - self.reference_offset
        self.front, gain = pareto_buffer_add(self.front, point, self.reference)
        if self.mode == "hypervolume" and not first:
            self.scale = float(hypervolume_scale(gain))
        return gain

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs: scale, buffer, reference, call count and the open window."""
        return {"scale": self.scale, "front": self.front.tolist(), "calls": self.calls,
                "reference": None if self.reference is None else self.reference.tolist(),
                "window_sum": self._window_sum.tolist(), "window_count": self._window_count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.front = torch.tensor(state["front"], dtype=torch.float64).reshape(-1, self.n)
        self.reference = None if state["reference"] is None else torch.tensor(state["reference"], dtype=torch.float64)
        self.calls = int(state["calls"])
        self._window_sum = torch.tensor(state["window_sum"], dtype=torch.float64)
        self._window_count = int(state["window_count"])


# ---------------------------------------------------------------------------------------------
# A proxy ensemble combined by an aggregator (Coste et al. 2023)
# ---------------------------------------------------------------------------------------------


class EnsembleReward:
    """A TRL reward function: K proxy scores per completion, combined by one aggregator.

    ensemble: anything with `k` and `score_texts(prompts, responses, ended) -> (K, B)` (the
        project's `ProxyEnsemble`); `ended` comes from `completion_ids` (see the module docstring).
    aggregator: "mean", "wco", "uwo", "median", "mean_minus_std" or "member_<i>", validated against
        `ensemble.k` here, applied by `rlhf_overopt.ops.aggregate.aggregate`.
    uwo_lambda, std_k, variance: the UWO coefficient, the mean_minus_std coefficient and the
        variance ("population", the paper's, or "sample") of both.
    eos_token_ids: the tokenizer's EOS id, or the ids TRL stops at (`trainer.eos_token_ids`).
    name: the `__name__` TRL logs the reward under (`rewards/<name>/mean`); default
        `ensemble_<aggregator>`.
    """

    def __init__(self, ensemble: ProxyEnsemble | Any, aggregator: str = "uwo", *, uwo_lambda: float = 0.5,
                 std_k: float = 1.0, variance: str = "population", eos_token_ids: int | Sequence[int],
                 name: str | None = None) -> None:
        if not callable(getattr(ensemble, "score_texts", None)):
            raise TypeError(f"ensemble must have score_texts(prompts, responses, ended), got {type(ensemble).__name__}")
        k = ensemble.k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"ensemble.k must be an integer >= 1, got {k!r}")
        parse_aggregator_name(aggregator, k)
        if variance not in ("population", "sample"):
            raise ValueError(f"variance must be 'population' or 'sample', got {variance!r}")
        if variance == "sample" and k < 2 and aggregator in ("uwo", "mean_minus_std"):
            raise ValueError(f"aggregator {aggregator!r} with sample variance needs at least 2 ensemble members")
        if not (math.isfinite(uwo_lambda) and uwo_lambda >= 0):
            raise ValueError(f"uwo_lambda must be finite and >= 0, got {uwo_lambda}")
        if not math.isfinite(std_k):
            raise ValueError(f"std_k must be finite, got {std_k}")
        self.ensemble = ensemble
        self.k = k
        self.aggregator = aggregator
        self.uwo_lambda, self.std_k, self.variance = float(uwo_lambda), float(std_k), variance
        self.eos_token_ids = _eos_id_list(eos_token_ids)
        self.__name__ = name or f"ensemble_{aggregator}"
        names = getattr(ensemble, "member_names", None)
        self.member_names = [str(x) for x in names] if names is not None and len(names) == k else [
            f"member_{i}" for i in range(k)]
        self.calls = 0
        self.history: list[dict[str, Any]] = []
        """One dict per call: call, global_step, member_means (K, this process's batch), member_std
        (mean over completions of the population std across members), score_mean."""

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any],
                 completion_ids: Sequence[Sequence[int]] | None = None, **kwargs: Any) -> list[float]:
        """One aggregated reward per completion (TRL's calling convention; of the extra keyword
        arguments only `trainer_state` (global_step, for the history) and `log_metric` are used)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        _check_plain_text("Proxy ensembles", prompts, completions)
        if completion_ids is None:
            raise ValueError("EnsembleReward needs completion_ids (whether a completion ended with EOS shows only "
                             "there: TRL strips the EOS text from completions)")
        if len(completion_ids) != len(completions):
            raise ValueError(f"{len(completion_ids)} completion_ids but {len(completions)} completions")
        ended = completion_ended(completion_ids, self.eos_token_ids)
        raw = self.ensemble.score_texts(list(prompts), list(completions), ended)
        scores = torch.as_tensor(raw).detach().double().cpu()
        if scores.shape != (self.k, len(completions)):
            raise ValueError(f"ensemble.score_texts must return (K, B) = ({self.k}, {len(completions)}) scores, "
                             f"got shape {tuple(scores.shape)}")
        for i, member in enumerate(self.member_names):
            bad = (~torch.isfinite(scores[i])).nonzero()
            if bad.numel():
                label = f"member_{i}" if member == f"member_{i}" else f"member_{i} ({member})"
                raise NonFiniteError(f"call {self.calls}: {self.__name__}: {label} score is not finite at "
                                     f"completion {int(bad[0])} ({int(bad.shape[0])} value(s))")
        rewards = aggregate(scores, self.aggregator, uwo_lambda=self.uwo_lambda, std_k=self.std_k,
                            variance=self.variance)
        member_means = scores.mean(1).tolist()
        # the ensemble's disagreement: population std across members, averaged over completions
        member_std = float(scores.std(0, correction=0).mean()) if scores.shape[1] else 0.0
        score_mean = float(rewards.mean()) if rewards.numel() else 0.0
        state = kwargs.get("trainer_state")
        self.history.append({"call": self.calls, "global_step": getattr(state, "global_step", None),
                             "member_means": member_means, "member_std": member_std, "score_mean": score_mean})
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            for i, value in enumerate(member_means):
                log_metric(f"{self.__name__}/member_{i}", value)
            log_metric(f"{self.__name__}/member_std", member_std)
            log_metric(f"{self.__name__}/score", score_mean)
        self.calls += 1
        return rewards.tolist()
