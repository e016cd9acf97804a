"""The value model of PPO-style methods: a transformer backbone with S scalar heads, one per reward
stream (S = 1 for PPO; N + 1 for the composite methods, whose streams are minus the KL and the N
component rewards, each with its own value estimate).

Heads are Linear(d, S) with weight ~ N(0, std = 1/sqrt(d + 1)) and bias 0 (Ziegler et al. 2019;
Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"). The backbone comes from the
reward model or the SFT policy: `ValueModel.from_pretrained_backbone(path)` loads the headless
transformer of either checkpoint.

Shapes: B batch, Tq query width, Tr response width, S heads.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from rlhf_overopt.ops.masking import position_ids_from_mask

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueModel(nn.Module):
    """A transformer backbone (`AutoModel`, returning `last_hidden_state` (B, T, d)) with S value heads."""

    def __init__(self, backbone: nn.Module, n_heads: int = 1, hidden_size: int | None = None) -> None:
        super().__init__()
        if n_heads < 1:
            raise ValueError(f"a value model needs at least one head, got {n_heads}")
        self.backbone = backbone
        d = hidden_size if hidden_size is not None else backbone.config.hidden_size
        self.head = nn.Linear(d, n_heads)
        nn.init.normal_(self.head.weight, mean=0.0, std=1.0 / math.sqrt(d + 1))
        nn.init.zeros_(self.head.bias)

    @property
    def n_heads(self) -> int:
        return self.head.out_features

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position values of every head. input_ids, attention_mask, position_ids: (B, T).
        Returns (B, T, S)."""
        if position_ids is None:
            position_ids = position_ids_from_mask(attention_mask)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype))

    @classmethod
    def from_pretrained_backbone(cls, path: str | os.PathLike, n_heads: int = 1, *, tokenizer=None,
                                 **kwargs) -> ValueModel:
        """Backbone of any saved transformers model (causal LM, reward model) + fresh heads.
        With `tokenizer`, a backbone embedding with fewer rows than it has tokens is grown to fit
        (the policy's added pad token; `models.fit_embeddings`). kwargs go to
        `AutoModel.from_pretrained` (e.g. dtype)."""
        from transformers import AutoModel

        from rlhf_overopt.run.models import fit_embeddings

        backbone = AutoModel.from_pretrained(path, **kwargs)
        if tokenizer is not None:
            fit_embeddings(backbone, tokenizer)
        return cls(backbone, n_heads)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Backbone via `save_pretrained`, heads as `value_head.safetensors` in the same folder."""
        from safetensors.torch import save_file

        self.backbone.save_pretrained(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        save_file(state, os.path.join(directory, VALUE_HEAD_FILE))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **kwargs) -> ValueModel:
        """Load what `save_pretrained` wrote (the head count is read from the saved heads)."""
        from safetensors.torch import load_file

        state = load_file(os.path.join(directory, VALUE_HEAD_FILE))
        model = cls.from_pretrained_backbone(directory, n_heads=state["weight"].shape[0], **kwargs)
        model.head.load_state_dict(state)
        return model


def response_values(value_model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                    response_mask: torch.Tensor) -> torch.Tensor:
    """Value of the state before each response token, per head: `values[s, :, t] = V_s(query, response_<t)`.

    One forward over cat(query, response); value[t] is read from position Tq - 1 + t, the last
    token seen before response token t is generated (the query's last token for t = 0): the
    alignment GAE expects, values[t] paired with the reward of action response_t.
    `value_model(input_ids, attention_mask, position_ids)` returns (B, T, S).
    query_ids, query_mask: (B, Tq) left-padded; response_ids, response_mask: (B, Tr).
    Returns (S, B, Tr), 0 at masked positions; gradients flow (value loss).
    """
    q, r = query_ids.shape[1], response_ids.shape[1]
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    values = value_model(input_ids, attention_mask, position_ids_from_mask(attention_mask))[:, q - 1:q - 1 + r]
    values = values.permute(2, 0, 1)
    return torch.where(response_mask.bool(), values, torch.zeros_like(values))
