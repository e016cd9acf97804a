"""Trained reward models on disk: the one load-or-train cache of proxies and component rewards.

Every experiment that needs proxies calls `ensure_proxies`, every composite experiment
`ensure_components`. Each loads the configured path when one is given; otherwise it trains once
into a content-hashed folder beside the testbed (or in the cache root when the world has no
testbed), keyed by what determines the trained weights (the proxy settings, the backbone, the
testbed, the seed, and for proxy.dataset other than the testbed the dataset's identity: its
resolved path or hub name and a fingerprint of its contents), so later runs reuse it in seconds.
Rank 0 trains under a file lock while the other ranks wait; then every rank loads.

Proxies train on proxy.dataset: the testbed's gold-labelled pairs, or any preference dataset in
TRL's formats (rlhf_overopt/data/preferences.py), split 90/10 into train and validation; the members
start from proxy.backbone and read text with its own tokenizer (rlhf_overopt/rewards/training.py),
and are loaded in proxy.dtype.

    <cache>/proxies-<hash>/             one saved ProxyEnsemble
    <cache>/components-<hash>/<name>/   one saved ProxyEnsemble per component
    <cache>/<testbed>-pretrain-<seed>/  the pretrain ensemble's backbones

The keys and folder names are those of caches written before this module existed: changing a
key's JSON contents, its hashing or a CACHE_VERSION retrains every cached reward model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rlhf_overopt.config.experiment import Config, to_dict
from rlhf_overopt.errors import InputError
from rlhf_overopt.rewards.components import ComponentRewards, component_preferences, component_values
from rlhf_overopt.rewards.ensemble import ENSEMBLE_FILE, ProxyEnsemble
from rlhf_overopt.run import dist
from rlhf_overopt.run.directory import RunDir, file_lock, sha256_file, sha256_json
from rlhf_overopt.run.dist import DistInfo

log = logging.getLogger("rlhf_overopt")

PROXY_CACHE_VERSION = 1
COMPONENTS_CACHE_VERSION = 1
COMPONENTS_FILE = "components.json"
VAL_FRACTION = 0.1


# ---------------------------------------------------------------------------------------------
# Shared: keys, data splits, backbones, the train-once step
# ---------------------------------------------------------------------------------------------


def proxy_key_settings(cfg: Config) -> dict[str, Any]:
    """The proxy settings that determine trained weights, as they enter a cache key.

    Settings that only steer scoring are left out (`dtype` too: members train in float32 whatever
    proxy.dtype, which is applied on load), and so are options at the value that keeps the earlier
    behaviour — `train_pairs` at 0 ("all pairs"), `dataset` at "testbed" — so caches written
    before an option existed keep their keys. A user dataset enters as its setting here and as its
    contents' fingerprint in proxy_cache_dir.
    """
    settings = to_dict(cfg.proxy)
    for key in ("path", "score_batch_size", "on_failed_member", "train_workers", "dtype"):
        settings.pop(key, None)
    if settings.get("train_pairs") == 0:
        settings.pop("train_pairs")
    if settings.get("dataset") == "testbed":
        settings.pop("dataset")
    return settings


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


def make_backbone(cfg: Config, testbed, tokenizer, seed: int) -> Path:
    """A differently seeded pretraining run of the testbed policy (the 'pretrain' ensemble),
    trained once under a file lock into <testbed cache>/<testbed>-pretrain-<seed>/."""
    from rlhf_overopt.testbed.sft import train_sft_policy

    target = testbed.root.parent / f"{testbed.root.name}-pretrain-{seed}"
    with file_lock(target.with_suffix(".lock")):
        if not (target / "config.json").exists():
            train_sft_policy(testbed.load_corpus(), tokenizer, cfg.testbed, seed, target)
    return target


def _proxy_backbone(cfg: Config, testbed) -> str:
    """The members' starting checkpoint: proxy.backbone, or with 'policy' the run's policy (the
    testbed's SFT policy, or the user's own checkpoint)."""
    if cfg.proxy.backbone != "policy":
        return cfg.proxy.backbone
    if cfg.policy.path == "testbed":
        return str(testbed.policy_dir)
    return cfg.policy.path


def _proxy_tokenizer(cfg: Config, testbed, backbone: str):
    """The tokenizer the proxies read text with: the testbed's for the testbed policy and its
    pretraining runs (as ever), else the backbone's own (`rm_training.proxy_tokenizer`)."""
    if cfg.proxy.kind == "pretrain" or (cfg.proxy.backbone == "policy" and cfg.policy.path == "testbed"):
        if testbed is None:
            raise InputError(f"proxy.kind={cfg.proxy.kind} with proxy.backbone={cfg.proxy.backbone} needs the "
                             "testbed (its policy and tokenizer); name a proxy.backbone checkpoint")
        return testbed.load_tokenizer()
    from rlhf_overopt.rewards.training import proxy_tokenizer

    return proxy_tokenizer(backbone, trust_remote_code=cfg.policy.trust_remote_code)


