"""The proxy ensemble: K reward models scored together, standardized, checked and saved.

`ProxyEnsemble` owns what every kind of ensemble shares: chunked, length-sorted scoring of ids,
texts and token lists as proxy_scores (K, B); per-member standardization; the failed-member
check; save and load. The kind-specific work (holding the weights, the batched forward, dropping
members, the weight files) is done by one members object (rlhf_overopt/rewards/members.py).

After training every member is evaluated on validation pairs against the noisy labels it was
trained on and against clean (gold) labels. A member below `min_accuracy` is failed and handled
per `on_failed_member`: a seed can stay at chance, and worst-case aggregation must not be
silently poisoned by it. Each member is then standardized to mean 0, std 1 on initial-policy
responses (Coste et al. 2023), otherwise an uncertainty penalty lambda means nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlhf_overopt.rewards.members import LoraMembers, MultiHeadMembers, SeparateMembers, WarmMembers
from rlhf_overopt.run.models import (
    check_tokenizer,
    left_pad,
    load_tokenizer,
    model_device,
    quiet_transformers,
    tokenize_for_reward,
)

if TYPE_CHECKING:
    from rlhf_overopt.data.preferences import EncodedPairs

logger = logging.getLogger(__name__)

ENSEMBLE_FILE = "ensemble.json"
FORMAT_VERSION = 1
_MIN_STD = 1e-6
"""Floor of a member's reference std, so a constant member cannot produce inf scores."""

MEMBERS_OF_KIND = {
    "independent": SeparateMembers,
    "pretrain": SeparateMembers,
    "multihead": MultiHeadMembers,
    "lora": LoraMembers,
    "warm": WarmMembers,
}
"""The members class that loads each saved kind."""


class FailedMemberError(RuntimeError):
    """Raised when ensemble members fail the validation-accuracy check and policy says stop."""


def _member_index(name: str) -> int:
    return int(name.rsplit("_", 1)[-1])


class ProxyEnsemble:
    """K proxy reward models scored together: `score_texts` / `score_ids` -> (K, B).

    Build one with `rlhf_overopt.rewards.training.train_ensemble` or `ProxyEnsemble.load`. Scores are
    standardized per member with the saved reference mean and std when `standardize` is on
    (Coste et al. 2023). `members` is a members object of rlhf_overopt/rewards/members.py.
    """

    def __init__(
        self,
        members,
        tokenizer,
        *,
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
        warm: dict[str, Any] | None = None,
    ) -> None:
        if score_method not in ("loop", "vmap"):
            raise ValueError(f"score_method must be 'loop' or 'vmap', got {score_method!r}")
        check_tokenizer(tokenizer)
        self.members = members
        self.tokenizer = tokenizer
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
        # kind=warm: what was averaged (K, seeds, the shared init's hash, each member's and the
        # average's validation accuracy; rm_training); None for other kinds.
        self.warm: dict[str, Any] | None = None if warm is None else dict(warm)
        self._check_members()

    def _check_members(self) -> None:
        k = self.k
        if k == 0:
            raise ValueError("an ensemble needs at least one member")
        for name, stats in (("score_mean", self.score_mean), ("score_std", self.score_std)):
            if stats is not None and stats.shape != (k,):
                raise ValueError(f"{name} must have one entry per member ({k}), got {tuple(stats.shape)}")

    # -- properties ---------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        """independent | pretrain | multihead | lora | warm."""
        return self.members.kind

    @property
    def member_names(self) -> list[str]:
        return self.members.names

    @property
    def k(self) -> int:
        """Number of members."""
        return len(self.members.names)

    @property
    def device(self) -> torch.device:
        """Device of the ensemble's parameters."""
        return model_device(self.members.modules()[0])

    def to(self, device: str | torch.device) -> ProxyEnsemble:
        """Move every member to `device`; returns self."""
        self.members.to(device)
        return self

    def eval(self) -> ProxyEnsemble:
        """Eval mode for every member (dropout is zero anyway); returns self."""
        for module in self.members.modules():
            module.eval()
        return self

    # -- scoring ------------------------------------------------------------------------------

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
            chunks.append(self.members.raw_scores(ids[:, first:], mask[:, first:], method).float())
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
            from rlhf_overopt.run.progress import bar

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
        Returns the names of the failed members.
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
        self.members.drop(keep, list(names))
        if self.score_mean is not None:
            self.score_mean = self.score_mean[keep]
            self.score_std = self.score_std[keep]
        self.dropped_members.extend(names)

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
        member_0/ (the weight average) + members/member_<i>/ (the K averaged members) (warm);
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
        with quiet_transformers():
            self.tokenizer.save_pretrained(str(out / "tokenizer"))
        self.members.write(out)
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
        if self.warm is not None:
            meta["warm"] = self.warm
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
        root = Path(directory)
        meta_path = root / ENSEMBLE_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{root} holds no {ENSEMBLE_FILE}; not a saved proxy ensemble")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
        kind, names = meta["kind"], list(meta["member_names"])
        tokenizer = load_tokenizer(root / "tokenizer", trust_remote_code=trust_remote_code)
        if kind not in MEMBERS_OF_KIND:
            raise ValueError(f"{meta_path}: unknown kind {kind!r}")
        members = MEMBERS_OF_KIND[kind].load(root, names, kind=kind, dtype=dtype,
                                             trust_remote_code=trust_remote_code)
        ensemble = cls(
            members,
            tokenizer,
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
            warm=meta.get("warm"),
        )
        return ensemble.to(device)
