"""The members of a proxy ensemble, one class per way of holding K reward models.

Each class does the kind-specific work behind `rlhf_overopt.rewards.ensemble.ProxyEnsemble`, through one
small interface:

    kind, names                       the ensemble kind and the member names, in order
    modules()                         the torch modules holding every parameter
    to(device)                        move them (and drop cached device state)
    raw_scores(ids, mask, method)     (K, B) raw scores by the kind's fast path
    member_scores(i, ids, mask)       (B,) raw scores of member i alone: the reference that
                                      every batched path must equal
    drop(keep, names)                 keep the members at indices `keep`; `names` are dropped
    write(out_dir)                    the weights, in the saved-ensemble layout
    load(root, names, ...)            classmethod, the inverse of write

Kinds (Coste et al. 2023; Eisenstein et al. 2023, "Helping or Herding?"):

- ``independent`` and ``pretrain`` (`SeparateMembers`): K full sequence-classification models.
  Independent members share a backbone and differ by seed (a finetune ensemble); pretrain members
  each start from their own pretraining run. Scored in a loop, or in one `torch.func.vmap` call
  over the stacked member weights when every member has the same architecture.
- ``warm`` (`WarmMembers`): one sequence-classification model, the uniform weight average of K
  members fine-tuned from one initialization (Ramé et al. 2024, arXiv:2401.12187); it scores at
  the cost of one member. The K averaged members are kept on disk under members/.
- ``multihead`` (`MultiHeadMembers`): one shared transformer and a Linear(d, K) head; one forward
  gives all K scores, about 1/K of the cost of K models.
- ``lora`` (`LoraMembers`): one frozen sequence-classification base and K peft LoRA adapters,
  each with its own copy of the score head; scoring switches adapters with `set_adapter`.
"""

from __future__ import annotations

import copy
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from rlhf_overopt.ops.masking import last_index, position_ids_from_mask
from rlhf_overopt.run.models import (
    backbone_from_pretrained,
    init_reward_head_,
    quiet_transformers,
    reward_scores,
    set_dropout_zero,
)

logger = logging.getLogger(__name__)

HEADS_FILE = "heads.safetensors"
WARM_MEMBERS_DIR = "members"
"""The folder of a saved warm ensemble that holds the K members its one model averages."""


