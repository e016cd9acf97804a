"""Process-group plumbing: one code path for a plain `python` run and a `deepspeed` launch.

A run without the launcher is a one-process run of the same code. Under the
launcher (WORLD_SIZE, RANK and LOCAL_RANK set), DeepSpeed initializes torch.distributed with the
accelerator's backend (gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True when started by a distributed launcher (deepspeed, torchrun)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def pick_device(choice: str, local_rank: int) -> torch.device:
    """'auto' takes this rank's GPU when CUDA is available, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device=cuda was asked for but no CUDA device is available")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init(device_choice: str = "auto") -> DistInfo:
    """Initialize the process group if launched (idempotent) and return this rank's DistInfo."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_choice, local_rank)
    if launched() and not tdist.is_initialized():
        import deepspeed  # heavy; only needed when there is a process group to create

        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    if tdist.is_initialized():
        return DistInfo(tdist.get_rank(), tdist.get_world_size(), local_rank, device)
    return DistInfo(0, 1, 0, device)


def shutdown() -> None:
    """Destroy the process group, if there is one, before the interpreter exits. Left to interpreter
    teardown, the process group's threads have aborted ranks that had finished their work ("terminate
    called without an active exception", exit status 250 from the launcher)."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of `t` over ranks (returns a new tensor; identity in a one-process run)."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return t.clone()
    out = t.detach().clone()
    tdist.all_reduce(out, op=tdist.ReduceOp.SUM)
    return out / tdist.get_world_size()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate each rank's (B_r, ...) tensor along dim 0, in rank order (sizes may differ)."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return t
    objs: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(objs, t.detach().cpu())
    return torch.cat(objs, dim=0).to(t.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s object on every rank."""
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def shard_indices(n: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of n items; n must divide evenly (checked by the caller's config)."""
    if n % world_size:
        raise ValueError(f"{n} items cannot be split evenly over {world_size} ranks")
    per = n // world_size
    return range(rank * per, (rank + 1) * per)


def global_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Whiten with the masked moments of the whole batch across ranks (equals one-rank whitening)."""
    from rlhf_overopt.ops.masking import whiten_from_moments

    m = mask.float()
    moments = torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()])
    moments = all_reduce_mean(moments) * (tdist.get_world_size() if tdist.is_initialized() else 1)
    return whiten_from_moments(x, mask, moments[0], moments[1], moments[2], shift_mean=shift_mean)


def global_token_count(mask: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of the number of valid tokens: the per-rank normalizer that makes DeepSpeed's
    gradient averaging equal a one-rank masked mean over the global minibatch."""
    return all_reduce_mean(mask.float().sum())


def sharded_map(n: int, fn, rank: int, world: int, batch_size: int) -> torch.Tensor:
    """fn(indices) -> (..., b) over all n items, each rank computing an equal share of batches
    (the last rank pads with index 0, so collective forwards under ZeRO-3 stay in step), gathered
    in order along the last dimension."""
    import math

    per = math.ceil(n / world)
    mine = [i if i < n else 0 for i in range(rank * per, (rank + 1) * per)]
    parts = [fn(mine[s:s + batch_size]) for s in range(0, per, batch_size)]
    local = torch.cat(parts, dim=-1).float().cpu()
    gathered_all = all_gather_cat(local.movedim(-1, 0)).movedim(0, -1)
    return gathered_all[..., :n]
