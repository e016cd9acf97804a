"""method: bon — best-of-n against every aggregator, from one scored pool (Gao et al. 2022 §3.1).

    1. prompts    the held-out eval prompts (sharded over ranks)
    2. pool       N samples per prompt from the initial policy (or bon.pool: an existing scored pool)
    3. score      every member's proxy score (K, P, N) and gold (P, N), once
    4. save       the scored pool (pool/, a `datasets` dataset) so any curve can be recomputed,
                  with each response's token count and log-prob under the initial policy
                  (ref_logprob, for rbon_kl); a reused pool lacking them gets them here
    5. curves     per aggregator and n: unbiased estimator of gold, proxy and member scores,
                  member std and response length at the best-of-n choice; KL = log n - (n-1)/n
                  (analytic) and kl_pool (exact on the pool, identical responses merged); then
                  per selector (rbon_kl, soft), parameter and base aggregator
    6. report     curves.jsonl rows, a plot and a table in the run directory
"""

from __future__ import annotations

import logging
import shutil
import time
from typing import Any

import torch

from rlhf_overopt.data.prompts import load_prompts
from rlhf_overopt.data.prompts import policy_path as initial_policy_path
from rlhf_overopt.errors import InputError, check_finite
from rlhf_overopt.pool import (
    aggregator_names,
    bon_curve_rows,
    n_grid,
    pool_samples,
    read_scored_pool,
    response_identity,
    text_ref_logprobs,
    text_response_tokens,
)
from rlhf_overopt.rewards.cache import ensure_proxies
from rlhf_overopt.rewards.gold import GoldScorer
from rlhf_overopt.rollout import generate, sequence_logprobs
from rlhf_overopt.run import dist, seeds
from rlhf_overopt.run.engines import load_policy_model
from rlhf_overopt.run.lifecycle import RunContext
from rlhf_overopt.run.models import check_vocabulary, load_tokenizer
from rlhf_overopt.run.tracking import Tracker

log = logging.getLogger("rlhf_overopt")


