"""The gold evaluation stage: one evaluator -> one typed evaluation record -> one curves writer.

    prompts (this rank's share of the held-out split)
      ─▶ sample (eval temperature, top-p; the same draw at every evaluation: common random numbers)
      ─▶ KL(pi || pi_init) on the same tokens, summed over response tokens (eval.kl_estimator)
      ─▶ proxy members (K, B) -> aggregate -> proxy_score (B,)   [or component ensembles (N, B)]
      ─▶ gold_score (B,)
      ─▶ [aggregate.shaping=par: proxy_shaped (B,) against the prompt's cached references]
      ─▶ EvalSamples (this rank's, typed; rlhf_overopt.records) ─▶ gather_samples (every rank's, field
         by field) ─▶ eval_point ─▶ EvalPoint ─▶ EvalLog: curves.jsonl (run.directory.curve_row), samples, W&B

Every row carries the overoptimization signals (rlhf_overopt.ops.signals), computed on the gathered
samples of all ranks: proxy_member_std (ensemble disagreement), proxy_gold_spearman (does the
proxy still rank the policy's samples as gold does) and response_length.

KL to the initial policy is measured at every evaluation whatever the method's own KL penalty is
(a run with a zero coefficient still moves away from its start). The row is the same as a
one-rank evaluation of all prompts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from rlhf_overopt.errors import check_finite
from rlhf_overopt.ops.kl import sequence_kl
from rlhf_overopt.ops.shaping import par_reward
from rlhf_overopt.ops.signals import member_std, spearman
from rlhf_overopt.records import EvalPoint, EvalSamples
from rlhf_overopt.rewards.components import component_values
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
    # 3. proxies and gold, one typed record of this rank's samples
    ended = ro.ended.cpu().tolist()
    gold_score = score_gold(gold, ro.prompts, ro.responses, ended, step)
    per_sample = {"kl": kl, "gold_score": gold_score, "response_length": ro.response_mask.sum(-1).float().cpu(),
                  "ended": ro.ended.float().cpu()}
    if components is None:
        members, proxy_score = score_proxies(ensemble, aggregate_fn, ro.prompts, ro.responses, ended, step)
        shaped = (None if shaping_references is None
                  else par_reward(proxy_score, shaping_references.to(proxy_score.dtype)))
        mine = EvalSamples(**per_sample, proxy_score=proxy_score, member_scores=members,
                           member_names=list(ensemble.member_names), member_groups=[members.shape[0]],
                           proxy_shaped=shaped)
    else:
        if shaping_references is not None:
            raise ValueError("shaping_references apply to an ensemble's aggregated score, not to components")
        members, component_scores = components.score(ro.prompts, ro.responses, ended, agg_cfg, step)
        parts = gold.components(ro.prompts, ro.responses, ended)
        # a model gold has no terms to split: its component columns are left out of the row
        has_terms = all(t in parts for g in components.terms for t in g.split("+"))
        # the objective per sample: the weighted sum of the component scores
        proxy_score = torch.tensor(component_weights, dtype=component_scores.dtype) @ component_scores
        mine = EvalSamples(**per_sample, proxy_score=proxy_score, member_scores=members,
                           member_names=[f"{c}/{m}" for c, e in zip(components.names, components.ensembles)
                                         for m in e.member_names],
                           member_groups=components.member_counts, component_names=list(components.names),
                           component_scores=component_scores,
                           gold_components=component_values(parts, components.terms) if has_terms else None)
    # 4. gather every rank's samples, reduce them to one row
    point = eval_point(gather_samples(mine), method=method, step=step, kl_estimator=ev.kl_estimator,
                       aggregator=aggregator, component_weights=component_weights, extra=extra)
    return point, sample_rows(mine, ro.prompts, ro.responses, step, ev.n_samples_logged)


def gather_samples(mine: EvalSamples) -> EvalSamples:
    """Every rank's samples in rank order, gathered field by field (identity in a one-process run)."""
    def cat(t: torch.Tensor | None, sample_dim: int) -> torch.Tensor | None:
        return None if t is None else dist.all_gather_cat(t.movedim(sample_dim, 0)).movedim(0, sample_dim)

    return dataclasses.replace(
        mine, kl=cat(mine.kl, 0), gold_score=cat(mine.gold_score, 0), response_length=cat(mine.response_length, 0),
        ended=cat(mine.ended, 0), proxy_score=cat(mine.proxy_score, 0), member_scores=cat(mine.member_scores, 1),
        proxy_shaped=cat(mine.proxy_shaped, 0), component_scores=cat(mine.component_scores, 1),
        gold_components=cat(mine.gold_components, 1))


