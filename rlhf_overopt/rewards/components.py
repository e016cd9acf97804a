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
    3. train    rlhf_overopt.rewards.training.train_ensemble with the proxy.* settings; members are
                standardized on initial-policy responses, so thresholds are in standard deviations
                of the initial policy
    4. cache    <testbed cache>/components-<hash>/<name>/, keyed by what determines the weights

This module holds the labelling math and `ComponentRewards`, the scorer; stages 1-4 run in
rlhf_overopt/rewards/cache.py (`ensure_components`), the load-or-train cache shared with the proxies.

Gold is the sum of all terms, so pushing either component alone eventually costs gold: sentiment
past some point buys long, repetitive, cut-off effusions (the length and EOS terms), fluency past
some point buys terse, bland reviews (the sentiment term) — the proxy points exist by design.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf_overopt.config.sections import AggregateConfig
from rlhf_overopt.errors import check_finite
from rlhf_overopt.ops.aggregate import aggregator
from rlhf_overopt.ops.constrained import quadratic_peak


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
        combine = aggregator(agg.name, uwo_lambda=agg.uwo_lambda, std_k=agg.std_k, variance=agg.variance)
        members, combined = [], []
        for name, ensemble in zip(self.names, self.ensembles):
            scores = ensemble.score_texts(list(prompts), list(responses), list(ended)).float().cpu()
            check_finite(scores, f"component {name} proxy scores", step)
            members.append(scores)
            combined.append(combine(scores))
        return torch.cat(members), torch.stack(combined)

    def report(self) -> dict[str, Any]:
        return {name: {"terms": terms, "k": e.k, "val_accuracy_noisy": e.val_accuracy,
                       "val_accuracy_clean": e.val_accuracy_clean, "failed_members": e.failed_members}
                for name, terms, e in zip(self.names, self.terms, self.ensembles)}


def fit_proxy_point(values: list[float], gold: list[float]) -> dict[str, Any]:
    """Quadratic least-squares fit of gold against a component's value, and where it peaks.

    values, gold: one entry per evaluation point. Returns the coefficients (a, b, c) of
    `a + b v + c v^2`, the proxy point (the fit's maximum on the observed range of v), and the
    observed best point for comparison.
    """
    import numpy as np
    from scipy.linalg import lstsq

    x, y = np.asarray(values, dtype=np.float64), np.asarray(gold, dtype=np.float64)
    coef = lstsq(np.stack([np.ones_like(x), x, x * x], axis=1), y)[0]  # exact linear least squares
    best = int(np.argmax(y))
    return {
        "coefficients": [float(c) for c in coef],
        "proxy_point": float(quadratic_peak(tuple(float(c) for c in coef), float(x.min()), float(x.max()))),
        "observed_peak_value": float(x[best]),
        "observed_peak_gold": float(y[best]),
        "points": [[float(a), float(b)] for a, b in zip(x, y)],
    }
