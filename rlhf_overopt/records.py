"""Typed records passed between pipeline stages.

```
prompts ─▶ rollout ─▶ proxy ensemble ─▶ aggregate ─▶ update ─▶ gold eval ─▶ curves.jsonl
PromptBatch  Rollout                                          EvalSamples    EvalPoint
```

Padding conventions, relied on by every stage:
- queries are LEFT-padded, so the last query token of every row sits at column Tq - 1 and the
  response starts at column Tq of `cat(query, response)`;
- responses are RIGHT-padded: after the first EOS every token is the pad token and masked out.
Masks are int64 0/1 tensors; they are the truth about which positions are real (never infer
padding from token ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_overopt.run.directory import curve_row

Index = int | slice | Sequence[int] | torch.Tensor


def _as_index(indices: Index) -> slice | torch.Tensor:
    """Normalize an index so it selects rows and keeps the batch dimension."""
    if isinstance(indices, slice):
        return indices
    if isinstance(indices, int):
        return torch.tensor([indices], dtype=torch.long)
    if isinstance(indices, torch.Tensor):
        if indices.dtype == torch.bool:
            return indices.nonzero().flatten().cpu()
        return indices.long().flatten().cpu()
    return torch.tensor(list(indices), dtype=torch.long)


def _rows(x: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
    """Apply a normalized row index to a tensor on any device."""
    return x[index if isinstance(index, slice) else index.to(x.device)]


def _pick(items: list, index: slice | torch.Tensor) -> list:
    """Apply a row index to a python list the same way it is applied to tensors."""
    if isinstance(index, slice):
        return items[index]
    return [items[i] for i in index.tolist()]


def _pad_to(x: torch.Tensor, width: int, value: float, left: bool) -> torch.Tensor:
    """Pad a (B, T) tensor along dim 1 to `width` columns. Returns (B, width)."""
    missing = width - x.shape[1]
    if missing == 0:
        return x
    fill = torch.full((x.shape[0], missing), value, dtype=x.dtype, device=x.device)
    return torch.cat([fill, x] if left else [x, fill], dim=1)


@dataclass
class PromptBatch:
    """A batch of prompts, tokenized as left-padded queries."""

    prompt_ids: list[int]
    """Identifier of each prompt (its index in the prompt set), length B."""
    texts: list[str]
    """Prompt strings, length B."""
    query_ids: torch.Tensor
    """(B, Tq) int64, left-padded with the pad token."""
    query_mask: torch.Tensor
    """(B, Tq) int64, 1 on real query tokens, 0 on left padding."""

    def __post_init__(self) -> None:
        b = self.query_ids.shape[0]
        if self.query_mask.shape != self.query_ids.shape:
            raise ValueError(
                f"query_mask {tuple(self.query_mask.shape)} != query_ids {tuple(self.query_ids.shape)}"
            )
        if len(self.prompt_ids) != b or len(self.texts) != b:
            raise ValueError(
                f"batch of {b} queries has {len(self.prompt_ids)} prompt_ids and {len(self.texts)} texts"
            )

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def to(self, device: torch.device | str) -> PromptBatch:
        """Copy with the tensors on `device`."""
        return PromptBatch(self.prompt_ids, self.texts, self.query_ids.to(device), self.query_mask.to(device))

    def select(self, indices: Index) -> PromptBatch:
        """Rows `indices` (int, slice, list or index/bool tensor); widths are kept."""
        index = _as_index(indices)
        return PromptBatch(
            _pick(self.prompt_ids, index),
            _pick(self.texts, index),
            _rows(self.query_ids, index),
            _rows(self.query_mask, index),
        )

    def __getitem__(self, indices: Index) -> PromptBatch:
        return self.select(indices)


@dataclass
class Rollout:
    """Responses sampled from the policy for a batch of queries, with their sampling log-probs.

    `logprobs` are log pi(response_t | query, response_<t) of the sampling policy with logits
    divided by `temperature` and WITHOUT top-p filtering: the quantity every later log-prob pass
    recomputes (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO": divide by the temperature in every log-prob pass).
    """

    query_ids: torch.Tensor
    """(B, Tq) int64, left-padded with `pad_token_id`."""
    query_mask: torch.Tensor
    """(B, Tq) int64, 1 on real query tokens."""
    response_ids: torch.Tensor
    """(B, Tr) int64, right-padded: every token after the first EOS is `pad_token_id`."""
    response_mask: torch.Tensor
    """(B, Tr) int64, 1 up to and including the first EOS, 0 after."""
    logprobs: torch.Tensor
    """(B, Tr) float, sampling-policy log-probs of the response tokens at `temperature`; 0 where masked."""
    ended: torch.Tensor
    """(B,) bool, whether the response contains EOS (False: truncated at the length cap)."""
    prompts: list[str]
    """Prompt strings, length B."""
    responses: list[str]
    """Responses decoded without special tokens, length B."""
    pad_token_id: int
    """Token used for padding (distinct from EOS); needed to pad when concatenating."""
    temperature: float = 1.0
    """Sampling temperature the log-probs were computed at."""

    def __post_init__(self) -> None:
        b, tr = self.response_ids.shape
        if self.query_mask.shape != self.query_ids.shape or self.query_ids.shape[0] != b:
            raise ValueError(
                f"query_ids {tuple(self.query_ids.shape)} / query_mask {tuple(self.query_mask.shape)} "
                f"do not match response batch {b}"
            )
        for name in ("response_mask", "logprobs"):
            shape = tuple(getattr(self, name).shape)
            if shape != (b, tr):
                raise ValueError(f"{name} has shape {shape}, expected {(b, tr)}")
        if tuple(self.ended.shape) != (b,):
            raise ValueError(f"ended has shape {tuple(self.ended.shape)}, expected {(b,)}")
        if len(self.prompts) != b or len(self.responses) != b:
            raise ValueError(
                f"batch of {b} has {len(self.prompts)} prompts and {len(self.responses)} responses"
            )

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @property
    def response_length(self) -> torch.Tensor:
        """(B,) int64, number of real response tokens (EOS included)."""
        return self.response_mask.sum(dim=-1)

    def to(self, device: torch.device | str) -> Rollout:
        """Copy with the tensors on `device`."""
        return Rollout(
            query_ids=self.query_ids.to(device),
            query_mask=self.query_mask.to(device),
            response_ids=self.response_ids.to(device),
            response_mask=self.response_mask.to(device),
            logprobs=self.logprobs.to(device),
            ended=self.ended.to(device),
            prompts=self.prompts,
            responses=self.responses,
            pad_token_id=self.pad_token_id,
            temperature=self.temperature,
        )

    def select(self, indices: Index) -> Rollout:
        """Rows `indices` (int, slice, list or index/bool tensor), e.g. a PPO minibatch.

        Widths Tq and Tr are kept, so minibatches of one rollout batch stack without re-padding.
        """
        index = _as_index(indices)
        return Rollout(
            query_ids=_rows(self.query_ids, index),
            query_mask=_rows(self.query_mask, index),
            response_ids=_rows(self.response_ids, index),
            response_mask=_rows(self.response_mask, index),
            logprobs=_rows(self.logprobs, index),
            ended=_rows(self.ended, index),
            prompts=_pick(self.prompts, index),
            responses=_pick(self.responses, index),
            pad_token_id=self.pad_token_id,
            temperature=self.temperature,
        )

    def __getitem__(self, indices: Index) -> Rollout:
        return self.select(indices)

    @staticmethod
    def cat(rollouts: Sequence[Rollout]) -> Rollout:
        """Concatenate rollouts along the batch.

        Queries are left-padded and responses right-padded to the widest member (pad token, mask
        0, log-prob 0), so the padding conventions of the module docstring still hold.
        """
        if not rollouts:
            raise ValueError("Rollout.cat needs at least one rollout")
        first = rollouts[0]
        for r in rollouts[1:]:
            if r.pad_token_id != first.pad_token_id or r.temperature != first.temperature:
                raise ValueError(
                    "cannot concatenate rollouts with different pad_token_id or temperature: "
                    f"({first.pad_token_id}, {first.temperature}) vs ({r.pad_token_id}, {r.temperature})"
                )
        tq = max(r.query_ids.shape[1] for r in rollouts)
        tr = max(r.response_ids.shape[1] for r in rollouts)
        pad = first.pad_token_id
        return Rollout(
            query_ids=torch.cat([_pad_to(r.query_ids, tq, pad, left=True) for r in rollouts]),
            query_mask=torch.cat([_pad_to(r.query_mask, tq, 0, left=True) for r in rollouts]),
            response_ids=torch.cat([_pad_to(r.response_ids, tr, pad, left=False) for r in rollouts]),
            response_mask=torch.cat([_pad_to(r.response_mask, tr, 0, left=False) for r in rollouts]),
            logprobs=torch.cat([_pad_to(r.logprobs, tr, 0.0, left=False) for r in rollouts]),
            ended=torch.cat([r.ended for r in rollouts]),
            prompts=[p for r in rollouts for p in r.prompts],
            responses=[s for r in rollouts for s in r.responses],
            pad_token_id=pad,
            temperature=first.temperature,
        )


@dataclass
class EvalSamples:
    """Per-sample numbers of one gold evaluation: this rank's B samples, or every rank's once gathered
    (`rlhf_overopt.evaluate.gather_samples`, field by field).

    `proxy_score` is the objective the method optimizes before any shaping: the aggregated ensemble,
    or for composite methods the weighted sum of the component scores.
    """

    kl: torch.Tensor
    """(B,) float, KL(pi || pi_init) of each sequence, summed over its response tokens."""
    gold_score: torch.Tensor
    """(B,) float."""
    response_length: torch.Tensor
    """(B,) float, response tokens (EOS included)."""
    ended: torch.Tensor
    """(B,) float 0/1, whether the response contains EOS."""
    proxy_score: torch.Tensor
    """(B,) float, the objective before shaping."""
    member_scores: torch.Tensor
    """(K, B) float, every proxy member's score (the members of all components, grouped by component)."""
    member_names: list[str]
    """K names, in `member_scores` row order (`component/member` for composite methods)."""
    member_groups: list[int]
    """Members per component, summing to K ([K] for one ensemble): disagreement is measured within each."""
    proxy_shaped: torch.Tensor | None = None
    """(B,) float, the PAR-shaped objective with aggregate.shaping=par, else None."""
    component_names: list[str] = field(default_factory=list)
    """N component names (composite methods), else empty."""
    component_scores: torch.Tensor | None = None
    """(N, B) float, each component's aggregated proxy score (composite methods), else None."""
    gold_components: torch.Tensor | None = None
    """(N, B) float, the gold's terms summed per component (a testbed gold has terms), else None."""

    def __post_init__(self) -> None:
        b = self.gold_score.shape[0]
        for name in ("kl", "gold_score", "response_length", "ended", "proxy_score", "proxy_shaped"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (b,):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(b,)}")
        k = len(self.member_names)
        if tuple(self.member_scores.shape) != (k, b) or sum(self.member_groups) != k:
            raise ValueError(f"member_scores {tuple(self.member_scores.shape)} do not match {k} member names "
                             f"in groups {self.member_groups} over {b} samples")
        n = len(self.component_names)
        for name in ("component_scores", "gold_components"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != (n, b):
                raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {(n, b)}")

    def __len__(self) -> int:
        return self.gold_score.shape[0]


@dataclass
class EvalPoint:
    """One evaluation of a policy on the held-out prompts: a curves.jsonl row.

    `proxy_score` is the objective actually optimized before any shaping (the aggregated ensemble,
    or for composite methods the weighted sum of the component scores): what gold-vs-proxy curves
    compare; `proxy_shaped` the mean PAR-shaped score with aggregate.shaping=par (else absent);
    `proxy_member_scores` every member's mean (members of all components, grouped by component);
    `proxy_member_std` the mean over samples of the population std across members (within each
    component, averaged), the ensemble disagreement (Coste et al. 2023); `proxy_gold_spearman`
    the rank correlation of the per-sample proxy score and gold (None when either is constant);
    `response_length` the mean response tokens.
    """

    method: str
    step: int
    kl: float
    kl_estimator: str
    proxy_score: float
    proxy_member_scores: list[float]
    proxy_member_std: float
    gold_score: float
    gold_stderr: float
    aggregator: str
    eos_rate: float
    response_length: float
    n_eval: int
    components: dict[str, Any] = field(default_factory=dict)
    """component_names, component_scores and (testbed gold) gold_components, for composite methods."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Method keys: kl_coef, beta, lagrange_multipliers, reward_weights, ..."""
    proxy_gold_spearman: float | None = None
    proxy_shaped: float | None = None

    def row(self) -> dict[str, Any]:
        return curve_row(method=self.method, step=self.step, kl=self.kl, proxy_score=self.proxy_score,
                         proxy_member_scores=self.proxy_member_scores, gold_score=self.gold_score,
                         kl_estimator=self.kl_estimator, proxy_member_std=self.proxy_member_std,
                         proxy_gold_spearman=self.proxy_gold_spearman,
                         **({} if self.proxy_shaped is None else {"proxy_shaped": self.proxy_shaped}),
                         gold_stderr=self.gold_stderr, aggregator=self.aggregator, **self.components,
                         eos_rate=self.eos_rate, response_length=self.response_length, n_eval=self.n_eval,
                         **self.extra)
