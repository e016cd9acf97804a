"""method: ppo — language-model PPO against an aggregated proxy ensemble, scored by gold as it goes.

One iteration (Ziegler et al. 2019; Huang et al. 2024, "The N+ implementation details of RLHF"):

    1. prompts      this rank's share of `ppo.batch_size` train prompts (seeded by step)
    2. rollout      sample responses (left-padded queries, temperature, stop at EOS, mask after it)
    3. log-probs    policy (recomputed), reference and values on the sampled tokens
    4. score        proxy_scores (K, B) -> aggregate -> proxy_score (B,) -> [aggregate.shaping=par:
                    mean_j sigmoid(proxy_score - r_ref,j)] (+ no-EOS penalty)
    5. rewards      -kl_coef * KL per token, the score added at the last response token
    6. advantages   GAE(gamma, lambda), whitened over the whole batch (all ranks)
    7. update       ppo_epochs over minibatches: clipped policy loss, clipped value loss
    8. KL control   fixed or adaptive coefficient
    9. log / eval / checkpoint

With aggregate.shaping=par, the k reference responses of every prompt the run draws (and of the
eval prompts) are sampled once from the initial policy before the first iteration and cached in
<run>/par_references/ (rlhf_overopt.references); a resumed run reads them back.

Every random draw comes from a generator seeded by (seed, step, rank) (rlhf_overopt.run.seeds), so a
resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from rlhf_overopt.config.plan import make_plan
from rlhf_overopt.data.prompts import load_prompts, policy_path
from rlhf_overopt.evaluate import EvalLog, evaluate_policy, score_proxies
from rlhf_overopt.ops.advantages import gae, token_rewards
from rlhf_overopt.ops.aggregate import aggregator
from rlhf_overopt.ops.kl import kl_controller, kl_penalty_per_token
from rlhf_overopt.ops.shaping import par_reward
from rlhf_overopt.references import lookup, run_references
from rlhf_overopt.rewards.cache import ensemble_dir, ensure_proxies, first_member_backbone
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
from rlhf_overopt.update import ppo_update
from rlhf_overopt.values import response_values

log = logging.getLogger("rlhf_overopt")


def run(ctx: RunContext) -> dict[str, Any]:
    cfg, p, info = ctx.cfg, ctx.cfg.ppo, ctx.dist
    ensure_process_group(info.device)
    check_policy_dtype(cfg, info.device)  # before proxies train: a bf16 policy on a CPU is refused
    rank, stage = info.rank, cfg.deepspeed.zero_stage
    plan = make_plan(cfg, info.world_size)

    # 0. models: tokenizer, prompts, proxies, gold, policy + value engines, frozen reference
    path = policy_path(cfg, ctx.testbed)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.policy.trust_remote_code)
    # prompts before proxies (which may need training): bad prompt data fails in seconds
    train_prompts, eval_share = load_prompts(cfg, ctx.testbed, info.world_size, rank, min_train=plan.local_batch,
                                             tokenizer=tokenizer)
    ensemble = ensure_proxies(cfg, ctx.testbed, info, ctx.run).to(info.device)
    agg = cfg.aggregate
    objective = aggregator(agg.name, uwo_lambda=agg.uwo_lambda, std_k=agg.std_k, variance=agg.variance, k=ensemble.k)
    gold = GoldScorer.from_config(cfg, ctx.testbed)
    value_path = path if p.value_init == "policy" else str(first_member_backbone(ensemble_dir(cfg, ctx.testbed)))
    actors = build_actors(cfg, tokenizer, path, micro_batch=plan.micro_batch, world_size=info.world_size,
                          total_updates=plan.total_updates, value_path=value_path, device=info.device)
    policy, kl_ctl = actors.policy, kl_controller(p.kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon)
    counts = actors.parameter_counts()
    log.info("policy: %d parameters (%d trained), %d on this rank (ZeRO-%d, %d rank(s))",
             counts["policy_total_params"], counts["policy_trainable_params"], counts["policy_local_params"], stage,
             info.world_size)

    # resume from the last complete checkpoint
    ckpt = Checkpointer(ctx.run.checkpoints)
    start, state = resume_step(ctx, ckpt, actors.engines())
    if state is not None:
        kl_ctl.load_state_dict(state["kl_controller"])
    # PAR references: sampled once from the initial policy (the frozen reference), cached in the run
    train_refs, eval_refs = run_references(ctx, actors, tokenizer, ensemble, objective, train_prompts=train_prompts,
                                           eval_share=eval_share, prompts_per_step=p.batch_size, zero_stage=stage)
    tracker = Tracker(cfg, enabled=info.is_main)
    eval_log = EvalLog(ctx.run, tracker)

    def evaluate(step: int) -> None:
        point, samples = evaluate_policy(
            policy=policy, reference=actors.reference, tokenizer=tokenizer, prompts=eval_share, gold=gold,
            ev=cfg.eval, zero_stage=stage, generator=seeds.eval_generator(cfg.seed, rank, info.device),
            method="ppo", step=step, aggregator=agg.name, ensemble=ensemble, aggregate_fn=objective,
            shaping_references=eval_refs, extra={"kl_coef": kl_ctl.value, "uwo_lambda": agg.uwo_lambda})
        eval_log.record(point, samples)

    if start == 0:
        evaluate(0)
    t_start = time.time()
    for step in range(start, p.steps):
        t0 = time.time()
        # 1. prompts: the step's global draw, this rank's contiguous share
        mine = seeds.prompt_draw(len(train_prompts), p.batch_size, cfg.seed, step, rank, plan.local_batch)
        batch_prompts = [train_prompts[i] for i in mine]
        # 2. rollout
        with gathered(policy, stage):
            ro = generate(policy, tokenizer, batch_prompts, max_new_tokens=p.max_new_tokens, temperature=p.temperature,
                          generator=seeds.rollout_generator(cfg.seed, step, rank, info.device))
        t_gen = time.time() - t0
        mask = ro.response_mask
        with torch.no_grad():
            # 3. log-probs of the sampled tokens: policy (same pass as training), reference; values
            old_logprobs = sequence_logprobs(actors.policy_engine, ro.query_ids, ro.query_mask, ro.response_ids,
                                             mask, temperature=p.temperature)
            ref_logprobs = sequence_logprobs(actors.reference, ro.query_ids, ro.query_mask, ro.response_ids, mask,
                                             temperature=p.temperature)
            old_values = response_values(actors.value_engine, ro.query_ids, ro.query_mask, ro.response_ids, mask)
            # 4. score with the proxy ensemble, aggregate; PAR shapes the aggregate against the
            # prompt's references (Fu et al. 2025); the no-EOS penalty is added to what is optimized
            proxy_scores, proxy_score = score_proxies(ensemble, objective, ro.prompts, ro.responses,
                                                      ro.ended.cpu().tolist(), step)
            shaped = proxy_score if train_refs is None else par_reward(proxy_score, lookup(train_refs, mine, "train"))
            score = shaped
            if p.no_eos_penalty:
                score = torch.where(ro.ended.cpu(), score, score + p.no_eos_penalty)
            # 5. rewards: per-token KL penalty, score at the last response token
            kl_tokens = kl_penalty_per_token(old_logprobs, ref_logprobs, p.kl_penalty_estimator) * mask
            rewards = token_rewards(score.to(info.device), kl_tokens, kl_ctl.value, mask)
            if p.whiten_rewards:
                rewards = dist.global_whiten(rewards, mask, shift_mean=False)
            # 6. advantages
            advantages, returns = gae(rewards, old_values[0], mask, p.gamma, p.lam)
            if p.whiten_advantages:
                advantages = dist.global_whiten(advantages, mask)
        # 7. update
        t1 = time.time()
        upd = ppo_update(actors.policy_engine, actors.value_engine, ro, old_logprobs=old_logprobs,
                         old_values=old_values, returns=returns[None], advantages_for=lambda idx: advantages[idx],
                         epochs=p.ppo_epochs, micro_batch=plan.micro_batch, clip_range=p.clip_range,
                         clip_range_value=p.clip_range_value, vf_coef=p.vf_coef, temperature=p.temperature,
                         generator=seeds.step_generator(cfg.seed, step, 1), step=step)
        t_update = time.time() - t1
        # 8. KL control on the batch's mean sequence KL
        seq_kl = float(dist.all_reduce_mean(kl_tokens.sum(-1).mean()))
        kl_ctl.update(seq_kl, p.batch_size)
        # 9. log, evaluate, checkpoint
        stats = {
            "step": step + 1,
            "score": float(dist.all_reduce_mean(score.mean())),
            "proxy_member_scores": [float(v) for v in dist.all_reduce_mean(proxy_scores.mean(1))],
            **({} if train_refs is None else {"proxy_score": float(dist.all_reduce_mean(proxy_score.mean())),
                                              "proxy_shaped": float(dist.all_reduce_mean(shaped.mean()))}),
            "rollout_kl": seq_kl,
            "kl_coef": kl_ctl.value,
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
            ckpt.save(done, actors.engines(), {"kl_controller": kl_ctl.state_dict()}, info.is_main)
    # the trained policy, loadable by any transformers user (safetensors)
    save_policy(policy, tokenizer, ctx.run.root / "policy", stage, info.is_main)
    tracker.finish()
    return {"train_time_s": round(time.time() - t_start, 2), "final_kl_coef": kl_ctl.value, **counts}
