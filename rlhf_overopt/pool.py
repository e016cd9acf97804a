"""The best-of-n stage over one scored pool: which n and which objectives to curve, and the
curves.jsonl rows of every (objective, n) from the unbiased estimator (rlhf_overopt.bon).

The pool holds N samples per prompt, scored once by every proxy member (K, P, N) and by gold
(P, N); re-ranking the same pool by another aggregator gives that aggregator's curve, and the
KL of the best-of-n choice is the analytic `log n - (n - 1)/n` (Gao et al. 2022, §3.1).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf_overopt.aggregate import aggregate
from rlhf_overopt.bon import bon_expected, bon_kl


def n_grid(pool_size: int, configured: list[int] = ()) -> list[int]:
    """The configured n values, or 1, 2, 4, ..., N (N itself included)."""
    if configured:
        return sorted(set(configured))
    grid, n = [], 1
    while n < pool_size:
        grid.append(n)
        n *= 2
    return grid + [pool_size]


def aggregator_names(configured: list[str], k: int) -> list[str]:
    """The configured aggregators with 'members' expanded to member_0 .. member_{k-1}."""
    names: list[str] = []
    for name in configured:
        names.extend([f"member_{i}" for i in range(k)] if name == "members" else [name])
    return list(dict.fromkeys(names))


def bon_curve_rows(member_scores: torch.Tensor, gold: torch.Tensor, aggregators: list[str], grid: list[int], *,
                   uwo_lambda: float = 0.5, std_k: float = 1.0, variance: str = "population") -> list[dict[str, Any]]:
    """curves.jsonl rows for every aggregator and n. member_scores: (K, P, N); gold: (P, N)."""
    k, n_prompts, pool = member_scores.shape
    rows = []
    for name in aggregators:
        objective = aggregate(member_scores.reshape(k, -1), name, uwo_lambda=uwo_lambda, std_k=std_k,
                              variance=variance).reshape(n_prompts, pool)
        gold_at = bon_expected(objective, gold, grid)  # (G, P)
        proxy_at = bon_expected(objective, objective, grid)
        members_at = torch.stack([bon_expected(objective, member_scores[i], grid) for i in range(k)])  # (K, G, P)
        for g, n in enumerate(grid):
            kl = float(bon_kl(n))
            rows.append({
                "method": "bon",
                "aggregator": name,
                "n": n,
                "step": n,
                "kl": kl,
                "sqrt_kl": math.sqrt(kl),
                "proxy_score": float(proxy_at[g].mean()),
                "proxy_member_scores": [float(members_at[i, g].mean()) for i in range(k)],
                "gold_score": float(gold_at[g].mean()),
                "gold_stderr": float(gold_at[g].std() / math.sqrt(n_prompts)) if n_prompts > 1 else 0.0,
                "gold_score_initial": float(gold.mean()),
                "uwo_lambda": uwo_lambda,
                "pool_size": pool,
                "n_prompts": n_prompts,
            })
    return rows


def pool_samples(pool, n: int, pool_size: int) -> list[dict[str, Any]]:
    """The best and worst sample by member 0 for the first n prompts, as a readable table."""
    rows = []
    for p in range(min(n, len(pool) // pool_size)):
        chunk = pool.select(range(p * pool_size, (p + 1) * pool_size))
        scores = [s[0] for s in chunk["proxy_scores"]]
        for tag, j in (("best_member_0", max(range(pool_size), key=scores.__getitem__)),
                       ("worst_member_0", min(range(pool_size), key=scores.__getitem__))):
            r = chunk[j]
            rows.append({"step": 0, "which": tag, "prompt": r["prompt"], "response": r["response"],
                         "ended": r["ended"], "gold_score": r["gold_score"], "proxy_member_scores": r["proxy_scores"]})
    return rows


POOL_COLUMNS = {"prompt": ("prompt", "query", "instruction"), "response": ("response", "completion", "output"),
                "gold_score": ("gold_score", "gold", "gold_reward", "gold_rm_score")}
"""Accepted names of a scored pool's columns (first match wins)."""


def read_scored_pool(source: str, pool_size: int, n_prompts: int) -> dict[str, Any]:
    """An existing scored pool (e.g. Coste et al.'s released gold-scored generations) as the pool
    columns this stage writes: prompt_index, sample, prompt, response, ended, gold_score, and
    proxy_scores when the pool carries member scores (a `proxy_scores` list column, or
    `member_<i>` columns), else None for the proxies to fill in.

    `source` is a local file (.jsonl/.json/.csv/.parquet), a save_to_disk folder or a hub name.
    Rows are grouped by prompt in order of first appearance; the first `n_prompts` prompts with at
    least `pool_size` samples are kept, their first `pool_size` samples each. Raises InputError
    naming the missing column, or how many prompts have a full pool.
    """
    from rlhf_overopt.errors import InputError
    from rlhf_overopt.preferences import PreferenceDataError, read_preference_source

    try:  # the one reader of local files, saved folders and hub names (a file's type, rows, splits checked there)
        data, _ = read_preference_source(source)
    except PreferenceDataError as exc:
        raise InputError(f"bon.pool: {exc}") from None
    names = {}
    for key, options in POOL_COLUMNS.items():
        found = next((c for c in options if c in data.column_names), None)
        if found is None:
            raise InputError(f"bon.pool: {source} has no {key} column (any of {', '.join(options)}); "
                             f"columns: {', '.join(data.column_names)}")
        names[key] = found
    member_cols = sorted((c for c in data.column_names if c.startswith("member_") and c[7:].isdigit()),
                         key=lambda c: int(c[7:]))
    groups: dict[str, list[int]] = {}
    prompts = data[names["prompt"]]
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(i)
    full = [rows[:pool_size] for rows in groups.values() if len(rows) >= pool_size][:n_prompts]
    if len(full) < n_prompts:
        raise InputError(f"bon.pool: {source} has {len(full)} prompts with at least bon.pool_size={pool_size} "
                         f"samples; eval.n_prompts asks for {n_prompts}")
    rows = [i for group in full for i in group]
    pick = data.select(rows)
    out: dict[str, Any] = {
        "prompt_index": [g for g, group in enumerate(full) for _ in group],
        "sample": [j for group in full for j in range(len(group))],
        "prompt": list(pick[names["prompt"]]), "response": list(pick[names["response"]]),
        "ended": [bool(v) for v in pick["ended"]] if "ended" in pick.column_names else [True] * len(rows),
        "gold_score": [float(v) for v in pick[names["gold_score"]]],
        "proxy_scores": None,
    }
    if "proxy_scores" in pick.column_names:
        out["proxy_scores"] = [list(map(float, v)) for v in pick["proxy_scores"]]
    elif member_cols:
        out["proxy_scores"] = [list(map(float, r)) for r in zip(*(pick[c] for c in member_cols))]
    return out
