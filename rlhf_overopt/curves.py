"""Gold evaluation of a policy → one curves.jsonl row (DESIGN.md §2, §3).

Each rank samples responses for its share of the held-out prompts, scores them with gold and every
proxy member, and estimates KL(pi || pi_init) on them; the per-sample numbers are gathered so the
row is the same as a one-rank evaluation of all prompts.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf_overopt import dist
from rlhf_overopt.aggregate import aggregate
from rlhf_overopt.config import AggregateConfig, EvalConfig
from rlhf_overopt.engines import gathered
from rlhf_overopt.errors import NonFiniteError
from rlhf_overopt.kl import sequence_kl
from rlhf_overopt.rollout import generate, sequence_logprobs


def check_finite(t: torch.Tensor, what: str, step: int) -> None:
    """Stop at the step a non-finite number appears, naming where it came from."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero()
        raise NonFiniteError(f"step {step}: {what} is not finite at index {bad[0].tolist()} "
                             f"({int(bad.shape[0])} value(s))")


def score_proxies(ensemble, prompts: list[str], responses: list[str], ended: list[bool], agg: AggregateConfig,
                  step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """proxy_scores (K, B) from every member and proxy_score (B,) aggregated; checked finite."""
    proxy_scores = ensemble.score_texts(prompts, responses, ended).float().cpu()
    for i in range(proxy_scores.shape[0]):
        check_finite(proxy_scores[i], f"proxy member {i} score", step)
    proxy_score = aggregate(proxy_scores, agg.name, uwo_lambda=agg.uwo_lambda, std_k=agg.std_k,
                            variance=agg.variance)
    return proxy_scores, proxy_score


def score_gold(gold, prompts: list[str], responses: list[str], ended: list[bool], step: int) -> torch.Tensor:
    """gold_score (B,), checked finite."""
    gold_score = gold.score(prompts, responses, ended).float().cpu()
    check_finite(gold_score, "gold score", step)
    return gold_score


@torch.no_grad()
def evaluate_policy(*, policy, reference, tokenizer, prompts: list[str], ensemble, gold, agg: AggregateConfig,
                    ev: EvalConfig, zero_stage: int, seed: int, method: str, step: int,
                    extra: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Evaluate on this rank's `prompts`; returns (curves row, samples) identical on every rank.

    KL is estimated on the policy's own samples at the eval temperature with `ev.kl_estimator`
    summed over response tokens (k1 = log pi - log pi_init). The sampling generator is seeded the
    same at every evaluation (common random numbers), so steps differ by the policy, not the draw.
    """
    generator = torch.Generator(device=dist_device(policy)).manual_seed(seed)
    # 1. sample on held-out prompts
    with gathered(policy, zero_stage):
        rollout = generate(policy, tokenizer, prompts, max_new_tokens=ev.max_new_tokens,
                           temperature=ev.temperature, top_p=ev.top_p, generator=generator,
                           batch_size=ev.batch_size)
    # 2. KL to the initial policy on the same tokens
    with gathered(reference, zero_stage):
        ref_logprobs = sequence_logprobs(reference, rollout.query_ids, rollout.query_mask, rollout.response_ids,
                                         rollout.response_mask, temperature=ev.temperature)
    kl = sequence_kl(rollout.logprobs, ref_logprobs, rollout.response_mask, ev.kl_estimator).float().cpu()
    # 3. proxies and gold
    ended = rollout.ended.cpu().tolist()
    proxy_scores, proxy_score = score_proxies(ensemble, rollout.prompts, rollout.responses, ended, agg, step)
    gold_score = score_gold(gold, rollout.prompts, rollout.responses, ended, step)
    lengths = rollout.response_mask.sum(-1).float().cpu()
    # 4. gather per-sample numbers from every rank
    per_sample = torch.cat([kl[:, None], proxy_score[:, None], gold_score[:, None], lengths[:, None],
                            rollout.ended.float().cpu()[:, None], proxy_scores.T], dim=1)
    every = dist.all_gather_cat(per_sample)
    kl_all, proxy_all, gold_all, len_all, ended_all, members_all = (
        every[:, 0], every[:, 1], every[:, 2], every[:, 3], every[:, 4], every[:, 5:])
    mean_kl = float(kl_all.mean())
    row = {
        "method": method,
        "step": step,
        "kl": mean_kl,
        "sqrt_kl": math.sqrt(max(mean_kl, 0.0)),
        "kl_estimator": ev.kl_estimator,
        "proxy_score": float(proxy_all.mean()),
        "proxy_member_scores": [float(v) for v in members_all.mean(0)],
        "proxy_member_std": float(members_all.std(1, unbiased=False).mean()),
        "gold_score": float(gold_all.mean()),
        "gold_stderr": float(gold_all.std() / math.sqrt(len(gold_all))) if len(gold_all) > 1 else 0.0,
        "aggregator": agg.name,
        "eos_rate": float(ended_all.mean()),
        "response_length": float(len_all.mean()),
        "n_eval": int(len(gold_all)),
        **(extra or {}),
    }
    samples = [
        {"step": step, "prompt": rollout.prompts[i], "response": rollout.responses[i], "ended": bool(ended[i]),
         "gold_score": float(gold_score[i]), "proxy_score": float(proxy_score[i]),
         "proxy_member_scores": [float(v) for v in proxy_scores[:, i]], "kl": float(kl[i])}
        for i in range(min(ev.n_samples_logged, len(rollout)))
    ]
    return row, samples


def dist_device(module) -> torch.device:
    return next(module.parameters()).device
