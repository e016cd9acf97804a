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

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from rlhf_overopt import dist
from rlhf_overopt.aggregate import aggregate
from rlhf_overopt.config import Config
from rlhf_overopt.curves import check_finite, evaluate_policy
from rlhf_overopt.engines import (
    checked_step,
    ds_config,
    ensure_process_group,
    frozen_model,
    gathered,
    train_engine,
)
from rlhf_overopt.loops.common import EvalLog, InputError, RunContext, resume_step
from rlhf_overopt.loops.ppo import Checkpointer, step_generator
from rlhf_overopt.losses import madpo_weights, preference_loss
from rlhf_overopt.models import context_length, load_causal_lm, load_tokenizer
from rlhf_overopt.preferences import (
    PairBatch,
    PreferenceDataError,
    collate_pairs,
    corpus_tier,
    ended_flags,
    fit_response_budget,
    load_preference_dataset,
    tokenize_pairs,
)
from rlhf_overopt.rollout import sequence_logprobs
from rlhf_overopt.runs import append_jsonl, atomic_write_bytes, atomic_write_json
from rlhf_overopt.tracking import Tracker

log = logging.getLogger("rlhf_overopt")


# ---------------------------------------------------------------------------------------------
# Pieces of the driver
# ---------------------------------------------------------------------------------------------


