"""ZeRO sharding worker: per-rank model-state memory and ZeRO-3 generation, under the launcher.

    deepspeed --num_gpus 2 --master_port P bench/zero_worker.py --testbed DIR --spec S.json --out R.json

Started by `bench/zero.py` (the section owns the sizes, written to the spec JSON); rank 0 writes
the result JSON. Every engine is built as the PPO driver builds the policy's: the
testbed policy, `ds_config(...)` from the main job's PPO settings, `train_engine(...)` (AdamW in
DeepSpeed's ZeRO optimizer; at stage 3 `engines.sized_for` fills in the ZeRO-3 sizes the config
does not set: persistence threshold 10 h, prefetch bucket 0.9 h^2, reduce bucket h^2, with h the
hidden size). Variants (`VARIANTS`):
   - zero0, zero2, zero3: the framework as the PPO loop runs it;
   - zero3_deepspeed_defaults: ZeRO-3 with DeepSpeed's own defaults set explicitly in the config
     (persistence threshold 1e5, prefetch bucket 5e7, reduce bucket 5e8), so `sized_for` leaves
     them: the framework before it sized ZeRO-3 to the model;
   - zero3_release: the framework's ZeRO-3 with `stage3_max_reuse_distance=0` and
     `stage3_prefetch_bucket_size=0` (memory only): every module's parameters released right after
     its use and nothing fetched ahead (on the testbed its peak is the largest layer). With the
     framework's sizes the reuse distance (1e9 elements, not scaled) keeps every parameter gathered
     from its forward use to its backward use, and a parameter the prefetcher passes over while it
     is gathered is kept until its next use; either alone keeps the whole model gathered.
Each variant's effective ZeRO settings (read back from the engine) go into the result.

1. Generation. The zero0, zero3 and zero3_deepspeed_defaults engines live side by side and
   `rlhf_overopt.rollout.generate` runs on the same prompts on both ranks with the same seeded
   generator (identical parameters give identical tokens, so both ranks run the same number of
   forwards, which ungathered ZeRO-3 needs: every forward is a collective). Timed: ZeRO-0; and at
   ZeRO-3 three modes:
   - "gathered": inside `engines.gathered` (the PPO loop's path: one gather per rollout, and the
     engine's ZeRO-3 module hooks removed for the block and registered again after it);
   - "gathered_hooks_kept": inside `deepspeed.zero.GatheredParameters` alone (the framework's path
     before `gathered` removed the hooks: they still run around every submodule call, fetching
     nothing);
   - "ungathered": no gather (DeepSpeed's hooks fetch each module's parameters on every forward).
   Repeats are interleaved round-robin over the modes (the machine is shared); each starts at a
   barrier and counts the slower rank's time; the median is reported.
2. Model-state memory, one variant at a time. After warm-up steps (so Adam states exist and
   ZeRO-3 has settled its persistent parameters) and one more forward+backward (so gradients
   exist: parameters, gradients and optimizer states all live), each rank sums the bytes of the
   distinct tensor storages it holds (views of DeepSpeed's flat buffers share one storage):
   - params: local parameter storage (`p.ds_tensor` partitions at stage 3, plus the full tensors
     of persistent parameters; the flat buffer the module's parameters view at stages 0-2);
   - master: DeepSpeed's fp32 master partition (`single_partition_of_fp32_groups` at stage 1/2,
     `fp32_partitioned_groups_flat` at stage 3), when it is a separate storage;
   - grads: `p.grad` (stage 0), gradient partitions (`averaged_gradients`, `grads_in_partition`,
     `grad_partitions_flat_buffer`);
   - optimizer: Adam's `exp_avg`, `exp_avg_sq` (and `step`) in the inner optimizer's state.
   The reduce buckets (`ipg_buckets`) are reported apart: communication buffers sized by
   `reduce_bucket_size`, not by the model. The peak of gathered non-persistent ZeRO-3 parameters
   during that forward is sampled too. DeepSpeed's own estimates come from the functions its
   `estimate_zero{2,3}_model_states_mem_needs_all_live` print from, fed the same model.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import deepspeed
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rlhf_overopt.rollout import generate
from rlhf_overopt.run.engines import (
    ds_config,
    ensure_process_group,
    gathered,
    local_parameter_count,
    train_engine,
)
from rlhf_overopt.testbed.build import Testbed

DEEPSPEED_DEFAULTS = {"stage3_param_persistence_threshold": 100_000, "stage3_prefetch_bucket_size": 50_000_000,
                      "reduce_bucket_size": 500_000_000}
"""DeepSpeed's own defaults for the keys `engines.sized_for` fills in (set explicitly, sized_for leaves them)."""

