"""method: train_rm — train the proxy ensemble on gold-labelled (noisy) preferences and report it.

Every experiment that needs proxies calls `ensure_proxies`: it loads `proxy.path` when given,
otherwise it trains the ensemble once into a content-hashed cache folder beside the testbed (keyed
by the proxy settings, the backbone and the testbed), so later runs reuse it in seconds.

    1. data       the testbed's preference pairs, split 90/10 into train and validation
    2. train      K members with the Bradley–Terry loss (rlhf_overopt.proxy.train_ensemble)
    3. check      validation accuracy per member vs noisy and clean labels; failed members handled
    4. save       the ensemble with its standardization statistics
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from rlhf_overopt import dist
from rlhf_overopt.config import Config, to_dict
from rlhf_overopt.errors import InputError
from rlhf_overopt.lifecycle import RunContext
from rlhf_overopt.runs import file_lock

log = logging.getLogger("rlhf_overopt")

PROXY_CACHE_VERSION = 1
VAL_FRACTION = 0.1


def proxy_key_settings(cfg: Config) -> dict[str, Any]:
    """The proxy settings that determine trained weights, as they enter a cache key.

    Settings that only steer scoring are left out, and so is `train_pairs` at 0 ("all pairs"):
    caches written before the option existed keep their keys.
    """
    settings = to_dict(cfg.proxy)
    for key in ("path", "score_batch_size", "on_failed_member", "train_workers"):
        settings.pop(key, None)
    if settings.get("train_pairs") == 0:
        settings.pop("train_pairs")
    return settings


def proxy_cache_dir(cfg: Config, testbed) -> Path:
    """<testbed cache>/proxies-<hash of what determines the trained weights>."""
    key = json.dumps({"proxy": proxy_key_settings(cfg), "policy": cfg.policy.path, "testbed": testbed.root.name,
                      "seed": cfg.seed, "version": PROXY_CACHE_VERSION}, sort_keys=True)
    return testbed.root.parent / f"proxies-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def split_prefs(prefs, seed: int):
    """Deterministic 90/10 train/validation split of the preference pairs."""
    if len(prefs) < 20:
        raise InputError(f"the preference dataset has {len(prefs)} pairs; proxies need at least 20")
    parts = prefs.train_test_split(test_size=VAL_FRACTION, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def limit_train_pairs(train, train_pairs: int):
    """The first `train_pairs` pairs of the (shuffled) train split; 0 keeps them all."""
    if not train_pairs:
        return train
    if train_pairs > len(train):
        raise InputError(f"proxy.train_pairs={train_pairs} exceeds the {len(train)} pairs of the train split")
    return train.select(range(train_pairs))


def _train(cfg: Config, testbed, out_dir: Path, device) -> None:
    from rlhf_overopt.proxy import train_ensemble
    from rlhf_overopt.testbed.sft import train_sft_policy

    # 1. data
    train, val = split_prefs(testbed.load_prefs(), cfg.seed)
    train = limit_train_pairs(train, cfg.proxy.train_pairs)
    tokenizer = testbed.load_tokenizer()
    backbone = str(testbed.policy_dir) if cfg.proxy.backbone == "policy" else cfg.proxy.backbone

    def make_backbone(seed: int) -> Path:
        """A differently seeded pretraining run of the testbed policy (the 'pretrain' ensemble)."""
        target = testbed.root.parent / f"{testbed.root.name}-pretrain-{seed}"
        with file_lock(target.with_suffix(".lock")):
            if not (target / "config.json").exists():
                train_sft_policy(testbed.load_corpus(), tokenizer, cfg.testbed, seed, target)
        return target

    # 2-4. train, check, save (train_ensemble writes atomically into out_dir)
    log.info("training %d %s proxies (%d train / %d val pairs) into %s", cfg.proxy.k, cfg.proxy.kind,
             len(train), len(val), out_dir)
    train_ensemble(cfg.proxy.kind, backbone, tokenizer, train, val, out_dir, cfg.proxy, seed=cfg.seed,
                   make_backbone=make_backbone, device=device, progress=True)


def ensure_proxies(ctx: RunContext):
    """The run's proxy ensemble: loaded from proxy.path, from the cache, or trained (rank 0) first."""
    from rlhf_overopt.proxy import ProxyEnsemble

    cfg = ctx.cfg
    if cfg.proxy.path:
        return ProxyEnsemble.load(cfg.proxy.path, score_batch_size=cfg.proxy.score_batch_size,
                                  trust_remote_code=cfg.policy.trust_remote_code)
    if ctx.testbed is None:
        raise InputError("proxy.path is empty and there is no testbed to train proxies on; set proxy.path")
    out_dir = proxy_cache_dir(cfg, ctx.testbed)
    if ctx.dist.is_main:
        with file_lock(out_dir.with_suffix(".lock")):
            if not (out_dir / "ensemble.json").exists():
                t = time.time()
                _train(cfg, ctx.testbed, out_dir, ctx.device)
                log.info("proxies trained in %.1f s", time.time() - t)
    dist.barrier()
    ensemble = ProxyEnsemble.load(out_dir, score_batch_size=cfg.proxy.score_batch_size)
    if ctx.dist.is_main:
        ctx.run.write_json("proxies.json", proxy_report(ensemble, out_dir))
    return ensemble


def ensemble_dir(cfg: Config, testbed) -> Path:
    """Where the run's ensemble lives: proxy.path, or its cache folder."""
    return Path(cfg.proxy.path) if cfg.proxy.path else proxy_cache_dir(cfg, testbed)


def first_member_backbone(root: Path) -> Path:
    """A transformer checkpoint inside a saved ensemble to initialize a value model from:
    member_0 (independent, pretrain), the shared backbone (multihead) or the base (lora)."""
    for name in ("member_0", "backbone", "base"):
        if (root / name / "config.json").exists():
            return root / name
    raise InputError(f"{root}: no member_0/, backbone/ or base/ checkpoint to initialize a value model from")


def proxy_report(ensemble, out_dir: Path) -> dict[str, Any]:
    return {
        "path": str(out_dir),
        "kind": ensemble.kind,
        "k": ensemble.k,
        "members": ensemble.member_names,
        "val_accuracy_noisy": ensemble.val_accuracy,
        "val_accuracy_clean": ensemble.val_accuracy_clean,
        "failed_members": ensemble.failed_members,
        "dropped_members": ensemble.dropped_members,
    }


def run(ctx: RunContext) -> dict[str, Any]:
    t = time.time()
    ensemble = ensure_proxies(ctx)
    report = proxy_report(ensemble, ensemble_dir(ctx.cfg, ctx.testbed))
    for name in ensemble.member_names:
        log.info("%s: val accuracy %.3f (noisy labels), %s (clean labels)", name, ensemble.val_accuracy.get(name, 0),
                 ensemble.val_accuracy_clean.get(name))
    return {"proxies": report, "wall_time_proxies_s": round(time.time() - t, 2)}
