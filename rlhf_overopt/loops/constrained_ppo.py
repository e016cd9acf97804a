"""methods: constrained_ppo (mu-PPO, xi-PPO) and nm_ppo — PPO on component rewards, with Lagrange
multipliers as dynamic weights (Moskovitz et al. 2023, "Confronting Reward Model Overoptimization
with Constrained RLHF", §4 and §4.3).

Every composite method (this module, dynamic_ppo, proxy_points) trains on S = N + 1 reward
streams, each with its own value head: stream 0 is minus the per-token KL to the initial policy,
stream i the score of component i (rlhf_overopt/components.py) at the last response token.
One iteration:

    1. prompts      this rank's share of the step's ppo.batch_size train prompts (seeded by step)
    2. rollout      sample responses (left-padded queries, temperature, stop at EOS)
    3. log-probs    policy and reference on the sampled tokens; one value per stream (S heads)
    4. score        each component's proxy ensemble -> component scores (N, B)
    5. rewards      per stream (S, B, Tr): -KL per token; component i at the last token
    6. advantages   GAE per stream; each stream also whitened on its own over the whole batch
    7. update       ppo_epochs over minibatches: the advantage mixed from the streams with the
                    current multipliers `(N - sum f(mu)) A_0 + sum f(mu_i) A_i`, clipped policy
                    loss, clipped value loss on every stream, then one SGD step of the
                    multipliers on the minibatch's constraint values
    8. KL control   (only a component objective carries ppo.kl_coef)
    9. log / eval / checkpoint

mu-PPO maximizes v_0 = -KL subject to v_i >= theta_i (sigmoid weights); xi-PPO subject to
v_i = theta_i (tanh weights). With `constrained.objective` a component name, that component (with
the KL penalty) is maximized and the others constrained.

NM-PPO: scipy's Nelder–Mead proposes thresholds; each function evaluation is a stretch of
nm.stretch_steps iterations under those thresholds, scored by minus the gold evaluation that ends
it. The policy and the multipliers carry over from stretch to stretch: one run. Should the
simplex converge before ppo.steps, training goes on at the best thresholds found.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_overopt import dist
from rlhf_overopt.advantages import gae
from rlhf_overopt.components import ComponentRewards, component_values
from rlhf_overopt.config import Config
from rlhf_overopt.constrained import mixed_advantages, multiplier_loss, squash_multipliers, stream_returns
from rlhf_overopt.curves import check_finite, score_gold
from rlhf_overopt.engines import (
    checked_step,
    ds_config,
    ensure_process_group,
    frozen_model,
    gathered,
    local_parameter_count,
    train_engine,
)
from rlhf_overopt.kl import AdaptiveKLController, FixedKLController, kl_penalty_per_token, sequence_kl
from rlhf_overopt.loops.common import InputError, RunContext, resume_step
from rlhf_overopt.loops.ppo import Checkpointer, global_token_count, global_whiten, step_generator
from rlhf_overopt.losses import ppo_policy_loss, ppo_value_loss
from rlhf_overopt.masking import last_index, masked_mean, position_ids_from_mask
from rlhf_overopt.models import check_vocabulary, load_causal_lm, load_tokenizer
from rlhf_overopt.records import Rollout
from rlhf_overopt.reward_cache import ensure_components
from rlhf_overopt.rollout import generate, sequence_logprobs
from rlhf_overopt.runs import append_jsonl, atomic_write_json, read_jsonl
from rlhf_overopt.tracking import Tracker

log = logging.getLogger("rlhf_overopt")

NM_PATH_FILE = "nm_path.jsonl"


# ---------------------------------------------------------------------------------------------
# One value head per reward stream
# ---------------------------------------------------------------------------------------------


class StreamValueModel(nn.Module):
    """A transformer backbone with S scalar value heads, one per reward stream.

    The head is Linear(d, S) with weights ~ N(0, std = 1/sqrt(d + 1)) and bias 0, as the single
    value head of rlhf_overopt.rollout.ValueModel (Huang et al. 2024, "N+ details").
    """

    def __init__(self, backbone: nn.Module, n_streams: int) -> None:
        super().__init__()
        self.backbone = backbone
        d = backbone.config.hidden_size
        self.head = nn.Linear(d, n_streams)
        nn.init.normal_(self.head.weight, mean=0.0, std=1.0 / math.sqrt(d + 1))
        nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position values of every stream. input_ids, attention_mask: (B, T). Returns (B, T, S)."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype))

    @classmethod
    def from_pretrained_backbone(cls, path: str, n_streams: int) -> StreamValueModel:
        """Backbone of any saved transformers model (causal LM, reward model) + fresh heads."""
        from transformers import AutoModel

        return cls(AutoModel.from_pretrained(path), n_streams)


def stream_values(value_model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                  response_mask: torch.Tensor) -> torch.Tensor:
    """`values[s, :, t] = V_s(query, response_<t)`, aligned as rlhf_overopt.rollout.response_values.

    query_ids, query_mask: (B, Tq) left-padded; response_ids, response_mask: (B, Tr).
    Returns (S, B, Tr), 0 at masked positions; gradients flow.
    """
    q, r = query_ids.shape[1], response_ids.shape[1]
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    values = value_model(input_ids, attention_mask, position_ids_from_mask(attention_mask))[:, q - 1:q - 1 + r]
    values = values.permute(2, 0, 1)
    return torch.where(response_mask.bool(), values, torch.zeros_like(values))


# ---------------------------------------------------------------------------------------------
# Lagrange multipliers with their own optimizer
# ---------------------------------------------------------------------------------------------


class Multipliers:
    """Raw multipliers mu (N,) trained by SGD with momentum and gradient-norm clipping on
    `multiplier_loss`, one step per PPO minibatch (Moskovitz et al. 2023, §4 and App.: SGD,
    lr 0.01-0.1, momentum 0.1, clip 0.5)."""

    def __init__(self, n: int, constraint: str, thresholds: list[float], *, init: float, lr: float, momentum: float,
                 grad_clip: float) -> None:
        self.constraint = constraint
        self.mu = nn.Parameter(torch.full((n,), float(init)))
        self.optimizer = torch.optim.SGD([self.mu], lr=lr, momentum=momentum)
        self.grad_clip = grad_clip
        self.thresholds = torch.tensor(thresholds, dtype=torch.float64)

    def weights(self) -> torch.Tensor:
        """f(mu) (N,): the weights of the constrained streams."""
        return squash_multipliers(self.mu.detach(), self.constraint)

    def step(self, constraint_values: torch.Tensor) -> float:
        """One optimizer step on `sum_i f(mu_i) (v_i - theta_i)`; returns the loss."""
        loss = multiplier_loss(self.mu, constraint_values.double().cpu(), self.thresholds, self.constraint)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([self.mu], self.grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        buf = self.optimizer.state.get(self.mu, {}).get("momentum_buffer")
        return {"mu": self.mu.detach().tolist(), "momentum_buffer": None if buf is None else buf.tolist(),
                "thresholds": self.thresholds.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.mu.copy_(torch.tensor(state["mu"]))
        if state["momentum_buffer"] is not None:
            self.optimizer.state[self.mu]["momentum_buffer"] = torch.tensor(state["momentum_buffer"])
        self.thresholds = torch.tensor(state["thresholds"], dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# The session every composite driver runs: models, data, one iteration's stages, eval, checkpoints
# ---------------------------------------------------------------------------------------------


@dataclass
class Session:
    """What a composite driver holds for a run (built by `setup`, stage 0)."""

    ctx: RunContext
    components: ComponentRewards
    gold: Any
    tokenizer: Any
    policy_engine: Any
    value_engine: Any
    reference: nn.Module
    kl_ctl: Any
    train_prompts: list[str]
    eval_share: list[str]
    tracker: Tracker
    checkpointer: Checkpointer
    param_counts: dict[str, int]

    @property
    def cfg(self) -> Config:
        return self.ctx.cfg

    @property
    def policy(self) -> nn.Module:
        return self.policy_engine.module

    @property
    def micro_batch(self) -> int:
        return self.cfg.ppo.mini_batch_size // self.ctx.dist.world_size

    @property
    def local_batch(self) -> int:
        return self.cfg.ppo.batch_size // self.ctx.dist.world_size


@dataclass
class StreamBatch:
    """A scored rollout batch of this rank with one reward stream per objective.

    Streams: 0 = -KL per token, 1..N = the components in `components.names` order.
    Tensors (S, B, Tr) unless noted.
    """

    rollout: Rollout
    old_logprobs: torch.Tensor  # (B, Tr)
    old_values: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor  # GAE per stream, raw
    returns: torch.Tensor
    whitened: torch.Tensor  # advantages whitened per stream over the whole batch (all ranks)
    starts: torch.Tensor  # (S, B) return of each sequence from its first token (constraint values)
    member_scores: torch.Tensor  # (K_total, B) every component member
    component_scores: torch.Tensor  # (N, B) aggregated per component
    seq_kl: float  # mean sequence KL of the batch over all ranks
    time_generate_s: float


def setup(ctx: RunContext) -> Session:
    """Stage 0: tokenizer, component proxies, gold, policy + stream-value engines, frozen reference."""
    from rlhf_overopt.gold import GoldScorer

    cfg, p, info = ctx.cfg, ctx.cfg.ppo, ctx.dist
    ensure_process_group(info.device)
    world, rank, stage = info.world_size, info.rank, cfg.deepspeed.zero_stage
    policy_path = str(ctx.testbed.policy_dir) if cfg.policy.path == "testbed" else cfg.policy.path
    tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.policy.trust_remote_code)
    components = ensure_components(cfg, ctx.testbed, info, ctx.run)
    gold = GoldScorer.from_config(cfg, ctx.testbed)
    prompts = ctx.testbed.load_prompts()
    train_prompts = list(prompts["train"]["prompt"])
    eval_prompts = list(prompts["eval"]["prompt"])[: cfg.eval.n_prompts]
    eval_share = [eval_prompts[i] for i in dist.shard_indices(len(eval_prompts), rank, world)]
    if len(train_prompts) < p.batch_size // world:
        raise InputError(f"the train prompt split has {len(train_prompts)} prompts, fewer than one batch")

    def load_policy():
        return load_causal_lm(policy_path, dtype=getattr(torch, cfg.policy.dtype),
                              trust_remote_code=cfg.policy.trust_remote_code, dropout_off=cfg.policy.dropout_off)

    if p.value_init == "policy":
        value_path = policy_path
    else:
        ensemble = components.ensembles[0]
        if components.root is None or ensemble.kind not in ("independent", "pretrain"):
            raise InputError("ppo.value_init=proxy needs saved independent/pretrain component ensembles")
        value_path = str(components.root / components.names[0] / ensemble.member_names[0])
    updates = p.steps * p.ppo_epochs * (p.batch_size // p.mini_batch_size)
    engine_cfg = ds_config(zero_stage=stage, micro_batch_per_rank=p.mini_batch_size // world, world_size=world,
                           max_grad_norm=p.max_grad_norm, extra_path=cfg.deepspeed.config, dtype=cfg.policy.dtype)
    torch.manual_seed(cfg.seed)  # the value heads' initialization is the same on every rank
    policy_model = load_policy()
    check_vocabulary(tokenizer, policy_model)
    policy_engine = train_engine(policy_model, lr=p.lr, total_steps=updates, final_ratio=p.lr_final_ratio,
                                 config=engine_cfg)
    value_engine = train_engine(StreamValueModel.from_pretrained_backbone(value_path, components.n + 1),
                                lr=p.value_lr, total_steps=updates, final_ratio=p.lr_final_ratio, config=engine_cfg)
    reference = frozen_model(load_policy(), zero_stage=stage, config=engine_cfg, device=info.device)
    kl_ctl = (AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.adaptive_kl
              else FixedKLController(p.kl_coef))
    policy = policy_engine.module
    counts = {"policy_local_params": local_parameter_count(policy),
              "policy_total_params": sum(int(getattr(q, "ds_numel", q.numel())) for q in policy.parameters())}
    log.info("%s: %d component(s) %s, policy %d parameters (%d on this rank), %d rank(s)", cfg.method,
             components.n, components.names, counts["policy_total_params"], counts["policy_local_params"], world)
    return Session(ctx=ctx, components=components, gold=gold, tokenizer=tokenizer, policy_engine=policy_engine,
                   value_engine=value_engine, reference=reference, kl_ctl=kl_ctl, train_prompts=train_prompts,
                   eval_share=eval_share, tracker=Tracker(cfg, enabled=info.is_main),
                   checkpointer=Checkpointer(ctx.run.checkpoints), param_counts=counts)


def collect(s: Session, step: int) -> StreamBatch:
    """Stages 1-6 of one iteration: prompts, rollout, log-probs and values, scores, per-stream
    rewards, per-stream advantages."""
    cfg, p, info = s.cfg, s.cfg.ppo, s.ctx.dist
    t0 = time.time()
    # 1. prompts: the step's global draw, this rank's contiguous share
    draw = torch.randperm(len(s.train_prompts), generator=step_generator(cfg.seed, step))[: p.batch_size]
    mine = draw[info.rank * s.local_batch:(info.rank + 1) * s.local_batch]
    batch_prompts = [s.train_prompts[int(i)] for i in mine]
    # 2. rollout
    sample_gen = torch.Generator(device=info.device).manual_seed(cfg.seed * 1_000_003 + step * 7919 + info.rank)
    with gathered(s.policy, cfg.deepspeed.zero_stage):
        ro = generate(s.policy, s.tokenizer, batch_prompts, max_new_tokens=p.max_new_tokens,
                      temperature=p.temperature, generator=sample_gen)
    t_gen = time.time() - t0
    mask = ro.response_mask
    with torch.no_grad():
        # 3. log-probs of the sampled tokens under the policy and the reference; values per stream
        old_logprobs = sequence_logprobs(s.policy_engine, ro.query_ids, ro.query_mask, ro.response_ids, mask,
                                         temperature=p.temperature)
        ref_logprobs = sequence_logprobs(s.reference, ro.query_ids, ro.query_mask, ro.response_ids, mask,
                                         temperature=p.temperature)
        old_values = stream_values(s.value_engine, ro.query_ids, ro.query_mask, ro.response_ids, mask)
        # 4. score with every component's ensemble
        member_scores, component_scores = s.components.score(ro.prompts, ro.responses, ro.ended.cpu().tolist(),
                                                             cfg.aggregate, step)
        # 5. rewards per stream: -KL per token on stream 0, component i at the last token on stream i
        kl_tokens = kl_penalty_per_token(old_logprobs, ref_logprobs, p.kl_penalty_estimator) * mask
        n_streams = s.components.n + 1
        rewards = torch.zeros((n_streams, *mask.shape), dtype=old_values.dtype, device=mask.device)
        rewards[0] = -kl_tokens
        rows = torch.arange(len(ro), device=mask.device)
        rewards[1:, rows, last_index(mask)] = component_scores.to(rewards.device, rewards.dtype)
        # 6. advantages: GAE per stream (streams stacked along the batch), whitened per stream
        flat_adv, flat_ret = gae(rewards.flatten(0, 1), old_values.flatten(0, 1), mask.repeat(n_streams, 1),
                                 p.gamma, p.lam)
        advantages, returns = flat_adv.view_as(rewards), flat_ret.view_as(rewards)
        whitened = torch.stack([global_whiten(advantages[i], mask) for i in range(n_streams)])
        starts = stream_returns(rewards, mask, p.gamma)
    seq_kl = float(dist.all_reduce_mean(kl_tokens.sum(-1).mean()))
    return StreamBatch(rollout=ro, old_logprobs=old_logprobs, old_values=old_values, rewards=rewards,
                       advantages=advantages, returns=returns, whitened=whitened, starts=starts,
                       member_scores=member_scores, component_scores=component_scores, seq_kl=seq_kl,
                       time_generate_s=t_gen)


def update(s: Session, batch: StreamBatch, *, step: int, advantages_for: Callable[[torch.Tensor], torch.Tensor],
           after_minibatch: Callable[[torch.Tensor], dict[str, float]] | None = None) -> dict[str, float]:
    """Stage 7: ppo_epochs over the batch in minibatches of `micro_batch` rows per rank.

    `advantages_for(idx)` gives the minibatch's (b, Tr) advantages, so a combiner may change
    between minibatches (Lagrange multipliers step once per minibatch); `after_minibatch(idx)`
    runs after the policy and value steps and returns stats to average.
    """
    cfg, p = s.cfg, s.cfg.ppo
    ro = batch.rollout
    n_streams = batch.old_values.shape[0]
    generator = step_generator(cfg.seed, step, 1)
    stats: dict[str, list[float]] = {}
    s.policy_engine.train()
    s.value_engine.train()
    for _epoch in range(p.ppo_epochs):
        order = torch.randperm(len(ro), generator=generator)
        for start in range(0, len(ro), s.micro_batch):
            idx = order[start:start + s.micro_batch]
            mb = ro.select(idx)
            mask = mb.response_mask
            # Each rank's masked mean is rescaled so DeepSpeed's average over ranks is the masked
            # mean over the global minibatch (as in rlhf_overopt.loops.ppo.ppo_update).
            scale = mask.float().sum() / global_token_count(mask).clamp(min=1.0)
            logprobs, entropy = sequence_logprobs(s.policy_engine, mb.query_ids, mb.query_mask, mb.response_ids,
                                                  mask, temperature=p.temperature, return_entropy=True)
            pg_loss, pg_stats = ppo_policy_loss(logprobs, batch.old_logprobs[idx], advantages_for(idx), mask,
                                                p.clip_range)
            check_finite(pg_loss, "policy loss", step)
            s.policy_engine.backward(pg_loss * scale)
            checked_step(s.policy_engine, "policy", step)

            values = stream_values(s.value_engine, mb.query_ids, mb.query_mask, mb.response_ids, mask)
            vf_loss, vf_stats = ppo_value_loss(values.flatten(0, 1), batch.old_values[:, idx].flatten(0, 1),
                                               batch.returns[:, idx].flatten(0, 1), mask.repeat(n_streams, 1),
                                               p.clip_range_value)
            check_finite(vf_loss, "value loss", step)
            s.value_engine.backward(p.vf_coef * vf_loss * scale)
            checked_step(s.value_engine, "value", step)

            extra = after_minibatch(idx) if after_minibatch is not None else {}
            for key, value in {"policy_loss": pg_loss, "value_loss": vf_loss,
                               "entropy": masked_mean(entropy.detach(), mask), **pg_stats, **vf_stats,
                               **extra}.items():
                stats.setdefault(key, []).append(float(value.detach()) if torch.is_tensor(value) else float(value))
    return {k: sum(v) / len(v) for k, v in stats.items()}


@torch.no_grad()
def evaluate(s: Session, step: int, *, component_weights: list[float], extra: dict[str, Any]
             ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One curves.jsonl row (and samples) of the current policy on the held-out prompts.

    Like rlhf_overopt.curves.evaluate_policy, with every component scored: `component_scores`
    (aggregated proxy per component), `gold_components` (the component's gold terms, the truth
    it stands for), `proxy_member_scores` (every member, grouped by component), and
    `proxy_score = sum_j component_weights[j] * component_scores[j]`, the component part of the
    reward the policy is trained on at this point.
    """
    cfg, ev, info = s.cfg, s.cfg.eval, s.ctx.dist
    stage = cfg.deepspeed.zero_stage
    generator = torch.Generator(device=info.device).manual_seed(cfg.seed * 7919 + info.rank)
    # 1. sample on held-out prompts (the same draw at every evaluation: common random numbers)
    with gathered(s.policy, stage):
        ro = generate(s.policy, s.tokenizer, s.eval_share, max_new_tokens=ev.max_new_tokens,
                      temperature=ev.temperature, top_p=ev.top_p, generator=generator, batch_size=ev.batch_size)
    # 2. KL to the initial policy on the same tokens
    with gathered(s.reference, stage):
        ref_logprobs = sequence_logprobs(s.reference, ro.query_ids, ro.query_mask, ro.response_ids,
                                         ro.response_mask, temperature=ev.temperature)
    kl = sequence_kl(ro.logprobs, ref_logprobs, ro.response_mask, ev.kl_estimator).float().cpu()
    # 3. components, gold, and gold's share of each component
    ended = ro.ended.cpu().tolist()
    member_scores, component_scores = s.components.score(ro.prompts, ro.responses, ended, cfg.aggregate, step)
    gold_score = score_gold(s.gold, ro.prompts, ro.responses, ended, step)
    parts = s.gold.components(ro.prompts, ro.responses, ended)
    # a model gold has no terms to split: its component columns are zeros and left out of the row
    has_terms = all(t in parts for group in s.components.terms for t in group.split("+"))
    gold_parts = (component_values(parts, s.components.terms) if has_terms
                  else torch.zeros(s.components.n, len(ro)))
    # 4. gather per-sample numbers from every rank
    n = s.components.n
    per_sample = torch.cat([kl[:, None], gold_score[:, None], ro.response_mask.sum(-1).float().cpu()[:, None],
                            ro.ended.float().cpu()[:, None], component_scores.T, gold_parts.T, member_scores.T], dim=1)
    every = dist.all_gather_cat(per_sample)
    kl_all, gold_all = every[:, 0], every[:, 1]
    comp_mean = every[:, 4:4 + n].mean(0)
    weights = torch.tensor(component_weights, dtype=comp_mean.dtype)
    mean_kl = float(kl_all.mean())
    row = {
        "method": cfg.method,
        "step": step,
        "kl": mean_kl,
        "sqrt_kl": math.sqrt(max(mean_kl, 0.0)),
        "kl_estimator": ev.kl_estimator,
        "proxy_score": float((weights * comp_mean).sum()),
        "proxy_member_scores": [float(v) for v in every[:, 4 + 2 * n:].mean(0)],
        "gold_score": float(gold_all.mean()),
        "gold_stderr": float(gold_all.std() / math.sqrt(len(gold_all))) if len(gold_all) > 1 else 0.0,
        "aggregator": cfg.aggregate.name,
        "component_names": s.components.names,
        "component_scores": [float(v) for v in comp_mean],
        **({"gold_components": [float(v) for v in every[:, 4 + n:4 + 2 * n].mean(0)]} if has_terms else {}),
        "eos_rate": float(every[:, 3].mean()),
        "response_length": float(every[:, 2].mean()),
        "n_eval": len(gold_all),
        **extra,
    }
    samples = [{"step": step, "prompt": ro.prompts[i], "response": ro.responses[i], "ended": bool(ended[i]),
                "gold_score": float(gold_score[i]), "component_scores": [float(v) for v in component_scores[:, i]],
                "kl": float(kl[i])} for i in range(min(ev.n_samples_logged, len(ro)))]
    return row, samples


