"""method: scaling_law — Gao, Schulman & Hilton (2022) §3.2 in one command: one best-of-n pool, a
proxy per (size, data size) cell ranking it, Gao's form fitted per proxy, and its coefficients
against log parameter count and log data size.

    1. check      the data sizes against the testbed's train split, before any work
    2. pool       N gold-scored samples per eval prompt: scaling.pool, or sampled from the initial
                  policy (rlhf_overopt.data.pool_sampling); saved as <run>/pool, reused on resume
    3. backbones  per proxy size a GPT-2 of that shape pretrained on the testbed corpus with the
                  SFT recipe and seed (the SFT policy itself for its own shape), cached beside the testbed
    4. cells      per (size, data size): ONE proxy trained on the first train_pairs noisy pairs
                  (reward_cache, cached), its parameters counted and validation accuracy read,
                  every pool sample scored once -> <run>/cells/<label>/; a resumed run skips
                  finished cells
    5. curves     per cell and n: unbiased best-of-n estimator of gold and proxy, analytic KL
                  log n - (n-1)/n -> curves.jsonl (rows name the cell)
    6. fits       R_bon(d) = d (alpha - beta d) on gold minus the pool's mean gold, per cell;
                  predicted peak d* = alpha / (2 beta) (none within the form when beta <= 0)
    7. trends     alpha and beta against log10 params (per data size) and log10 pairs (per size):
                  y = a + b log10 x and its R^2 -> scaling.json, summary.json
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch

from rlhf_overopt.data.pool_sampling import sample_gold_pool
from rlhf_overopt.errors import InputError, check_finite
from rlhf_overopt.ops.bon import bon_expected, bon_kl
from rlhf_overopt.ops.scaling import (
    bon_peak,
    bon_peak_gain,
    fit_bon_form,
    fit_log_linear,
    non_embedding_parameters,
)
from rlhf_overopt.pool import n_grid, read_scored_pool
from rlhf_overopt.rewards.cache import ensure_proxies, split_prefs
from rlhf_overopt.run import dist
from rlhf_overopt.run.directory import RunDir, atomic_write_bytes, atomic_write_json, curve_row, file_lock
from rlhf_overopt.run.lifecycle import RunContext
from rlhf_overopt.run.tracking import Tracker

log = logging.getLogger("rlhf_overopt")

CELL_FILE = "cell.json"
SCORES_FILE = "scores.safetensors"
RESULTS_FILE = "scaling.json"


def _resolve_pairs(configured: list[int], available: int) -> list[int]:
    """The data sizes as pair counts (0 = all), each checked against the train split."""
    counts = []
    for i, n in enumerate(configured):
        if n > available:
            raise InputError(f"scaling.train_pairs[{i}]: {n} exceeds the {available} pairs of the train split")
        counts.append(n or available)
    if len(set(counts)) != len(counts):
        raise InputError(f"scaling.train_pairs: {configured} names the same data size twice ({available} = all pairs)")
    return counts


def _finite(value: float) -> float | None:
    """JSON holds no inf or NaN: None for them."""
    return value if math.isfinite(value) else None


def _load_pool(ctx: RunContext):
    """The run's gold-scored pool: <run>/pool when a resumed run saved one, else scaling.pool or a
    freshly sampled one, saved there (rank 0). Sorted by prompt, then sample."""
    from datasets import Dataset, load_from_disk

    cfg, info, sc = ctx.cfg, ctx.dist, ctx.cfg.scaling
    pool_dir = ctx.run.root / "pool"
    timings: dict[str, float] = {}
    if (pool_dir / "dataset_info.json").exists():
        log.info("reusing the gold-scored pool in %s", pool_dir)
        return load_from_disk(str(pool_dir)), timings
    t = time.time()
    if sc.pool:
        pool = None
        if info.is_main:
            try:
                columns = read_scored_pool(sc.pool, sc.pool_size, cfg.eval.n_prompts)
            except InputError as exc:  # it names bon's keys
                raise InputError(str(exc).replace("bon.pool", "scaling.pool")) from None
            columns.pop("proxy_scores")  # the cells score the pool themselves
            check_finite(torch.tensor(columns["gold_score"]), "gold score of scaling.pool", 0)
            pool = Dataset.from_dict(columns)
            pool.save_to_disk(str(pool_dir))
        dist.barrier()
        pool = pool if pool is not None else load_from_disk(str(pool_dir))
        timings["read_pool_s"] = time.time() - t
        return pool, timings
    pool, timings = sample_gold_pool(cfg, ctx.testbed, info, pool_size=sc.pool_size, max_new_tokens=sc.max_new_tokens,
                                     temperature=sc.temperature, top_p=sc.top_p, batch_size=sc.batch_size)
    if info.is_main:
        pool.save_to_disk(str(pool_dir))
    dist.barrier()
    return pool, timings


def _backbone(ctx: RunContext, size) -> str:
    """proxy.backbone for a proxy size: 'policy' for the SFT policy's own shape (it is the testbed's
    pretraining run of that shape), else a run of the same recipe and seed at this shape, trained
    once (rank 0, under a lock) into <testbed cache>/<testbed>-shape-L<l>-d<d>-h<h>-<seed>/."""
    from rlhf_overopt.testbed.sft import METRICS_FILE, train_sft_policy

    tb, testbed = ctx.cfg.testbed, ctx.testbed
    shape = (size.n_layer, size.n_embd, size.heads)
    if shape == (tb.n_layer, tb.n_embd, tb.n_head):
        return "policy"
    target = testbed.root.parent / f"{testbed.root.name}-shape-L{shape[0]}-d{shape[1]}-h{shape[2]}-{tb.seed}"
    if ctx.dist.is_main:
        with file_lock(target.with_suffix(".lock")):
            if not (target / METRICS_FILE).exists():  # written last: a killed pretraining starts over
                t = time.time()
                shaped = dataclasses.replace(tb, n_layer=shape[0], n_embd=shape[1], n_head=shape[2])
                train_sft_policy(testbed.load_corpus(), testbed.load_tokenizer(), shaped, tb.seed, target)
                log.info("pretrained the L%d d%d h%d backbone in %.1f s", *shape, time.time() - t)
    dist.barrier()
    return str(target)


def _pretraining_loss(ctx: RunContext, backbone: str) -> float | None:
    """Held-out LM loss (nats/token) of a backbone's pretraining run, from its sft_metrics.json."""
    from rlhf_overopt.testbed.sft import METRICS_FILE

    path = Path(ctx.testbed.policy_dir if backbone == "policy" else backbone) / METRICS_FILE
    return json.loads(path.read_text())["heldout_loss"] if path.exists() else None


