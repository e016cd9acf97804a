"""The gold evaluation stage: one evaluator -> one typed evaluation record -> one curves writer.

    prompts (this rank's share of the held-out split)
      ─▶ sample (eval temperature, top-p; the same draw at every evaluation: common random numbers)
      ─▶ KL(pi || pi_init) on the same tokens, summed over response tokens (eval.kl_estimator)
      ─▶ proxy members (K, B) -> aggregate -> proxy_score (B,)   [or component ensembles (N, B)]
      ─▶ gold_score (B,)
      ─▶ [aggregate.shaping=par: proxy_shaped (B,) against the prompt's cached references]
      ─▶ gather every rank's per-sample numbers ─▶ EvalPoint ─▶ EvalLog: curves.jsonl, samples, W&B

Every row carries the overoptimization signals (rlhf_overopt.ops.signals), computed on the gathered
samples of all ranks: proxy_member_std (ensemble disagreement), proxy_gold_spearman (does the
proxy still rank the policy's samples as gold does) and response_length.

KL to the initial policy is measured at every evaluation whatever the method's own KL penalty is
(a run with a zero coefficient still moves away from its start). The row is the same as a
one-rank evaluation of all prompts.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_overopt.errors import check_finite
from rlhf_overopt.ops.kl import sequence_kl
from rlhf_overopt.ops.shaping import par_reward
from rlhf_overopt.ops.signals import member_std, spearman
from rlhf_overopt.rollout import generate, sequence_logprobs
from rlhf_overopt.run import dist
from rlhf_overopt.run.engines import gathered

log = logging.getLogger("rlhf_overopt")


def score_proxies(ensemble, aggregate_fn: Callable[[torch.Tensor], torch.Tensor], prompts: list[str],
                  responses: list[str], ended: list[bool], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """proxy_scores (K, B) from every member and proxy_score (B,) aggregated; checked finite."""
    proxy_scores = ensemble.score_texts(prompts, responses, ended).float().cpu()
    for i in range(proxy_scores.shape[0]):
        check_finite(proxy_scores[i], f"proxy member {i} score", step)
    return proxy_scores, aggregate_fn(proxy_scores)


def score_gold(gold, prompts: list[str], responses: list[str], ended: list[bool], step: int) -> torch.Tensor:
    """gold_score (B,), checked finite."""
    gold_score = gold.score(prompts, responses, ended).float().cpu()
    check_finite(gold_score, "gold score", step)
    return gold_score


@dataclass
class EvalPoint:
    """One evaluation of a policy on the held-out prompts: a curves.jsonl row.

    `proxy_score` is the objective actually optimized before any shaping (the aggregated ensemble,
    or for composite methods the weighted sum of the component scores): what gold-vs-proxy curves
    compare; `proxy_shaped` the mean PAR-shaped score with aggregate.shaping=par (else absent);
    `proxy_member_scores` every member's mean (members of all components, grouped by component);
    `proxy_member_std` the mean over samples of the population std across members (within each
    component, averaged), the ensemble disagreement (Coste et al. 2023); `proxy_gold_spearman`
    the rank correlation of the per-sample proxy score and gold (None when either is constant);
    `response_length` the mean response tokens.
    """

    method: str
    step: int
    kl: float
    kl_estimator: str
    proxy_score: float
    proxy_member_scores: list[float]
    proxy_member_std: float
    gold_score: float
    gold_stderr: float
    aggregator: str
    eos_rate: float
    response_length: float
    n_eval: int
    components: dict[str, Any] = field(default_factory=dict)
    """component_names, component_scores and (testbed gold) gold_components, for composite methods."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Method keys: kl_coef, beta, lagrange_multipliers, reward_weights, ..."""
    proxy_gold_spearman: float | None = None
    proxy_shaped: float | None = None

    def row(self) -> dict[str, Any]:
        return {"method": self.method, "step": self.step, "kl": self.kl, "sqrt_kl": math.sqrt(max(self.kl, 0.0)),
                "kl_estimator": self.kl_estimator, "proxy_score": self.proxy_score,
                "proxy_member_scores": self.proxy_member_scores, "proxy_member_std": self.proxy_member_std,
                "proxy_gold_spearman": self.proxy_gold_spearman,
                **({} if self.proxy_shaped is None else {"proxy_shaped": self.proxy_shaped}),
                "gold_score": self.gold_score, "gold_stderr": self.gold_stderr, "aggregator": self.aggregator,
                **self.components, "eos_rate": self.eos_rate, "response_length": self.response_length,
                "n_eval": self.n_eval, **self.extra}


