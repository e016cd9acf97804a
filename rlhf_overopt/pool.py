"""The best-of-n stage over one scored pool: which n and which objectives to curve, and the
curves.jsonl rows of every (objective, n) from the unbiased estimator (rlhf_overopt.ops.bon), plus
the regularized (rbon_kl) and soft best-of-n selectors on the same pool.

The pool holds N samples per prompt, scored once by every proxy member (K, P, N) and by gold
(P, N); re-ranking the same pool by another aggregator gives that aggregator's curve, and the
KL of the best-of-n choice is the analytic `log n - (n - 1)/n` (Gao et al. 2022, §3.1), an upper
bound, logged beside the exact KL over the pool's empirical distribution (`kl_pool`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from rlhf_overopt.ops.aggregate import aggregate
from rlhf_overopt.ops.bon import bon_expected, bon_kl, expected_under, kl_pool, merged_kl, soft_bon_probs
from rlhf_overopt.run.directory import curve_row


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


def response_identity(prompt_index: list[int], responses: list[str], ended: list[bool], n_prompts: int,
                      pool_size: int) -> torch.Tensor:
    """(P, N) int64 ids of the pool's responses, equal within a prompt exactly for identical responses.

    A response is its text and whether it ended (a text cut at the length cap and the same text
    followed by EOS are different sequences, and the scorers see `ended`). Rows must be sorted by
    (prompt_index, sample), prompt-major, as the curves stage sorts them. The id is the sample
    index of the response's first copy in its prompt.
    """
    if len(responses) != n_prompts * pool_size or len(ended) != len(responses) or len(prompt_index) != len(responses):
        raise ValueError(f"response_identity: {len(responses)} responses for {n_prompts} prompts x pool {pool_size}")
    ids = torch.empty(n_prompts, pool_size, dtype=torch.int64)
    for p in range(n_prompts):
        first: dict[tuple[str, bool], int] = {}
        for j in range(pool_size):
            row = p * pool_size + j
            ids[p, j] = first.setdefault((responses[row], bool(ended[row])), j)
    return ids


def _at_choice(expect, gold: torch.Tensor, base: torch.Tensor, member_scores: torch.Tensor,
               response_tokens: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Expected gold, base objective, each member, member std and response length at the choice
    that `expect(values (P, N)) -> (G, P)` describes."""
    k = member_scores.shape[0]
    out = {
        "gold": expect(gold),
        "proxy": expect(base),
        "members": torch.stack([expect(member_scores[i]) for i in range(k)]),  # (K, G, P)
        # ensemble disagreement at the choice: population std over members of each sample's scores
        "member_std": expect(member_scores.to(torch.float64).std(dim=0, unbiased=False)),
    }
    if response_tokens is not None:
        out["length"] = expect(response_tokens.to(torch.float64))
    return out


