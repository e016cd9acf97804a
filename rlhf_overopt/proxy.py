"""Proxy reward-model ensembles: Bradley–Terry training, failed-member checks, standardization,
batched scoring, save and load.

Four kinds of ensemble, each scoring a batch as `proxy_scores` (K, B):

- ``independent``: K full sequence-classification models from the same backbone; member i uses
  seed `seed + i` for its head init and data order (Coste et al. 2023: "same data and
  hyperparameters, different seeds"; Eisenstein et al. 2023: a "finetune ensemble").
- ``pretrain``: member i's backbone comes from its own pretraining run, `make_backbone(1000 +
  seed + i)` (Eisenstein et al. 2023: pretrain ensembles beat finetune ensembles).
- ``multihead``: one shared transformer (`AutoModel`) and a Linear(d, K) head; one forward gives
  all K scores, about 1/K of the cost of K models (DESIGN.md §5b). Heads differ by init seed and,
  with `multihead_bootstrap`, by data: each head's Bradley–Terry loss is computed on its own
  resample with replacement of every batch (an online bootstrap), and the loss summed over heads
  trains the shared trunk.
- ``lora``: one frozen sequence-classification base and K peft LoRA adapters, each with its own
  seeded LoRA init and its own copy of the score head (peft `modules_to_save`), trained one by
  one; scoring switches adapters with `set_adapter`.

After training every member is evaluated on validation pairs against the noisy labels it was
trained on and against clean (gold) labels. A member below `min_accuracy` is failed and handled
per `on_failed_member` — in the prototype one seed in five stayed at chance (DESIGN.md §5b), and
worst-case aggregation must not be silently poisoned by it. Each member is then standardized to
mean 0, std 1 on initial-policy responses (Coste et al. 2023), otherwise an uncertainty penalty
lambda means nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from rlhf_overopt.config import ProxyConfig
from rlhf_overopt.losses import bradley_terry_loss
from rlhf_overopt.masking import last_index
from rlhf_overopt.models import (
    backbone_from_pretrained,
    check_tokenizer,
    context_length,
    init_reward_head_,
    left_pad,
    load_tokenizer,
    model_device,
    position_ids_from_mask,
    quiet_transformers,
    reward_head,
    reward_model_from_pretrained,
    reward_scores,
    set_dropout_zero,
    tokenize_for_reward,
)
from rlhf_overopt.progress import bar

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("independent", "pretrain", "multihead", "lora")
ENSEMBLE_FILE = "ensemble.json"
HEADS_FILE = "heads.safetensors"
FORMAT_VERSION = 1
PRETRAIN_SEED_OFFSET = 1000
"""Member i of a pretrain ensemble gets its backbone from `make_backbone(1000 + seed + i)`."""
_MIN_STD = 1e-6
"""Floor of a member's reference std, so a constant member cannot produce inf scores."""


class FailedMemberError(RuntimeError):
    """Raised when ensemble members fail the validation-accuracy check and policy says stop."""


# ---------------------------------------------------------------------------------------------
# Shared-backbone heads
# ---------------------------------------------------------------------------------------------