def _cell_label(size, pairs: int) -> str:
    return f"L{size.n_layer}-d{size.n_embd}/p{pairs}"


def _run_cell(ctx: RunContext, size, backbone: str, configured_pairs: int, pairs: int, pool) -> tuple[dict, torch.Tensor]:
    """One cell: (its record, the proxy's (P*N,) standardized score of every pool sample). Reads
    <run>/cells/<label>/ when a previous attempt finished it; else trains (or loads from the
    reward-model cache) one proxy and scores the pool, writing the scores, then cell.json."""
    from safetensors.torch import load, save

    cfg, info = ctx.cfg, ctx.dist
    label = _cell_label(size, pairs)
    cell_dir = ctx.run.root / "cells" / label.replace("/", "-")
    record_path = cell_dir / CELL_FILE
    if record_path.exists() and (cell_dir / SCORES_FILE).exists():
        record = json.loads(record_path.read_text())
        if record.get("pool_rows") == len(pool):
            log.info("cell %s: reusing its scores", label)
            return record, load((cell_dir / SCORES_FILE).read_bytes())["proxy_score"]
    t = time.time()
    proxy = dataclasses.replace(cfg.proxy, k=1, train_pairs=configured_pairs, backbone=backbone)
    ensemble = ensure_proxies(dataclasses.replace(cfg, proxy=proxy), ctx.testbed, info,
                              RunDir(cell_dir, writable=info.is_main)).to(info.device)
    train_s = time.time() - t
    model = ensemble.members.modules()[0]
    record = {
        "label": label,
        "n_layer": size.n_layer, "n_embd": size.n_embd, "n_head": size.heads,
        "params": sum(p.numel() for m in ensemble.members.modules() for p in m.parameters()),
        "params_non_embedding": non_embedding_parameters(size.n_layer, size.n_embd),
        "vocab_rows": int(model.get_input_embeddings().weight.shape[0]),
        "train_pairs": pairs,
        "proxy_val_accuracy": ensemble.val_accuracy.get("member_0"),
        "proxy_val_accuracy_clean": ensemble.val_accuracy_clean.get("member_0"),
        "proxy_failed": bool(ensemble.failed_members),
        "backbone": backbone,
        "backbone_heldout_loss": _pretraining_loss(ctx, backbone),
        "pool_rows": len(pool),
        "train_s": round(train_s, 2),
    }
    scores = torch.empty(0)
    if info.is_main:
        t = time.time()
        scores = ensemble.score_texts(pool["prompt"], pool["response"], pool["ended"],
                                      progress=f"scores {label}")[0].float().cpu()
        check_finite(scores, f"proxy score of cell {label}", 0)
        record["score_s"] = round(time.time() - t, 2)
        atomic_write_bytes(cell_dir / SCORES_FILE, save({"proxy_score": scores.contiguous()}))
        atomic_write_json(record_path, record)  # last: its presence marks the cell finished
        log.info("cell %s: %d params, val accuracy %.3f, trained in %.1f s, pool scored in %.1f s", label,
                 record["params"], record["proxy_val_accuracy"] or math.nan, train_s, record["score_s"])
    dist.barrier()
    return record, scores