class PolicyCheckpointer(Checkpointer):
    """PPO's checkpoint layout with the policy engine only: checkpoints/policy/step_N, then
    state.json (written last, atomically) naming step N."""

    def save_policy(self, step: int, engine, is_main: bool) -> None:
        tag = f"step_{step}"
        engine.save_checkpoint(str(self.root / "policy"), tag=tag)
        dist.barrier()
        if is_main:
            atomic_write_json(self.state_path, {"step": step, "tag": tag})
            tags = sorted((d for d in (self.root / "policy").glob("step_*") if d.is_dir()),
                          key=lambda d: int(d.name.split("_")[1]))
            for old in tags[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load_policy(self, state: dict[str, Any], engine) -> int:
        path, _ = engine.load_checkpoint(str(self.root / "policy"), tag=state["tag"])
        if path is None:
            raise RuntimeError(f"checkpoint {self.root / 'policy' / state['tag']} could not be loaded")
        return int(state["step"])


def schedule(n_pairs: int, batch_size: int, epochs: float, evals_per_epoch: int) -> tuple[int, int, list[int]]:
    """(steps per epoch, total steps, evaluation steps). The last partial batch of an epoch is
    dropped; evaluations at step 0, every 1/evals_per_epoch of an epoch, and the last step."""
    steps_per_epoch = n_pairs // batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{n_pairs} pairs are fewer than one batch of {batch_size}")
    total = max(1, round(epochs * steps_per_epoch))
    per_eval = steps_per_epoch / evals_per_epoch
    evals = {0, total, *(round(k * per_eval) for k in range(1, math.ceil(total / per_eval)))}
    return steps_per_epoch, total, sorted(evals)


def batch_indices(step: int, steps_per_epoch: int, batch_size: int, n_pairs: int, seed: int, rank: int,
                  world: int) -> torch.Tensor:
    """This rank's contiguous share of the step's global batch; the epoch's permutation depends on
    (seed, epoch) only."""
    epoch, position = divmod(step, steps_per_epoch)
    order = torch.randperm(n_pairs, generator=step_generator(seed, epoch))
    batch = order[position * batch_size:(position + 1) * batch_size]
    local = batch_size // world
    return batch[rank * local:(rank + 1) * local]


def pair_logprobs(model, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs of the chosen and rejected rows: (b,), (b,)."""
    logprobs = sequence_logprobs(model, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask)
    return logprobs.sum(-1).chunk(2)


def pair_lengths(batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Response token counts of the chosen and rejected rows: (b,), (b,) float."""
    return batch.response_mask.sum(-1).float().clamp(min=1.0).chunk(2)


def sharded_map(n: int, fn, rank: int, world: int, batch_size: int) -> torch.Tensor:
    """fn(indices) -> (..., b) over all n items, each rank computing an equal share of batches
    (the last rank pads with index 0, so collective forwards under ZeRO-3 stay in step), gathered
    in order along the last dimension."""
    per = math.ceil(n / world)
    mine = [i if i < n else 0 for i in range(rank * per, (rank + 1) * per)]
    parts = [fn(mine[s:s + batch_size]) for s in range(0, per, batch_size)]
    local = torch.cat(parts, dim=-1).float().cpu()
    gathered_all = dist.all_gather_cat(local.movedim(-1, 0)).movedim(0, -1)
    return gathered_all[..., :n]


def summary_stats(x: torch.Tensor) -> dict[str, float]:
    """mean / std / min / quantiles / max of a 1-D tensor."""
    q = torch.quantile(x.double(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.double))
    return {"mean": float(x.mean()), "std": float(x.std()) if len(x) > 1 else 0.0, "min": float(x.min()),
            "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "q95": float(q[4]),
            "max": float(x.max())}


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
    if "chosen_gold" in columns:
        gold_c = torch.tensor(columns["chosen_gold"], dtype=torch.float64)
        gold_r = torch.tensor(columns["rejected_gold"], dtype=torch.float64)
        info["label_gold_agreement"] = float((gold_c > gold_r).double().mean())
    return columns, info


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def preference_step(policy_engine, reference, batch, idx: torch.Tensor, ref_logps: torch.Tensor | None,
                    weights: torch.Tensor | None, d, step: int) -> dict[str, float]:
    """One optimizer step of the DPO family on this rank's pairs `batch` (global indices `idx`).

    Log-probs of chosen and rejected under the policy (with gradients) and the reference (from
    `ref_logps (2, M)` when precomputed, else a no-grad forward), optional length normalization,
    the family loss with optional MADPO weights, backward and step. Returns the step's statistics
    averaged over ranks: loss, reward accuracy (implicit reward margin > 0), chosen and rejected
    implicit rewards beta * (log pi - log pi_ref), and their margin.
    """
    policy_engine.train()
    policy_chosen, policy_rejected = pair_logprobs(policy_engine, batch)
    if ref_logps is not None:
        ref_chosen, ref_rejected = (ref_logps[:, idx].to(policy_chosen.device)).unbind(0)
    else:
        with torch.no_grad():
            ref_chosen, ref_rejected = pair_logprobs(reference, batch)
    if d.length_normalize:
        len_chosen, len_rejected = pair_lengths(batch)
        policy_chosen, ref_chosen = policy_chosen / len_chosen, ref_chosen / len_chosen
        policy_rejected, ref_rejected = policy_rejected / len_rejected, ref_rejected / len_rejected
    w = weights[idx].to(policy_chosen.device) if weights is not None else None
    loss, _, chosen_rewards, rejected_rewards = preference_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=d.beta, loss_type=d.loss_type, weights=w)
    check_finite(loss, f"{d.loss_type} loss", step)
    policy_engine.backward(loss)
    checked_step(policy_engine, "policy", step)
    margin = chosen_rewards - rejected_rewards
    local = torch.stack([loss.detach(), (margin > 0).float().mean(), chosen_rewards.mean(),
                         rejected_rewards.mean(), margin.mean()]).cpu()
    means = dist.all_reduce_mean(local)
    return {"loss": float(means[0]), "reward_accuracy": float(means[1]), "chosen_reward": float(means[2]),
            "rejected_reward": float(means[3]), "reward_margin": float(means[4])}


def run(ctx: RunContext) -> dict[str, Any]:
    from rlhf_overopt.gold import GoldScorer
    from rlhf_overopt.reward_cache import ensemble_dir, ensure_proxies

    cfg, d, info = ctx.cfg, ctx.cfg.dpo, ctx.dist
    ensure_process_group(info.device)
    world, rank = info.world_size, info.rank
    stage = cfg.deepspeed.zero_stage
    if d.batch_size % world:
        raise InputError(f"dpo.batch_size ({d.batch_size}) must be divisible by the number of ranks ({world})")
    timings: dict[str, float] = {}

    # 0. models: tokenizer, gold, initial policy (proxies after the data checks: they may need training)
    policy_path = str(ctx.testbed.policy_dir) if cfg.policy.path == "testbed" else cfg.policy.path
    tokenizer = load_tokenizer(policy_path, trust_remote_code=cfg.policy.trust_remote_code)
    gold = GoldScorer.from_config(cfg, ctx.testbed)

    def load_policy():
        return load_causal_lm(policy_path, dtype=getattr(torch, cfg.policy.dtype),
                              trust_remote_code=cfg.policy.trust_remote_code, dropout_off=cfg.policy.dropout_off)

    policy = load_policy()

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
    steps_per_epoch, total_steps, eval_steps = schedule(n_pairs, d.batch_size, d.epochs, d.evals_per_epoch)
    data_info.update(n_truncated=pairs.n_truncated, steps_per_epoch=steps_per_epoch, total_steps=total_steps)
    if ctx.testbed is not None:
        eval_prompts = list(ctx.testbed.load_prompts()["eval"]["prompt"])[: cfg.eval.n_prompts]
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
    if cfg.method == "madpo":
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
    reference = frozen_model(load_policy(), zero_stage=stage, config=engine_cfg, device=info.device)
    policy = policy_engine.module
    ref_logps = None
    if d.precompute_ref:
        t = time.time()

        @torch.no_grad()
        def ref_fn(idx: list[int]) -> torch.Tensor:
            chosen, rejected = pair_logprobs(reference, collate_pairs(pairs, idx, tokenizer.pad_token_id)
                                             .to(info.device))
            return torch.stack([chosen, rejected])

        ref_logps = sharded_map(n_pairs, ref_fn, rank, world, d.logprob_batch_size)  # (2, N)
        check_finite(ref_logps, "reference log-probs", 0)
        timings["reference_s"] = time.time() - t

    # resume from the last complete checkpoint
    ckpt = PolicyCheckpointer(ctx.run.checkpoints)
    start, _ = resume_step(ctx, ckpt, lambda state: ckpt.load_policy(state, policy_engine))
    tracker = Tracker(cfg, enabled=info.is_main)
    eval_log = EvalLog(ctx, tracker)
    extra = {"beta": d.beta, "loss_type": d.loss_type, "quality": data_info.get("quality", "user"),
             **({"margin_aggregator": cfg.madpo.margin_aggregator} if cfg.method == "madpo" else {})}

    def evaluate(step: int) -> dict[str, Any]:
        row, samples = evaluate_policy(
            policy=policy, reference=reference, tokenizer=tokenizer, prompts=eval_share, ensemble=ensemble,
            gold=gold, agg=cfg.aggregate, ev=cfg.eval, zero_stage=stage, seed=cfg.seed * 7919 + rank,
            method=cfg.method, step=step, extra={**extra, "epoch": step / steps_per_epoch})
        eval_log.record(step, row, samples)
        log.info("eval step %d (epoch %.2f): gold %.3f proxy %.3f kl %.2f", step, step / steps_per_epoch,
                 row["gold_score"], row["proxy_score"], row["kl"])
        return row

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
        idx = batch_indices(step, steps_per_epoch, d.batch_size, n_pairs, cfg.seed, rank, world)
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
            ckpt.save_policy(done, policy_engine, info.is_main)
    # 8. the trained policy, loadable by any transformers user (safetensors)
    with gathered(policy, stage):
        if info.is_main:
            policy.save_pretrained(ctx.run.root / "policy", safe_serialization=True)
            tokenizer.save_pretrained(ctx.run.root / "policy")
    dist.barrier()
    tracker.finish()
    timings["train_s"] = time.time() - t_start - t_eval
    timings["eval_s"] = t_eval
    return {"beta": d.beta, "loss_type": d.loss_type, "data": data_info, "steps": total_steps,
            "timings_s": {k: round(v, 2) for k, v in timings.items()}, **({"madpo": madpo_info} if madpo_info else {})}


MARGIN_CACHE_VERSION = 1
PAIR_TEXT_COLUMNS = ("prompt", "chosen", "rejected", "chosen_ended", "rejected_ended")


def margin_cache_path(cfg: Config, ensemble_root: Path, columns: dict[str, list[Any]], world: int) -> Path:
    """<cache root>/margins/<key>.safetensors for the member margins of these pairs.

    The key holds everything the margins depend on: the ensemble's folder and every file in it
    (path, size, modification time: an ensemble retrained in place gets a new key), raw or
    standardized scores, the pair texts and ended flags, and how scoring is batched (batch size
    and ranks change padding, hence the last bits of a score), so a cached run equals an uncached one.
    """
    from rlhf_overopt.testbed.build import resolve_cache_dir

    root = Path(ensemble_root).resolve()
    files = sorted((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
                   for f in root.rglob("*") if f.is_file())
    pairs = hashlib.sha256(json.dumps([columns[c] for c in PAIR_TEXT_COLUMNS]).encode("utf-8")).hexdigest()
    key = json.dumps({"version": MARGIN_CACHE_VERSION, "ensemble": str(root), "files": files,
                      "standardized": cfg.madpo.standardized_margins, "pairs": pairs,
                      "score_batch_size": cfg.proxy.score_batch_size, "world": world}, sort_keys=True)
    name = hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]
    return resolve_cache_dir(cfg.testbed) / "margins" / f"{name}.safetensors"


def load_cached_margins(path: Path | None, n: int) -> torch.Tensor | None:
    """The cached (K, n) member margins when every rank finds them (ranks decide together, since
    scoring is collective), else None."""
    have = path is not None and path.is_file()
    if float(dist.all_reduce_mean(torch.tensor([float(have)]))) < 1.0:
        return None
    from safetensors.torch import load_file

    margins = load_file(str(path))["member_margins"]
    if margins.dim() != 2 or margins.shape[1] != n:
        raise RuntimeError(f"{path}: cached margins have shape {tuple(margins.shape)}, expected (K, {n})")
    return margins


def save_cached_margins(path: Path, margins: torch.Tensor) -> None:
    """Write (K, N) member margins atomically as safetensors."""
    from safetensors.torch import save

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save({"member_margins": margins.contiguous()}))


