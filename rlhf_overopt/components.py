"""Component rewards on the testbed: one proxy ensemble per aspect of gold (Moskovitz et al. 2023).

A composite reward is built from component reward models, each measuring one aspect of quality
and each useful only up to its *proxy point*. On the testbed a component is a named group of the
gold's terms (rlhf_overopt/testbed/gold.py): by default

    sentiment = the VADER term                          (what the review says)
    fluency   = repetition + eos + length               (non-degeneracy: no loops, ends, sane length)

Each component gets its own gold-labelled preferences and its own proxy ensemble:

    1. pairs    the testbed's response pairs of the initial policy (plus, with
                components.pairs_per_prompt > 1, extra pairs sampled from it)
    2. labels   chosen = the response with the larger sum of the component's gold terms; exact
                ties carry no preference and are dropped; components.label_noise of the labels
                are flipped (seeded per component)
    3. train    rlhf_overopt.proxy.train_ensemble with the proxy.* settings; members are
                standardized on initial-policy responses, so thresholds are in standard deviations
                of the initial policy
    4. cache    <testbed cache>/components-<hash>/<name>/, keyed by what determines the weights

Gold is the sum of all terms, so pushing either component alone eventually costs gold: sentiment
past some point buys long, repetitive, cut-off effusions (the length and EOS terms), fluency past
some point buys terse, bland reviews (the sentiment term) — the proxy points exist by design.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf_overopt import dist
from rlhf_overopt.aggregate import aggregate
from rlhf_overopt.config import AggregateConfig, Config, to_dict
from rlhf_overopt.evaluate import check_finite

log = logging.getLogger("rlhf_overopt")

COMPONENTS_CACHE_VERSION = 1
COMPONENTS_FILE = "components.json"


def component_values(parts: dict[str, torch.Tensor], terms: Sequence[str]) -> torch.Tensor:
    """Per component, the sum of its gold terms: `value_i = sum_{t in terms_i} parts[t]`.

    parts: the gold's terms, each (B,) (TestbedGold.components); terms: N '+'-joined groups.
    Returns (N, B) float32.
    """
    rows = []
    for group in terms:
        names = group.split("+")
        total = parts[names[0]].float()
        for term in names[1:]:
            total = total + parts[term].float()
        rows.append(total)
    return torch.stack(rows)


def component_preferences(prompts: Sequence[str], first: Sequence[str], second: Sequence[str],
                          first_ended: Sequence[bool], second_ended: Sequence[bool],
                          first_value: Sequence[float], second_value: Sequence[float],
                          label_noise: float, seed: int):
    """A preference `datasets.Dataset` for one component: chosen has the larger component value.

    Pairs with equal values are dropped (no preference); then exactly
    `round(label_noise * n_pairs)` seeded rows are flipped (`label_flipped`), as the testbed does
    for the gold labels (Coste et al. 2023, §4). `chosen_gold` / `rejected_gold` hold the clean
    component values, so proxy training reports accuracy against clean labels too.
    """
    import datasets

    rows = []
    for i, prompt in enumerate(prompts):
        if first_value[i] == second_value[i]:
            continue
        a_wins = first_value[i] > second_value[i]
        win, lose = (0, 1) if a_wins else (1, 0)
        texts, ended = (first[i], second[i]), (first_ended[i], second_ended[i])
        values = (first_value[i], second_value[i])
        rows.append({"prompt": prompt, "chosen": texts[win], "rejected": texts[lose],
                     "chosen_ended": bool(ended[win]), "rejected_ended": bool(ended[lose]),
                     "chosen_gold": float(values[win]), "rejected_gold": float(values[lose]), "label_flipped": False})
    for i in random.Random(seed).sample(range(len(rows)), round(label_noise * len(rows))):
        r = rows[i]
        for key in ("", "_ended", "_gold"):
            r["chosen" + key], r["rejected" + key] = r["rejected" + key], r["chosen" + key]
        r["label_flipped"] = True
    columns = ("prompt", "chosen", "rejected", "chosen_ended", "rejected_ended", "chosen_gold", "rejected_gold",
               "label_flipped")
    return datasets.Dataset.from_dict({c: [r[c] for r in rows] for c in columns})


def components_cache_dir(cfg: Config, testbed) -> Path:
    """<testbed cache>/components-<hash of the component definitions, proxy settings, policy, testbed, seed>."""
    from rlhf_overopt.loops.train_rm import proxy_key_settings

    proxy = proxy_key_settings(cfg)
    comp = to_dict(cfg.components)
    comp.pop("path", None)
    key = json.dumps({"components": comp, "proxy": proxy, "policy": cfg.policy.path, "testbed": testbed.root.name,
                      "seed": cfg.seed, "version": COMPONENTS_CACHE_VERSION}, sort_keys=True)
    return testbed.root.parent / f"components-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


class ComponentRewards:
    """N component proxy ensembles scored together.

    `score` gives every member's score (K_total, B), members grouped by component in
    `names` order, and each component's aggregated score (N, B) (the aggregator of
    cfg.aggregate applied within each component's ensemble).
    """

    def __init__(self, names: Sequence[str], terms: Sequence[str], ensembles: Sequence[Any],
                 root: Path | None = None) -> None:
        if not (len(names) == len(terms) == len(ensembles)):
            raise ValueError("ComponentRewards: names, terms and ensembles must have the same length")
        self.names, self.terms, self.ensembles = list(names), list(terms), list(ensembles)
        self.root = root
        """The folder holding one saved ensemble per component (None when built in memory)."""

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def member_counts(self) -> list[int]:
        return [e.k for e in self.ensembles]

    def to(self, device) -> ComponentRewards:
        for e in self.ensembles:
            e.to(device)
        return self

    def score(self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool], agg: AggregateConfig,
              step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(member_scores (K_total, B), component_scores (N, B)), on the CPU, checked finite."""
        members, combined = [], []
        for name, ensemble in zip(self.names, self.ensembles):
            scores = ensemble.score_texts(list(prompts), list(responses), list(ended)).float().cpu()
            check_finite(scores, f"component {name} proxy scores", step)
            members.append(scores)
            combined.append(aggregate(scores, agg.name, uwo_lambda=agg.uwo_lambda, std_k=agg.std_k,
                                      variance=agg.variance))
        return torch.cat(members), torch.stack(combined)

    def report(self) -> dict[str, Any]:
        return {name: {"terms": terms, "k": e.k, "val_accuracy_noisy": e.val_accuracy,
                       "val_accuracy_clean": e.val_accuracy_clean, "failed_members": e.failed_members}
                for name, terms, e in zip(self.names, self.terms, self.ensembles)}


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