def complete_pool(cfg, ctx: RunContext, info, pool, pool_dir):
    """A reused pool with the columns the curves need: `response_tokens` (always; the policy
    tokenizer reads the texts back) and `ref_logprob` (only with bon.selectors rbon_kl: one forward
    pass of the initial policy). Computed on rank 0 and saved into pool/ (written beside it, then
    swapped in, since the loaded pool still maps its files); every rank reads it back."""
    from datasets import Dataset, load_from_disk

    need_tokens = "response_tokens" not in pool.column_names
    need_logprob = "rbon_kl" in cfg.bon.selectors and "ref_logprob" not in pool.column_names
    if not (need_tokens or need_logprob):
        return pool
    if info.is_main:
        policy_path = initial_policy_path(cfg, ctx.testbed)
        tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.policy.trust_remote_code)
        columns = pool.to_dict()
        if need_tokens:
            columns["response_tokens"] = [len(t) for t in text_response_tokens(tokenizer, columns["response"],
                                                                               columns["ended"])]
        if need_logprob:
            t = time.time()
            log.info("best-of-n: rbon_kl needs log pi_ref of the %d pool responses; one forward pass of the "
                     "initial policy", len(pool))
            policy = load_policy_model(cfg, policy_path).to(info.device)
            check_vocabulary(tokenizer, policy)
            logprobs = text_ref_logprobs(policy, tokenizer, columns["prompt"], columns["response"], columns["ended"],
                                         batch_size=cfg.bon.batch_size, progress="pool ref log-probs")
            check_finite(logprobs, "ref_logprob of the pool", 0)
            columns["ref_logprob"] = logprobs.tolist()
            del policy
            log.info("best-of-n: pool ref log-probs in %.1f s", time.time() - t)
        tmp = pool_dir.with_name(pool_dir.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        Dataset.from_dict(columns).save_to_disk(str(tmp))
        del pool
        shutil.rmtree(pool_dir)
        tmp.rename(pool_dir)
    dist.barrier()
    return load_from_disk(str(pool_dir))


def run(ctx: RunContext) -> dict[str, Any]:
    from datasets import Dataset, concatenate_datasets, load_from_disk

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
    elif b.pool:
        # 1-3. an existing scored pool (prompt, response, gold score; member scores when it has
        # them, else scored here by the proxies), read on rank 0
        pool = None
        if info.is_main:
            t = time.time()
            columns = read_scored_pool(b.pool, b.pool_size, cfg.eval.n_prompts)
            kept = columns["proxy_scores"] is not None and b.pool_scores == "keep"
            if kept and len(columns["proxy_scores"][0]) != ensemble.k:
                raise InputError(f"bon.pool: {b.pool} carries {len(columns['proxy_scores'][0])} member scores per "
                                 f"sample, bon.pool_scores=keep needs proxy.k={ensemble.k}")
            if not kept:
                log.info("best-of-n: scoring the %d samples of %s with %d proxies", len(columns["prompt"]), b.pool,
                         ensemble.k)
                members = ensemble.score_texts(columns["prompt"], columns["response"], columns["ended"],
                                               progress="proxy scores").float().cpu()
                for i in range(members.shape[0]):
                    check_finite(members[i], f"proxy member {i} score", 0)
                columns["proxy_scores"] = members.T.tolist()
            check_finite(torch.tensor(columns["gold_score"]), "gold score of bon.pool", 0)
            timings["read_pool_s"] = time.time() - t
            pool = Dataset.from_dict(columns)
            pool.save_to_disk(str(pool_dir))
        dist.barrier()
        if pool is None:
            pool = load_from_disk(str(pool_dir))
    else:
        # 1. prompts: this rank's share of the eval prompts
        policy_path = initial_policy_path(cfg, ctx.testbed)
        tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.policy.trust_remote_code)
        _, mine = load_prompts(cfg, ctx.testbed, info.world_size, info.rank, min_train=0, tokenizer=tokenizer)
        # the pool's prompt_index is global: this rank's share starts at rank * len(mine)
        share = [info.rank * len(mine) + i for i in range(len(mine))]
        prompts = dict(zip(share, mine))
        policy = load_policy_model(cfg, policy_path).to(info.device)
        check_vocabulary(tokenizer, policy)
        # 2. pool: N samples per prompt, prompt-major
        t = time.time()
        queries = [prompts[i] for i in share for _ in range(b.pool_size)]
        log.info("best-of-n: sampling %d responses (%d prompts x pool %d on this rank), then scoring them with "
                 "%d proxies and gold", len(queries), len(share), b.pool_size, ensemble.k)
        generator = seeds.pool_generator(cfg.seed, info.rank, info.device)
        rollout = generate(policy, tokenizer, queries, max_new_tokens=b.max_new_tokens, temperature=b.temperature,
                           top_p=b.top_p, generator=generator, batch_size=b.batch_size,
                           progress="best-of-n pool" if info.is_main else "")
        timings["generate_s"] = time.time() - t
        # log pi_ref(y) at temperature 1 for rbon_kl: the sampler's own log-probs at temperature 1
        # (they are the unfiltered policy's, whatever top_p), else one forward pass at temperature 1
        if b.temperature == 1.0:
            ref_logprob = rollout.logprobs.sum(-1).float().cpu()
        else:
            t = time.time()
            with torch.no_grad():
                policy.eval()
                ref_logprob = torch.cat([
                    sequence_logprobs(policy, part.query_ids, part.query_mask, part.response_ids, part.response_mask,
                                      temperature=1.0).sum(-1).float().cpu()
                    for part in (rollout[a:a + b.batch_size] for a in range(0, len(rollout), b.batch_size))
                ])
            timings["ref_logprob_s"] = time.time() - t
        del policy
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
            "response_tokens": rollout.response_length.cpu().tolist(),
            "ref_logprob": ref_logprob.tolist(),
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

    pool = complete_pool(cfg, ctx, info, pool, pool_dir)

    # 5. curves for every aggregator and n, then for every selector
    t = time.time()
    n_prompts = len(set(pool["prompt_index"]))
    k = len(pool[0]["proxy_scores"])
    pool = pool.sort(["prompt_index", "sample"])
    members = torch.tensor(pool["proxy_scores"], dtype=torch.float32).T.reshape(k, n_prompts, b.pool_size)
    gold_pn = torch.tensor(pool["gold_score"], dtype=torch.float32).reshape(n_prompts, b.pool_size)
    shape = (n_prompts, b.pool_size)
    ids = response_identity(pool["prompt_index"], pool["response"], pool["ended"], n_prompts, b.pool_size)
    tokens = torch.tensor(pool["response_tokens"], dtype=torch.float64).reshape(shape)
    ref = (torch.tensor(pool["ref_logprob"], dtype=torch.float64).reshape(shape)
           if "ref_logprob" in pool.column_names else None)
    agg = cfg.aggregate
    rows = bon_curve_rows(members, gold_pn, aggregator_names(b.aggregators, k), n_grid(b.pool_size, b.n_grid),
                          uwo_lambda=agg.uwo_lambda, std_k=agg.std_k, variance=agg.variance, response_ids=ids,
                          response_tokens=tokens, ref_logprob=ref, selectors=b.selectors, rbon_alphas=b.rbon_alphas,
                          soft_temperatures=b.soft_temperatures,
                          selector_aggregators=aggregator_names(b.selector_aggregators, k))
    timings["curves_s"] = time.time() - t
    if info.is_main:
        ctx.run.truncate_curves(-1)  # a resumed run rewrites its curves from the pool
        ctx.run.log_curve(rows)
        ctx.run.log_samples(pool_samples(pool, cfg.eval.n_samples_logged, b.pool_size))
        tracker = Tracker(cfg, enabled=True)
        for row in rows:
            tracker.log_eval(row)
        tracker.finish()
    ended_rate = float(torch.tensor(pool["ended"], dtype=torch.float32).mean())
    log.info("best-of-n: %d prompts x %d samples, %d curves; %s", n_prompts, b.pool_size,
             len(aggregator_names(b.aggregators, k)), {k_: round(v, 1) for k_, v in timings.items()})
    return {"timings_s": {k_: round(v, 2) for k_, v in timings.items()}, "pool_eos_rate": ended_rate,
            "proxy_val_accuracy": ensemble.val_accuracy}