def bon_curve_rows(member_scores: torch.Tensor, gold: torch.Tensor, aggregators: list[str], grid: list[int], *,
                   uwo_lambda: float = 0.5, std_k: float = 1.0, variance: str = "population",
                   response_ids: torch.Tensor | None = None, response_tokens: torch.Tensor | None = None,
                   ref_logprob: torch.Tensor | None = None, selectors: list[str] = (),
                   rbon_alphas: list[float] = (), soft_temperatures: list[float] = (),
                   selector_aggregators: list[str] = ()) -> list[dict[str, Any]]:
    """curves.jsonl rows for every aggregator and n, then for every (selector, parameter, base
    aggregator) and n. member_scores: (K, P, N); gold: (P, N); response_ids: (P, N) ids of
    identical responses (`response_identity`; None: every sample distinct); response_tokens:
    (P, N) response lengths (None: no `response_length`); ref_logprob: (P, N) summed response
    log-probs under the initial policy at temperature 1 (needed by rbon_kl).

    Every row has the analytic `kl` = log n - (n-1)/n (Gao et al. 2022) and `kl_pool`, the exact
    KL of the selection over the pool's empirical distribution with identical responses merged
    (`bon.kl_pool`; Beirami et al. 2024), plus the overoptimization signals at the choice:
    `proxy_member_std` (expected population std of the member scores) and `response_length`.
    Selector rows (`selector`, `selector_param`, `curve` = "<aggregator>+<selector>(<param>)"):
    - rbon_kl (Jinnai et al. 2024, arXiv 2404.01054): best-of-n of objective + alpha * ref_logprob,
      every expectation by the unbiased estimator (`estimator: unbiased`);
    - soft (Verdun et al. 2025, arXiv 2505.03156): y_i among n iid draws with probability
      proportional to exp(objective_i / lambda), expectations exact for the pool's empirical
      distribution with replacement (`bon.soft_bon_probs`; `estimator: exact_pool`, a plug-in,
      not a without-replacement U-statistic).
    For selector rows `kl` is the pool KL as well (the analytic bound holds for plain argmax
    best-of-n only), and `proxy_score` is the base aggregator's expected value.
    """
    k, n_prompts, pool = member_scores.shape
    if response_ids is None:
        response_ids = torch.arange(pool).expand(n_prompts, pool)

    def objective_of(name: str) -> torch.Tensor:
        return aggregate(member_scores.reshape(k, -1), name, uwo_lambda=uwo_lambda, std_k=std_k,
                         variance=variance).reshape(n_prompts, pool)

    def make_rows(name: str, at: dict[str, torch.Tensor], kl_at: torch.Tensor, extra: dict[str, Any],
                  analytic: bool) -> list[dict[str, Any]]:
        out = []
        for g, n in enumerate(grid):
            pool_kl = float(kl_at[g].mean())
            kl = float(bon_kl(n)) if analytic else pool_kl
            row = curve_row(
                method="bon",
                step=n,
                kl=kl,
                proxy_score=float(at["proxy"][g].mean()),
                proxy_member_scores=[float(at["members"][i, g].mean()) for i in range(k)],
                gold_score=float(at["gold"][g].mean()),
                aggregator=name,
                n=n,
                kl_pool=pool_kl,
                sqrt_kl_pool=math.sqrt(pool_kl),
                proxy_member_std=float(at["member_std"][g].mean()),
                gold_stderr=float(at["gold"][g].std() / math.sqrt(n_prompts)) if n_prompts > 1 else 0.0,
                gold_score_initial=float(gold.mean()),
                uwo_lambda=uwo_lambda,
                pool_size=pool,
                n_prompts=n_prompts,
                **extra,
            )
            if "length" in at:
                row["response_length"] = float(at["length"][g].mean())
            out.append(row)
        return out

    rows = []
    for name in aggregators:
        objective = objective_of(name)
        at = _at_choice(lambda v, o=objective: bon_expected(o, v, grid), gold, objective, member_scores,
                        response_tokens)
        rows += make_rows(name, at, kl_pool(objective, response_ids, grid),
                          {"curve": name, "estimator": "unbiased"}, analytic=True)
    for selector in selectors:
        for name in selector_aggregators:
            base = objective_of(name)
            if selector == "rbon_kl":
                if ref_logprob is None:
                    raise ValueError("bon_curve_rows: selector rbon_kl needs ref_logprob (P, N)")
                params, label = rbon_alphas, "alpha"
            elif selector == "soft":
                params, label = soft_temperatures, "lambda"
            else:
                raise ValueError(f"bon_curve_rows: unknown selector {selector!r} (known: rbon_kl, soft)")
            for param in params:
                extra = {"curve": f"{name}+{selector}({label}={param:g})", "selector": selector,
                         "selector_param": float(param)}
                if selector == "rbon_kl":
                    # Jinnai et al. 2024, §3: RBoN_KL ranks by r(y) + alpha * log pi_ref(y)
                    objective = base + float(param) * ref_logprob.to(torch.float64)
                    at = _at_choice(lambda v, o=objective: bon_expected(o, v, grid), gold, base,
                                    member_scores, response_tokens)
                    rows += make_rows(name, at, kl_pool(objective, response_ids, grid),
                                      {**extra, "estimator": "unbiased"}, analytic=False)
                else:
                    probs = soft_bon_probs(base, grid, float(param))
                    at = _at_choice(lambda v, pr=probs: expected_under(pr, v), gold, base, member_scores,
                                    response_tokens)
                    rows += make_rows(name, at, merged_kl(probs, response_ids),
                                      {**extra, "estimator": "exact_pool"}, analytic=False)
    return rows


def text_response_tokens(tokenizer, responses: list[str], ended: list[bool]) -> list[list[int]]:
    """Token ids of pool responses read back from text: tokenize(response) without special tokens,
    + EOS where the response ended (as a sampled response's mask counts it). A sampled pool's
    own counts come from the sampler; this serves a pool that lacks them (bon.pool, older runs)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the policy tokenizer has no eos_token")
    ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"] if responses else []
    return [list(r) + ([eos] if e else []) for r, e in zip(ids, ended)]


@torch.no_grad()
def text_ref_logprobs(policy, tokenizer, prompts: list[str], responses: list[str], ended: list[bool], *,
                      batch_size: int, progress: str = "") -> torch.Tensor:
    """Summed response log-probs log pi_ref(y | x) at temperature 1 of pool rows given as text.

    Queries are tokenized as the sampler does (`tokenize_prompts`, left-padded), responses by
    `text_response_tokens`, right-padded; one no-grad `sequence_logprobs` pass per batch, the
    policy in eval mode. Returns (B,) float32 on the CPU.
    Text is scored in its canonical tokenization: a sampled response whose tokens were not
    canonical (or whose bytes were not valid UTF-8, replaced on decoding) gets the log-prob of
    another token sequence with the same text. A sampled pool stores the sampler's own values.
    """
    from rlhf_overopt.rollout import sequence_logprobs, tokenize_prompts

    pad = tokenizer.pad_token_id  # tokenize_prompts refuses a tokenizer without a pad distinct from EOS
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    out = []
    starts = range(0, len(prompts), batch_size)
    if progress:
        from rlhf_overopt.run.progress import bar

        starts = bar(starts, desc=progress, unit="batch")
    try:
        for a in starts:
            query_ids, query_mask = tokenize_prompts(tokenizer, prompts[a:a + batch_size])
            tokens = text_response_tokens(tokenizer, responses[a:a + batch_size], ended[a:a + batch_size])
            width = max(1, max(map(len, tokens)))
            response_ids = torch.full((len(tokens), width), pad, dtype=torch.long)
            response_mask = torch.zeros((len(tokens), width), dtype=torch.long)
            for i, r in enumerate(tokens):
                response_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                response_mask[i, :len(r)] = 1
            logprobs = sequence_logprobs(policy, query_ids.to(device), query_mask.to(device), response_ids.to(device),
                                         response_mask.to(device), temperature=1.0)
            out.append(logprobs.sum(-1).float().cpu())
    finally:
        policy.train(was_training)
    return torch.cat(out)


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
    from rlhf_overopt.data.preferences import PreferenceDataError, read_preference_source
    from rlhf_overopt.errors import InputError

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
