"""MADPO's margin stage: each preference pair's reward margin from the proxy ensemble and the
per-pair weight w(h) it gives (Rho 2025, "MADPO: Margin-Adaptive Direct Preference Optimization").

The member margins `r_i(prompt + chosen) - r_i(prompt + rejected)` (K, N) are combined by the
margin aggregator (member_0 is the paper's single reward model; mean / wco / uwo give ensemble
margins, the conservative rules applied to the *margins*), then `madpo_weights` maps them to
weights. Scoring the pairs is the expensive part, so member margins are cached per ensemble
files, pairs and scoring layout (<cache root>/margins/).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from rlhf_overopt.config.experiment import Config
from rlhf_overopt.errors import check_finite
from rlhf_overopt.ops.aggregate import aggregate
from rlhf_overopt.ops.losses import madpo_weights
from rlhf_overopt.run import dist
from rlhf_overopt.run.directory import atomic_write_bytes

MARGIN_CACHE_VERSION = 1
PAIR_TEXT_COLUMNS = ("prompt", "chosen", "rejected", "chosen_ended", "rejected_ended")


def summary_stats(x: torch.Tensor) -> dict[str, float]:
    """mean / std / min / quantiles / max of a 1-D tensor."""
    q = torch.quantile(x.double(), torch.tensor([0.05, 0.25, 0.5, 0.75, 0.95], dtype=torch.double))
    return {"mean": float(x.mean()), "std": float(x.std()) if len(x) > 1 else 0.0, "min": float(x.min()),
            "q05": float(q[0]), "q25": float(q[1]), "median": float(q[2]), "q75": float(q[3]), "q95": float(q[4]),
            "max": float(x.max())}


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
        member_margins = dist.sharded_map(n, score, rank, world, cfg.proxy.score_batch_size)  # (K, N)
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
    # the testbed's label_flipped, or `flipped` of a user dataset (rlhf_overopt/data/preferences.py)
    flip_column = next((c for c in ("label_flipped", "flipped") if c in columns), None)
    if flip_column is not None:
        flipped = torch.tensor([bool(v) for v in columns[flip_column]])
        if flipped.any() and (~flipped).any():
            # does the margin find the noisy labels? (testbed: flipped pairs should weigh less)
            stats["weight_mean_flipped_labels"] = float(weights[flipped].mean())
            stats["weight_mean_clean_labels"] = float(weights[~flipped].mean())
    return weights, stats
