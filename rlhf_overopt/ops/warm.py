"""Weight averaging of reward models (WARM): the pure math behind `proxy.kind=warm`.

Ramé et al. 2024, "WARM: On the Benefits of Weight Averaged Reward Models" (arXiv:2401.12187):
M reward models fine-tuned from one shared pretrained initialization (same backbone and same
head init, different data orders / hyperparameters) stay linearly mode connected, so their weights
can be averaged into one model. The average scores at the cost of one model, approximates the
prediction ensemble of the members (the paper's "weight averaging approximates prediction
ensembling" observation), and is more robust to label noise and distribution shift than either.

Imports only torch and the standard library.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch


def average_state_dicts(states: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Uniform weight average of M state dicts (WARM, Ramé et al. 2024, arXiv:2401.12187):

        theta_WARM = (1/M) * sum_{i=1..M} theta_i

    applied elementwise to every floating-point tensor (parameters and buffers alike), summed in
    float64 and returned in each tensor's own dtype. Non-floating tensors (integer position ids,
    bool masks) carry no trained information and must be equal in every member; they are kept.

    states: M >= 1 mappings with the same keys, each tensor of the same shape and dtype across
    members. Returns a new dict of tensors (on the first member's device), in the first member's
    key order. Raises ValueError on an empty list, differing keys, shapes or dtypes, or differing
    non-floating tensors.
    """
    if not states:
        raise ValueError("average_state_dicts needs at least one state dict")
    keys = list(states[0].keys())
    for i, state in enumerate(states[1:], start=1):
        if set(state.keys()) != set(keys):
            diff = sorted(set(state.keys()) ^ set(keys))
            raise ValueError(f"state dict {i} has other keys than state dict 0 (differing: {diff[:5]})")
    out: dict[str, torch.Tensor] = {}
    for key in keys:
        tensors = [state[key] for state in states]
        first = tensors[0]
        for i, t in enumerate(tensors[1:], start=1):
            if t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError(f"{key}: state dict {i} has {tuple(t.shape)} {t.dtype}, state dict 0 has "
                                 f"{tuple(first.shape)} {first.dtype}")
        if first.is_floating_point():
            total = torch.zeros(first.shape, dtype=torch.float64, device=first.device)
            for t in tensors:
                total += t.detach().to(first.device, torch.float64)
            out[key] = (total / len(tensors)).to(first.dtype)
        else:
            for i, t in enumerate(tensors[1:], start=1):
                if not torch.equal(t.to(first.device), first):
                    raise ValueError(f"{key}: non-floating tensor differs between state dict 0 and {i}; "
                                     "such tensors cannot be averaged")
            out[key] = first.detach().clone()
    return out


def state_dict_hash(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex, first 16 digits) of a state dict's names, shapes, dtypes and bytes, in sorted key
    order: equal hashes mean bit-identical weights, e.g. the shared initialization of WARM members."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(t.shape)}:{t.dtype};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]
