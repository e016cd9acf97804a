"""method: bon — best-of-n against every aggregator, from one scored pool (Gao et al. 2022 §3.1).

    1. prompts    the held-out eval prompts (sharded over ranks)
    2. pool       N samples per prompt from the initial policy
    3. score      every member's proxy score (K, P, N) and gold (P, N), once
    4. save       the scored pool (pool/, a `datasets` dataset) so any curve can be recomputed
    5. curves     per aggregator and n: unbiased estimator of gold, proxy and member scores at
                  the best-of-n choice; KL = log n - (n-1)/n (analytic)
    6. report     curves.jsonl rows, a plot and a table in the run directory
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from rlhf_overopt import dist
from rlhf_overopt.aggregate import aggregate
from rlhf_overopt.bon import bon_expected, bon_kl
from rlhf_overopt.config import Config
from rlhf_overopt.curves import check_finite
from rlhf_overopt.gold import GoldScorer
from rlhf_overopt.loops.common import RunContext
from rlhf_overopt.models import check_vocabulary, load_causal_lm, load_tokenizer
from rlhf_overopt.rollout import generate
from rlhf_overopt.tracking import Tracker

log = logging.getLogger("rlhf_overopt")


def n_grid(cfg: Config) -> list[int]:
    """The configured n values, or 1, 2, 4, ..., N (N itself included)."""
    if cfg.bon.n_grid:
        return sorted(set(cfg.bon.n_grid))
    grid, n = [], 1
    while n < cfg.bon.pool_size:
        grid.append(n)
        n *= 2
    return grid + [cfg.bon.pool_size]


def aggregator_names(cfg: Config, k: int) -> list[str]:
    """bon.aggregators with 'members' expanded to member_0 .. member_{k-1}."""
    names: list[str] = []
    for name in cfg.bon.aggregators:
        names.extend([f"member_{i}" for i in range(k)] if name == "members" else [name])
    return list(dict.fromkeys(names))


def bon_curve_rows(member_scores: torch.Tensor, gold: torch.Tensor, aggregators: list[str], grid: list[int],
                   cfg: Config) -> list[dict[str, Any]]:
    """curves.jsonl rows for every aggregator and n. member_scores: (K, P, N); gold: (P, N)."""
    k, n_prompts, pool = member_scores.shape
    agg = cfg.aggregate
    rows = []
    for name in aggregators:
        objective = aggregate(member_scores.reshape(k, -1), name, uwo_lambda=agg.uwo_lambda, std_k=agg.std_k,
                              variance=agg.variance).reshape(n_prompts, pool)
        gold_at = bon_expected(objective, gold, grid)  # (G, P)
        proxy_at = bon_expected(objective, objective, grid)
        members_at = torch.stack([bon_expected(objective, member_scores[i], grid) for i in range(k)])  # (K, G, P)
        for g, n in enumerate(grid):
            kl = float(bon_kl(n))
            rows.append({
                "method": "bon",
                "aggregator": name,
                "n": n,
                "step": n,
                "kl": kl,
                "sqrt_kl": math.sqrt(kl),
                "proxy_score": float(proxy_at[g].mean()),
                "proxy_member_scores": [float(members_at[i, g].mean()) for i in range(k)],
                "gold_score": float(gold_at[g].mean()),
                "gold_stderr": float(gold_at[g].std() / math.sqrt(n_prompts)) if n_prompts > 1 else 0.0,
                "gold_score_initial": float(gold.mean()),
                "uwo_lambda": agg.uwo_lambda,
                "pool_size": pool,
                "n_prompts": n_prompts,
            })
    return rows


def run(ctx: RunContext) -> dict[str, Any]:
    from datasets import Dataset, concatenate_datasets, load_from_disk

    from rlhf_overopt.reward_cache import ensure_proxies

    cfg, info, b = ctx.cfg, ctx.dist, ctx.cfg.bon
    timings: dict[str, float] = {}
    t = time.time()
    ensemble = ensure_proxies(cfg, ctx.testbed, info, ctx.run).to(info.device)
    gold = GoldScorer.from_config(cfg, ctx.testbed)
    timings["proxies_s"] = time.time() - t
    pool_dir = ctx.run.root / "pool"

    if (pool_dir / "dataset_info.json").exists():
        # a resumed run reuses the scored pool it saved
        pool = load_from_disk(str(pool_dir))
        log.info("reusing the scored pool in %s (%d samples)", pool_dir, len(pool))
    else:
        # 1. prompts: this rank's share of the eval prompts
        prompts = list(ctx.testbed.load_prompts()["eval"]["prompt"])[: cfg.eval.n_prompts]
        share = list(dist.shard_indices(len(prompts), info.rank, info.world_size))
        policy_path = str(ctx.testbed.policy_dir) if cfg.policy.path == "testbed" else cfg.policy.path
        tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.policy.trust_remote_code)
        policy = load_causal_lm(policy_path, trust_remote_code=cfg.policy.trust_remote_code).to(info.device)
        check_vocabulary(tokenizer, policy)
        # 2. pool: N samples per prompt, prompt-major
        t = time.time()
        queries = [prompts[i] for i in share for _ in range(b.pool_size)]
        log.info("best-of-n: sampling %d responses (%d prompts x pool %d on this rank), then scoring them with "
                 "%d proxies and gold", len(queries), len(share), b.pool_size, ensemble.k)
        generator = torch.Generator(device=info.device).manual_seed(cfg.seed * 1_000_003 + info.rank)
        rollout = generate(policy, tokenizer, queries, max_new_tokens=b.max_new_tokens, temperature=b.temperature,
                           top_p=b.top_p, generator=generator, batch_size=b.batch_size,
                           progress="best-of-n pool" if info.is_main else "")
        del policy
        timings["generate_s"] = time.time() - t
        ended = rollout.ended.cpu().tolist()
        # 3. score once: every member and gold
        t = time.time()
        members = ensemble.score_texts(rollout.prompts, rollout.responses, ended,
                                       progress="proxy scores" if info.is_main else "").float().cpu()  # (K, P*N)
        timings["score_proxies_s"] = time.time() - t
        t = time.time()
        gold_scores = gold.score(rollout.prompts, rollout.responses, ended).float().cpu()
        timings["score_gold_s"] = time.time() - t
        for i in range(members.shape[0]):
            check_finite(members[i], f"proxy member {i} score", 0)
        check_finite(gold_scores, "gold score", 0)
        # 4. save the scored pool
        local = Dataset.from_dict({
            "prompt_index": [i for i in share for _ in range(b.pool_size)],
            "sample": [j for _ in share for j in range(b.pool_size)],
            "prompt": rollout.prompts,
            "response": rollout.responses,
            "ended": ended,
            "gold_score": gold_scores.tolist(),
            "proxy_scores": members.T.tolist(),
        })
        if info.world_size > 1:
            import torch.distributed as tdist

            gathered: list[Any] = [None] * info.world_size
            tdist.all_gather_object(gathered, local.to_dict())
            pool = concatenate_datasets([Dataset.from_dict(d) for d in gathered])
        else:
            pool = local
        if info.is_main:
            pool.save_to_disk(str(pool_dir))

    # 5. curves for every aggregator and n
    t = time.time()
    n_prompts = len(set(pool["prompt_index"]))
    k = len(pool[0]["proxy_scores"])
    pool = pool.sort(["prompt_index", "sample"])
    members = torch.tensor(pool["proxy_scores"], dtype=torch.float32).T.reshape(k, n_prompts, b.pool_size)
    gold_pn = torch.tensor(pool["gold_score"], dtype=torch.float32).reshape(n_prompts, b.pool_size)
    rows = bon_curve_rows(members, gold_pn, aggregator_names(cfg, k), n_grid(cfg), cfg)
    timings["curves_s"] = time.time() - t
    if info.is_main:
        ctx.run.truncate_curves(-1)  # a resumed run rewrites its curves from the pool
        ctx.run.log_curve(rows)
        ctx.run.log_samples(_samples(pool, cfg.eval.n_samples_logged, b.pool_size))
        tracker = Tracker(cfg, enabled=True)
        for row in rows:
            tracker.log_eval(row)
        tracker.finish()
    ended_rate = float(torch.tensor(pool["ended"], dtype=torch.float32).mean())
    log.info("best-of-n: %d prompts x %d samples, %d curves; %s", n_prompts, b.pool_size,
             len(aggregator_names(cfg, k)), {k_: round(v, 1) for k_, v in timings.items()})
    return {"timings_s": {k_: round(v, 2) for k_, v in timings.items()}, "pool_eos_rate": ended_rate,
            "proxy_val_accuracy": ensemble.val_accuracy}


def _samples(pool, n: int, pool_size: int) -> list[dict[str, Any]]:
    """The best and worst sample by member 0 for the first n prompts, as a readable table."""
    rows = []
    for p in range(min(n, len(pool) // pool_size)):
        chunk = pool.select(range(p * pool_size, (p + 1) * pool_size))
        scores = [s[0] for s in chunk["proxy_scores"]]
        for tag, j in (("best_member_0", max(range(pool_size), key=scores.__getitem__)),
                       ("worst_member_0", min(range(pool_size), key=scores.__getitem__))):
            r = chunk[j]
            rows.append({"step": 0, "which": tag, "prompt": r["prompt"], "response": r["response"],
                         "ended": r["ended"], "gold_score": r["gold_score"], "proxy_member_scores": r["proxy_scores"]})
    return rows

