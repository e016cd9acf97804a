"""method: ppo — language-model PPO against an aggregated proxy ensemble, scored by gold as it goes.

One iteration (Ziegler et al. 2019; Huang et al. 2024, "The N+ implementation details of RLHF"):

    1. prompts      this rank's share of `ppo.batch_size` train prompts (seeded by step)
    2. rollout      sample responses (left-padded queries, temperature, stop at EOS, mask after it)
    3. log-probs    policy (recomputed), reference and values on the sampled tokens
    4. score        proxy_scores (K, B) -> aggregate -> proxy_score (B,) (+ no-EOS penalty)
    5. rewards      -kl_coef * KL per token, the score added at the last response token
    6. advantages   GAE(gamma, lambda), whitened over the whole batch (all ranks)
    7. update       ppo_epochs over minibatches: clipped policy loss, clipped value loss
    8. KL control   fixed or adaptive coefficient
    9. log / eval / checkpoint

Every random draw comes from a generator seeded by (seed, step, rank), so a resumed run repeats
exactly what an uninterrupted one does.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rlhf_overopt import dist
from rlhf_overopt.advantages import gae
from rlhf_overopt.config import Config
from rlhf_overopt.curves import check_finite, evaluate_policy, score_proxies
from rlhf_overopt.engines import (
    checked_step,
    ds_config,
    ensure_process_group,
    frozen_model,
    gathered,
    local_parameter_count,
    train_engine,
)
from rlhf_overopt.kl import AdaptiveKLController, FixedKLController, kl_penalty_per_token
from rlhf_overopt.loops.common import EvalLog, InputError, RunContext, resume_step
from rlhf_overopt.losses import ppo_policy_loss, ppo_value_loss
from rlhf_overopt.masking import last_index, masked_mean, whiten_from_moments
from rlhf_overopt.models import check_vocabulary, load_causal_lm, load_tokenizer
from rlhf_overopt.records import Rollout
from rlhf_overopt.rollout import ValueModel, generate, response_values, sequence_logprobs
from rlhf_overopt.runs import atomic_write_json
from rlhf_overopt.tracking import Tracker

log = logging.getLogger("rlhf_overopt")


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator determined by (seed, parts) alone — the basis of exact resume."""
    value = seed
    for p in parts:
        value = (value * 1_000_003 + p + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


@dataclass
class PPOBatch:
    """A scored rollout batch of this rank, ready for the update. Tensors (B, Tr) unless noted."""

    rollout: Rollout
    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor


def global_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten with the masked moments of the whole batch across ranks (equals one-rank whitening)."""
    m = mask.float()
    moments = torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()])
    moments = dist.all_reduce_mean(moments) * (torch.distributed.get_world_size()
                                               if torch.distributed.is_initialized() else 1)
    return whiten_from_moments(x, mask, moments[0], moments[1], moments[2], shift_mean=shift_mean)


def global_token_count(mask: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of the number of valid tokens: the per-rank normalizer that makes DeepSpeed's
    gradient averaging equal a one-rank masked mean over the global minibatch."""
    return dist.all_reduce_mean(mask.float().sum())


def ppo_update(policy_engine, value_engine, batch: PPOBatch, *, cfg: Config, micro_batch: int,
               generator: torch.Generator, step: int) -> dict[str, float]:
    """Step 7: `ppo_epochs` passes over the batch in minibatches of `micro_batch` rows per rank."""
    p = cfg.ppo
    ro = batch.rollout
    n = len(ro)
    stats: dict[str, list[float]] = {}
    policy_engine.train()
    value_engine.train()
    for _epoch in range(p.ppo_epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, micro_batch):
            idx = order[start:start + micro_batch]
            mb = ro.select(idx)
            mask = mb.response_mask
            # Each rank's masked mean is rescaled by (its tokens / mean tokens per rank), so the
            # gradient DeepSpeed averages over ranks is the masked mean over the global minibatch.
            scale = mask.float().sum() / global_token_count(mask).clamp(min=1.0)

            logprobs, entropy = sequence_logprobs(policy_engine, mb.query_ids, mb.query_mask, mb.response_ids,
                                                  mask, temperature=p.temperature, return_entropy=True)
            pg_loss, pg_stats = ppo_policy_loss(logprobs, batch.old_logprobs[idx], batch.advantages[idx], mask,
                                                p.clip_range)
            check_finite(pg_loss, "policy loss", step)
            policy_engine.backward(pg_loss * scale)
            checked_step(policy_engine, "policy", step)

            values = response_values(value_engine, mb.query_ids, mb.query_mask, mb.response_ids, mask)
            vf_loss, vf_stats = ppo_value_loss(values, batch.old_values[idx], batch.returns[idx], mask,
                                               p.clip_range_value)
            check_finite(vf_loss, "value loss", step)
            value_engine.backward(p.vf_coef * vf_loss * scale)
            checked_step(value_engine, "value", step)

            for key, value in {
                "policy_loss": pg_loss, "value_loss": vf_loss, "entropy": masked_mean(entropy.detach(), mask),
                "value_error": masked_mean((values.detach() - batch.returns[idx]) ** 2, mask),
                **pg_stats, **vf_stats,
            }.items():
                stats.setdefault(key, []).append(float(value.detach()) if torch.is_tensor(value) else float(value))
    return {k: sum(v) / len(v) for k, v in stats.items()}


class Checkpointer:
    """checkpoints/{policy,value}/step_N via DeepSpeed, then state.json naming step N, written last
    and atomically: a checkpoint counts only once state.json points at it."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = root
        self.keep = keep

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def latest(self) -> dict[str, Any] | None:
        import json

        if not self.state_path.exists():
            return None
        return json.loads(self.state_path.read_text())

    def save(self, step: int, policy_engine, value_engine, kl_ctl, is_main: bool) -> None:
        tag = f"step_{step}"
        policy_engine.save_checkpoint(str(self.root / "policy"), tag=tag)
        value_engine.save_checkpoint(str(self.root / "value"), tag=tag)
        dist.barrier()
        if is_main:
            atomic_write_json(self.state_path, {"step": step, "tag": tag, "kl_controller": kl_ctl.state_dict()})
            for sub in ("policy", "value"):
                tags = sorted((d for d in (self.root / sub).glob("step_*") if d.is_dir()),
                              key=lambda d: int(d.name.split("_")[1]))
                for old in tags[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load(self, state: dict[str, Any], policy_engine, value_engine, kl_ctl) -> int:
        for sub, engine in (("policy", policy_engine), ("value", value_engine)):
            path, _ = engine.load_checkpoint(str(self.root / sub), tag=state["tag"])
            if path is None:
                raise RuntimeError(f"checkpoint {self.root / sub / state['tag']} could not be loaded")
        kl_ctl.load_state_dict(state["kl_controller"])
        return int(state["step"])


def run(ctx: RunContext) -> dict[str, Any]:
    from rlhf_overopt.gold import GoldScorer
    from rlhf_overopt.reward_cache import ensemble_dir, ensure_proxies, first_member_backbone

    cfg, p, info = ctx.cfg, ctx.cfg.ppo, ctx.dist
    ensure_process_group(info.device)
    world, rank = info.world_size, info.rank
    micro_batch = p.mini_batch_size // world
    local_batch = p.batch_size // world
    stage = cfg.deepspeed.zero_stage

    # 0. models: tokenizer, proxies, gold, policy + value engines, frozen reference
    policy_path = str(ctx.testbed.policy_dir) if cfg.policy.path == "testbed" else cfg.policy.path
    tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.policy.trust_remote_code)
    ensemble = ensure_proxies(cfg, ctx.testbed, info, ctx.run).to(info.device)
    gold = GoldScorer.from_config(cfg, ctx.testbed)
    prompts = ctx.testbed.load_prompts()
    train_prompts = list(prompts["train"]["prompt"])
    eval_prompts = list(prompts["eval"]["prompt"])[: cfg.eval.n_prompts]
    eval_share = [eval_prompts[i] for i in dist.shard_indices(len(eval_prompts), rank, world)]
    if len(train_prompts) < local_batch:
        raise InputError(f"the train prompt split has {len(train_prompts)} prompts, fewer than one batch")

    def load_policy():
        return load_causal_lm(policy_path, dtype=getattr(torch, cfg.policy.dtype),
                              trust_remote_code=cfg.policy.trust_remote_code, dropout_off=cfg.policy.dropout_off)

    value_path = (policy_path if p.value_init == "policy"
                  else str(first_member_backbone(ensemble_dir(cfg, ctx.testbed))))
    updates_per_iteration = p.ppo_epochs * (p.batch_size // p.mini_batch_size)
    engine_cfg = ds_config(zero_stage=stage, micro_batch_per_rank=micro_batch, world_size=world,
                           max_grad_norm=p.max_grad_norm, extra_path=cfg.deepspeed.config, dtype=cfg.policy.dtype)
    torch.manual_seed(cfg.seed)  # the value head's initialization is the same on every rank
    policy_model = load_policy()
    check_vocabulary(tokenizer, policy_model)
    policy_engine = train_engine(policy_model, lr=p.lr, total_steps=p.steps * updates_per_iteration,
                                 final_ratio=p.lr_final_ratio, config=engine_cfg)
    value_engine = train_engine(ValueModel.from_pretrained_backbone(value_path), lr=p.value_lr,
                                total_steps=p.steps * updates_per_iteration, final_ratio=p.lr_final_ratio,
                                config=engine_cfg)
    reference = frozen_model(load_policy(), zero_stage=stage, config=engine_cfg, device=info.device)
    policy = policy_engine.module
    kl_ctl = (AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else FixedKLController(p.kl_coef))
    param_counts = {"policy_local_params": local_parameter_count(policy),
                    "policy_total_params": sum(int(v) for v in [getattr(q, "ds_numel", q.numel())
                                                                for q in policy.parameters()])}
    log.info("policy: %d parameters, %d on this rank (ZeRO-%d, %d rank(s))",
             param_counts["policy_total_params"], param_counts["policy_local_params"], stage, world)

    # resume from the last complete checkpoint
    ckpt = Checkpointer(ctx.run.checkpoints)
    start, _ = resume_step(ctx, ckpt, lambda state: ckpt.load(state, policy_engine, value_engine, kl_ctl))
    tracker = Tracker(cfg, enabled=info.is_main)
    eval_log = EvalLog(ctx, tracker)

    def evaluate(step: int) -> dict[str, Any]:
        row, samples = evaluate_policy(
            policy=policy, reference=reference, tokenizer=tokenizer, prompts=eval_share, ensemble=ensemble,
            gold=gold, agg=cfg.aggregate, ev=cfg.eval, zero_stage=stage, seed=cfg.seed * 7919 + rank,
            method="ppo", step=step, extra={"kl_coef": kl_ctl.value, "uwo_lambda": cfg.aggregate.uwo_lambda})
        eval_log.record(step, row, samples)
        log.info("eval step %d: gold %.3f proxy %.3f kl %.2f", step, row["gold_score"], row["proxy_score"],
                 row["kl"])
        return row

    if start == 0:
        evaluate(0)
    t_start = time.time()
    for step in range(start, p.steps):
        t0 = time.time()
        # 1. prompts: the step's global draw, this rank's contiguous share
        draw = torch.randperm(len(train_prompts), generator=step_generator(cfg.seed, step))[: p.batch_size]
        batch_prompts = [train_prompts[int(i)] for i in draw[rank * local_batch:(rank + 1) * local_batch]]
        # 2. rollout
        sample_gen = torch.Generator(device=info.device).manual_seed(cfg.seed * 1_000_003 + step * 7919 + rank)
        with gathered(policy, stage):
            ro = generate(policy, tokenizer, batch_prompts, max_new_tokens=p.max_new_tokens,
                          temperature=p.temperature, generator=sample_gen)
        t_gen = time.time() - t0
        mask = ro.response_mask
        with torch.no_grad():
            # 3. log-probs of the sampled tokens: policy (same pass as training), reference; values
            old_logprobs = sequence_logprobs(policy_engine, ro.query_ids, ro.query_mask, ro.response_ids, mask,
                                             temperature=p.temperature)
            ref_logprobs = sequence_logprobs(reference, ro.query_ids, ro.query_mask, ro.response_ids, mask,
                                             temperature=p.temperature)
            old_values = response_values(value_engine, ro.query_ids, ro.query_mask, ro.response_ids, mask)
            # 4. score with the proxy ensemble, aggregate
            proxy_scores, score = score_proxies(ensemble, ro.prompts, ro.responses, ro.ended.cpu().tolist(),
                                                cfg.aggregate, step)
            if p.no_eos_penalty:
                score = torch.where(ro.ended.cpu(), score, score + p.no_eos_penalty)
            score = score.to(info.device)
            # 5. rewards: per-token KL penalty, score at the last response token
            kl_tokens = kl_penalty_per_token(old_logprobs, ref_logprobs, p.kl_penalty_estimator) * mask
            rewards = -kl_ctl.value * kl_tokens
            rows = torch.arange(len(ro), device=rewards.device)
            rewards[rows, last_index(mask)] += score
            if p.whiten_rewards:
                rewards = global_whiten(rewards, mask, shift_mean=False)
            # 6. advantages
            advantages, returns = gae(rewards, old_values, mask, p.gamma, p.lam)
            if p.whiten_advantages:
                advantages = global_whiten(advantages, mask)
        batch = PPOBatch(ro, old_logprobs, old_values, advantages, returns)
        # 7. update
        t1 = time.time()
        upd = ppo_update(policy_engine, value_engine, batch, cfg=cfg, micro_batch=micro_batch,
                         generator=step_generator(cfg.seed, step, 1), step=step)
        t_update = time.time() - t1
        # 8. KL control on the batch's mean sequence KL
        seq_kl = float(dist.all_reduce_mean(kl_tokens.sum(-1).mean()))
        kl_ctl.update(seq_kl, p.batch_size)
        # 9. log, evaluate, checkpoint
        stats = {
            "step": step + 1,
            "score": float(dist.all_reduce_mean(score.mean())),
            "proxy_member_scores": [float(v) for v in dist.all_reduce_mean(proxy_scores.mean(1))],
            "rollout_kl": seq_kl,
            "kl_coef": kl_ctl.value,
            "eos_rate": float(dist.all_reduce_mean(ro.ended.float().mean())),
            "response_length": float(dist.all_reduce_mean(mask.float().sum(-1).mean())),
            "lr": policy_engine.get_lr()[0],
            "time_generate_s": t_gen,
            "time_update_s": t_update,
            "time_step_s": time.time() - t0,
            **{k: float(dist.all_reduce_mean(torch.tensor(v))) for k, v in upd.items()},
        }
        if info.is_main:
            from rlhf_overopt.runs import append_jsonl

            append_jsonl(ctx.run.root / "train_stats.jsonl", [stats])
        tracker.log_train(step + 1, {k: v for k, v in stats.items() if isinstance(v, float)})
        done = step + 1
        if done % cfg.eval.every == 0 or done == p.steps:
            evaluate(done)
        if done % p.save_every == 0 or done == p.steps:
            ckpt.save(done, policy_engine, value_engine, kl_ctl, info.is_main)
    # the trained policy, loadable by any transformers user (safetensors)
    with gathered(policy, stage):
        if info.is_main:
            policy.save_pretrained(ctx.run.root / "policy", safe_serialization=True)
            tokenizer.save_pretrained(ctx.run.root / "policy")
    dist.barrier()
    tracker.finish()
    return {"train_time_s": round(time.time() - t_start, 2), "final_kl_coef": kl_ctl.value, **param_counts}

