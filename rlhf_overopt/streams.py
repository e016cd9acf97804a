"""The experience stage of the composite methods (constrained_ppo, nm_ppo, dynamic_ppo,
proxy_points): S = N + 1 reward streams, each with its own value head (Moskovitz et al. 2023,
"Confronting Reward Model Overoptimization with Constrained RLHF", §4). Stream 0 is minus the
per-token KL to the initial policy, stream i the score of component i at the last response token.

    collect_streams     stages 1-6 of one iteration: prompts, rollout, log-probs and stream
                        values, component scores, stream rewards, per-stream GAE and whitening
    stream_stats        the train_stats.jsonl row of an iteration (identical on every rank)
    value_init_path     where the S-head value model's backbone comes from
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from rlhf_overopt.errors import InputError
from rlhf_overopt.ops.advantages import gae, stream_token_rewards
from rlhf_overopt.ops.constrained import stream_returns
from rlhf_overopt.ops.kl import kl_penalty_per_token
from rlhf_overopt.records import Rollout
from rlhf_overopt.rollout import generate, sequence_logprobs
from rlhf_overopt.run import dist, seeds
from rlhf_overopt.run.engines import gathered
from rlhf_overopt.values import response_values


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


def value_init_path(cfg, components, policy_path: str) -> str:
    """The value model's backbone: the policy, or (ppo.value_init=proxy) the first member of the
    first component's saved independent/pretrain ensemble (warm: its weight average)."""
    if cfg.ppo.value_init == "policy":
        return policy_path
    ensemble = components.ensembles[0]
    if components.root is None or ensemble.kind not in ("independent", "pretrain", "warm"):
        raise InputError("ppo.value_init=proxy needs saved independent/pretrain/warm component ensembles")
    return str(components.root / components.names[0] / ensemble.member_names[0])


def collect_streams(*, actors, tokenizer, components, agg_cfg, train_prompts: list[str], cfg, plan, info,
                    step: int) -> StreamBatch:
    """Stages 1-6 of one composite iteration (see the module docstring)."""
    p = cfg.ppo
    t0 = time.time()
    # 1. prompts: the step's global draw, this rank's contiguous share
    mine = seeds.prompt_draw(len(train_prompts), p.batch_size, cfg.seed, step, info.rank, plan.local_batch)
    batch_prompts = [train_prompts[i] for i in mine]
    # 2. rollout
    with gathered(actors.policy, cfg.deepspeed.zero_stage):
        ro = generate(actors.policy, tokenizer, batch_prompts, max_new_tokens=p.max_new_tokens,
                      temperature=p.temperature, generator=seeds.rollout_generator(cfg.seed, step, info.rank,
                                                                                 info.device))
    t_gen = time.time() - t0
    mask = ro.response_mask
    with torch.no_grad():
        # 3. log-probs of the sampled tokens under the policy and the reference; values per stream
        old_logprobs = sequence_logprobs(actors.policy_engine, ro.query_ids, ro.query_mask, ro.response_ids, mask,
                                         temperature=p.temperature)
        ref_logprobs = sequence_logprobs(actors.reference, ro.query_ids, ro.query_mask, ro.response_ids, mask,
                                         temperature=p.temperature)
        old_values = response_values(actors.value_engine, ro.query_ids, ro.query_mask, ro.response_ids, mask)
        # 4. score with every component's ensemble
        member_scores, component_scores = components.score(ro.prompts, ro.responses, ro.ended.cpu().tolist(),
                                                           agg_cfg, step)
        # 5. rewards per stream: -KL per token on stream 0, component i at the last token on stream i
        kl_tokens = kl_penalty_per_token(old_logprobs, ref_logprobs, p.kl_penalty_estimator) * mask
        rewards = stream_token_rewards(component_scores, kl_tokens.to(old_values.dtype), mask)
        n_streams = rewards.shape[0]
        # 6. advantages: GAE per stream (streams stacked along the batch), whitened per stream
        flat_adv, flat_ret = gae(rewards.flatten(0, 1), old_values.flatten(0, 1), mask.repeat(n_streams, 1),
                                 p.gamma, p.lam)
        advantages, returns = flat_adv.view_as(rewards), flat_ret.view_as(rewards)
        whitened = torch.stack([dist.global_whiten(advantages[i], mask) for i in range(n_streams)])
        starts = stream_returns(rewards, mask, p.gamma)
    seq_kl = float(dist.all_reduce_mean(kl_tokens.sum(-1).mean()))
    return StreamBatch(rollout=ro, old_logprobs=old_logprobs, old_values=old_values, rewards=rewards,
                       advantages=advantages, returns=returns, whitened=whitened, starts=starts,
                       member_scores=member_scores, component_scores=component_scores, seq_kl=seq_kl,
                       time_generate_s=t_gen)