def _curve_rows(record: dict, objective: torch.Tensor, gold: torch.Tensor, grid: list[int]) -> list[dict[str, Any]]:
    """curves.jsonl rows of one cell: objective and gold (P, N)."""
    n_prompts, pool_size = gold.shape
    gold_at = bon_expected(objective, gold, grid)  # (G, P)
    proxy_at = bon_expected(objective, objective, grid)
    cell = {k: record[k] for k in ("n_layer", "n_embd", "n_head", "params", "params_non_embedding", "train_pairs",
                                   "proxy_val_accuracy", "proxy_val_accuracy_clean")}
    rows = []
    for g, n in enumerate(grid):
        kl = float(bon_kl(n))
        proxy = float(proxy_at[g].mean())
        rows.append(curve_row(
            method="scaling_law",
            step=n,
            kl=kl,
            proxy_score=proxy,
            proxy_member_scores=[proxy],
            gold_score=float(gold_at[g].mean()),
            aggregator=record["label"],  # one curve per cell (the row grouping of analysis and summaries)
            **cell,
            n=n,
            gold_stderr=float(gold_at[g].std() / math.sqrt(n_prompts)) if n_prompts > 1 else 0.0,
            gold_score_initial=float(gold.mean()),
            pool_size=pool_size,
            n_prompts=n_prompts,
        ))
    return rows


