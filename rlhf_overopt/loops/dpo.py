"""method: dpo | madpo — direct alignment on a fixed preference dataset, scored by gold as it goes.

The DAA family (Rafailov et al. 2024, "Scaling Laws for Reward Model Overoptimization in Direct
Alignment Algorithms"): `loss = E[g(beta * h_theta)]` with `h_theta` the difference of the
chosen and rejected log-ratios to the reference policy, g from DPO, IPO or SLiC (`dpo.loss_type`);
beta sets the KL budget (small beta = large budget). MADPO (Rho 2025) weights each pair's loss by
`w(h)`, h the pair's reward-model margin, here taken from the proxy ensemble: the member margins
`r_i(chosen) - r_i(rejected)` (K, N) are combined by `madpo.margin_aggregator` — member_0 is the
paper's single reward model; mean / wco / uwo give ensemble margins, and the conservative rules
are applied to the *margins* (WCO: the smallest margin any member gives the pair), not to the
scores of each response.

    0. models       tokenizer, gold, initial policy
    1. data         testbed pairs at the quality tier, or a user dataset; validated, tokenized
    2. proxies      the ensemble that scores evaluations; madpo: member margins (K, N) -> aggregate
                    -> h (N,) -> w(h), once up front (member margins cached under <cache>/margins)
    3. engines      policy engine, frozen reference; reference log-probs of every pair, once
                    (dpo.precompute_ref), sharded over ranks
    per optimizer step:
    4. batch        the step's global batch from the epoch's seeded permutation; this rank's share
    5. log-probs    policy (and, without precompute, reference) log-probs of chosen and rejected
    6. loss         per-pair DPO / IPO / SLiC, times w for madpo, mean; backward; step
    7. log / evaluate (evals_per_epoch times per epoch, step 0 and the end) / checkpoint
    8. save         the trained policy as a transformers folder (run_dir/policy)

Every rank takes an equal contiguous share of each global batch and averages its pairs; DeepSpeed
averages gradients over ranks, so the update is the one-rank update of the whole batch. Batches
come from a permutation seeded by (seed, epoch) alone, so a resumed run repeats exactly what an
uninterrupted one does.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_overopt.config.methods import METHODS
from rlhf_overopt.config.plan import preference_schedule
from rlhf_overopt.data.preferences import (
    GOLD_COLUMNS,
    PreferenceDataError,
    collate_pairs,
    column_of,
    corpus_tier,
    ended_flags,
    fit_response_budget,
    load_preference_dataset,
    tokenize_pairs,
)
from rlhf_overopt.data.prompts import load_prompts
from rlhf_overopt.data.prompts import policy_path as initial_policy_path
from rlhf_overopt.errors import InputError, check_finite
from rlhf_overopt.evaluate import EvalLog, evaluate_policy
from rlhf_overopt.ops.aggregate import aggregator
from rlhf_overopt.rewards.cache import ensemble_dir, ensure_proxies
from rlhf_overopt.rewards.gold import GoldScorer
from rlhf_overopt.rewards.margins import margin_weights
from rlhf_overopt.run import dist, seeds
from rlhf_overopt.run.checkpoints import Checkpointer
from rlhf_overopt.run.directory import append_jsonl
from rlhf_overopt.run.engines import (
    check_policy_dtype,
    ds_config,
    ensure_process_group,
    frozen_model,
    load_policy_model,
    save_policy,
    train_engine,
)
from rlhf_overopt.run.lifecycle import RunContext, resume_step
from rlhf_overopt.run.models import context_length, load_tokenizer
from rlhf_overopt.run.tracking import Tracker
from rlhf_overopt.update import pair_logprobs, preference_step

log = logging.getLogger("rlhf_overopt")


# ---------------------------------------------------------------------------------------------
# Pieces of the driver
# ---------------------------------------------------------------------------------------------
















def load_pairs(ctx: RunContext, gold, tokenizer) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    """Step 1 (text): the preference columns and a description of where they came from."""
    cfg = ctx.cfg
    d = cfg.dpo
    if d.dataset != "testbed":
        try:
            data = load_preference_dataset(d.dataset)
        except PreferenceDataError as exc:
            raise InputError(f"dpo.dataset: {exc}") from None
        columns = {c: list(data[c]) for c in data.column_names}
        columns["chosen_ended"] = ended_flags(data, "chosen_ended")
        columns["rejected_ended"] = ended_flags(data, "rejected_ended")
        return columns, {"source": d.dataset, "n_pairs": len(data)}
    prefs = ctx.testbed.load_prefs()
    columns = {c: list(prefs[c]) for c in prefs.column_names}
    share = {"high": 0.0, "medium": d.corpus_share_medium, "low": d.corpus_share_low}[d.quality]
    info: dict[str, Any] = {"source": "testbed", "quality": d.quality, "corpus_share": share}
    if share > 0:
        tb = cfg.testbed
        train = ctx.testbed.load_prompts()["train"]
        reference = dict(zip(train["prompt_id"], train["reference"]))
        columns, stats = corpus_tier(
            columns, [reference[i] for i in columns["prompt_id"]], share=share, seed=cfg.seed,
            fit_budget=lambda text: fit_response_budget(text, tokenizer, tb.max_new_tokens),
            gold_fn=gold.score, label_noise=tb.label_noise)
        info.update(stats.as_dict())
    info["n_pairs"] = len(columns["prompt"])
    gold_chosen, gold_rejected = (column_of(list(columns), c) for c in GOLD_COLUMNS)
    if gold_chosen is not None and gold_rejected is not None:
        gold_c = torch.tensor(columns[gold_chosen], dtype=torch.float64)
        gold_r = torch.tensor(columns[gold_rejected], dtype=torch.float64)
        info["label_gold_agreement"] = float((gold_c > gold_r).double().mean())
    return columns, info


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------




def run(ctx: RunContext) -> dict[str, Any]:
    cfg, d, info = ctx.cfg, ctx.cfg.dpo, ctx.dist
    ensure_process_group(info.device)
    world, rank = info.world_size, info.rank
    stage = cfg.deepspeed.zero_stage
    if d.batch_size % world:
        raise InputError(f"dpo.batch_size ({d.batch_size}) must be divisible by the number of ranks ({world})")
    timings: dict[str, float] = {}

    # 0. models: tokenizer, gold, initial policy (proxies after the data checks: they may need training)
    check_policy_dtype(cfg, info.device)
    policy_path = initial_policy_path(cfg, ctx.testbed)
    tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.policy.trust_remote_code)
    gold = GoldScorer.from_config(cfg, ctx.testbed)
    policy = load_policy_model(cfg, policy_path)

    # 1. data: pairs as text (quality tier or user dataset), validated, then tokens
    t = time.time()
    columns, data_info = load_pairs(ctx, gold, tokenizer)
    max_length = d.max_length or context_length(policy.config) or 1024
    try:
        pairs = tokenize_pairs(tokenizer, columns["prompt"], columns["chosen"], columns["rejected"],
                               columns["chosen_ended"], columns["rejected_ended"], max_length)
    except PreferenceDataError as exc:
        raise InputError(f"dpo.dataset: {exc}") from None
    n_pairs = len(pairs)
    if n_pairs < d.batch_size:
        raise InputError(f"the preference dataset has {n_pairs} pairs, fewer than one batch ({d.batch_size})")
    steps_per_epoch, total_steps, eval_steps = preference_schedule(n_pairs, d.batch_size, d.epochs, d.evals_per_epoch)
    data_info.update(n_truncated=pairs.n_truncated, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    if cfg.data.prompts != "testbed" or ctx.testbed is not None:
        # data.prompts' eval prompts (the testbed's eval split by default)
        _, eval_share = load_prompts(cfg, ctx.testbed, world, rank, min_train=0, tokenizer=tokenizer)
    else:
        # no held-out prompt split without the testbed: evaluate on the dataset's first distinct prompts
        eval_prompts = list(dict.fromkeys(columns["prompt"]))[: cfg.eval.n_prompts]
        if len(eval_prompts) % world:
            raise InputError(f"{len(eval_prompts)} eval prompts cannot be split evenly over {world} ranks")
        eval_share = [eval_prompts[i] for i in dist.shard_indices(len(eval_prompts), rank, world)]
    timings["data_s"] = time.time() - t
    log.info("%d preference pairs (%s), %d steps (%d per epoch), evaluations at steps %s", n_pairs,
             data_info.get("quality", data_info["source"]), total_steps, steps_per_epoch, eval_steps)

    # 2. proxies: they score every evaluation; madpo weights from their margins, once
    t = time.time()
    ensemble = ensure_proxies(cfg, ctx.testbed, info, ctx.run).to(info.device)
    timings["proxies_s"] = time.time() - t
    weights, madpo_info = None, {}
    margins = METHODS[cfg.method].margins
    if margins:
        t = time.time()
        weights, madpo_info = margin_weights(cfg, ensemble, columns, rank, world,
                                             ensemble_root=ensemble_dir(cfg, ctx.testbed))
        timings["margins_s"] = time.time() - t
        log.info("madpo margins (%s): weight mean %.3f, min %.3f, max %.3f", cfg.madpo.margin_aggregator,
                 madpo_info["weights"]["mean"], madpo_info["weights"]["min"], madpo_info["weights"]["max"])

    # 3. engines: trained policy, frozen reference; reference log-probs of every pair, once
    engine_cfg = ds_config(zero_stage=stage, micro_batch_per_rank=d.batch_size // world, world_size=world,
                           max_grad_norm=d.max_grad_norm, extra_path=cfg.deepspeed.config, dtype=cfg.policy.dtype)
    policy_engine = train_engine(policy, lr=d.lr, total_steps=total_steps, final_ratio=d.lr_final_ratio,
                                 config=engine_cfg)
    reference = frozen_model(load_policy_model(cfg, policy_path), zero_stage=stage, config=engine_cfg, device=info.device)
    policy = policy_engine.module
    ref_logps = None
    if d.precompute_ref:
        t = time.time()

        @torch.no_grad()
        def ref_fn(idx: list[int]) -> torch.Tensor:
            chosen, rejected = pair_logprobs(reference, collate_pairs(pairs, idx, tokenizer.pad_token_id)
                                             .to(info.device))
            return torch.stack([chosen, rejected])

        ref_logps = dist.sharded_map(n_pairs, ref_fn, rank, world, d.logprob_batch_size)  # (2, N)
        check_finite(ref_logps, "reference log-probs", 0)
        timings["reference_s"] = time.time() - t

    # resume from the last complete checkpoint
    ckpt = Checkpointer(ctx.run.checkpoints)
    start, _ = resume_step(ctx, ckpt, {"policy": policy_engine})
    tracker = Tracker(cfg, enabled=info.is_main)
    eval_log = EvalLog(ctx.run, tracker)
    agg = cfg.aggregate
    objective = aggregator(agg.name, uwo_lambda=agg.uwo_lambda, std_k=agg.std_k, variance=agg.variance, k=ensemble.k)
    extra = {"beta": d.beta, "loss_type": d.loss_type, "quality": data_info.get("quality", "user"),
             **({"margin_aggregator": cfg.madpo.margin_aggregator} if margins else {})}

    def evaluate(step: int) -> None:
        point, samples = evaluate_policy(
            policy=policy, reference=reference, tokenizer=tokenizer, prompts=eval_share, gold=gold, ev=cfg.eval,
            zero_stage=stage, generator=seeds.eval_generator(cfg.seed, rank, info.device), method=cfg.method,
            step=step, aggregator=agg.name, ensemble=ensemble, aggregate_fn=objective,
            extra={**extra, "epoch": step / steps_per_epoch})
        eval_log.record(point, samples)

    t_eval = 0.0
    if start == 0:
        t = time.time()
        evaluate(0)
        t_eval += time.time() - t
    t_start = time.time()
    progress = tqdm(range(start, total_steps), desc=f"{cfg.method} ({d.loss_type}, beta={d.beta})",
                    disable=not info.is_main, initial=start, total=total_steps)
    for step in progress:
        t0 = time.time()
        # 4. batch: this rank's share of the step's global batch
        idx = seeds.batch_indices(step, steps_per_epoch, d.batch_size, n_pairs, cfg.seed, rank, world)
        batch = collate_pairs(pairs, idx.tolist(), tokenizer.pad_token_id).to(info.device)
        # 5-6. log-probs (policy with gradients, reference precomputed or now), loss, update
        step_stats = preference_step(policy_engine, reference, batch, idx, ref_logps, weights, d, step)
        # 7. log, evaluate, checkpoint
        done = step + 1
        stats = {"step": done, "epoch": done / steps_per_epoch, **step_stats,
                 "lr": policy_engine.get_lr()[0], "time_step_s": time.time() - t0}
        if info.is_main:
            append_jsonl(ctx.run.root / "train_stats.jsonl", [stats])
        tracker.log_train(done, {k: v for k, v in stats.items() if isinstance(v, float)})
        progress.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['reward_accuracy']:.2f}")
        if done in eval_steps:
            t = time.time()
            evaluate(done)
            t_eval += time.time() - t
        if done % d.save_every == 0 or done == total_steps:
            ckpt.save(done, {"policy": policy_engine}, {}, info.is_main)
    # 8. the trained policy, loadable by any transformers user (safetensors)
    save_policy(policy, tokenizer, ctx.run.root / "policy", stage, info.is_main)
    tracker.finish()
    timings["train_s"] = time.time() - t_start - t_eval
    timings["eval_s"] = t_eval
    return {"beta": d.beta, "loss_type": d.loss_type, "data": data_info, "steps": total_steps,
            "timings_s": {k: round(v, 2) for k, v in timings.items()}, **({"madpo": madpo_info} if madpo_info else {})}