def margin_weights(cfg: Config, ensemble, columns: dict[str, list[Any]], rank: int,
                   world: int, ensemble_root: Path | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """Step 2: MADPO weights w(h) (N,) with h the aggregated member margins, and their statistics.

    Member margins (K, N) = r_i(prompt + chosen) - r_i(prompt + rejected), from raw Bradley-Terry
    scores unless madpo.standardized_margins (a score offset cancels in a margin; the scale is what
    the weight's sigmoid reads). The aggregator is applied to the margins themselves. With
    `ensemble_root` (the saved ensemble's folder) the member margins are cached by
    `margin_cache_path`, so runs that differ only in aggregator, beta or optimizer settings
    score the pairs once.
    """
    m, agg = cfg.madpo, cfg.aggregate

    def score(idx: list[int]) -> torch.Tensor:
        prompts = [columns["prompt"][i] for i in idx]
        chosen = ensemble.score_texts(prompts, [columns["chosen"][i] for i in idx],
                                      [columns["chosen_ended"][i] for i in idx], standardized=m.standardized_margins)
        rejected = ensemble.score_texts(prompts, [columns["rejected"][i] for i in idx],
                                        [columns["rejected_ended"][i] for i in idx],
                                        standardized=m.standardized_margins)
        return (chosen - rejected).float().cpu()

    n = len(columns["prompt"])
    cache = margin_cache_path(cfg, ensemble_root, columns, world) if ensemble_root is not None else None
    member_margins = load_cached_margins(cache, n)
    cached = member_margins is not None
    if member_margins is None:
        member_margins = sharded_map(n, score, rank, world, cfg.proxy.score_batch_size)  # (K, N)
        if cache is not None and rank == 0 and bool(torch.isfinite(member_margins).all()):
            save_cached_margins(cache, member_margins)
    for i in range(member_margins.shape[0]):
        check_finite(member_margins[i], f"proxy member {i} margin", 0)
    margins = aggregate(member_margins, m.margin_aggregator, uwo_lambda=agg.uwo_lambda, std_k=agg.std_k,
                        variance=agg.variance)
    weights = madpo_weights(margins, c_max=m.c_max, c_min=m.c_min or None, lam=m.lam, tau=m.tau)
    stats: dict[str, Any] = {
        "member_margins_cached": cached,
        "margin_aggregator": m.margin_aggregator,
        "standardized_margins": m.standardized_margins,
        "margins": summary_stats(margins),
        "member_margin_means": [float(v) for v in member_margins.mean(1)],
        "label_agreement": float((margins > 0).float().mean()),
        "weights": summary_stats(weights),
        "share_downweighted": float((weights < 1).float().mean()),
    }
    if "label_flipped" in columns:
        flipped = torch.tensor([bool(v) for v in columns["label_flipped"]])
        if flipped.any() and (~flipped).any():
            # does the margin find the noisy labels? (testbed: flipped pairs should weigh less)
            stats["weight_mean_flipped_labels"] = float(weights[flipped].mean())
            stats["weight_mean_clean_labels"] = float(weights[~flipped].mean())
    return weights, stats
