"""methods: constrained_ppo (mu-PPO, xi-PPO) and nm_ppo — PPO on component rewards, with Lagrange
multipliers as dynamic weights (Moskovitz et al. 2023, "Confronting Reward Model Overoptimization
with Constrained RLHF", §4 and §4.3).

The composite methods train on S = N + 1 reward streams, each with its own value head
(rlhf_overopt.streams): stream 0 is minus the per-token KL to the initial policy, stream i the
score of component i at the last response token. One iteration:

    1-6. experience  prompts, rollout, log-probs and stream values, component scores, stream
                     rewards, per-stream GAE whitened over the whole batch (streams.collect_streams)
    7. update        ppo_epochs over minibatches: the advantage mixed from the streams with the
                     current multipliers `(N - sum f(mu)) A_0 + sum f(mu_i) A_i`, clipped policy
                     loss, clipped value loss on every stream, then one SGD step of the
                     multipliers on the minibatch's constraint values
    8. KL control    (only a component objective carries ppo.kl_coef)
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
import time
from pathlib import Path
from typing import Any

import torch

from rlhf_overopt.config.experiment import Config
from rlhf_overopt.config.methods import METHODS
from rlhf_overopt.config.plan import make_plan
from rlhf_overopt.errors import InputError
from rlhf_overopt.evaluate import EvalLog, evaluate_policy
from rlhf_overopt.ops.constrained import Multipliers, mixed_advantages
from rlhf_overopt.ops.kl import kl_controller
from rlhf_overopt.run import dist, seeds
from rlhf_overopt.run.checkpoints import Checkpointer
from rlhf_overopt.run.directory import append_jsonl, read_jsonl
from rlhf_overopt.run.engines import save_policy
from rlhf_overopt.run.lifecycle import RunContext, resume_step
from rlhf_overopt.run.tracking import Tracker
from rlhf_overopt.streams import StreamBatch, build_composite, collect_streams, stream_stats
from rlhf_overopt.update import ppo_update

log = logging.getLogger("rlhf_overopt")

NM_PATH_FILE = "nm_path.jsonl"


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


class Lagrangian:
    """mu-PPO / xi-PPO bookkeeping for one run: which streams are constrained, the multipliers, the
    mixed advantage of a minibatch and the fields logged with it."""

    def __init__(self, cfg: Config, thresholds: list[float]) -> None:
        con = cfg.constrained
        self.cfg, self.names = cfg, list(cfg.components.names)
        self.constrained = [i + 1 for i in constrained_indices(cfg)]  # stream indices
        self.objective = con.objective
        self.multipliers = Multipliers(len(thresholds), con.constraint, thresholds, init=con.multiplier_init,
                                       lr=con.multiplier_lr, momentum=con.multiplier_momentum,
                                       grad_clip=con.multiplier_grad_clip)

    def objective_advantages(self, batch: StreamBatch, kl_coef: float) -> torch.Tensor:
        """A_0 (B, Tr), whitened: minus the KL, or a component with the ppo.kl_coef KL penalty (GAE is
        linear, so the raw stream advantages combine exactly into that reward's advantage)."""
        if self.objective == "kl":
            return batch.whitened[0]
        k = self.names.index(self.objective) + 1
        return dist.global_whiten(batch.advantages[k] + kl_coef * batch.advantages[0], batch.rollout.response_mask)

    def fields(self, constraint_values: list[float] | None = None) -> dict[str, Any]:
        """The curves / train_stats fields of the multipliers."""
        f = self.multipliers.weights()
        out = {
            "constraint": self.cfg.constrained.constraint,
            "constraint_names": [self.names[i - 1] for i in self.constrained],
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
        weights = [0.0] * len(self.names)
        for w, stream in zip(f.tolist(), self.constrained):
            weights[stream - 1] = w
        if self.objective != "kl":
            weights[self.names.index(self.objective)] = float(len(f) - f.sum())
        return weights


def run(ctx: RunContext) -> dict[str, Any]:
    cfg, p, info = ctx.cfg, ctx.cfg.ppo, ctx.dist
    nm = "nm" in METHODS[cfg.method].sections  # NM-PPO searches the thresholds; mu-/xi-PPO holds them fixed
    plan = make_plan(cfg, info.world_size)
    # 0. models, thresholds, multipliers; resume (NM-PPO replays its search from nm_path.jsonl)
    m = build_composite(cfg, ctx.testbed, info, ctx.run, plan)
    actors, stage = m.actors, cfg.deepspeed.zero_stage
    kl_ctl = kl_controller(p.kl_coef, p.adaptive_kl, p.kl_target, p.kl_horizon)
    lag = Lagrangian(cfg, list(cfg.constrained.thresholds) if nm else resolve_thresholds(cfg))
    ckpt = Checkpointer(ctx.run.checkpoints)
    start, state = resume_step(ctx, ckpt, actors.engines(), extra_logs=(NM_PATH_FILE,) if nm else ())
    if state is not None:
        kl_ctl.load_state_dict(state["kl_controller"])
        lag.multipliers.load_state_dict(state["multipliers"])
    tracker = Tracker(cfg, enabled=info.is_main)
    eval_log = EvalLog(ctx.run, tracker)

    def evaluate(step: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        point, samples = evaluate_policy(
            policy=actors.policy, reference=actors.reference, tokenizer=m.tokenizer, prompts=m.eval_share,
            gold=m.gold, ev=cfg.eval, zero_stage=stage, generator=seeds.eval_generator(cfg.seed, info.rank, info.device),
            method=cfg.method, step=step, aggregator=cfg.aggregate.name, components=m.components,
            agg_cfg=cfg.aggregate, component_weights=lag.component_weights(), extra={"kl_coef": kl_ctl.value})
        scores = point.components["component_scores"]
        point.extra.update(lag.fields([scores[i - 1] for i in lag.constrained]), **(extra or {}))
        return eval_log.record(point, samples)

    def iteration(step: int) -> None:
        t0 = time.time()
        # 1-6. prompts, rollout, log-probs and stream values, component scores, stream rewards, advantages
        batch = collect_streams(actors=actors, tokenizer=m.tokenizer, components=m.components, agg_cfg=cfg.aggregate,
                                train_prompts=m.train_prompts, cfg=cfg, plan=plan, info=info, step=step)
        # 7. update: mixed advantages per minibatch, one multiplier step after each
        a0 = lag.objective_advantages(batch, kl_ctl.value)
        cons = batch.whitened[lag.constrained]

        def multiplier_step(idx: torch.Tensor) -> dict[str, float]:
            # v_i: the global minibatch's mean return of each constrained stream (all ranks)
            values = dist.all_reduce_mean(batch.starts[lag.constrained][:, idx].mean(-1))
            return {"multiplier_loss": lag.multipliers.step(values)}

        upd = ppo_update(
            actors.policy_engine, actors.value_engine, batch.rollout, old_logprobs=batch.old_logprobs,
            old_values=batch.old_values, returns=batch.returns,
            advantages_for=lambda idx: mixed_advantages(a0[idx], cons[:, idx], lag.multipliers.mu,
                                                        cfg.constrained.constraint),
            epochs=p.ppo_epochs, micro_batch=plan.micro_batch, clip_range=p.clip_range,
            clip_range_value=p.clip_range_value, vf_coef=p.vf_coef, temperature=p.temperature,
            generator=seeds.step_generator(cfg.seed, step, 1), step=step, after_minibatch=multiplier_step)
        # 8. KL control (enters the reward only through a component objective)
        kl_ctl.update(batch.seq_kl, p.batch_size)
        # 9a. log
        values = dist.all_reduce_mean(batch.starts[lag.constrained].mean(-1))
        stats = stream_stats(batch, upd, step=step, kl_coef=kl_ctl.value, lr=actors.policy_engine.get_lr()[0],
                             t0=t0, extra=lag.fields([float(v) for v in values]))
        if info.is_main:
            append_jsonl(ctx.run.root / "train_stats.jsonl", [stats])
        tracker.log_train(step + 1, {k: v for k, v in stats.items() if isinstance(v, float)})

    def save(step: int) -> None:
        ckpt.save(step, actors.engines(), {"kl_controller": kl_ctl.state_dict(),
                                           "multipliers": lag.multipliers.state_dict()}, info.is_main)

    t_start = time.time()
    summary = run_nm(ctx, lag, start, evaluate, iteration, save) if nm else {}
    if not nm:
        if start == 0:
            evaluate(0)
        for step in range(start, p.steps):
            # 1-9a. one iteration (see the module docstring)
            iteration(step)
            # 9b. evaluate, checkpoint
            done = step + 1
            if done in plan.eval_steps:
                evaluate(done)
            if done in plan.save_steps:
                save(done)
    save_policy(actors.policy, m.tokenizer, ctx.run.root / "policy", stage, info.is_main)
    tracker.finish()
    return {"train_time_s": round(time.time() - t_start, 2), "final_kl_coef": kl_ctl.value,
            "components": m.components.names, **actors.parameter_counts(), **summary,
            "final_multipliers": lag.fields()}


class _BudgetSpent(Exception):
    """Nelder–Mead asked for another evaluation after ppo.steps were all used."""


def run_nm(ctx: RunContext, lag: Lagrangian, start: int, evaluate, iteration, save) -> dict[str, Any]:
    """NM-PPO's outer loop: Nelder–Mead over the thresholds, each evaluation a stretch of training."""
    import numpy as np
    from scipy.optimize import minimize

    cfg, p, nm = ctx.cfg, ctx.cfg.ppo, ctx.cfg.nm
    x0 = np.asarray(cfg.constrained.thresholds, dtype=np.float64)
    path = ctx.run.root / NM_PATH_FILE
    history = read_jsonl(path) if start > 0 else []
    searched = [h for h in history if h["phase"] == "search"]
    step = start
    if start == 0:
        evaluate(0, {"nm_phase": "start"})

    def stretch(theta: np.ndarray, phase: str) -> float:
        """nm.stretch_steps iterations under thresholds theta, then the gold evaluation; returns gold."""
        nonlocal step
        lag.multipliers.thresholds = torch.tensor(theta, dtype=torch.float64)
        for _ in range(nm.stretch_steps):
            iteration(step)
            step += 1
        row = evaluate(step, {"nm_phase": phase, "nm_evaluation": len(history)})
        record = {"evaluation": len(history), "step": step, "phase": phase, "thresholds": [float(v) for v in theta],
                  "gold_score": row["gold_score"], "constraint_values": row["constraint_values"],
                  "lagrange_multipliers": row["lagrange_multipliers"]}
        history.append(record)
        if ctx.dist.is_main:
            append_jsonl(path, [record])
        save(step)
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
    return {"nm_result": message, "nm_best_thresholds": [float(v) for v in best], "nm_evaluations": len(history)}