def _seq_cls(path: Path, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """A saved sequence-classification model, from safetensors only, in eval mode without dropout."""
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    return set_dropout_zero(model.eval())


# ---------------------------------------------------------------------------------------------
# independent / pretrain: K separate models
# ---------------------------------------------------------------------------------------------


class SeparateMembers:
    """K sequence-classification models, one per member (kind independent or pretrain)."""

    def __init__(self, kind: str, names: Sequence[str], models: Sequence[nn.Module]) -> None:
        if len(models) != len(names):
            raise ValueError(f"{kind}: {len(models)} models for {len(names)} member names")
        self.kind = kind
        self.names: list[str] = list(names)
        self.models: list[nn.Module] = list(models)
        self._stacked: tuple[dict, dict, nn.Module] | None = None
        self._vmap_ok: bool | None = None

    def modules(self) -> list[nn.Module]:
        return self.models

    def to(self, device: str | torch.device) -> None:
        for model in self.models:
            model.to(device)
        self._stacked = None

    def member_scores(self, index: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return reward_scores(self.models[index], input_ids, attention_mask)

    def raw_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
        """(K, B): one vmap call when `method` is 'vmap' and the members allow it, else a loop."""
        if method == "vmap" and self._vmap_possible():
            return self._vmap_scores(input_ids, attention_mask)
        return torch.stack([self.member_scores(i, input_ids, attention_mask) for i in range(len(self.names))])

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
        """All members in one vectorized call (torch.func.vmap over members). (K, B)"""
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

    def drop(self, keep: Sequence[int], names: Sequence[str]) -> None:
        self.models = [self.models[i] for i in keep]
        self.names = [self.names[i] for i in keep]
        self._stacked = None
        self._vmap_ok = None

    def write(self, out: Path) -> None:
        """member_<i>/: one save_pretrained folder per member."""
        with quiet_transformers():
            for name, model in zip(self.names, self.models):
                model.save_pretrained(str(out / name))

    @classmethod
    def load(cls, root: Path, names: Sequence[str], *, kind: str, dtype: torch.dtype,
             trust_remote_code: bool) -> SeparateMembers:
        return cls(kind, names, [_seq_cls(root / name, dtype, trust_remote_code) for name in names])


class WarmMembers(SeparateMembers):
    """One weight-averaged reward model (kind warm), and the K members it averages.

    Scoring sees a single member (`names` == ["member_0"]), so aggregators reduce to it. The
    averaged members are `trained` (in memory, right after training) or `source` (the members/
    folder of a loaded ensemble); either is written to members/member_<i>/ so the average can be
    checked against them.
    """

    def __init__(self, names: Sequence[str], models: Sequence[nn.Module], *, trained: Sequence[nn.Module] = (),
                 trained_names: Sequence[str] = (), source: Path | None = None) -> None:
        if len(models) != 1:
            raise ValueError(f"warm: one averaged model expected, got {len(models)}")
        if len(trained) != len(trained_names):
            raise ValueError(f"warm: {len(trained)} averaged members for {len(trained_names)} names")
        super().__init__("warm", names, models)
        self.trained: list[nn.Module] = list(trained)
        self.trained_names: list[str] = list(trained_names)
        self.source = source

    def write(self, out: Path) -> None:
        """member_0/ (the average) and members/member_<i>/ (the averaged members), save_pretrained."""
        super().write(out)
        target = out / WARM_MEMBERS_DIR
        if self.trained:
            with quiet_transformers():
                for name, model in zip(self.trained_names, self.trained):
                    model.save_pretrained(str(target / name))
        elif self.source is not None and self.source.is_dir():
            shutil.copytree(self.source, target)

    @classmethod
    def load(cls, root: Path, names: Sequence[str], *, kind: str, dtype: torch.dtype,
             trust_remote_code: bool) -> WarmMembers:
        """The averaged model only; the members stay on disk (members/), carried over by `write`."""
        models = [_seq_cls(root / name, dtype, trust_remote_code) for name in names]
        return cls(names, models, source=root / WARM_MEMBERS_DIR)


# ---------------------------------------------------------------------------------------------
# multihead: one shared transformer, K heads
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


class MultiHeadMembers:
    """The K heads of one `MultiHeadRewardModel` (kind multihead)."""

    kind = "multihead"

    def __init__(self, names: Sequence[str], model: MultiHeadRewardModel) -> None:
        if model is None or model.heads.out_features != len(names):
            raise ValueError(f"multihead: the head count must equal the {len(names)} member names")
        self.names: list[str] = list(names)
        self.model = model

    def modules(self) -> list[nn.Module]:
        return [self.model]

    def to(self, device: str | torch.device) -> None:
        self.model.to(device)

    def member_scores(self, index: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model.hidden_at_last_token(input_ids, attention_mask)
        heads = self.model.heads
        return hidden @ heads.weight[index] + heads.bias[index]

    def raw_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
        """(K, B) from one forward, whatever the method."""
        return self.model(input_ids, attention_mask).T

    def drop(self, keep: Sequence[int], names: Sequence[str]) -> None:
        self.model.drop_heads(keep)
        self.names = [self.names[i] for i in keep]

    def write(self, out: Path) -> None:
        """backbone/ (save_pretrained) and heads.safetensors (weight (K, d), bias (K,))."""
        from safetensors.torch import save_file

        with quiet_transformers():
            self.model.backbone.save_pretrained(str(out / "backbone"))
        heads = self.model.heads
        save_file(
            {"weight": heads.weight.detach().cpu().contiguous(), "bias": heads.bias.detach().cpu().contiguous()},
            str(out / HEADS_FILE),
        )

    @classmethod
    def load(cls, root: Path, names: Sequence[str], *, kind: str, dtype: torch.dtype,
             trust_remote_code: bool) -> MultiHeadMembers:
        from safetensors.torch import load_file

        backbone = backbone_from_pretrained(root / "backbone", dtype=dtype, trust_remote_code=trust_remote_code)
        model = MultiHeadRewardModel(backbone, seeds=[0] * len(names))
        state = load_file(str(root / HEADS_FILE))
        model.heads.load_state_dict({"weight": state["weight"].to(dtype), "bias": state["bias"].to(dtype)})
        return cls(names, model.eval())


# ---------------------------------------------------------------------------------------------
# lora: one frozen base, K adapters
# ---------------------------------------------------------------------------------------------


class LoraMembers:
    """K peft LoRA adapters on one frozen sequence-classification base (kind lora).

    `base_state` is the frozen base's own tensors (shared storage, no copy), kept to save the
    base without the LoRA layers peft injected into it.
    """

    kind = "lora"

    def __init__(self, names: Sequence[str], peft_model: nn.Module, base_state: dict[str, torch.Tensor]) -> None:
        if peft_model is None:
            raise ValueError("lora: a peft model is required")
        self.names: list[str] = list(names)
        self.peft_model = peft_model
        self.base_state = base_state

    def modules(self) -> list[nn.Module]:
        return [self.peft_model]

    def to(self, device: str | torch.device) -> None:
        self.peft_model.to(device)

    def member_scores(self, index: int, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.peft_model.set_adapter(self.names[index])
        return reward_scores(self.peft_model, input_ids, attention_mask)

    def raw_scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, method: str) -> torch.Tensor:
        """(K, B), one adapter after another, whatever the method."""
        return torch.stack([self.member_scores(i, input_ids, attention_mask) for i in range(len(self.names))])

    def drop(self, keep: Sequence[int], names: Sequence[str]) -> None:
        for name in names:
            self.peft_model.delete_adapter(name)
        self.names = [self.names[i] for i in keep]

    def write(self, out: Path) -> None:
        """base/ (save_pretrained of the frozen base) and member_<i>/ peft adapter folders."""
        with quiet_transformers():
            base = self.peft_model.get_base_model()
            state = {k: v.detach().cpu().contiguous() for k, v in self.base_state.items()}
            base.save_pretrained(str(out / "base"), state_dict=state)
            self.peft_model.save_pretrained(str(out), selected_adapters=self.names)
        readme = out / "README.md"  # peft's model-card stub, not part of the format
        if readme.exists():
            readme.unlink()

    @classmethod
    def load(cls, root: Path, names: Sequence[str], *, kind: str, dtype: torch.dtype,
             trust_remote_code: bool) -> LoraMembers:
        from peft import PeftModel

        base = _seq_cls(root / "base", dtype, trust_remote_code)
        base_state = dict(base.state_dict())
        for name in names:
            if not (root / name / "adapter_model.safetensors").is_file():
                raise FileNotFoundError(f"{root / name} has no adapter_model.safetensors")
        with quiet_transformers():
            peft_model = PeftModel.from_pretrained(base, str(root / names[0]), adapter_name=names[0])
            for name in names[1:]:
                peft_model.load_adapter(str(root / name), adapter_name=name)
        return cls(names, peft_model.eval(), base_state)