class MultiHeadRewardModel(nn.Module):
    """A shared transformer and K scalar heads, read at the last real token.

    `backbone` is a transformers base model (`AutoModel`) returning `last_hidden_state`
    (B, T, d); `heads` is Linear(d, K), row i initialized N(0, 1/sqrt(d+1)) from its own seed.
    """

    def __init__(self, backbone: nn.Module, seeds: Sequence[int]) -> None:
        super().__init__()
        self.backbone = backbone
        d = backbone.config.hidden_size
        self.heads = nn.Linear(d, len(seeds))
        for i, seed in enumerate(seeds):
            row = nn.Linear(d, 1)
            init_reward_head_(row, torch.Generator().manual_seed(seed))
            with torch.no_grad():
                self.heads.weight[i].copy_(row.weight[0])
                self.heads.bias[i] = 0.0

    def hidden_at_last_token(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden state at each row's last real token. (B, T) -> (B, d)."""
        hidden = self.backbone(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, last_index(attention_mask).to(hidden.device)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """All K scores in one forward. input_ids, attention_mask: (B, T). Returns (B, K)."""
        return self.heads(self.hidden_at_last_token(input_ids, attention_mask))

    def drop_heads(self, keep: Sequence[int]) -> None:
        """Keep only the heads with the given indices, in that order."""
        index = torch.as_tensor(list(keep), dtype=torch.long, device=self.heads.weight.device)
        heads = nn.Linear(self.heads.in_features, len(keep)).to(self.heads.weight.device)
        with torch.no_grad():
            heads.weight.copy_(self.heads.weight[index])
            heads.bias.copy_(self.heads.bias[index])
        self.heads = heads


# ---------------------------------------------------------------------------------------------
# Preference data
# ---------------------------------------------------------------------------------------------


@dataclass
class EncodedPairs:
    """Tokenized preference pairs (unpadded id lists) and their clean labels."""

    chosen: list[list[int]]
    """Token ids of prompt + chosen (+ EOS when the chosen response ended), one list per pair."""
    rejected: list[list[int]]
    """Token ids of prompt + rejected (+ EOS when it ended)."""
    gold_chosen_better: torch.Tensor | None
    """(N,) bool: the gold score of chosen beats rejected (None without gold columns)."""
    gold_tie: torch.Tensor | None
    """(N,) bool: equal gold scores; such pairs have no clean label and are left out of it."""

    def __len__(self) -> int:
        return len(self.chosen)


def _column(dataset, name: str, default: Any) -> list:
    if name in dataset.column_names:
        return list(dataset[name])
    return [default] * len(dataset)


def encode_pairs(dataset, tokenizer, max_length: int) -> EncodedPairs:
    """Tokenize a preference `datasets.Dataset` once, for training and evaluation.

    Needs columns prompt, chosen, rejected; chosen_ended / rejected_ended default to True (a
    finished text) and chosen_gold / rejected_gold, when present, give the clean labels.
    """
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"preference dataset lacks column(s) {missing}; has {dataset.column_names}")
    prompts = list(dataset["prompt"])
    chosen = tokenize_for_reward(
        tokenizer, prompts, list(dataset["chosen"]), _column(dataset, "chosen_ended", True), max_length
    )
    rejected = tokenize_for_reward(
        tokenizer, prompts, list(dataset["rejected"]), _column(dataset, "rejected_ended", True), max_length
    )
    better = tie = None
    if "chosen_gold" in dataset.column_names and "rejected_gold" in dataset.column_names:
        gold_c = torch.as_tensor(list(dataset["chosen_gold"]), dtype=torch.float64)
        gold_r = torch.as_tensor(list(dataset["rejected_gold"]), dtype=torch.float64)
        better, tie = gold_c > gold_r, gold_c == gold_r
    return EncodedPairs(chosen, rejected, better, tie)


def reference_responses(dataset) -> tuple[list[str], list[str], list[bool]]:
    """(prompts, responses, ended) of every response in a preference dataset, chosen then rejected.

    These are initial-policy samples: the reference distribution for standardization.
    """
    prompts = list(dataset["prompt"])
    responses = list(dataset["chosen"]) + list(dataset["rejected"])
    ended = [
        bool(e) for e in _column(dataset, "chosen_ended", True) + _column(dataset, "rejected_ended", True)
    ]
    return prompts + prompts, responses, ended


# ---------------------------------------------------------------------------------------------
# Bradley–Terry fitting (one loop for every kind)
# ---------------------------------------------------------------------------------------------


def _fit_bradley_terry(
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    params: Sequence[nn.Parameter],
    pairs: EncodedPairs,
    *,
    pad_token_id: int,
    n_heads: int,
    cfg: ProxyConfig,
    seed: int,
    device: torch.device,
    desc: str,
    progress: bool,
) -> dict[str, float]:
    """Train `params` with AdamW on the Bradley–Terry loss over `pairs`; returns last-epoch stats.

    `forward(input_ids, attention_mask) -> (B, n_heads)` scores. Chosen and rejected of a batch
    go through one forward (left-padded together). Data order comes from a generator seeded with
    `seed`. With several heads the loss is the sum of each head's BT loss; with
    `cfg.multihead_bootstrap` each head sees its own resample with replacement of the batch.
    """
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order_gen = torch.Generator().manual_seed(seed)
    boot_gen = torch.Generator().manual_seed(seed + 1)
    n = len(pairs)
    steps = cfg.epochs * math.ceil(n / cfg.batch_size)
    progress_bar = bar(total=steps, desc=desc, disable=not progress, leave=False)
    stats: dict[str, float] = {}
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=order_gen).tolist()
        loss_sum = acc_sum = 0.0
        n_steps = 0
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            b = len(idx)
            ids, mask = left_pad(
                [pairs.chosen[i] for i in idx] + [pairs.rejected[i] for i in idx], pad_token_id
            )
            scores = forward(ids.to(device), mask.to(device))  # (2b, H)
            chosen, rejected = scores[:b], scores[b:]
            loss = scores.new_zeros(())
            acc = 0.0
            for h in range(n_heads):
                if n_heads > 1 and cfg.multihead_bootstrap:
                    sel = torch.randint(0, b, (b,), generator=boot_gen).to(device)
                    loss_h, acc_h = bradley_terry_loss(chosen[sel, h], rejected[sel, h], cfg.offset_eta)
                else:
                    loss_h, acc_h = bradley_terry_loss(chosen[:, h], rejected[:, h], cfg.offset_eta)
                loss = loss + loss_h
                acc += float(acc_h) / n_heads
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_loss = loss.item() / n_heads
            loss_sum += step_loss
            acc_sum += acc
            n_steps += 1
            progress_bar.update(1)
            progress_bar.set_postfix(epoch=epoch, loss=f"{step_loss:.3f}", acc=f"{acc:.2f}")
        stats = {"train_loss": loss_sum / max(n_steps, 1), "train_accuracy": acc_sum / max(n_steps, 1)}
    progress_bar.close()
    return stats


# ---------------------------------------------------------------------------------------------
# The ensemble
# ---------------------------------------------------------------------------------------------