@torch.no_grad()
def evaluate_policy(*, policy, reference, tokenizer, prompts: list[str], gold, ev, zero_stage: int,
                    generator: torch.Generator, method: str, step: int, aggregator: str,
                    ensemble=None, aggregate_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    components=None, agg_cfg=None, component_weights: list[float] | None = None,
                    shaping_references: torch.Tensor | None = None,
                    extra: dict[str, Any] | None = None) -> tuple[EvalPoint, list[dict[str, Any]]]:
    """Evaluate on this rank's `prompts`; returns (EvalPoint, samples), identical on every rank.

    Proxies: an `ensemble` with its `aggregate_fn` (K, B) -> (B,), or the composite methods'
    `components` (rlhf_overopt.rewards.components.ComponentRewards, each ensemble aggregated by
    `agg_cfg`) with the current `component_weights`. `ev` is the eval config section.
    shaping_references: (B, k) aggregated scores of the PAR references of these `prompts`
    (aggregate.shaping=par, ensemble runs only), for `proxy_shaped`.
    """
    # 1. sample on held-out prompts
    with gathered(policy, zero_stage):
        ro = generate(policy, tokenizer, prompts, max_new_tokens=ev.max_new_tokens, temperature=ev.temperature,
                      top_p=ev.top_p, generator=generator, batch_size=ev.batch_size)
    # 2. KL to the initial policy on the same tokens
    with gathered(reference, zero_stage):
        ref_logprobs = sequence_logprobs(reference, ro.query_ids, ro.query_mask, ro.response_ids,
                                         ro.response_mask, temperature=ev.temperature)
    kl = sequence_kl(ro.logprobs, ref_logprobs, ro.response_mask, ev.kl_estimator).float().cpu()
    # 3. proxies and gold
    ended = ro.ended.cpu().tolist()
    gold_score = score_gold(gold, ro.prompts, ro.responses, ended, step)
    if components is None:
        members, proxy_score = score_proxies(ensemble, aggregate_fn, ro.prompts, ro.responses, ended, step)
        groups = [members.shape[0]]
        per_sample_proxy = [proxy_score[:, None]]
        if shaping_references is not None:
            per_sample_proxy.append(par_reward(proxy_score, shaping_references.to(proxy_score.dtype))[:, None])
    else:
        members, component_scores = components.score(ro.prompts, ro.responses, ended, agg_cfg, step)
        groups = components.member_counts
        parts = gold.components(ro.prompts, ro.responses, ended)
        # a model gold has no terms to split: its component columns are left out of the row
        has_terms = all(t in parts for g in components.terms for t in g.split("+"))
        from rlhf_overopt.rewards.components import component_values

        gold_parts = (component_values(parts, components.terms) if has_terms
                      else torch.zeros(components.n, len(ro)))
        if shaping_references is not None:
            raise ValueError("shaping_references apply to an ensemble's aggregated score, not to components")
        # the objective per sample: the weighted sum of the component scores
        proxy_score = torch.tensor(component_weights, dtype=component_scores.dtype) @ component_scores
        per_sample_proxy = [proxy_score[:, None], component_scores.T, gold_parts.T]
    # 4. gather per-sample numbers from every rank
    lengths = ro.response_mask.sum(-1).float().cpu()
    per_sample = torch.cat([kl[:, None], gold_score[:, None], lengths[:, None], ro.ended.float().cpu()[:, None],
                            *per_sample_proxy, members.T], dim=1)
    every = dist.all_gather_cat(per_sample)
    kl_all, gold_all = every[:, 0], every[:, 1]
    members_all = every[:, every.shape[1] - members.shape[0]:]
    stds = [member_std(g.T) for g in members_all.split(groups, dim=1)]
    disagreement = float(torch.stack(stds).mean(0).mean())
    # column 4 is the per-sample objective (before shaping) in both cases
    proxy = float(every[:, 4].mean())
    rho = spearman(every[:, 4], gold_all)
    fields: dict[str, Any] = {}
    shaped = None
    if components is None:
        if shaping_references is not None:
            shaped = float(every[:, 5].mean())
    else:
        n = components.n
        comp_mean = every[:, 5:5 + n].mean(0)
        proxy = float((torch.tensor(component_weights, dtype=comp_mean.dtype) * comp_mean).sum())
        fields = {"component_names": components.names, "component_scores": [float(v) for v in comp_mean],
                  **({"gold_components": [float(v) for v in every[:, 5 + n:5 + 2 * n].mean(0)]} if has_terms else {})}
    point = EvalPoint(
        method=method, step=step, kl=float(kl_all.mean()), kl_estimator=ev.kl_estimator, proxy_score=proxy,
        proxy_member_scores=[float(v) for v in members_all.mean(0)], proxy_member_std=disagreement,
        gold_score=float(gold_all.mean()),
        gold_stderr=float(gold_all.std() / math.sqrt(len(gold_all))) if len(gold_all) > 1 else 0.0,
        aggregator=aggregator, eos_rate=float(every[:, 3].mean()), response_length=float(every[:, 2].mean()),
        n_eval=int(len(gold_all)), components=fields, extra=dict(extra or {}),
        proxy_gold_spearman=None if math.isnan(rho) else rho, proxy_shaped=shaped)
    samples = []
    for i in range(min(ev.n_samples_logged, len(ro))):
        sample = {"step": step, "prompt": ro.prompts[i], "response": ro.responses[i], "ended": bool(ended[i]),
                  "gold_score": float(gold_score[i])}
        if components is None:
            sample.update(proxy_score=float(proxy_score[i]), proxy_member_scores=[float(v) for v in members[:, i]])
            if shaping_references is not None:
                sample["proxy_shaped"] = float(per_sample_proxy[1][i, 0])
        else:
            sample["component_scores"] = [float(v) for v in component_scores[:, i]]
        sample["kl"] = float(kl[i])
        samples.append(sample)
    return point, samples


class EvalLog:
    """Where evaluations go: curves.jsonl, samples.jsonl and the tracker.

    Each row gets `gold_score_initial`, the gold of the step-0 evaluation (read back from
    curves.jsonl when a run resumes), so curves can be shown relative to the initial policy.
    """

    def __init__(self, run, tracker) -> None:
        self.run, self.tracker = run, tracker
        self.gold_initial = next((r["gold_score"] for r in run.curves() if r["step"] == 0), None)

    def record(self, point: EvalPoint | dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, Any]:
        row = point.row() if isinstance(point, EvalPoint) else dict(point)
        if self.gold_initial is None:
            self.gold_initial = row["gold_score"]
        row["gold_score_initial"] = self.gold_initial
        self.run.log_curve(row)
        self.run.log_samples(samples)
        self.tracker.log_eval(row)
        self.tracker.log_samples(row["step"], samples)
        parts = "" if "component_scores" not in row else " components " + " ".join(
            f"{k}={v:.2f}" for k, v in zip(row["component_names"], row["component_scores"]))
        log.info("eval step %d: gold %.3f proxy %.3f kl %.2f%s", row["step"], row["gold_score"], row["proxy_score"],
                 row["kl"], parts)
        return row