def stream_stats(batch: StreamBatch, upd: dict[str, float], *, step: int, kl_coef: float, lr: float, t0: float,
                 extra: dict[str, Any]) -> dict[str, Any]:
    """One train_stats.jsonl row (identical on every rank: every number is all-reduced)."""
    mask = batch.rollout.response_mask
    return {
        "step": step + 1,
        "component_scores": [float(v) for v in dist.all_reduce_mean(batch.component_scores.mean(1))],
        "proxy_member_scores": [float(v) for v in dist.all_reduce_mean(batch.member_scores.mean(1))],
        "rollout_kl": batch.seq_kl,
        "kl_coef": kl_coef,
        "eos_rate": float(dist.all_reduce_mean(batch.rollout.ended.float().mean())),
        "response_length": float(dist.all_reduce_mean(mask.float().sum(-1).mean())),
        "lr": lr,
        "time_generate_s": batch.time_generate_s,
        "time_step_s": time.time() - t0,
        **{k: float(dist.all_reduce_mean(torch.tensor(v))) for k, v in upd.items()},
        **extra,
    }


@dataclass
class CompositeModels:
    """What a composite driver trains and scores with (built once by `build_composite`)."""

    tokenizer: Any
    components: Any  # rlhf_overopt.rewards.components.ComponentRewards
    gold: Any
    train_prompts: list[str]
    eval_share: list[str]
    actors: Any  # rlhf_overopt.run.engines.Actors, value model with S = N + 1 heads


def build_composite(cfg, testbed, info, run, plan) -> CompositeModels:
    """Stage 0 of the composite drivers: tokenizer, prompts, component proxies, gold, the policy and
    S-head value engines, the frozen reference."""
    import logging

    from rlhf_overopt.data.prompts import load_prompts, policy_path
    from rlhf_overopt.rewards.cache import ensure_components
    from rlhf_overopt.rewards.gold import GoldScorer
    from rlhf_overopt.run.engines import build_actors, check_policy_dtype, ensure_process_group
    from rlhf_overopt.run.models import load_tokenizer

    ensure_process_group(info.device)
    check_policy_dtype(cfg, info.device)  # before components train
    path = policy_path(cfg, testbed)
    tokenizer = load_tokenizer(path, trust_remote_code=cfg.policy.trust_remote_code)
    # prompts before components (which may need training): bad prompt data fails in seconds
    train_prompts, eval_share = load_prompts(cfg, testbed, info.world_size, info.rank, min_train=plan.local_batch,
                                             tokenizer=tokenizer)
    components = ensure_components(cfg, testbed, info, run)
    gold = GoldScorer.from_config(cfg, testbed)
    actors = build_actors(cfg, tokenizer, path, micro_batch=plan.micro_batch, world_size=info.world_size,
                          total_updates=plan.total_updates, value_path=value_init_path(cfg, components, path),
                          value_heads=components.n + 1, device=info.device)
    counts = actors.parameter_counts()
    logging.getLogger("rlhf_overopt").info(
        "%s: %d component(s) %s, policy %d parameters (%d on this rank), %d rank(s)", cfg.method, components.n,
        components.names, counts["policy_total_params"], counts["policy_local_params"], info.world_size)
    return CompositeModels(tokenizer, components, gold, train_prompts, eval_share, actors)