def _make_backbone(cfg: Config, testbed, tokenizer):
    """make_backbone for kind=pretrain (pretraining runs of the testbed policy), None without a testbed."""
    return None if testbed is None else partial(make_backbone, cfg, testbed, tokenizer)


def cache_root(cfg: Config, testbed) -> Path:
    """Where trained reward models are cached: beside the testbed, else in the cache root
    (testbed.cache_dir, $RLHF_OVEROPT_CACHE or ~/.cache/rlhf_overopt) for a world without one."""
    if testbed is not None:
        return testbed.root.parent
    from rlhf_overopt.testbed.build import resolve_cache_dir

    return resolve_cache_dir(cfg.testbed)


def _trained_once(out_dir: Path, marker: str, train: Callable[[], None], info: DistInfo, what: str) -> None:
    """Rank 0 runs `train` under out_dir's lock unless out_dir/marker exists; every rank waits."""
    if info.is_main:
        with file_lock(out_dir.with_suffix(".lock")):
            if not (out_dir / marker).exists():
                t = time.time()
                train()
                log.info("%s trained in %.1f s", what, time.time() - t)
    dist.barrier()


# ---------------------------------------------------------------------------------------------
# Proxies
# ---------------------------------------------------------------------------------------------


def proxy_dataset(cfg: Config):
    """proxy.dataset read and normalized (rlhf_overopt/data/preferences.py), and its identity
    {"dataset": resolved path or hub name, "fingerprint": ...}; not for 'testbed'."""
    from rlhf_overopt.data.preferences import (
        PreferenceDataError,
        normalize_preferences,
        read_preference_source,
    )

    try:
        raw, identity = read_preference_source(cfg.proxy.dataset)
        return normalize_preferences(raw, source=cfg.proxy.dataset), identity
    except PreferenceDataError as exc:
        raise InputError(f"proxy.dataset: {exc}") from None


def proxy_cache_dir(cfg: Config, testbed, identity: dict[str, str] | None = None) -> Path:
    """<cache root>/proxies-<hash of what determines the trained weights>.

    With proxy.dataset=testbed the key is exactly the one written before proxy.dataset existed
    (the caches keep their folders); another dataset adds its identity (resolved path or hub name
    and a fingerprint of its contents: `identity`, read from proxy.dataset when not given), so an
    edited file trains anew.
    """
    entries: dict[str, Any] = {"proxy": proxy_key_settings(cfg), "policy": cfg.policy.path,
                               "seed": cfg.seed, "version": PROXY_CACHE_VERSION}
    if cfg.proxy.dataset == "testbed":
        entries["testbed"] = testbed.root.name
    else:
        entries["testbed"] = testbed.root.name if testbed is not None else None
        entries["dataset"] = identity if identity is not None else proxy_dataset(cfg)[1]
    key = json.dumps(entries, sort_keys=True)
    return cache_root(cfg, testbed) / f"proxies-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def saved_ensemble_identity(directory: str | Path) -> str | None:
    """'sha256:<hex>' of a saved ensemble's ensemble.json: its members, standardization statistics,
    validation accuracies and training config, which differ between any two trainings. None without
    one (loading the ensemble then stops the run, naming the folder)."""
    meta = Path(directory) / ENSEMBLE_FILE
    return sha256_file(meta) if meta.is_file() else None