def _sample_major(blocks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Views of the named (B, w) blocks laid side by side in one row-major (B, sum w) table.

    The means and stds of a row are taken on these views, not on the blocks themselves: torch sums a
    strided column in another order than a contiguous vector (the last bits differ), and every curve
    so far, results/ included, was reduced from this layout. Keeping it keeps those numbers exact.
    """
    table = torch.cat(list(blocks.values()), dim=1)
    views, start = {}, 0
    for name, block in blocks.items():
        views[name] = table[:, start:start + block.shape[1]]
        start += block.shape[1]
    return views


def eval_point(samples: EvalSamples, *, method: str, step: int, kl_estimator: str, aggregator: str,
               component_weights: list[float] | None = None, extra: dict[str, Any] | None = None) -> EvalPoint:
    """Reduce the samples of all ranks to one EvalPoint (a curves row); the same on every rank.

    Composite methods' `proxy_score` is the weighted sum of the component means (`component_weights`).
    """
    blocks = {"kl": samples.kl[:, None], "gold_score": samples.gold_score[:, None],
              "response_length": samples.response_length[:, None], "ended": samples.ended[:, None],
              "proxy_score": samples.proxy_score[:, None]}
    for name in ("proxy_shaped", "component_scores", "gold_components"):
        t = getattr(samples, name)
        if t is not None:
            blocks[name] = t[:, None] if t.dim() == 1 else t.T
    blocks["member_scores"] = samples.member_scores.T
    view = _sample_major(blocks)
    gold, objective, members = view["gold_score"][:, 0], view["proxy_score"][:, 0], view["member_scores"]
    stds = [member_std(g.T) for g in members.split(samples.member_groups, dim=1)]
    rho = spearman(objective, gold)
    proxy = float(objective.mean())
    fields: dict[str, Any] = {}
    if samples.component_scores is not None:
        comp_mean = view["component_scores"].mean(0)
        proxy = float((torch.tensor(component_weights, dtype=comp_mean.dtype) * comp_mean).sum())
        fields = {"component_names": samples.component_names, "component_scores": [float(v) for v in comp_mean]}
        if samples.gold_components is not None:
            fields["gold_components"] = [float(v) for v in view["gold_components"].mean(0)]
    return EvalPoint(
        method=method, step=step, kl=float(view["kl"][:, 0].mean()), kl_estimator=kl_estimator, proxy_score=proxy,
        proxy_member_scores=[float(v) for v in members.mean(0)],
        proxy_member_std=float(torch.stack(stds).mean(0).mean()), gold_score=float(gold.mean()),
        gold_stderr=float(gold.std() / math.sqrt(len(gold))) if len(gold) > 1 else 0.0,
        aggregator=aggregator, eos_rate=float(view["ended"][:, 0].mean()),
        response_length=float(view["response_length"][:, 0].mean()), n_eval=len(gold), components=fields,
        extra=dict(extra or {}), proxy_gold_spearman=None if math.isnan(rho) else rho,
        proxy_shaped=None if samples.proxy_shaped is None else float(view["proxy_shaped"][:, 0].mean()))


def sample_rows(mine: EvalSamples, prompts: list[str], responses: list[str], step: int,
                n: int) -> list[dict[str, Any]]:
    """samples.jsonl rows of this rank's first `n` samples."""
    rows = []
    for i in range(min(n, len(mine))):
        row = {"step": step, "prompt": prompts[i], "response": responses[i], "ended": bool(mine.ended[i]),
               "gold_score": float(mine.gold_score[i])}
        if mine.component_scores is None:
            row.update(proxy_score=float(mine.proxy_score[i]),
                       proxy_member_scores=[float(v) for v in mine.member_scores[:, i]])
            if mine.proxy_shaped is not None:
                row["proxy_shaped"] = float(mine.proxy_shaped[i])
        else:
            row["component_scores"] = [float(v) for v in mine.component_scores[:, i]]
        row["kl"] = float(mine.kl[i])
        rows.append(row)
    return rows


class EvalLog:
    """Where evaluations go: curves.jsonl, samples.jsonl and the tracker.

    Each row gets `gold_score_initial`, the gold of the step-0 evaluation (read back from
    curves.jsonl when a run resumes), so curves can be shown relative to the initial policy.
    """

    def __init__(self, run, tracker) -> None:
        self.run, self.tracker = run, tracker
        self.gold_initial = next((r["gold_score"] for r in run.curves() if r["step"] == 0), None)

    def record(self, point: EvalPoint, samples: list[dict[str, Any]]) -> dict[str, Any]:
        row = point.row()
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
