"""method: dynamic_ppo — PPO on a weighted sum of component rewards whose weights are fixed or
adapted during training (Lu et al. 2025, "Learning to Optimize Multi-Objective Alignment Through
Dynamic Reward Weighting").

The streams, value heads and stages 1-6 are rlhf_overopt.streams' (as for constrained_ppo). The
reward the policy is trained on is

    r_t = scale * sum_j w_j * c_j * [t = last]  -  kl_coef * KL_t

and since GAE is linear in rewards and values, its advantage is exactly
`scale * sum_j w_j A_j + kl_coef * A_0` over the per-stream advantages (then whitened, as PPO does).

weighting.mode:
- fixed:        w and scale = 1 constant (the fixed-weight baseline; one-hot weights optimize one
                component, which is how proxy_points finds each component's proxy point).
- hypervolume:  at each evaluation the eval component scores are a point of the objective space;
                its hypervolume gain over the Pareto buffer of earlier points sets
                `scale = 0.5 + 1.5 tanh(delta_HV)` until the next evaluation, and the buffer keeps
                the non-dominated points. The reference point is the step-0 point minus
                weighting.hv_reference_offset.
- gradient:     every weighting.gradient_every iterations, the per-objective policy gradients g_j
                (of the PPO surrogate with component j's whitened advantage, at the rollout
                policy) give `w_j <- w_j exp(eta <g_j, sum_k g_k> / mu)`, renormalized.

Every evaluation logs `reward_weights` (w), `reward_scale`, `hypervolume` of the buffer and
`hypervolume_gain` of the point.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from rlhf_overopt.config.plan import make_plan
from rlhf_overopt.evaluate import EvalLog, evaluate_policy
from rlhf_overopt.ops.constrained import (
    combine_streams,
    gradient_weight_update,
    hypervolume,
    hypervolume_scale,
    normalized_weights,
    objective_influence,
    pareto_buffer_add,
)
from rlhf_overopt.ops.kl import kl_controller
from rlhf_overopt.ops.losses import ppo_policy_loss
from rlhf_overopt.rollout import sequence_logprobs
from rlhf_overopt.run import dist, seeds
from rlhf_overopt.run.checkpoints import Checkpointer
from rlhf_overopt.run.directory import append_jsonl
from rlhf_overopt.run.engines import save_policy
from rlhf_overopt.run.lifecycle import RunContext, resume_step
from rlhf_overopt.run.tracking import Tracker
from rlhf_overopt.streams import StreamBatch, build_composite, collect_streams, stream_stats
from rlhf_overopt.update import ppo_update

log = logging.getLogger("rlhf_overopt")


def objective_gradients(policy, batch: StreamBatch, advantages: torch.Tensor, *, micro_batch: int,
                        temperature: float, clip_range: float) -> torch.Tensor:
    """Per-objective policy gradients over the whole batch (all ranks), flattened: (J, P).

    g_j is the gradient of the PPO surrogate `-masked_mean(ratio * A_j)` at the rollout policy
    (ratio 1, so the clip is inactive and this is the policy gradient of objective j), averaged
    over the batch's tokens as one global masked mean. Computed with torch.autograd.grad on the
    module's own parameters, which leaves the DeepSpeed engine's gradient state untouched
    (ZeRO stage <= 2, where every rank holds the full parameters).
    advantages: (J, B, Tr) whitened per objective.
    """
    ro = batch.rollout
    params = [q for q in policy.parameters() if q.requires_grad]
    tokens = ro.response_mask.float().sum().clamp(min=1.0)
    grads = torch.zeros(advantages.shape[0], sum(q.numel() for q in params), device=tokens.device)
    for start in range(0, len(ro), micro_batch):
        idx = torch.arange(start, min(start + micro_batch, len(ro)))
        mb = ro.select(idx)
        mask = mb.response_mask
        share = mask.float().sum() / tokens  # this minibatch's share of the local masked mean
        logprobs = sequence_logprobs(policy, mb.query_ids, mb.query_mask, mb.response_ids, mask,
                                     temperature=temperature)
        for j in range(advantages.shape[0]):
            loss, _ = ppo_policy_loss(logprobs, batch.old_logprobs[idx], advantages[j][idx], mask, clip_range)
            g = torch.autograd.grad(loss * share, params, retain_graph=j < advantages.shape[0] - 1)
            grads[j] += torch.cat([x.reshape(-1) for x in g])
    # local masked mean * (local tokens / mean tokens per rank), averaged over ranks = global masked mean
    grads *= tokens / dist.global_token_count(ro.response_mask).clamp(min=1.0)
    return dist.all_reduce_mean(grads)


class Weighting:
    """The weights w (N,), the reward scale and the hypervolume buffer of one run."""

    def __init__(self, cfg, n: int) -> None:
        w = cfg.weighting
        self.cfg, self.n = cfg, n
        self.weights = normalized_weights(w.weights or None, n)
        self.scale = 1.0
        self.front = torch.zeros(0, n, dtype=torch.float64)
        self.reference: torch.Tensor | None = None
        self.last_gain = 0.0
        self.last_influence: list[float] | None = None

    def coefficients(self, kl_coef: float) -> torch.Tensor:
        """Stream coefficients [kl_coef, scale * w_1, ..., scale * w_N] (S,)."""
        beta = torch.tensor([kl_coef], dtype=torch.float64)
        return torch.cat([beta, self.scale * self.weights]).float()

    def adapt_by_gradients(self, policy, batch: StreamBatch, micro_batch: int) -> None:
        """w_j <- w_j exp(eta I_j / mu), renormalized (Lu et al. 2025)."""
        cfg = self.cfg
        grads = objective_gradients(policy, batch, batch.whitened[1:], micro_batch=micro_batch,
                                    temperature=cfg.ppo.temperature, clip_range=cfg.ppo.clip_range)
        eta = cfg.weighting.gradient_eta or cfg.ppo.lr
        self.last_influence = [float(v) for v in objective_influence(grads.double())]
        self.weights = gradient_weight_update(self.weights, grads.double(), eta, cfg.weighting.gradient_mu)

    def observe(self, point: torch.Tensor, step: int) -> dict[str, Any]:
        """An evaluation's component scores: hypervolume gain over the buffer, the new buffer, and
        (mode hypervolume, after step 0) the reward scale until the next evaluation."""
        w = self.cfg.weighting
        point = point.double()
        if self.reference is None:
            self.reference = point - w.hv_reference_offset
        self.front, gain = pareto_buffer_add(self.front, point, self.reference)
        if w.mode == "hypervolume" and step > 0:
            self.scale = float(hypervolume_scale(gain))
        self.last_gain = gain
        return {"hypervolume_gain": gain, "hypervolume": float(hypervolume(self.front, self.reference)),
                "pareto_buffer_size": int(self.front.shape[0])}

    def fields(self) -> dict[str, Any]:
        return {"weighting": self.cfg.weighting.mode, "reward_weights": [float(v) for v in self.weights],
                "reward_scale": self.scale,
                **({"objective_influence": self.last_influence} if self.last_influence is not None else {})}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "scale": self.scale, "front": self.front.tolist(),
                "reference": None if self.reference is None else self.reference.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = self.n
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)
        self.scale = float(state["scale"])
        self.front = torch.tensor(state["front"], dtype=torch.float64).reshape(-1, n)
        self.reference = None if state["reference"] is None else torch.tensor(state["reference"], dtype=torch.float64)


def run(ctx: RunContext) -> dict[str, Any]:
    cfg, p, w, info = ctx.cfg, ctx.cfg.ppo, ctx.cfg.weighting, ctx.dist
    plan = make_plan(cfg, info.world_size)
    # 0. models and weights; resume
    m = build_composite(cfg, ctx.testbed, info, ctx.run, plan)
    actors, stage = m.actors, cfg.deepspeed.zero_stage
    kl_ctl = kl_controller(p.kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon)
    weighting = Weighting(cfg, m.components.n)
    ckpt = Checkpointer(ctx.run.checkpoints)
    start, state = resume_step(ctx, ckpt, actors.engines())
    if state is not None:
        kl_ctl.load_state_dict(state["kl_controller"])
        weighting.load_state_dict(state["weighting"])
    tracker = Tracker(cfg, enabled=info.is_main)
    eval_log = EvalLog(ctx.run, tracker)

    def evaluate(step: int) -> None:
        point, samples = evaluate_policy(
            policy=actors.policy, reference=actors.reference, tokenizer=m.tokenizer, prompts=m.eval_share,
            gold=m.gold, ev=cfg.eval, zero_stage=stage, generator=seeds.eval_generator(cfg.seed, info.rank, info.device),
            method=cfg.method, step=step, aggregator=cfg.aggregate.name, components=m.components,
            agg_cfg=cfg.aggregate, component_weights=(weighting.scale * weighting.weights).tolist(),
            extra={"kl_coef": kl_ctl.value})
        point.extra.update(weighting.fields())  # the weights the policy was trained with up to this point
        point.extra.update(weighting.observe(torch.tensor(point.components["component_scores"]), step))
        point.extra["reward_scale_next"] = weighting.scale
        eval_log.record(point, samples)

    if start == 0:
        evaluate(0)
    t_start = time.time()
    for step in range(start, p.steps):
        t0 = time.time()
        # 1-6. prompts, rollout, log-probs and stream values, component scores, stream rewards, advantages
        batch = collect_streams(actors=actors, tokenizer=m.tokenizer, components=m.components, agg_cfg=cfg.aggregate,
                                train_prompts=m.train_prompts, cfg=cfg, plan=plan, info=info, step=step)
        # 6b. gradient-based weights from this batch's per-objective gradients
        if w.mode == "gradient" and step % w.gradient_every == 0:
            weighting.adapt_by_gradients(actors.policy, batch, plan.micro_batch)
        # 7. update on the weighted reward's advantage
        advantages = combine_streams(batch.advantages, weighting.coefficients(kl_ctl.value))
        if p.whiten_advantages:
            advantages = dist.global_whiten(advantages, batch.rollout.response_mask)
        upd = ppo_update(actors.policy_engine, actors.value_engine, batch.rollout, old_logprobs=batch.old_logprobs,
                         old_values=batch.old_values, returns=batch.returns,
                         advantages_for=lambda idx, a=advantages: a[idx], epochs=p.ppo_epochs,
                         micro_batch=plan.micro_batch, clip_range=p.clip_range,
                         clip_range_value=p.clip_range_value, vf_coef=p.vf_coef, temperature=p.temperature,
                         generator=seeds.step_generator(cfg.seed, step, 1), step=step)
        # 8. KL control
        kl_ctl.update(batch.seq_kl, p.batch_size)
        # 9. log, evaluate, checkpoint
        stats = stream_stats(batch, upd, step=step, kl_coef=kl_ctl.value, lr=actors.policy_engine.get_lr()[0],
                             t0=t0, extra=weighting.fields())
        if info.is_main:
            append_jsonl(ctx.run.root / "train_stats.jsonl", [stats])
        tracker.log_train(step + 1, {k: v for k, v in stats.items() if isinstance(v, float)})
        done = step + 1
        if done in plan.eval_steps:
            evaluate(done)
        if done in plan.save_steps:
            ckpt.save(done, actors.engines(), {"kl_controller": kl_ctl.state_dict(),
                                               "weighting": weighting.state_dict()}, info.is_main)
    save_policy(actors.policy, m.tokenizer, ctx.run.root / "policy", stage, info.is_main)
    tracker.finish()
    return {"train_time_s": round(time.time() - t_start, 2), "final_kl_coef": kl_ctl.value,
            "components": m.components.names, **actors.parameter_counts(),
            "final_weighting": weighting.fields(),
            "final_hypervolume": float(hypervolume(weighting.front, weighting.reference))}
