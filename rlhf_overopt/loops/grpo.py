"""methods: grpo | rloo — group-relative policy optimization against an aggregated proxy ensemble,
scored by gold as it goes. No value model: G responses per prompt, and each response's advantage
is its reward relative to the others of its group.

    GRPO      A_i = (r_i - mean(r_g)) / (std(r_g) + eps)        Shao et al. 2024, DeepSeekMath §4.1
    Dr. GRPO  A_i = r_i - mean(r_g), constant loss normalization  Liu et al. 2025 (grpo.std_normalize=false,
                                                                 grpo.loss_normalization=constant)
    RLOO      A_i = r_i - mean_{j != i} r_j, summed token loss    Ahmadian et al. 2024, §3.2
                                                                 (grpo.loss_normalization=auto: constant)

One iteration:

    1. prompts      this rank's share of ppo.batch_size / G train prompts (seeded by step), each G times
    2. rollout      G responses per prompt (temperature, stop at EOS)
    3. log-probs    policy (the sampling pass) and reference on the sampled tokens
    4. score        proxy_scores (K, B) -> aggregate -> r (B,) -> [aggregate.shaping=par:
                    mean_j sigmoid(r - r_ref,j), Fu et al. 2025]; with grpo.kl_in=reward,
                    r -= grpo.kl_coef * sequence KL (ppo.kl_penalty_estimator)
    5. advantages   per group (a rank always holds whole groups)
    6. update       ppo_epochs over minibatches: clipped surrogate with the response's advantage on
                    every token, + grpo.kl_coef * k3 KL to the reference with grpo.kl_in=loss,
                    normalized per grpo.loss_normalization (auto: sequence for grpo, constant for rloo)
    7. log / eval / checkpoint

KL to the initial policy is measured at every evaluation whatever grpo.kl_coef is (0 included).
With aggregate.shaping=par the references are sampled once and cached as in method ppo
(rlhf_overopt.references, <run>/par_references/).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from rlhf_overopt.config.methods import METHODS
from rlhf_overopt.config.plan import make_plan
from rlhf_overopt.data.prompts import load_prompts, policy_path
from rlhf_overopt.evaluate import EvalLog, evaluate_policy, score_proxies
from rlhf_overopt.ops.advantages import constant_group_fraction, group_advantages, leave_one_out_advantages
from rlhf_overopt.ops.aggregate import aggregator
from rlhf_overopt.ops.kl import sequence_kl
from rlhf_overopt.ops.shaping import par_reward
from rlhf_overopt.references import lookup, run_references
from rlhf_overopt.rewards.cache import ensure_proxies
from rlhf_overopt.rewards.gold import GoldScorer
from rlhf_overopt.rollout import generate, sequence_logprobs
from rlhf_overopt.run import dist, seeds
from rlhf_overopt.run.checkpoints import Checkpointer
from rlhf_overopt.run.directory import append_jsonl
from rlhf_overopt.run.engines import (
    build_actors,
    check_policy_dtype,
    ensure_process_group,
    gathered,
    save_policy,
)
from rlhf_overopt.run.lifecycle import RunContext, resume_step
from rlhf_overopt.run.models import load_tokenizer
from rlhf_overopt.run.tracking import Tracker
from rlhf_overopt.update import group_update

log = logging.getLogger("rlhf_overopt")


def run(ctx: RunContext) -> dict[str, Any]:
    cfg, p, g, info = ctx.cfg, ctx.cfg.ppo, ctx.cfg.grpo, ctx.dist
    ensure_process_group(info.device)
    check_policy_dtype(cfg, info.device)  # before proxies train: a bf16 policy on a CPU is refused
    rank, stage = info.rank, cfg.deepspeed.zero_stage
    plan = make_plan(cfg, info.world_size)
    loo = METHODS[cfg.method].advantage == "leave_one_out"  # RLOO's baseline, else GRPO's group normalization
    variant = "rloo" if loo else ("grpo" if g.std_normalize else "dr_grpo")

    # 0. models: tokenizer, prompts, proxies, gold, policy engine, frozen reference (no value model)
    path = policy_path(cfg, ctx.testbed)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.policy.trust_remote_code)
    # prompts before proxies (which may need training): bad prompt data fails in seconds
    train_prompts, eval_share = load_prompts(cfg, ctx.testbed, info.world_size, rank,
                                             min_train=plan.prompts_per_rank, tokenizer=tokenizer)
    ensemble = ensure_proxies(cfg, ctx.testbed, info, ctx.run).to(info.device)
    agg = cfg.aggregate
    objective = aggregator(agg.name, uwo_lambda=agg.uwo_lambda, std_k=agg.std_k, variance=agg.variance, k=ensemble.k)
    gold = GoldScorer.from_config(cfg, ctx.testbed)
    actors = build_actors(cfg, tokenizer, path, micro_batch=plan.micro_batch, world_size=info.world_size,
                          total_updates=plan.total_updates, device=info.device)
    policy = actors.policy
    log.info("%s (%s): %d responses per prompt, %d prompts per rank per iteration, KL %g in the %s, "
             "token loss normalized per %s", cfg.method, variant, plan.group_size, plan.prompts_per_rank, g.kl_coef,
             g.kl_in, plan.loss_normalization)

    ckpt = Checkpointer(ctx.run.checkpoints)
    start, _ = resume_step(ctx, ckpt, actors.engines())
    # PAR references: sampled once from the initial policy (the frozen reference), cached in the run
    train_refs, eval_refs = run_references(ctx, actors, tokenizer, ensemble, objective, train_prompts=train_prompts,
                                           eval_share=eval_share, prompts_per_step=p.batch_size // plan.group_size, zero_stage=stage)
    tracker = Tracker(cfg, enabled=info.is_main)
    eval_log = EvalLog(ctx.run, tracker)
    fields = {"kl_coef": g.kl_coef, "kl_in": g.kl_in, "group_size": plan.group_size, "advantage": variant,
              "uwo_lambda": agg.uwo_lambda}

    def evaluate(step: int) -> None:
        point, samples = evaluate_policy(
            policy=policy, reference=actors.reference, tokenizer=tokenizer, prompts=eval_share, gold=gold,
            ev=cfg.eval, zero_stage=stage, generator=seeds.eval_generator(cfg.seed, rank, info.device),
            method=cfg.method, step=step, aggregator=agg.name, ensemble=ensemble, aggregate_fn=objective,
            shaping_references=eval_refs, extra=fields)
        eval_log.record(point, samples)

    if start == 0:
        evaluate(0)
    t_start = time.time()
    for step in range(start, p.steps):
        t0 = time.time()
        # 1. prompts: the step's global draw of distinct prompts, this rank's share, each G times
        mine = seeds.prompt_draw(len(train_prompts), p.batch_size // plan.group_size, cfg.seed, step, rank,
                                 plan.prompts_per_rank)
        batch_prompts = [train_prompts[i] for i in mine for _ in range(plan.group_size)]
        # 2. rollout
        with gathered(policy, stage):
            ro = generate(policy, tokenizer, batch_prompts, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                          generator=seeds.rollout_generator(cfg.seed, step, rank, info.device))
        t_gen = time.time() - t0
        mask = ro.response_mask
        with torch.no_grad():
            # 3. log-probs of the sampled tokens: policy (same pass as training) and reference
            old_logprobs = sequence_logprobs(actors.policy_engine, ro.query_ids, ro.query_mask, ro.response_ids,
                                             mask, temperature=p.temperature)
            ref_logprobs = sequence_logprobs(actors.reference, ro.query_ids, ro.query_mask, ro.response_ids, mask,
                                             temperature=p.temperature)
            # 4. score with the proxy ensemble, aggregate, PAR-shape against the prompt's references
            # (Fu et al. 2025) if asked; KL in the reward if asked
            proxy_scores, proxy_score = score_proxies(ensemble, objective, ro.prompts, ro.responses,
                                                      ro.ended.cpu().tolist(), step)
            score = proxy_score if train_refs is None else par_reward(
                proxy_score, lookup(train_refs, [i for i in mine for _ in range(plan.group_size)], "train"))
            seq_kl = sequence_kl(old_logprobs, ref_logprobs, mask, p.kl_penalty_estimator).float().cpu()
            reward = score - g.kl_coef * seq_kl if g.kl_in == "reward" else score
            # 5. advantages within each group
            if loo:
                advantages = leave_one_out_advantages(reward, plan.group_size)
            else:
                advantages = group_advantages(reward, plan.group_size, std_normalize=g.std_normalize, eps=g.eps)
            constant_groups = constant_group_fraction(reward, plan.group_size)  # groups without a learning signal
        # 6. update
        t1 = time.time()
        upd = group_update(actors.policy_engine, ro, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs,
                           advantages=advantages.to(info.device), epochs=p.ppo_epochs, micro_batch=plan.micro_batch,
                           clip_range=p.clip_range, temperature=p.temperature,
                           kl_coef=g.kl_coef if g.kl_in == "loss" else 0.0,
                           loss_normalization=plan.loss_normalization, max_new_tokens=p.max_new_tokens,
                           generator=seeds.step_generator(cfg.seed, step, 1), step=step)
        t_update = time.time() - t1
        # 7. log, evaluate, checkpoint
        stats = {
            "step": step + 1,
            "score": float(dist.all_reduce_mean(score.mean())),
            "reward": float(dist.all_reduce_mean(reward.mean())),
            "proxy_member_scores": [float(v) for v in dist.all_reduce_mean(proxy_scores.mean(1))],
            **({} if train_refs is None else {"proxy_score": float(dist.all_reduce_mean(proxy_score.mean())),
                                              "proxy_shaped": float(dist.all_reduce_mean(score.mean()))}),
            "rollout_kl": float(dist.all_reduce_mean(seq_kl.mean())),
            "constant_group_fraction": float(dist.all_reduce_mean(constant_groups)),
            "advantage_abs_mean": float(dist.all_reduce_mean(advantages.abs().mean())),
            "eos_rate": float(dist.all_reduce_mean(ro.ended.float().mean())),
            "response_length": float(dist.all_reduce_mean(mask.float().sum(-1).mean())),
            "lr": actors.policy_engine.get_lr()[0],
            "time_generate_s": t_gen,
            "time_update_s": t_update,
            "time_step_s": time.time() - t0,
            **{k: float(dist.all_reduce_mean(torch.tensor(v))) for k, v in upd.items()},
        }
        if info.is_main:
            append_jsonl(ctx.run.root / "train_stats.jsonl", [stats])
        tracker.log_train(step + 1, {k: v for k, v in stats.items() if isinstance(v, float)})
        done = step + 1
        if done in plan.eval_steps:
            evaluate(done)
        if done in plan.save_steps:
            ckpt.save(done, actors.engines(), {}, info.is_main)
    save_policy(policy, tokenizer, ctx.run.root / "policy", stage, info.is_main)
    tracker.finish()
    return {"train_time_s": round(time.time() - t_start, 2), "advantage": variant, **actors.parameter_counts()}
