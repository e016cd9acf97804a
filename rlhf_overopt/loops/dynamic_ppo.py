"""method: dynamic_ppo — PPO on a weighted sum of component rewards whose weights are fixed or
adapted during training (Lu et al. 2025, "Learning to Optimize Multi-Objective Alignment Through
Dynamic Reward Weighting").

The streams, value heads and stages 1-6 are those of rlhf_overopt.loops.constrained_ppo. The
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

from rlhf_overopt import dist
from rlhf_overopt.constrained import (
    combine_streams,
    gradient_weight_update,
    hypervolume,
    hypervolume_scale,
    normalized_weights,
    objective_influence,
    pareto_buffer_add,
)
from rlhf_overopt.loops.common import RunContext
from rlhf_overopt.loops.constrained_ppo import (
    Session,
    StreamBatch,
    collect,
    evaluate,
    finish,
    log_train,
    record_eval,
    resume,
    save_checkpoint,
    setup,
    update,
)
from rlhf_overopt.loops.ppo import global_token_count, global_whiten
from rlhf_overopt.losses import ppo_policy_loss
from rlhf_overopt.rollout import sequence_logprobs

log = logging.getLogger("rlhf_overopt")


def objective_gradients(s: Session, batch: StreamBatch, advantages: torch.Tensor) -> torch.Tensor:
    """Per-objective policy gradients over the whole batch (all ranks), flattened: (J, P).

    g_j is the gradient of the PPO surrogate `-masked_mean(ratio * A_j)` at the rollout policy
    (ratio 1, so the clip is inactive and this is the policy gradient of objective j), averaged
    over the batch's tokens as one global masked mean. Computed with torch.autograd.grad on the
    module's own parameters, which leaves the DeepSpeed engine's gradient state untouched
    (ZeRO stage <= 2, where every rank holds the full parameters).
    advantages: (J, B, Tr) whitened per objective.
    """
    p = s.cfg.ppo
    ro = batch.rollout
    policy = s.policy
    params = [q for q in policy.parameters() if q.requires_grad]
    tokens = ro.response_mask.float().sum().clamp(min=1.0)
    grads = torch.zeros(advantages.shape[0], sum(q.numel() for q in params), device=tokens.device)
    for start in range(0, len(ro), s.micro_batch):
        idx = torch.arange(start, min(start + s.micro_batch, len(ro)))
        mb = ro.select(idx)
        mask = mb.response_mask
        share = mask.float().sum() / tokens  # this minibatch's share of the local masked mean
        logprobs = sequence_logprobs(policy, mb.query_ids, mb.query_mask, mb.response_ids, mask,
                                     temperature=p.temperature)
        for j in range(advantages.shape[0]):
            loss, _ = ppo_policy_loss(logprobs, batch.old_logprobs[idx], advantages[j][idx], mask, p.clip_range)
            g = torch.autograd.grad(loss * share, params, retain_graph=j < advantages.shape[0] - 1)
            grads[j] += torch.cat([x.reshape(-1) for x in g])
    # local masked mean * (local tokens / mean tokens per rank), averaged over ranks = global masked mean
    grads *= tokens / global_token_count(ro.response_mask).clamp(min=1.0)
    return dist.all_reduce_mean(grads)


class Weighting:
    """The weights w (N,), the reward scale and the hypervolume buffer of one run."""

    def __init__(self, s: Session) -> None:
        w = s.cfg.weighting
        n = s.components.n
        self.s = s
        self.weights = normalized_weights(w.weights or None, n)
        self.scale = 1.0
        self.front = torch.zeros(0, n, dtype=torch.float64)
        self.reference: torch.Tensor | None = None
        self.last_gain = 0.0
        self.last_influence: list[float] | None = None

    def coefficients(self) -> torch.Tensor:
        """Stream coefficients [kl_coef, scale * w_1, ..., scale * w_N] (S,)."""
        beta = torch.tensor([self.s.kl_ctl.value], dtype=torch.float64)
        return torch.cat([beta, self.scale * self.weights]).float()

    def adapt_by_gradients(self, batch: StreamBatch) -> None:
        """w_j <- w_j exp(eta I_j / mu), renormalized (Lu et al. 2025)."""
        cfg = self.s.cfg
        grads = objective_gradients(self.s, batch, batch.whitened[1:])
        eta = cfg.weighting.gradient_eta or cfg.ppo.lr
        self.last_influence = [float(v) for v in objective_influence(grads.double())]
        self.weights = gradient_weight_update(self.weights, grads.double(), eta, cfg.weighting.gradient_mu)

    def observe(self, point: torch.Tensor, step: int) -> dict[str, Any]:
        """An evaluation's component scores: hypervolume gain over the buffer, the new buffer, and
        (mode hypervolume, after step 0) the reward scale until the next evaluation."""
        w = self.s.cfg.weighting
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
        return {"weighting": self.s.cfg.weighting.mode, "reward_weights": [float(v) for v in self.weights],
                "reward_scale": self.scale,
                **({"objective_influence": self.last_influence} if self.last_influence is not None else {})}

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.weights.tolist(), "scale": self.scale, "front": self.front.tolist(),
                "reference": None if self.reference is None else self.reference.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        n = self.s.components.n
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)
        self.scale = float(state["scale"])
        self.front = torch.tensor(state["front"], dtype=torch.float64).reshape(-1, n)
        self.reference = None if state["reference"] is None else torch.tensor(state["reference"], dtype=torch.float64)


def _evaluate(s: Session, weighting: Weighting, step: int) -> dict[str, Any]:
    component_weights = (weighting.scale * weighting.weights).tolist()
    row, samples = evaluate(s, step, component_weights=component_weights, extra={"kl_coef": s.kl_ctl.value})
    row.update(weighting.fields())  # the weights the policy was trained with up to this point
    row.update(weighting.observe(torch.tensor(row["component_scores"]), step))
    row["reward_scale_next"] = weighting.scale
    record_eval(s, row, samples)
    return row


def run(ctx: RunContext) -> dict[str, Any]:
    cfg, p, w = ctx.cfg, ctx.cfg.ppo, ctx.cfg.weighting
    # 0. models and weights; resume
    s = setup(ctx)
    weighting = Weighting(s)
    start, state = resume(s)
    if state is not None:
        weighting.load_state_dict(state["weighting"])
    if start == 0:
        _evaluate(s, weighting, 0)
    t_start = time.time()
    for step in range(start, p.steps):
        t0 = time.time()
        # 1-6. prompts, rollout, log-probs and stream values, component scores, stream rewards, advantages
        batch = collect(s, step)
        # 6b. gradient-based weights from this batch's per-objective gradients
        if w.mode == "gradient" and step % w.gradient_every == 0:
            weighting.adapt_by_gradients(batch)
        # 7. update on the weighted reward's advantage
        advantages = combine_streams(batch.advantages, weighting.coefficients())
        if p.whiten_advantages:
            advantages = global_whiten(advantages, batch.rollout.response_mask)
        upd = update(s, batch, step=step, advantages_for=lambda idx, a=advantages: a[idx])
        # 8. KL control
        s.kl_ctl.update(batch.seq_kl, p.batch_size)
        # 9. log, evaluate, checkpoint
        log_train(s, step, batch, upd, t0, weighting.fields())
        done = step + 1
        if done % cfg.eval.every == 0 or done == p.steps:
            _evaluate(s, weighting, done)
        if done % p.save_every == 0 or done == p.steps:
            save_checkpoint(s, done, {"weighting": weighting.state_dict()})
    return finish(s, t_start, {"final_weighting": weighting.fields(),
                               "final_hypervolume": float(hypervolume(weighting.front, weighting.reference))})