def proxy_identity(cfg: Config, testbed) -> str | None:
    """The run's proxy ensemble's identity, for `_meta.identity.proxy_cache_key`: its cache
    folder's name (proxies-<hash>, the key of the proxy settings and the seed; known before
    anything trains), or with proxy.path saved_ensemble_identity of that folder. None when there
    is no testbed to train on or proxy.path holds no ensemble (ensure_proxies says why)."""
    if cfg.proxy.path:
        return saved_ensemble_identity(cfg.proxy.path)
    if cfg.proxy.dataset == "testbed" and testbed is None:
        return None
    return proxy_cache_dir(cfg, testbed).name


def _train_proxies(cfg: Config, testbed, out_dir: Path, device, prefs=None) -> None:
    """Train the ensemble into out_dir on `prefs` (proxy.dataset's pairs; the testbed's when None)."""
    from rlhf_overopt.rewards.training import train_ensemble

    train, val = split_prefs(testbed.load_prefs() if prefs is None else prefs, cfg.seed)
    train = limit_train_pairs(train, cfg.proxy.train_pairs)
    backbone = _proxy_backbone(cfg, testbed)
    tokenizer = _proxy_tokenizer(cfg, testbed, backbone)
    log.info("training %d %s proxies (%d train / %d val pairs of %s) into %s", cfg.proxy.k, cfg.proxy.kind,
             len(train), len(val), cfg.proxy.dataset, out_dir)
    # train_ensemble checks, standardizes (on the validation split's responses) and writes
    # atomically into out_dir
    train_ensemble(cfg.proxy.kind, backbone, tokenizer, train, val, out_dir, cfg.proxy, seed=cfg.seed,
                   make_backbone=_make_backbone(cfg, testbed, tokenizer), device=device, progress=True)


def ensure_proxies(cfg: Config, testbed, info: DistInfo, run: RunDir) -> ProxyEnsemble:
    """The run's proxy ensemble: loaded from proxy.path, from the cache, or trained (rank 0) first.

    The pairs are proxy.dataset's (read and checked on every rank before anything trains: a bad
    dataset stops the run with one line). Rank 0 writes proxies.json (proxy_report) into the run
    directory. The ensemble is on the CPU, its members in proxy.dtype (trained in float32).
    """
    dtype = getattr(torch, cfg.proxy.dtype)
    if cfg.proxy.path:
        return ProxyEnsemble.load(cfg.proxy.path, score_batch_size=cfg.proxy.score_batch_size, dtype=dtype,
                                  trust_remote_code=cfg.policy.trust_remote_code)
    prefs = identity = None
    if cfg.proxy.dataset != "testbed":
        prefs, identity = proxy_dataset(cfg)
    elif testbed is None:
        raise InputError("proxy.path is empty and there is no testbed to train proxies on; set proxy.path")
    out_dir = proxy_cache_dir(cfg, testbed, identity)
    _trained_once(out_dir, ENSEMBLE_FILE, lambda: _train_proxies(cfg, testbed, out_dir, info.device, prefs), info,
                  "proxies")
    ensemble = ProxyEnsemble.load(out_dir, score_batch_size=cfg.proxy.score_batch_size, dtype=dtype,
                                  trust_remote_code=cfg.policy.trust_remote_code)
    if info.is_main:
        run.write_json("proxies.json", proxy_report(ensemble, out_dir))
    return ensemble


def ensemble_dir(cfg: Config, testbed) -> Path:
    """Where the run's ensemble lives: proxy.path, or its cache folder (proxy.dataset is read again
    for its identity)."""
    return Path(cfg.proxy.path) if cfg.proxy.path else proxy_cache_dir(cfg, testbed)