def record_eval(s: Session, row: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    """Write an evaluation to curves.jsonl, samples.jsonl and the tracker."""
    s.ctx.run.log_curve(row)
    s.ctx.run.log_samples(samples)
    s.tracker.log_eval(row)
    s.tracker.log_samples(row["step"], samples)
    log.info("eval step %d: gold %.3f components %s kl %.2f", row["step"], row["gold_score"],
             " ".join(f"{k}={v:.2f}" for k, v in zip(row["component_names"], row["component_scores"])), row["kl"])


def log_train(s: Session, step: int, batch: StreamBatch, upd: dict[str, float], t0: float,
              extra: dict[str, Any]) -> None:
    """Stage 9a: one train_stats.jsonl row (identical on every rank: every number is all-reduced)."""
    mask = batch.rollout.response_mask
    stats = {
        "step": step + 1,
        "component_scores": [float(v) for v in dist.all_reduce_mean(batch.component_scores.mean(1))],
        "proxy_member_scores": [float(v) for v in dist.all_reduce_mean(batch.member_scores.mean(1))],
        "rollout_kl": batch.seq_kl,
        "kl_coef": s.kl_ctl.value,
        "eos_rate": float(dist.all_reduce_mean(batch.rollout.ended.float().mean())),
        "response_length": float(dist.all_reduce_mean(mask.float().sum(-1).mean())),
        "lr": s.policy_engine.get_lr()[0],
        "time_generate_s": batch.time_generate_s,
        "time_step_s": time.time() - t0,
        **{k: float(dist.all_reduce_mean(torch.tensor(v))) for k, v in upd.items()},
        **extra,
    }
    if s.ctx.dist.is_main:
        append_jsonl(s.ctx.run.root / "train_stats.jsonl", [stats])
    s.tracker.log_train(step + 1, {k: v for k, v in stats.items() if isinstance(v, float)})


def save_checkpoint(s: Session, step: int, state: dict[str, Any]) -> None:
    """Engines and KL controller via rlhf_overopt.loops.ppo.Checkpointer, plus the driver's own
    state (multipliers, weights, ...) in checkpoints/composite_step_N.json, written first: the
    checkpoint counts once state.json names step N."""
    root = s.checkpointer.root
    if s.ctx.dist.is_main:
        atomic_write_json(root / f"composite_step_{step}.json", state)
    s.checkpointer.save(step, s.policy_engine, s.value_engine, s.kl_ctl, s.ctx.dist.is_main)
    if s.ctx.dist.is_main:
        kept = {int(d.name.split("_")[1]) for d in (root / "policy").glob("step_*") if d.is_dir()}
        for path in root.glob("composite_step_*.json"):
            if int(path.stem.split("_")[-1]) not in kept:
                path.unlink()


def resume(s: Session) -> tuple[int, dict[str, Any] | None]:
    """(start step, driver state) from the last complete checkpoint; logs past it are dropped."""
    ckpt = s.checkpointer
    start, state = resume_step(s.ctx, ckpt, lambda st: ckpt.load(st, s.policy_engine, s.value_engine, s.kl_ctl),
                               extra_logs=(NM_PATH_FILE,))
    extra = None if state is None else json.loads((ckpt.root / f"composite_step_{start}.json").read_text())
    return start, extra


def finish(s: Session, t_start: float, summary: dict[str, Any]) -> dict[str, Any]:
    """Save the trained policy (safetensors, loadable by any transformers user); close tracking."""
    stage = s.cfg.deepspeed.zero_stage
    with gathered(s.policy, stage):
        if s.ctx.dist.is_main:
            s.policy.save_pretrained(s.ctx.run.root / "policy", safe_serialization=True)
            s.tokenizer.save_pretrained(s.ctx.run.root / "policy")
    dist.barrier()
    s.tracker.finish()
    return {"train_time_s": round(time.time() - t_start, 2), "final_kl_coef": s.kl_ctl.value,
            "components": s.components.names, **s.param_counts, **summary}


# ---------------------------------------------------------------------------------------------
# mu-PPO / xi-PPO
# ---------------------------------------------------------------------------------------------


def constrained_indices(cfg: Config) -> list[int]:
    """Indices (into components.names) of the constrained components: all but a component objective."""
    return [i for i, name in enumerate(cfg.components.names) if name != cfg.constrained.objective]


def resolve_thresholds(cfg: Config) -> list[float]:
    """constrained.thresholds, or the constrained components' values in thresholds_file (a
    thresholds.json written by method proxy_points, or the run directory holding one)."""
    con = cfg.constrained
    if con.thresholds:
        return list(con.thresholds)
    path = Path(con.thresholds_file)
    path = path / "thresholds.json" if path.is_dir() else path
    if not path.is_file():
        raise InputError(f"constrained.thresholds_file: {path} not found (run method proxy_points first)")
    data = json.loads(path.read_text())
    found = dict(zip(data["names"], data["thresholds"]))
    wanted = [cfg.components.names[i] for i in constrained_indices(cfg)]
    missing = [name for name in wanted if name not in found]
    if missing:
        raise InputError(f"constrained.thresholds_file: {path} has no threshold for {', '.join(missing)}")
    return [float(found[name]) for name in wanted]


def make_multipliers(cfg: Config, thresholds: list[float]) -> Multipliers:
    con = cfg.constrained
    return Multipliers(len(thresholds), con.constraint, thresholds, init=con.multiplier_init, lr=con.multiplier_lr,
                       momentum=con.multiplier_momentum, grad_clip=con.multiplier_grad_clip)


class LagrangianPPO:
    """Stage 7 of mu-PPO / xi-PPO for one batch: the mixed advantage per minibatch and the
    multiplier step after it."""

    def __init__(self, s: Session, multipliers: Multipliers) -> None:
        self.s, self.multipliers = s, multipliers
        self.constrained = [i + 1 for i in constrained_indices(s.cfg)]  # stream indices
        self.objective = s.cfg.constrained.objective

    def objective_advantages(self, batch: StreamBatch) -> torch.Tensor:
        """A_0 (B, Tr), whitened: minus the KL, or a component with the ppo.kl_coef KL penalty (GAE is
        linear, so the raw stream advantages combine exactly into that reward's advantage)."""
        if self.objective == "kl":
            return batch.whitened[0]
        k = self.s.components.names.index(self.objective) + 1
        raw = batch.advantages[k] + self.s.kl_ctl.value * batch.advantages[0]
        return global_whiten(raw, batch.rollout.response_mask)

    def update(self, batch: StreamBatch, step: int) -> dict[str, float]:
        a0 = self.objective_advantages(batch)
        cons = batch.whitened[self.constrained]
        con = self.s.cfg.constrained

        def advantages_for(idx: torch.Tensor) -> torch.Tensor:
            return mixed_advantages(a0[idx], cons[:, idx], self.multipliers.mu, con.constraint)

        def multiplier_step(idx: torch.Tensor) -> dict[str, float]:
            # v_i: the global minibatch's mean return of each constrained stream (all ranks)
            values = dist.all_reduce_mean(batch.starts[self.constrained][:, idx].mean(-1))
            return {"multiplier_loss": self.multipliers.step(values)}

        return update(self.s, batch, step=step, advantages_for=advantages_for, after_minibatch=multiplier_step)

    def fields(self, constraint_values: list[float] | None = None) -> dict[str, Any]:
        """The curves / train_stats fields of the multipliers."""
        f = self.multipliers.weights()
        out = {
            "constraint": self.s.cfg.constrained.constraint,
            "constraint_names": [self.s.components.names[i - 1] for i in self.constrained],
            "lagrange_multipliers": [float(v) for v in f],
            "multiplier_params": [float(v) for v in self.multipliers.mu.detach()],
            "thresholds": [float(v) for v in self.multipliers.thresholds],
            "reward_weights": [float(v) for v in f],
            "objective_weight": float(len(f) - f.sum()),
        }
        if constraint_values is not None:
            out["constraint_values"] = constraint_values
        return out

    def component_weights(self) -> list[float]:
        """Weight of each component (names order) in the mixed reward, for proxy_score."""
        f = self.multipliers.weights()
        weights = [0.0] * self.s.components.n
        for w, stream in zip(f.tolist(), self.constrained):
            weights[stream - 1] = w
        if self.objective != "kl":
            weights[self.s.components.names.index(self.objective)] = float(len(f) - f.sum())
        return weights

    def eval_fields(self, row_scores: list[float]) -> dict[str, Any]:
        return self.fields([row_scores[i - 1] for i in self.constrained])


def _evaluate_lagrangian(s: Session, lag: LagrangianPPO, step: int, extra: dict[str, Any] | None = None
                         ) -> dict[str, Any]:
    row, samples = evaluate(s, step, component_weights=lag.component_weights(), extra={"kl_coef": s.kl_ctl.value})
    row.update(lag.eval_fields(row["component_scores"]))
    row.update(extra or {})
    record_eval(s, row, samples)
    return row


def _iteration(s: Session, lag: LagrangianPPO, step: int) -> None:
    """One mu-/xi-PPO iteration: stages 1-9a (evaluation and checkpoints are the caller's)."""
    t0 = time.time()
    # 1-6. prompts, rollout, log-probs and stream values, component scores, stream rewards, advantages
    batch = collect(s, step)
    # 7. update: mixed advantages per minibatch, one multiplier step after each
    upd = lag.update(batch, step)
    # 8. KL control (enters the reward only through a component objective)
    s.kl_ctl.update(batch.seq_kl, s.cfg.ppo.batch_size)
    # 9a. log
    values = dist.all_reduce_mean(batch.starts[lag.constrained].mean(-1))
    log_train(s, step, batch, upd, t0, lag.fields([float(v) for v in values]))


def run(ctx: RunContext) -> dict[str, Any]:
    if ctx.cfg.method == "nm_ppo":
        return run_nm(ctx)
    cfg, p = ctx.cfg, ctx.cfg.ppo
    # 0. models, thresholds, multipliers; resume
    s = setup(ctx)
    lag = LagrangianPPO(s, make_multipliers(cfg, resolve_thresholds(cfg)))
    start, state = resume(s)
    if state is not None:
        lag.multipliers.load_state_dict(state["multipliers"])
    if start == 0:
        _evaluate_lagrangian(s, lag, 0)
    t_start = time.time()
    for step in range(start, p.steps):
        # 1-9a. one iteration (see the module docstring)
        _iteration(s, lag, step)
        # 9b. evaluate, checkpoint
        done = step + 1
        if done % cfg.eval.every == 0 or done == p.steps:
            _evaluate_lagrangian(s, lag, done)
        if done % p.save_every == 0 or done == p.steps:
            save_checkpoint(s, done, {"multipliers": lag.multipliers.state_dict()})
    return finish(s, t_start, {"final_multipliers": lag.fields()})


# ---------------------------------------------------------------------------------------------
# NM-PPO
# ---------------------------------------------------------------------------------------------


class _BudgetSpent(Exception):
    """Nelder–Mead asked for another evaluation after ppo.steps were all used."""


def run_nm(ctx: RunContext) -> dict[str, Any]:
    import numpy as np
    from scipy.optimize import minimize

    cfg, p, nm = ctx.cfg, ctx.cfg.ppo, ctx.cfg.nm
    # 0. models, multipliers at the initial thresholds; resume (the search is replayed from nm_path.jsonl)
    s = setup(ctx)
    x0 = np.asarray(cfg.constrained.thresholds, dtype=np.float64)
    lag = LagrangianPPO(s, make_multipliers(cfg, x0.tolist()))
    start, state = resume(s)
    if state is not None:
        lag.multipliers.load_state_dict(state["multipliers"])
    path = ctx.run.root / NM_PATH_FILE
    history = read_jsonl(path) if start > 0 else []
    searched = [h for h in history if h["phase"] == "search"]
    step = start
    if start == 0:
        _evaluate_lagrangian(s, lag, 0, {"nm_phase": "start"})
    t_start = time.time()

    def stretch(theta: np.ndarray, phase: str) -> float:
        """nm.stretch_steps iterations under thresholds theta, then the gold evaluation; returns gold."""
        nonlocal step
        lag.multipliers.thresholds = torch.tensor(theta, dtype=torch.float64)
        for _ in range(nm.stretch_steps):
            _iteration(s, lag, step)
            step += 1
        row = _evaluate_lagrangian(s, lag, step, {"nm_phase": phase, "nm_evaluation": len(history)})
        record = {"evaluation": len(history), "step": step, "phase": phase, "thresholds": [float(v) for v in theta],
                  "gold_score": row["gold_score"], "constraint_values": row["constraint_values"],
                  "lagrange_multipliers": row["lagrange_multipliers"]}
        history.append(record)
        if ctx.dist.is_main:
            append_jsonl(path, [record])
        save_checkpoint(s, step, {"multipliers": lag.multipliers.state_dict()})
        return row["gold_score"]

    calls = 0

    def objective(theta: np.ndarray) -> float:
        """Minus the gold score after a stretch of training at theta."""
        nonlocal calls
        k, calls = calls, calls + 1
        if k < len(searched):  # replay after a resume: Nelder–Mead is deterministic given its past values
            if not np.allclose(searched[k]["thresholds"], theta, rtol=0, atol=1e-9):
                raise RuntimeError(f"resume: Nelder-Mead evaluation {k} asks for {theta.tolist()}, "
                                   f"the run recorded {searched[k]['thresholds']}")
            return -searched[k]["gold_score"]
        if step + nm.stretch_steps > p.steps:
            raise _BudgetSpent
        return -stretch(theta, "search")

    # 1. the search: scipy's Nelder–Mead (reflection 1, expansion 2, contraction 0.5, shrink 0.5)
    simplex = np.vstack([x0] + [x0 + nm.initial_step * np.eye(len(x0))[i] for i in range(len(x0))])
    try:
        result = minimize(objective, x0, method="Nelder-Mead",
                          options={"initial_simplex": simplex, "maxfev": p.steps // nm.stretch_steps,
                                   "xatol": nm.xatol, "fatol": nm.fatol})
        best, message = result.x, str(result.message)
    except _BudgetSpent:
        done = [h for h in history if h["phase"] == "search"]
        best, message = np.asarray(max(done, key=lambda h: h["gold_score"])["thresholds"]), "budget spent"
    log.info("Nelder-Mead: %s; best thresholds %s", message, best.tolist())
    # 2. steps left after convergence: keep training at the best thresholds found
    while step + nm.stretch_steps <= p.steps:
        stretch(best, "final")
    return finish(s, t_start, {"nm_result": message, "nm_best_thresholds": [float(v) for v in best],
                               "nm_evaluations": len(history), "final_multipliers": lag.fields()})