class ProxyEnsemble:
    """K proxy reward models scored together: `score_texts` / `score_ids` -> (K, B).

    Build one with `train_ensemble` or `ProxyEnsemble.load`. Scores are standardized per member
    with the saved reference mean and std when `standardize` is on (Coste et al. 2023).
    """

    def __init__(
        self,
        kind: str,
        tokenizer,
        member_names: Sequence[str],
        *,
        models: Sequence[nn.Module] | None = None,
        multihead: MultiHeadRewardModel | None = None,
        peft_model: nn.Module | None = None,
        lora_base_state: dict[str, torch.Tensor] | None = None,
        max_length: int,
        score_batch_size: int = 256,
        standardize: bool = True,
        score_method: str = "loop",
        score_mean: Sequence[float] | None = None,
        score_std: Sequence[float] | None = None,
        val_accuracy: dict[str, float] | None = None,
        val_accuracy_clean: dict[str, float | None] | None = None,
        failed_members: Sequence[str] = (),
        dropped_members: Sequence[str] = (),
        train_config: dict[str, Any] | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown ensemble kind {kind!r} (known: {', '.join(KINDS)})")
        if score_method not in ("loop", "vmap"):
            raise ValueError(f"score_method must be 'loop' or 'vmap', got {score_method!r}")
        check_tokenizer(tokenizer)
        self.kind = kind
        self.tokenizer = tokenizer
        self.member_names: list[str] = list(member_names)
        self.models: list[nn.Module] = list(models or [])
        self.multihead = multihead
        self.peft_model = peft_model
        # The frozen base's own tensors (shared storage, no copy), kept to save the base
        # without the LoRA layers peft injected into it.
        self._lora_base_state = lora_base_state
        self.max_length = max_length
        self.score_batch_size = score_batch_size
        self.standardize = standardize
        self.score_method = score_method
        self.score_mean = None if score_mean is None else torch.as_tensor(score_mean, dtype=torch.float32)
        self.score_std = None if score_std is None else torch.as_tensor(score_std, dtype=torch.float32)
        self.val_accuracy: dict[str, float] = dict(val_accuracy or {})
        self.val_accuracy_clean: dict[str, float | None] = dict(val_accuracy_clean or {})
        self.failed_members: list[str] = list(failed_members)
        self.dropped_members: list[str] = list(dropped_members)
        self.train_config: dict[str, Any] = dict(train_config or {})
        self._stacked: tuple[dict, dict, nn.Module] | None = None
        self._vmap_ok: bool | None = None
        self._check_members()

    def _check_members(self) -> None:
        k = len(self.member_names)
        if k == 0:
            raise ValueError("an ensemble needs at least one member")
        if self.kind in ("independent", "pretrain") and len(self.models) != k:
            raise ValueError(f"{self.kind}: {len(self.models)} models for {k} member names")
        if self.kind == "multihead" and (self.multihead is None or self.multihead.heads.out_features != k):
            raise ValueError(f"multihead: the head count must equal the {k} member names")
        if self.kind == "lora" and self.peft_model is None:
            raise ValueError("lora: a peft model is required")
        for name, stats in (("score_mean", self.score_mean), ("score_std", self.score_std)):
            if stats is not None and stats.shape != (k,):
                raise ValueError(f"{name} must have one entry per member ({k}), got {tuple(stats.shape)}")

    # -- properties ---------------------------------------------------------------------------

    @property
    def k(self) -> int:
        """Number of members."""
        return len(self.member_names)

    @property
    def device(self) -> torch.device:
        """Device of the ensemble's parameters."""
        return model_device(self._modules()[0])

    def _modules(self) -> list[nn.Module]:
        if self.kind in ("independent", "pretrain"):
            return self.models
        if self.kind == "multihead":
            return [self.multihead]
        return [self.peft_model]

    def to(self, device: str | torch.device) -> ProxyEnsemble:
        """Move every member to `device`; returns self."""
        for module in self._modules():
            module.to(device)
        self._stacked = None
        return self

    def eval(self) -> ProxyEnsemble:
        """Eval mode for every member (dropout is zero anyway); returns self."""
        for module in self._modules():
            module.eval()
        return self

    # -- raw scores ---------------------------------------------------------------------------

    def _member_scores(
        self, index: int, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Raw scores of one member alone: the reference every batched path must equal. (B,)"""
        if self.kind in ("independent", "pretrain"):
            return reward_scores(self.models[index], input_ids, attention_mask)
        if self.kind == "multihead":
            hidden = self.multihead.hidden_at_last_token(input_ids, attention_mask)
            heads = self.multihead.heads
            return hidden @ heads.weight[index] + heads.bias[index]
        self.peft_model.set_adapter(self.member_names[index])
        return reward_scores(self.peft_model, input_ids, attention_mask)

    def _stacked_members(self) -> tuple[dict, dict, nn.Module]:
        """Member weights stacked along a new leading K dim, and a weightless copy to call.

        The copy uses eager attention: vmap has no batching rule for CPU SDPA kernels and falls
        back to a slow per-member loop there (measured with torch 2.13).
        """
        if self._stacked is None:
            params, buffers = torch.func.stack_module_state(self.models)
            skeleton = copy.deepcopy(self.models[0])
            if hasattr(skeleton, "set_attn_implementation"):
                skeleton.set_attn_implementation("eager")
            self._stacked = (params, buffers, skeleton.to("meta"))
        return self._stacked

    def _vmap_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """All independent members in one vectorized call (torch.func.vmap over members). (K, B)"""
        params, buffers, skeleton = self._stacked_members()
        position_ids = position_ids_from_mask(attention_mask)

        def one(p: dict, b: dict, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            out = torch.func.functional_call(
                skeleton, (p, b), (), {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
            )
            return out.logits[:, 0]

        return torch.vmap(one, in_dims=(0, 0, None, None, None))(
            params, buffers, input_ids, attention_mask, position_ids
        )

    def _raw_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
        """(K, B) raw scores by the kind's fast path. `method` matters for independent/pretrain
        only: multihead is always one forward, lora always switches adapters."""
        if self.kind == "multihead":
            return self.multihead(input_ids, attention_mask).T
        if method == "vmap" and self.kind != "lora" and self._vmap_possible():
            return self._vmap_scores(input_ids, attention_mask)
        return torch.stack([self._member_scores(i, input_ids, attention_mask) for i in range(self.k)])

    def _vmap_possible(self) -> bool:
        """All members share one architecture (same parameter names and shapes); said once if not."""
        if self._vmap_ok is None:
            first = {n: p.shape for n, p in self.models[0].named_parameters()}
            self._vmap_ok = all(
                {n: p.shape for n, p in m.named_parameters()} == first for m in self.models[1:]
            )
            if not self._vmap_ok:
                logger.warning(
                    "proxy members differ in architecture; score_method=vmap falls back to the loop"
                )
        return self._vmap_ok

    # -- public scoring -----------------------------------------------------------------------

    def _standardized(self, raw: torch.Tensor) -> torch.Tensor:
        if self.score_mean is None or self.score_std is None:
            raise RuntimeError(
                "standardized scores asked for, but no reference statistics were fitted; call "
                "fit_standardization(...) or pass standardized=False"
            )
        mean = self.score_mean.to(raw.device, raw.dtype)[:, None]
        std = self.score_std.to(raw.device, raw.dtype)[:, None]
        return (raw - mean) / std

    @torch.no_grad()
    def score_ids(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        standardized: bool | None = None,
        method: str | None = None,
    ) -> torch.Tensor:
        """Member scores of left-padded token ids, in chunks of `score_batch_size`.

        input_ids, attention_mask: (B, T), the reward-model input (prompt + response, EOS
        included where the response ended). `standardized` defaults to the ensemble's
        `standardize`; `method` ('loop' or 'vmap', used by independent/pretrain ensembles)
        to its `score_method`. Returns proxy_scores (K, B) float32 on the ensemble's device.
        """
        if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                "must both be (B, T)"
            )
        method = method or self.score_method
        if method not in ("loop", "vmap"):
            raise ValueError(f"method must be 'loop' or 'vmap', got {method!r}")
        standardized = self.standardize if standardized is None else standardized
        device = self.device
        chunks = []
        for start in range(0, input_ids.shape[0], self.score_batch_size):
            ids = input_ids[start : start + self.score_batch_size].to(device)
            mask = attention_mask[start : start + self.score_batch_size].to(device)
            # Columns that are padding in every row change nothing (left-padding invariance);
            # dropping them saves compute when a chunk is shorter than the whole batch.
            real_cols = mask.any(dim=0).nonzero()
            first = int(real_cols[0]) if real_cols.numel() else 0
            chunks.append(self._raw_scores(ids[:, first:], mask[:, first:], method).float())
        raw = torch.cat(chunks, dim=1) if chunks else torch.zeros(self.k, 0, device=device)
        return self._standardized(raw) if standardized else raw

    @torch.no_grad()
    def score_texts(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        ended: Sequence[bool],
        *,
        standardized: bool | None = None,
        method: str | None = None,
        progress: str = "",
    ) -> torch.Tensor:
        """Member scores of `prompt + response` texts (+ EOS where `ended`). Returns (K, B)."""
        seqs = tokenize_for_reward(self.tokenizer, prompts, responses, ended, self.max_length)
        return self.score_sequences(seqs, standardized=standardized, method=method, progress=progress)

    @torch.no_grad()
    def score_sequences(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        standardized: bool | None = None,
        method: str | None = None,
        progress: str = "",
    ) -> torch.Tensor:
        """Member scores of unpadded token-id lists (reward-model input). Returns (K, B).

        Sequences are sorted by length before batching so each chunk pads little; the result is
        in input order. `progress`, when non-empty, shows a progress bar with that description.
        """
        seqs = list(sequences)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        method = method or self.score_method
        standardized = self.standardize if standardized is None else standardized
        out = torch.zeros(self.k, len(seqs), device=self.device)
        starts = range(0, len(order), self.score_batch_size)
        if progress:
            from rlhf_overopt.progress import bar

            starts = bar(starts, desc=progress, unit="batch")
        for start in starts:
            idx = order[start : start + self.score_batch_size]
            ids, mask = left_pad([seqs[i] for i in idx], self.tokenizer.pad_token_id)
            out[:, idx] = self.score_ids(ids, mask, standardized=False, method=method)
        return self._standardized(out) if standardized else out

    # -- validation, failed members, standardization -----------------------------------------

    @torch.no_grad()
    def evaluate(self, pairs: EncodedPairs) -> tuple[dict[str, float], dict[str, float | None]]:
        """Per-member validation accuracy vs the dataset's (noisy) labels and vs gold labels.

        Noisy: fraction of pairs with r(chosen) > r(rejected) (ties count as wrong, as in
        `bradley_terry_loss`). Clean: fraction of pairs, gold ties left out, where the member
        orders the pair as the gold scores do; None without gold columns.
        """
        if len(pairs) == 0:
            raise ValueError("the validation set is empty; member accuracy cannot be checked")
        chosen = self.score_sequences(pairs.chosen, standardized=False)
        rejected = self.score_sequences(pairs.rejected, standardized=False)
        member_prefers_chosen = (chosen > rejected).cpu()  # (K, N)
        noisy = member_prefers_chosen.float().mean(dim=1)
        clean: list[float | None] = [None] * self.k
        if pairs.gold_chosen_better is not None:
            keep = ~pairs.gold_tie
            if keep.any():
                agree = member_prefers_chosen[:, keep] == pairs.gold_chosen_better[keep]
                # A member tie (r+ == r-) is an answer of neither; count it as wrong.
                tied = (chosen == rejected).cpu()[:, keep]
                clean = ((agree & ~tied).float().mean(dim=1)).tolist()
        names = self.member_names
        return dict(zip(names, noisy.tolist())), dict(zip(names, clean))

    def check_members(self, pairs: EncodedPairs, min_accuracy: float, on_failed_member: str) -> list[str]:
        """Evaluate members, record accuracies, and handle those below `min_accuracy`.

        on_failed_member: 'error' raises FailedMemberError; 'warn' keeps them and logs a
        warning; 'drop' removes them (at least one member must remain, or FailedMemberError).
        Returns the names of the failed members (DESIGN.md §5b).
        """
        if on_failed_member not in ("error", "warn", "drop"):
            raise ValueError(f"on_failed_member must be error, warn or drop, got {on_failed_member!r}")
        noisy, clean = self.evaluate(pairs)
        self.val_accuracy.update(noisy)
        self.val_accuracy_clean.update(clean)
        for name in self.member_names:
            clean_text = "n/a" if clean[name] is None else f"{clean[name]:.3f}"
            logger.info(
                "proxy %s: val accuracy %.3f (noisy labels), %s (clean labels)", name, noisy[name], clean_text
            )
        failed = [name for name in self.member_names if noisy[name] < min_accuracy]
        self.failed_members = sorted(set(self.failed_members) | set(failed), key=_member_index)
        if not failed:
            return []
        detail = ", ".join(f"{name} ({noisy[name]:.3f})" for name in failed)
        message = (
            f"{len(failed)} of {self.k} proxy members have validation accuracy below "
            f"min_accuracy={min_accuracy}: {detail}"
        )
        if on_failed_member == "error":
            raise FailedMemberError(message + "; set proxy.on_failed_member to warn or drop to go on")
        if on_failed_member == "warn":
            logger.warning(
                "%s; kept (proxy.on_failed_member=warn) — they can poison min/UWO aggregation", message
            )
            return failed
        if len(failed) == self.k:
            raise FailedMemberError(message + "; every member failed, none left to keep")
        logger.warning(
            "%s; dropped (proxy.on_failed_member=drop), %d members remain", message, self.k - len(failed)
        )
        self.drop_members(failed)
        return failed

    def drop_members(self, names: Sequence[str]) -> None:
        """Remove members by name (their accuracies stay on record)."""
        unknown = [n for n in names if n not in self.member_names]
        if unknown:
            raise ValueError(f"unknown member(s) {unknown}; members are {self.member_names}")
        keep = [i for i, n in enumerate(self.member_names) if n not in set(names)]
        if not keep:
            raise ValueError("cannot drop every member of an ensemble")
        if self.kind in ("independent", "pretrain"):
            self.models = [self.models[i] for i in keep]
        elif self.kind == "multihead":
            self.multihead.drop_heads(keep)
        else:
            for name in names:
                self.peft_model.delete_adapter(name)
        if self.score_mean is not None:
            self.score_mean = self.score_mean[keep]
            self.score_std = self.score_std[keep]
        self.dropped_members.extend(names)
        self.member_names = [self.member_names[i] for i in keep]
        self._stacked = None
        self._vmap_ok = None

    def fit_standardization(
        self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool]
    ) -> None:
        """Record each member's raw score mean and (population) std on reference responses.

        The reference should be initial-policy samples, so that standardized scores are
        comparable across members at the start of optimization (Coste et al. 2023).
        """
        raw = self.score_texts(prompts, responses, ended, standardized=False).cpu()
        if raw.shape[1] < 2:
            raise ValueError("standardization needs at least two reference responses")
        std = raw.std(dim=1, unbiased=False)
        for name, s in zip(self.member_names, std.tolist()):
            if s < _MIN_STD:
                logger.warning("proxy %s: constant on the reference set (std %.2e); std floored", name, s)
        self.score_mean = raw.mean(dim=1)
        self.score_std = std.clamp(min=_MIN_STD)

    # -- save / load --------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Save the ensemble to `directory`, atomically.

        Layout: ensemble.json (kind, members, standardization stats, accuracies, training config),
        tokenizer/, and per kind: member_<i>/ save_pretrained folders (independent, pretrain);
        backbone/ + heads.safetensors (multihead); base/ + member_<i>/ peft adapter folders
        (lora). Everything is written into a temporary sibling folder that replaces `directory`
        only when complete, so a killed run never leaves a half-written ensemble.
        """
        final = Path(directory)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            self._write(tmp)
            if final.exists():
                # os.replace cannot put a folder over a non-empty one: move the old aside first.
                old = final.parent / f".{final.name}.old-{os.getpid()}"
                if old.exists():
                    shutil.rmtree(old)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def _write(self, out: Path) -> None:
        from safetensors.torch import save_file

        with quiet_transformers():
            self.tokenizer.save_pretrained(str(out / "tokenizer"))
            if self.kind in ("independent", "pretrain"):
                for name, model in zip(self.member_names, self.models):
                    model.save_pretrained(str(out / name))
            elif self.kind == "multihead":
                self.multihead.backbone.save_pretrained(str(out / "backbone"))
                heads = self.multihead.heads
                save_file(
                    {
                        "weight": heads.weight.detach().cpu().contiguous(),
                        "bias": heads.bias.detach().cpu().contiguous(),
                    },
                    str(out / HEADS_FILE),
                )
            else:
                base = self.peft_model.get_base_model()
                state = {k: v.detach().cpu().contiguous() for k, v in self._lora_base_state.items()}
                base.save_pretrained(str(out / "base"), state_dict=state)
                self.peft_model.save_pretrained(str(out), selected_adapters=self.member_names)
                readme = out / "README.md"  # peft's model-card stub, not part of the format
                if readme.exists():
                    readme.unlink()
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "k": self.k,
            "member_names": self.member_names,
            "standardize": self.standardize,
            "score_mean": None if self.score_mean is None else self.score_mean.tolist(),
            "score_std": None if self.score_std is None else self.score_std.tolist(),
            "val_accuracy": self.val_accuracy,
            "val_accuracy_clean": self.val_accuracy_clean,
            "failed_members": self.failed_members,
            "dropped_members": self.dropped_members,
            "max_length": self.max_length,
            "score_batch_size": self.score_batch_size,
            "score_method": self.score_method,
            "train_config": self.train_config,
        }
        (out / ENSEMBLE_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        score_batch_size: int | None = None,
    ) -> ProxyEnsemble:
        """Load an ensemble written by `save`. Weights are read from safetensors only."""
        from transformers import AutoModelForSequenceClassification

        root = Path(directory)
        meta_path = root / ENSEMBLE_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{root} holds no {ENSEMBLE_FILE}; not a saved proxy ensemble")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
        kind, names = meta["kind"], list(meta["member_names"])
        tokenizer = load_tokenizer(root / "tokenizer", trust_remote_code=trust_remote_code)
        kwargs: dict[str, Any] = {}

        def seq_cls(path: Path) -> nn.Module:
            with quiet_transformers():
                model = AutoModelForSequenceClassification.from_pretrained(
                    str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
                )
            return set_dropout_zero(model.eval())

        if kind in ("independent", "pretrain"):
            kwargs["models"] = [seq_cls(root / name) for name in names]
        elif kind == "multihead":
            from safetensors.torch import load_file

            backbone = backbone_from_pretrained(
                root / "backbone", dtype=dtype, trust_remote_code=trust_remote_code
            )
            model = MultiHeadRewardModel(backbone, seeds=[0] * len(names))
            state = load_file(str(root / HEADS_FILE))
            model.heads.load_state_dict(
                {"weight": state["weight"].to(dtype), "bias": state["bias"].to(dtype)}
            )
            kwargs["multihead"] = model.eval()
        elif kind == "lora":
            from peft import PeftModel

            base = seq_cls(root / "base")
            base_state = dict(base.state_dict())
            for name in names:
                if not (root / name / "adapter_model.safetensors").is_file():
                    raise FileNotFoundError(f"{root / name} has no adapter_model.safetensors")
            with quiet_transformers():
                peft_model = PeftModel.from_pretrained(base, str(root / names[0]), adapter_name=names[0])
                for name in names[1:]:
                    peft_model.load_adapter(str(root / name), adapter_name=name)
            kwargs["peft_model"] = peft_model.eval()
            kwargs["lora_base_state"] = base_state
        else:
            raise ValueError(f"{meta_path}: unknown kind {kind!r}")
        ensemble = cls(
            kind,
            tokenizer,
            names,
            max_length=meta["max_length"],
            score_batch_size=score_batch_size or meta["score_batch_size"],
            standardize=meta["standardize"],
            score_method=meta["score_method"],
            score_mean=meta["score_mean"],
            score_std=meta["score_std"],
            val_accuracy=meta["val_accuracy"],
            val_accuracy_clean=meta["val_accuracy_clean"],
            failed_members=meta["failed_members"],
            dropped_members=meta["dropped_members"],
            train_config=meta["train_config"],
            **kwargs,
        )
        return ensemble.to(device)


def _member_index(name: str) -> int:
    return int(name.rsplit("_", 1)[-1])


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _one_head(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A sequence-classification reward model as a (B, T) -> (B, 1) training forward."""
    return lambda input_ids, attention_mask: reward_scores(model, input_ids, attention_mask)[:, None]


def _lora_config(cfg: ProxyConfig, base: nn.Module):
    from peft import LoraConfig, TaskType
    from transformers.pytorch_utils import Conv1D

    # GPT-2 style Conv1D layers store weights transposed (fan_in_fan_out).
    conv1d = any(isinstance(m, Conv1D) for m in base.modules())
    return LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,
        target_modules="all-linear",
        fan_in_fan_out=conv1d,
    )


def member_workers(requested: int, k: int, device: torch.device | str) -> int:
    """Processes that train independent members at once: 1 on an accelerator or for one member;
    `requested` if set; else as many as the usable cores allow at this process's thread count."""
    if torch.device(device).type != "cpu" or k <= 1:
        return 1
    if requested:
        return min(requested, k)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(k, cores // max(torch.get_num_threads(), 1)))


def _member_worker(job: dict[str, Any]) -> tuple[int, bytes, dict[str, float]]:
    """One independent member trained in a worker process: its weights as safetensors bytes and
    its last-epoch statistics. Same seed, thread count and data as the in-process path, so the
    same weights."""
    from safetensors.torch import save

    torch.set_num_threads(job["threads"])
    model = reward_model_from_pretrained(job["path"], pad_token_id=job["pad"], seed=job["seed"],
                                         n_layer=job["cfg"].n_layer)
    model.train()
    stats = _fit_bradley_terry(_one_head(model), list(model.parameters()), job["pairs"], pad_token_id=job["pad"],
                               n_heads=1, cfg=job["cfg"], seed=job["seed"], device=torch.device("cpu"),
                               desc=job["name"], progress=False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return job["index"], save(state), stats


def _train_members_in_processes(paths: Sequence[str], names: Sequence[str], seeds: Sequence[int],
                                pairs: EncodedPairs, pad: int, cfg: ProxyConfig, workers: int,
                                progress: bool) -> list[nn.Module]:
    """Train independent members in `workers` spawned processes (CPU); returns them in order, in
    eval mode. Weights travel back as safetensors bytes, not pickles."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from safetensors.torch import load

    threads = torch.get_num_threads()
    jobs = [{"index": i, "name": names[i], "path": str(paths[i]), "seed": seeds[i], "pad": pad, "cfg": cfg,
             "pairs": pairs, "threads": threads} for i in range(len(names))]
    logger.info("training %d proxy members in %d processes (%d thread(s) each)", len(jobs), workers, threads)
    states: dict[int, dict[str, torch.Tensor]] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_member_worker, job) for job in jobs]
        with bar(total=len(jobs), desc="proxy members", unit="member", disable=not progress) as pbar:
            for future in as_completed(futures):
                index, blob, stats = future.result()
                states[index] = load(blob)
                logger.info("proxy %s: last epoch train loss %.4f, accuracy %.3f", names[index],
                            stats["train_loss"], stats["train_accuracy"])
                pbar.update(1)
    models = []
    for i in range(len(jobs)):
        model = reward_model_from_pretrained(paths[i], pad_token_id=pad, seed=seeds[i], n_layer=cfg.n_layer)
        model.load_state_dict(states[i])
        models.append(model.eval())
    return models


def train_ensemble(
    kind: str,
    backbone_path: str | os.PathLike | None,
    tokenizer,
    prefs_train,
    prefs_val,
    out_dir: str | os.PathLike | None,
    cfg: ProxyConfig,
    *,
    seed: int = 0,
    make_backbone: Callable[[int], str | os.PathLike] | None = None,
    reference: tuple[Sequence[str], Sequence[str], Sequence[bool]] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ProxyEnsemble:
    """Train a K-member proxy ensemble with the Bradley–Terry loss on (noisy) preference labels.

    kind: independent | pretrain | multihead | lora (module docstring). `backbone_path` is a
    causal-LM or sequence-classification checkpoint (the SFT policy); for kind=pretrain it is
    unused and member i's backbone is `make_backbone(1000 + seed + i)`.
    prefs_train / prefs_val: `datasets.Dataset` with prompt, chosen, rejected and optionally
    chosen_ended, rejected_ended, chosen_gold, rejected_gold; "chosen" is the noisy label.
    Per member: AdamW (cfg.lr, cfg.weight_decay), cfg.epochs over prefs_train in batches of
    cfg.batch_size pairs, offset regularizer cfg.offset_eta (Eisenstein et al. 2023). Then
    validation accuracies are recorded, failed members handled per cfg.on_failed_member,
    standardization statistics fitted on `reference` (default: every response in prefs_val),
    and the ensemble is saved to `out_dir` (skipped when None).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown proxy kind {kind!r} (known: {', '.join(KINDS)})")
    if cfg.k < 1:
        raise ValueError(f"proxy.k must be >= 1, got {cfg.k}")
    if cfg.max_length < 0 or cfg.weight_decay < 0:
        raise ValueError("proxy.max_length and proxy.weight_decay must be >= 0")
    if kind == "pretrain" and make_backbone is None:
        raise ValueError(
            "kind=pretrain needs make_backbone(seed) -> path of a differently seeded pretrained model"
        )
    if kind != "pretrain" and backbone_path is None:
        raise ValueError(f"kind={kind} needs a backbone_path")
    check_tokenizer(tokenizer)
    device = torch.device(device)
    pad = tokenizer.pad_token_id
    names = [f"member_{i}" for i in range(cfg.k)]
    seeds = [seed + i for i in range(cfg.k)]
    backbones: list[str] = []  # recorded in ensemble.json: where each member started from

    def member_path(i: int) -> str:
        if kind == "pretrain":
            path = str(make_backbone(PRETRAIN_SEED_OFFSET + seeds[i]))
        else:
            path = str(backbone_path)
        backbones.append(path)
        return path

    def fit(forward, params, n_heads: int, fit_seed: int, desc: str) -> None:
        stats = _fit_bradley_terry(
            forward,
            params,
            train_pairs,
            pad_token_id=pad,
            n_heads=n_heads,
            cfg=cfg,
            seed=fit_seed,
            device=device,
            desc=desc,
            progress=progress,
        )
        logger.info(
            "proxy %s: last epoch train loss %.4f, accuracy %.3f",
            desc,
            stats["train_loss"],
            stats["train_accuracy"],
        )

    # 1. the first backbone fixes the context length, hence the token cap
    first_path = member_path(0)
    from transformers import AutoConfig

    with quiet_transformers():
        first_config = AutoConfig.from_pretrained(first_path)
    max_length = cfg.max_length or context_length(first_config) or 1024
    train_pairs = encode_pairs(prefs_train, tokenizer, max_length)
    val_pairs = encode_pairs(prefs_val, tokenizer, max_length)
    if len(train_pairs) == 0:
        raise ValueError("the proxy training set is empty")

    # 2. build and train the members
    kwargs: dict[str, Any] = {}
    if kind in ("independent", "pretrain"):
        paths = [first_path] + [member_path(i) for i in range(1, cfg.k)]
        workers = member_workers(cfg.train_workers, cfg.k, device)
        if workers > 1:
            models = _train_members_in_processes(paths, names, seeds, train_pairs, pad, cfg, workers, progress)
        else:
            models = []
            for i, name in enumerate(names):
                model = reward_model_from_pretrained(
                    paths[i], pad_token_id=pad, seed=seeds[i], n_layer=cfg.n_layer
                ).to(device)
                model.train()
                fit(_one_head(model), model.parameters(), 1, seeds[i], name)
                models.append(model.eval())
        kwargs["models"] = models
    elif kind == "multihead":
        backbone = backbone_from_pretrained(first_path, n_layer=cfg.n_layer)
        model = MultiHeadRewardModel(backbone, seeds).to(device)
        model.train()
        fit(model, model.parameters(), cfg.k, seed, f"{cfg.k} heads")
        kwargs["multihead"] = model.eval()
    else:
        from peft import get_peft_model

        base = reward_model_from_pretrained(first_path, pad_token_id=pad, seed=seed, n_layer=cfg.n_layer).to(
            device
        )
        base_state = dict(base.state_dict())
        lora_config = _lora_config(cfg, base)
        peft_model = None
        for i, name in enumerate(names):
            # LoRA A matrices are drawn from the global RNG: fork it so member i's init depends
            # on its seed only, and the caller's RNG stream is left untouched.
            with torch.random.fork_rng(devices=[]), quiet_transformers():
                torch.manual_seed(seeds[i])
                if peft_model is None:
                    peft_model = get_peft_model(base, lora_config, adapter_name=name)
                else:
                    peft_model.add_adapter(name, lora_config)
            peft_model.set_adapter(name)
            # Each adapter owns a copy of the score head; give it its own seeded init.
            init_reward_head_(reward_head(peft_model), torch.Generator().manual_seed(seeds[i]))
            peft_model.train()
            fit(_one_head(peft_model), peft_model.parameters(), 1, seeds[i], name)
        kwargs["peft_model"] = peft_model.eval()
        kwargs["lora_base_state"] = base_state

    ensemble = ProxyEnsemble(
        kind,
        tokenizer,
        names,
        max_length=max_length,
        score_batch_size=cfg.score_batch_size,
        standardize=cfg.standardize,
        score_method=cfg.score_method,
        train_config={**dataclasses.asdict(cfg), "kind": kind, "seed": seed, "member_backbones": backbones},
        **kwargs,
    )

    # 3. validation accuracy, failed members (DESIGN.md §5b)
    ensemble.check_members(val_pairs, cfg.min_accuracy, cfg.on_failed_member)

    # 4. standardization on initial-policy responses (Coste et al. 2023)
    ensemble.fit_standardization(*(reference if reference is not None else reference_responses(prefs_val)))

    # 5. save
    if out_dir is not None:
        ensemble.save(out_dir)
    return ensemble