def first_member_backbone(root: Path) -> Path:
    """A transformer checkpoint inside a saved ensemble to initialize a value model from:
    member_0 (independent, pretrain; warm: the weight average), the shared backbone (multihead) or
    the base (lora)."""
    for name in ("member_0", "backbone", "base"):
        if (root / name / "config.json").exists():
            return root / name
    raise InputError(f"{root}: no member_0/, backbone/ or base/ checkpoint to initialize a value model from")


def proxy_report(ensemble: ProxyEnsemble, out_dir: Path) -> dict[str, Any]:
    """What proxies.json records: where the ensemble lives, its members and their accuracies (for
    warm also what was averaged: K, seeds, init hash, each averaged member's accuracy)."""
    report = {
        "path": str(out_dir),
        "dataset": ensemble.train_config.get("dataset", "testbed"),
        "kind": ensemble.kind,
        "k": ensemble.k,
        "members": ensemble.member_names,
        "val_accuracy_noisy": ensemble.val_accuracy,
        "val_accuracy_clean": ensemble.val_accuracy_clean,
        "failed_members": ensemble.failed_members,
        "dropped_members": ensemble.dropped_members,
    }
    if ensemble.warm is not None:
        report["warm"] = ensemble.warm
    return report


# ---------------------------------------------------------------------------------------------
# Components (rlhf_overopt/rewards/components.py)
# ---------------------------------------------------------------------------------------------


def components_cache_dir(cfg: Config, testbed) -> Path:
    """<testbed cache>/components-<hash of the component definitions, proxy settings, policy, testbed, seed>."""
    proxy = proxy_key_settings(cfg)
    comp = to_dict(cfg.components)
    comp.pop("path", None)
    key = json.dumps({"components": comp, "proxy": proxy, "policy": cfg.policy.path, "testbed": testbed.root.name,
                      "seed": cfg.seed, "version": COMPONENTS_CACHE_VERSION}, sort_keys=True)
    return testbed.root.parent / f"components-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def components_identity(cfg: Config, testbed) -> str | None:
    """The run's component ensembles' identity, for `_meta.identity.components_cache_key`: their
    cache folder's name (components-<hash>), or with components.path the hash of each component's
    saved ensemble identity. None when there is no testbed to label components on."""
    comp = cfg.components
    if comp.path:
        saved = {name: saved_ensemble_identity(Path(comp.path) / name) for name in comp.names}
        return sha256_json(saved) if all(saved.values()) else None
    return None if testbed is None else components_cache_dir(cfg, testbed).name


def _candidate_pairs(cfg: Config, testbed, device) -> dict[str, list]:
    """Response pairs of the initial policy: the testbed's preference pairs, plus extra sampled pairs."""
    prefs = testbed.load_prefs()
    pairs = {"prompt": list(prefs["prompt"]), "first": list(prefs["chosen"]), "second": list(prefs["rejected"]),
             "first_ended": list(prefs["chosen_ended"]), "second_ended": list(prefs["rejected_ended"])}
    if cfg.components.pairs_per_prompt > 1:
        from rlhf_overopt.testbed.build import stage_seed
        from rlhf_overopt.testbed.data import sample_responses

        policy, tokenizer = testbed.load_policy(device), testbed.load_tokenizer()
        prompts = list(testbed.load_prompts()["train"]["prompt"])
        tb = cfg.testbed
        for r in range(1, cfg.components.pairs_per_prompt):
            doubled = [p for p in prompts for _ in range(2)]
            s = sample_responses(policy, tokenizer, doubled, tb.max_new_tokens, tb.gen_batch_size,
                                 stage_seed(cfg.seed, f"component-pairs-{r}"), progress=False,
                                 desc="component pairs")
            pairs["prompt"] += prompts
            pairs["first"] += s.responses[0::2]
            pairs["second"] += s.responses[1::2]
            pairs["first_ended"] += s.ended[0::2]
            pairs["second_ended"] += s.ended[1::2]
    return pairs


