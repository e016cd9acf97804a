"""A gold-scored best-of-n pool sampled from the initial policy (Gao et al. 2022 §3.1): N samples per
held-out eval prompt, each scored by gold once. Proxies are not involved, so any number of them can
rank the same pool later (the bon and scaling_law methods).

    1. prompts   this rank's contiguous share of the first eval.n_prompts eval prompts
    2. sample    N responses per prompt, prompt-major, from a seeded generator per rank
    3. gold      one gold score per sample
    4. gather    every rank's rows, in prompt order, on every rank

The pool's columns are those a bon run saves in <run>/pool (less proxy_scores): prompt_index
(global), sample, prompt, response, ended, gold_score.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rlhf_overopt.data.prompts import load_prompts
from rlhf_overopt.data.prompts import policy_path as initial_policy_path
from rlhf_overopt.errors import check_finite
from rlhf_overopt.rewards.gold import GoldScorer
from rlhf_overopt.rollout import generate
from rlhf_overopt.run import seeds
from rlhf_overopt.run.dist import DistInfo
from rlhf_overopt.run.engines import load_policy_model
from rlhf_overopt.run.models import check_vocabulary, load_tokenizer

log = logging.getLogger("rlhf_overopt")


def sample_gold_pool(cfg, testbed, info: DistInfo, *, pool_size: int, max_new_tokens: int, temperature: float,
                     top_p: float, batch_size: int, gold: GoldScorer | None = None):
    """N = `pool_size` samples per eval prompt from the initial policy, gold-scored.

    Prompts come from `cfg` (data.*, eval.n_prompts), the policy from policy.*, gold from gold.*
    unless `gold` is given. Sampling uses `seeds.pool_generator(cfg.seed, rank)`, so a given seed,
    rank count and batch_size give the same pool. Collective over ranks. Returns
    (`datasets.Dataset` with the columns of the module docstring, sorted by prompt_index then
    sample; timings {"generate_s", "score_gold_s"}).
    """
    from datasets import Dataset, concatenate_datasets

    timings: dict[str, float] = {}
    # 1. prompts: this rank's share; the pool's prompt_index is global (rank * share + i)
    policy_path = initial_policy_path(cfg, testbed)
    tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.policy.trust_remote_code)
    _, mine = load_prompts(cfg, testbed, info.world_size, info.rank, min_train=0, tokenizer=tokenizer)
    share = [info.rank * len(mine) + i for i in range(len(mine))]
    policy = load_policy_model(cfg, policy_path).to(info.device)
    check_vocabulary(tokenizer, policy)

    # 2. sample N responses per prompt
    t = time.time()
    queries = [mine[i] for i in range(len(mine)) for _ in range(pool_size)]
    log.info("pool: sampling %d responses (%d prompts x %d on this rank)", len(queries), len(share), pool_size)
    rollout = generate(policy, tokenizer, queries, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_p=top_p, generator=seeds.pool_generator(cfg.seed, info.rank, info.device),
                       batch_size=batch_size, progress="pool" if info.is_main else "")
    del policy
    timings["generate_s"] = time.time() - t
    ended = rollout.ended.cpu().tolist()

    # 3. gold, once per sample
    t = time.time()
    gold = gold if gold is not None else GoldScorer.from_config(cfg, testbed)
    gold_scores = gold.score(rollout.prompts, rollout.responses, ended).float().cpu()
    check_finite(gold_scores, "gold score", 0)
    timings["score_gold_s"] = time.time() - t

    # 4. every rank's rows, in prompt order
    local: dict[str, Any] = {
        "prompt_index": [i for i in share for _ in range(pool_size)],
        "sample": [j for _ in share for j in range(pool_size)],
        "prompt": list(rollout.prompts),
        "response": list(rollout.responses),
        "ended": [bool(e) for e in ended],
        "gold_score": gold_scores.tolist(),
    }
    if info.world_size > 1:
        import torch.distributed as tdist

        gathered: list[Any] = [None] * info.world_size
        tdist.all_gather_object(gathered, local)
        pool = concatenate_datasets([Dataset.from_dict(d) for d in gathered])
    else:
        pool = Dataset.from_dict(local)
    return pool, timings