VARIANTS: tuple[tuple[str, int, dict[str, int]], ...] = (
    ("zero0", 0, {}),
    ("zero2", 2, {}),
    ("zero3", 3, {}),
    ("zero3_deepspeed_defaults", 3, DEEPSPEED_DEFAULTS),
    ("zero3_release", 3, {"stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0}),
)
"""(name, ZeRO stage, `zero_optimization` entries set in the config passed to train_engine; {} = the PPO loop's)."""

GENERATION_VARIANTS = ("zero0", "zero3", "zero3_deepspeed_defaults")

ZERO3_MODES = ("gathered", "gathered_hooks_kept", "ungathered")
"""Generation modes at ZeRO-3 (see the module docstring)."""

T = TypeVar("T")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--testbed", required=True, help="testbed root folder")
    p.add_argument("--spec", required=True, help="JSON of sizes and the PPO settings (written by bench/zero.py)")
    p.add_argument("--out", required=True, help="result JSON, written by rank 0")
    p.add_argument("--local_rank", type=int, default=0, help="set by the DeepSpeed launcher")
    return p.parse_args()


# -- engines ---------------------------------------------------------------------------------------


def build_engine(model: torch.nn.Module, spec: dict[str, Any], stage: int, overrides: dict[str, int]):
    """The policy engine as the PPO loop builds it, at `stage`, with `overrides` set in `zero_optimization`."""
    world = dist.get_world_size()
    config = ds_config(zero_stage=stage, micro_batch_per_rank=spec["micro_batch"], world_size=world,
                       max_grad_norm=spec["max_grad_norm"], extra_path=spec["deepspeed_config"],
                       dtype=spec["dtype"])
    config["zero_optimization"].update(overrides)
    return train_engine(model, lr=spec["lr"], total_steps=spec["total_steps"], final_ratio=spec["lr_final_ratio"],
                        config=config)


def effective_zero_settings(engine) -> dict[str, int]:
    """The ZeRO sizes the engine runs with (after `engines.sized_for` and DeepSpeed's defaults)."""
    z = engine._config.zero_config
    return {"persistence_threshold": int(z.param_persistence_threshold),
            "prefetch_bucket_size": int(z.prefetch_bucket_size), "reduce_bucket_size": int(z.reduce_bucket_size),
            "max_reuse_distance": int(z.max_reuse_distance), "max_live_parameters": int(z.max_live_parameters),
            "hidden_size": int(getattr(engine.module.config, "hidden_size", 0) or 0)}


def train_micro_step(engine, input_ids: torch.Tensor, step: bool) -> None:
    """One causal-LM forward+backward on `input_ids` (B, T), then `engine.step()` if `step`."""
    engine.train()
    loss = engine(input_ids=input_ids, labels=input_ids).loss
    engine.backward(loss)
    if step:
        engine.step()


# -- model-state accounting ------------------------------------------------------------------------


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    """Every tensor in a tensor or a nested list/tuple/dict of them."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for item in obj:
            yield from tensors_in(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from tensors_in(item)


class StorageLedger:
    """Bytes of distinct tensor storages by category; a storage is counted once, in the first category."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def add(self, category: str, obj: Any) -> None:
        self.bytes.setdefault(category, 0)
        for t in tensors_in(obj):
            if t.is_meta:
                continue
            storage = t.untyped_storage()
            if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
                continue
            self.seen.add(storage.data_ptr())
            self.bytes[category] += storage.nbytes()


def model_state_bytes(engine) -> dict[str, int]:
    """This rank's parameter, master, gradient and optimizer-state bytes, plus its reduce buckets."""
    zero = engine.optimizer
    inner = getattr(zero, "optimizer", zero)  # ZeRO wraps the torch optimizer; stage 0 (fp32) does not
    ledger = StorageLedger()
    for p in engine.module.parameters():
        ledger.add("params", getattr(p, "ds_tensor", None))
        ledger.add("params", p.data)  # full tensor: stages 0-2, and persistent parameters at stage 3
    ledger.add("master", getattr(zero, "single_partition_of_fp32_groups", None))
    ledger.add("master", getattr(zero, "fp32_partitioned_groups_flat", None))
    ledger.add("grads", [p.grad for p in engine.module.parameters()])
    for name in ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer"):
        ledger.add("grads", getattr(zero, name, None))
    ledger.add("optimizer", [dict(state) for state in inner.state.values()])
    buckets = getattr(zero, "ipg_buckets", {}) or {}
    ledger.add("reduce_buckets", [getattr(b, "buffer", None) for b in buckets.values()])
    return ledger.bytes


def resident_bytes() -> int:
    """This process's resident set size (VmRSS), 0 where /proc is not there."""
    try:
        line = next(li for li in Path("/proc/self/status").read_text().splitlines() if li.startswith("VmRSS"))
    except (OSError, StopIteration):
        return 0
    return int(line.split()[1]) * 1024


def persistent_parameter_count(module: torch.nn.Module) -> int:
    """Parameters ZeRO-3 keeps whole on every rank (below stage3_param_persistence_threshold)."""
    return sum(p.ds_numel for p in module.parameters() if getattr(p, "ds_persist", False))


class GatheredPeak:
    """Peak bytes of non-persistent ZeRO-3 parameters gathered whole, sampled around every module's forward.

    The transient working set DeepSpeed's ZeRO-3 estimate budgets as 4 x largest layer: parameters
    fetched for a module's compute (and any prefetched ahead of it) before they are released.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.peak = 0
        self.params = [p for p in module.parameters() if hasattr(p, "ds_tensor") and not p.ds_persist]
        # Registered after DeepSpeed's own hooks, so they run after its fetch (pre) and release (post).
        self.handles = [h for m in module.modules()
                        for h in (m.register_forward_pre_hook(self.sample), m.register_forward_hook(self.sample))]

    def sample(self, *_: Any) -> None:
        ledger = StorageLedger()
        ledger.add("gathered", [p.data for p in self.params])
        self.peak = max(self.peak, ledger.bytes["gathered"])

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def memory_figures(engine, spec: dict[str, Any], vocab_size: int) -> dict[str, Any]:
    """Model-state bytes of every rank at the all-live point (see the module docstring).

    `spec["memory_warm_steps"]` full steps come first: ZeRO-3 keeps its persistent parameters
    resident only once the module trace of the training forward is recorded (after a generation
    the first training pass releases them), so the figure is the steady state of training.
    """
    g = torch.Generator().manual_seed(spec["seed"] + dist.get_rank())
    input_ids = torch.randint(0, vocab_size, (spec["micro_batch"], spec["train_seq_len"]), generator=g)
    for _ in range(spec["memory_warm_steps"]):
        train_micro_step(engine, input_ids, step=True)
    peak = GatheredPeak(engine.module)
    train_micro_step(engine, input_ids, step=False)
    peak.remove()
    state = model_state_bytes(engine)
    local = {"bytes": state, "model_state_bytes": sum(v for k, v in state.items() if k != "reduce_buckets"),
             "gathered_peak_bytes": peak.peak, "rss_bytes": resident_bytes(),
             "local_params": local_parameter_count(engine.module),
             "persistent_params": persistent_parameter_count(engine.module)}
    per_rank: list[dict[str, Any]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(per_rank, local)
    engine.step()  # finish the update so the engine is left consistent
    return {"per_rank": per_rank}


def deepspeed_estimates(model: torch.nn.Module, world: int) -> dict[str, Any]:
    """DeepSpeed's per-device estimates (no offload) for this model on `world` ranks of one node.

    `estimate_zero{2,3}_model_states_mem_needs_all_live` only print (GB, two decimals); the bytes
    come from the functions they print from, called with the same total and largest-layer counts.
    """
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    total, largest = stage3.model_to_params(model)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        stage_1_and_2.estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=world)
        stage3.estimate_zero3_model_states_mem_needs_all_live(model, num_gpus_per_node=world)
    _, zero2 = stage_1_and_2.estimate_zero2_model_states_mem_needs(total, num_gpus_per_node=world,
                                                                    cpu_offload=False)
    _, zero3, largest_bytes = stage3.estimate_zero3_model_states_mem_needs(
        total, largest, num_gpus_per_node=world, cpu_offload=False, cpu_offload_params=False)
    return {"total_params": total, "largest_layer_params": largest, "zero2_bytes": zero2, "zero3_bytes": zero3,
            "largest_layer_bytes": largest_bytes, "printed": printed.getvalue()}


# -- generation ------------------------------------------------------------------------------------


def time_together(fn: Callable[[], T]) -> tuple[T, float]:
    """`fn()` run by every rank from a barrier, and its seconds: the slower rank's time."""
    dist.barrier()
    t = time.perf_counter()
    out = fn()
    elapsed = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return out, float(elapsed)


def rollout(engine, mode: str, tokenizer, prompts: list[str], spec: dict[str, Any]) -> int:
    """One generation with `engine.module` in `mode`; returns the number of response tokens.

    "gathered" is `engines.gathered` (gather + hooks removed, the PPO loop's path); "gathered_hooks_kept"
    is DeepSpeed's `GatheredParameters` alone (the path before); "ungathered" and "plain" gather nothing.
    """
    module, stage = engine.module, engine.zero_optimization_stage()
    generator = torch.Generator().manual_seed(spec["seed"])  # same tokens on both ranks, every repeat
    with contextlib.ExitStack() as scope:
        scope.enter_context(torch.no_grad())
        if mode == "gathered":
            scope.enter_context(gathered(module, stage))
        elif mode == "gathered_hooks_kept":
            scope.enter_context(deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None))
        ro = generate(module, tokenizer, prompts, max_new_tokens=spec["max_new_tokens"],
                      temperature=spec["temperature"], generator=generator)
    return int(ro.response_mask.sum())


def generation_figures(engines: dict[str, Any], tokenizer, prompts: list[str],
                       spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Generation seconds of every (engine, mode), repeats interleaved round-robin.

    Modes: "plain" below ZeRO-3; `ZERO3_MODES` at ZeRO-3. The
    machine is shared, so every round times every mode once: a drift in background load then
    reaches all of them alike instead of whichever variant happened to run during it.
    """
    runs = [(name, mode) for name, engine in engines.items()
            for mode in (ZERO3_MODES if engine.zero_optimization_stage() == 3 else ("plain",))]
    times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    tokens: dict[tuple[str, str], int] = {}
    for round_ in range(spec["warmup"] + spec["repeats"]):
        for name, mode in runs:
            tokens[name, mode], elapsed = time_together(
                functools.partial(rollout, engines[name], mode, tokenizer, prompts, spec))
            if round_ >= spec["warmup"]:
                times[name, mode].append(elapsed)
    out: dict[str, dict[str, Any]] = {name: {} for name in engines}
    for (name, mode), ts in times.items():
        out[name][mode] = {"median_s": statistics.median(ts), "times_s": ts, "response_tokens": tokens[name, mode]}
    return out


# -- driver ----------------------------------------------------------------------------------------


def build_variant(testbed: Testbed, spec: dict[str, Any], stage: int, overrides: dict[str, int]):
    """A policy engine from the testbed's initial weights (the same for every variant)."""
    torch.manual_seed(spec["seed"])
    return build_engine(testbed.load_policy(), spec, stage, overrides)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    spec = json.loads(Path(args.spec).read_text())
    ensure_process_group(torch.device("cpu"))
    testbed = Testbed.at(args.testbed)
    tokenizer = testbed.load_tokenizer()
    prompts = list(testbed.load_prompts()["train"]["prompt"])[: spec["n_prompts"]]
    result: dict[str, Any] = {"world_size": dist.get_world_size(), "spec": spec,
                              "estimates": deepspeed_estimates(testbed.load_policy(), dist.get_world_size()),
                              "variants": {name: {"stage": stage, "config_overrides": overrides}
                                           for name, stage, overrides in VARIANTS}}

    # 1. generation: the engines that generate live side by side, their repeats interleaved
    settings = {name: (stage, overrides) for name, stage, overrides in VARIANTS}
    engines = {name: build_variant(testbed, spec, *settings[name]) for name in GENERATION_VARIANTS}
    for name, figures in generation_figures(engines, tokenizer, prompts, spec).items():
        result["variants"][name]["generation"] = figures
    # 2. model-state memory, one variant at a time (after generation, as in a PPO iteration)
    for name, stage, overrides in VARIANTS:
        engine = engines.pop(name, None) or build_variant(testbed, spec, stage, overrides)
        result["variants"][name]["zero_settings"] = effective_zero_settings(engine)
        result["variants"][name]["memory"] = memory_figures(engine, spec, engine.module.config.vocab_size)
        del engine
        gc.collect()

    if dist.get_rank() == 0:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        tmp.replace(args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