def _train_components(cfg: Config, testbed, out_dir: Path, device) -> None:
    """Stages 1-3 of rlhf_overopt/rewards/components.py's docstring for every component, into out_dir/<name>/."""
    from rlhf_overopt.rewards.gold import GoldScorer
    from rlhf_overopt.rewards.training import reference_responses, train_ensemble
    from rlhf_overopt.testbed.build import stage_seed

    comp = cfg.components
    # 1. pairs, and their gold terms
    pairs = _candidate_pairs(cfg, testbed, device)
    gold = GoldScorer.from_config(cfg, testbed)
    first = component_values(gold.components(pairs["prompt"], pairs["first"], pairs["first_ended"]), comp.terms)
    second = component_values(gold.components(pairs["prompt"], pairs["second"], pairs["second_ended"]), comp.terms)
    backbone = _proxy_backbone(cfg, testbed)
    tokenizer = _proxy_tokenizer(cfg, testbed, backbone)
    # initial-policy responses for standardization: the testbed pairs' validation split, as for the main proxies
    reference = reference_responses(split_prefs(testbed.load_prefs(), cfg.seed)[1])

    stats = {}
    for i, name in enumerate(comp.names):
        # 2. labels
        prefs = component_preferences(pairs["prompt"], pairs["first"], pairs["second"], pairs["first_ended"],
                                      pairs["second_ended"], first[i].tolist(), second[i].tolist(),
                                      comp.label_noise, stage_seed(cfg.seed, f"component-noise-{name}"))
        train, val = split_prefs(prefs, cfg.seed)
        train = limit_train_pairs(train, cfg.proxy.train_pairs)
        stats[name] = {"terms": comp.terms[i], "candidate_pairs": len(pairs["prompt"]), "pairs": len(prefs),
                       "train_pairs": len(train), "val_pairs": len(val)}
        log.info("component %s (%s): %d of %d pairs carry a preference; training %d %s proxies",
                 name, comp.terms[i], len(prefs), len(pairs["prompt"]), cfg.proxy.k, cfg.proxy.kind)
        # 3. train
        train_ensemble(cfg.proxy.kind, backbone, tokenizer, train, val, out_dir / name, cfg.proxy, seed=cfg.seed,
                       make_backbone=_make_backbone(cfg, testbed, tokenizer), reference=reference,
                       device=device, progress=True)
    (out_dir / COMPONENTS_FILE).write_text(json.dumps({"names": comp.names, "terms": comp.terms, "data": stats},
                                                      indent=2) + "\n")


def load_components(directory: str | Path, names: Sequence[str], terms: Sequence[str], *,
                    score_batch_size: int | None = None, trust_remote_code: bool = False,
                    dtype: torch.dtype = torch.float32) -> ComponentRewards:
    """The component ensembles saved under directory/<name>/, their members in `dtype`."""
    root = Path(directory)
    ensembles = [ProxyEnsemble.load(root / name, score_batch_size=score_batch_size, dtype=dtype,
                                    trust_remote_code=trust_remote_code) for name in names]
    return ComponentRewards(names, terms, ensembles, root=root)


def ensure_components(cfg: Config, testbed, info: DistInfo, run: RunDir) -> ComponentRewards:
    """The run's components: loaded from components.path, from the cache, or trained (rank 0) first.

    Rank 0 writes components.json into the run directory. The components are on `info.device`.
    """
    comp = cfg.components
    if comp.path:
        out_dir = Path(comp.path)
    else:
        if testbed is None:
            raise InputError("components.path is empty and there is no testbed to label components on")
        out_dir = components_cache_dir(cfg, testbed)
        _trained_once(out_dir, COMPONENTS_FILE, lambda: _train_components(cfg, testbed, out_dir, info.device),
                      info, "components")
    components = load_components(out_dir, comp.names, comp.terms, score_batch_size=cfg.proxy.score_batch_size,
                                 trust_remote_code=cfg.policy.trust_remote_code, dtype=getattr(torch, cfg.proxy.dtype))
    if info.is_main:
        data = json.loads((out_dir / COMPONENTS_FILE).read_text()) if (out_dir / COMPONENTS_FILE).exists() else {}
        run.write_json("components.json", {"path": str(out_dir), **components.report(), "data": data.get("data")})
    return components.to(info.device)