def _train(cfg: Config, testbed, out_dir: Path, device) -> None:
    """Stages 1-3 of the module docstring for every component, into out_dir/<name>/."""
    from rlhf_overopt.gold import GoldScorer
    from rlhf_overopt.loops.train_rm import file_lock, limit_train_pairs, split_prefs
    from rlhf_overopt.proxy import reference_responses, train_ensemble
    from rlhf_overopt.testbed.build import stage_seed
    from rlhf_overopt.testbed.sft import train_sft_policy

    comp = cfg.components
    # 1. pairs, and their gold terms
    pairs = _candidate_pairs(cfg, testbed, device)
    gold = GoldScorer.from_config(cfg, testbed)
    first = component_values(gold.components(pairs["prompt"], pairs["first"], pairs["first_ended"]), comp.terms)
    second = component_values(gold.components(pairs["prompt"], pairs["second"], pairs["second_ended"]), comp.terms)
    tokenizer = testbed.load_tokenizer()
    backbone = str(testbed.policy_dir) if cfg.proxy.backbone == "policy" else cfg.proxy.backbone
    # initial-policy responses for standardization: the testbed pairs' validation split, as for the main proxies
    reference = reference_responses(split_prefs(testbed.load_prefs(), cfg.seed)[1])

    def make_backbone(seed: int) -> Path:
        target = testbed.root.parent / f"{testbed.root.name}-pretrain-{seed}"
        with file_lock(target.with_suffix(".lock")):
            if not (target / "config.json").exists():
                train_sft_policy(testbed.load_corpus(), tokenizer, cfg.testbed, seed, target)
        return target

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
                       make_backbone=make_backbone, reference=reference, device=device, progress=True)
    (out_dir / COMPONENTS_FILE).write_text(json.dumps({"names": comp.names, "terms": comp.terms, "data": stats},
                                                      indent=2) + "\n")


def load_components(directory: str | Path, names: Sequence[str], terms: Sequence[str], *,
                    score_batch_size: int | None = None, trust_remote_code: bool = False) -> ComponentRewards:
    """The component ensembles saved under directory/<name>/."""
    from rlhf_overopt.proxy import ProxyEnsemble

    root = Path(directory)
    ensembles = [ProxyEnsemble.load(root / name, score_batch_size=score_batch_size,
                                    trust_remote_code=trust_remote_code) for name in names]
    return ComponentRewards(names, terms, ensembles, root=root)


def ensure_components(ctx) -> ComponentRewards:
    """The run's components: loaded from components.path, from the cache, or trained (rank 0) first."""
    from rlhf_overopt.errors import InputError
    from rlhf_overopt.loops.train_rm import file_lock

    cfg = ctx.cfg
    comp = cfg.components
    if comp.path:
        out_dir = Path(comp.path)
    else:
        if ctx.testbed is None:
            raise InputError("components.path is empty and there is no testbed to label components on")
        out_dir = components_cache_dir(cfg, ctx.testbed)
        if ctx.dist.is_main:
            with file_lock(out_dir.with_suffix(".lock")):
                if not (out_dir / COMPONENTS_FILE).exists():
                    t = time.time()
                    _train(cfg, ctx.testbed, out_dir, ctx.device)
                    log.info("components trained in %.1f s", time.time() - t)
        dist.barrier()
    components = load_components(out_dir, comp.names, comp.terms, score_batch_size=cfg.proxy.score_batch_size,
                                 trust_remote_code=cfg.policy.trust_remote_code)
    if ctx.dist.is_main:
        data = json.loads((out_dir / COMPONENTS_FILE).read_text()) if (out_dir / COMPONENTS_FILE).exists() else {}
        ctx.run.write_json("components.json", {"path": str(out_dir), **components.report(), "data": data.get("data")})
    return components.to(ctx.device)