def _fit_cell(record: dict, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Gao's best-of-n form on one cell's curve, gold relative to the pool's mean gold (n = 1)."""
    d = [r["sqrt_kl"] for r in rows]
    gain = [r["gold_score"] - r["gold_score_initial"] for r in rows]
    peak_row = max(rows, key=lambda r: r["gold_score"])
    out: dict[str, Any] = {**record, "observed_peak_gain": peak_row["gold_score"] - peak_row["gold_score_initial"],
                           "observed_peak_sqrt_kl": peak_row["sqrt_kl"], "observed_peak_n": peak_row["n"],
                           "max_sqrt_kl": max(d)}
    try:
        fit = fit_bon_form(d, gain)
    except ValueError as exc:  # a grid with fewer than two n > 1
        return {**out, "alpha": None, "beta": None, "fit_r2": None, "peak_sqrt_kl": None, "peak_gain": None,
                "peak": f"no fit: {exc}"}
    d_star = bon_peak(fit.alpha, fit.beta)
    if not math.isfinite(d_star):
        where = "none within the form (beta <= 0: fitted gold never turns down)"
    elif d_star > max(d):
        where = "beyond the pool's largest n (extrapolated)"
    else:
        where = "within the pool"
    return {**out, "alpha": fit.alpha, "beta": fit.beta, "fit_r2": _finite(fit.r2), "peak_sqrt_kl": _finite(d_star),
            "peak_gain": _finite(bon_peak_gain(fit.alpha, fit.beta)) if math.isfinite(d_star) else None, "peak": where}


def _trends(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """alpha and beta against log10 params at each data size, and against log10 pairs at each size
    (a line needs two or more fitted cells)."""
    lines = []
    for against, held in (("params", lambda c: f"train_pairs={c['train_pairs']}"),
                          ("train_pairs", lambda c: f"size=L{c['n_layer']}-d{c['n_embd']}")):
        groups: dict[str, list[dict[str, Any]]] = {}
        for c in cells:
            if c["alpha"] is not None:
                groups.setdefault(held(c), []).append(c)
        for at, group in groups.items():
            if len({c[against] for c in group}) < 2:
                continue
            for coefficient in ("alpha", "beta"):
                fit = fit_log_linear([c[against] for c in group], [c[coefficient] for c in group])
                lines.append({"coefficient": coefficient, "against": against, "at": at, "points": len(group),
                              "intercept": fit.a, "slope_per_decade": fit.b, "r2": _finite(fit.r2)})
    return lines


def run(ctx: RunContext) -> dict[str, Any]:
    cfg, info, sc = ctx.cfg, ctx.dist, ctx.cfg.scaling
    timings: dict[str, float] = {}
    log.info("scaling_law: %d proxy sizes x %d data sizes, one proxy per cell (proxy.k is not read)",
             len(sc.proxy_sizes), len(sc.train_pairs))

    # 1. check the data sizes against the train split, before any work
    train, _ = split_prefs(ctx.testbed.load_prefs(), cfg.seed)
    pairs = _resolve_pairs(sc.train_pairs, len(train))
    if ctx.state == "resume":  # from here on a resumed run writes (and records a failure) in its directory
        ctx.resumed = True
        ctx.run.write_summary({"status": "running"})

    # 2. pool
    pool, pool_timings = _load_pool(ctx)
    timings.update(pool_timings)
    pool = pool.sort(["prompt_index", "sample"])
    n_prompts = len(set(pool["prompt_index"]))
    if len(pool) != n_prompts * sc.pool_size:
        raise InputError(f"scaling.pool: {len(pool)} samples are not {n_prompts} prompts x scaling.pool_size={sc.pool_size}")
    gold = torch.tensor(pool["gold_score"], dtype=torch.float32).reshape(n_prompts, sc.pool_size)
    grid = n_grid(sc.pool_size, sc.n_grid)

    # 3. backbones
    t = time.time()
    backbones = [_backbone(ctx, size) for size in sc.proxy_sizes]
    timings["backbones_s"] = time.time() - t

    # 4. cells (5. their curves as they finish)
    t = time.time()
    records, rows = [], []
    for size, backbone in zip(sc.proxy_sizes, backbones):
        for configured, n_pairs in zip(sc.train_pairs, pairs):
            record, scores = _run_cell(ctx, size, backbone, configured, n_pairs, pool)
            records.append(record)
            if info.is_main:
                rows.append(_curve_rows(record, scores.reshape(n_prompts, sc.pool_size), gold, grid))
    timings["cells_s"] = time.time() - t
    if not info.is_main:
        return {}

    # 6. fits, 7. trends
    cells = [_fit_cell(record, cell_rows) for record, cell_rows in zip(records, rows)]
    trends = _trends(cells)
    results = {"pool": {"n_prompts": n_prompts, "pool_size": sc.pool_size, "source": sc.pool or "sampled",
                        "gold_mean": float(gold.mean()), "n_grid": grid},
               "cells": cells, "trends": trends}
    ctx.run.write_json(RESULTS_FILE, results)
    ctx.run.truncate_curves(-1)  # a resumed run rewrites its curves from the cells
    flat = [r for cell_rows in rows for r in cell_rows]
    ctx.run.log_curve(flat)
    tracker = Tracker(cfg, enabled=True)
    for row in flat:
        tracker.log_eval(row)
    tracker.finish()
    for line in trends:
        log.info("trend: %s vs log10 %s at %s: slope %.4g per decade, R^2 %s", line["coefficient"], line["against"],
                 line["at"], line["slope_per_decade"], "n/a" if line["r2"] is None else f"{line['r2']:.3f}")
    return {"timings_s": {k: round(v, 2) for k, v in timings.items()},
            "scaling": {"cells": len(cells),
                        "trend_r2": {f"{ln['coefficient']}~log10({ln['against']}) @ {ln['at']}": ln["r2"] for ln in trends},
                        "peaks": {c["label"]: c["peak_sqrt_kl"] for c in cells}}}
