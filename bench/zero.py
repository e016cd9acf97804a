"""ZeRO sharding: per-rank model-state memory against DeepSpeed's estimators, and ZeRO-3 generation.

Runs `bench/zero_worker.py` under the DeepSpeed launcher with 2 ranks (gloo on CPU; see its
docstring for what is measured and how) and turns the JSON rank 0 writes into rows:

1. memory     bytes of parameters, gradients, fp32 master and Adam states each rank holds at
              ZeRO-0/2/3 (engines built as the PPO loop builds the policy's, so at ZeRO-3 with the
              sizes `engines.sized_for` scales to the model), against DeepSpeed's
              `estimate_zero{2,3}_model_states_mem_needs` and against the same formulas with fp32
              sizes (our models are fp32; DeepSpeed's assume 16-bit parameters and gradients). The
              "before" comparison is ZeRO-3 with DeepSpeed's own defaults set explicitly
              (persistence threshold 1e5, prefetch bucket 5e7, reduce bucket 5e8). The transient
              peak of gathered parameters is measured too (the estimate's 4L term), also for ZeRO-3
              releasing every module's parameters right after use (reuse distance 0, no prefetch);
2. generation `rlhf_overopt.rollout.generate` at ZeRO-0, and at ZeRO-3 (framework sizes, and
              DeepSpeed's defaults) three ways: "gathered" = `engines.gathered` (the PPO loop's
              path: one gather per rollout with the engine's ZeRO-3 hooks removed for the block),
              "gathered, hooks kept" = `deepspeed.zero.GatheredParameters` alone (the path before),
              and ungathered.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
from typing import Any

from bench.common import ROOT, BenchContext, Row

TITLE = "ZeRO sharding"
SECTION = "zero"
WORLD = 2
"""Ranks of the launched job (CPU processes here)."""
WORKER = "bench/zero_worker.py"
MIB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_spec(ctx: BenchContext) -> dict[str, Any]:
    """Sizes of this run and the PPO settings the policy engine is built from (as in loops/ppo.py)."""
    cfg, p = ctx.config, ctx.config.ppo
    if p.mini_batch_size % WORLD:
        raise ValueError(f"ppo.mini_batch_size={p.mini_batch_size} does not split over {WORLD} ranks")
    return {
        "micro_batch": p.mini_batch_size // WORLD,
        "max_grad_norm": p.max_grad_norm,
        "deepspeed_config": cfg.deepspeed.config,
        "dtype": cfg.policy.dtype,
        "lr": p.lr,
        "total_steps": p.steps * p.ppo_epochs * (p.batch_size // p.mini_batch_size),
        "lr_final_ratio": p.lr_final_ratio,
        "temperature": p.temperature,
        "seed": cfg.seed,
        "train_seq_len": 24 if ctx.quick else 64,
        "memory_warm_steps": 2,
        "n_prompts": 8 if ctx.quick else 32,
        "max_new_tokens": min(16, p.max_new_tokens) if ctx.quick else p.max_new_tokens,
        "repeats": ctx.repeats,
        "warmup": 1,
    }


def launch(ctx: BenchContext, spec: dict[str, Any], launcher: str) -> dict[str, Any]:
    """Run the worker under the DeepSpeed launcher; its result JSON, or an error with the log's tail."""
    spec_path, out_path = ctx.work_dir / "zero_spec.json", ctx.work_dir / "zero_result.json"
    log_path = ctx.work_dir / "zero_launcher.log"
    spec_path.write_text(json.dumps(spec, indent=2))
    out_path.unlink(missing_ok=True)
    cmd = [launcher, "--num_gpus", str(WORLD), "--master_port", str(_free_port()), WORKER,
           "--testbed", str(ctx.testbed.root), "--spec", str(spec_path), "--out", str(out_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    limit = 240 if ctx.quick else 480
    # Own process group: on a timeout the launcher and both ranks are ended together.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\n(killed after {limit} s)"
    log_path.write_text(f"$ {' '.join(cmd)}\n\n--- stdout\n{stdout}\n--- stderr\n{stderr}")
    if proc.returncode != 0 or not out_path.exists():
        tail = "\n".join(stderr.strip().splitlines()[-40:])
        raise RuntimeError(f"the DeepSpeed launcher exited with {proc.returncode} (log: {log_path}); "
                           f"stderr tail:\n{tail}")
    return json.loads(out_path.read_text())


# -- estimates -------------------------------------------------------------------------------------


def fp32_estimates(total: int, largest: int, world: int) -> dict[str, float]:
    """DeepSpeed's no-offload formulas with each term at the bytes it has when the model is fp32.

    DeepSpeed (stage_1_and_2.py) splits its 18 bytes/param as 2 (16-bit grads) + 4 (fp32 grads)
    + 4 (fp32 master params) + 8 (Adam moments), with 2 bytes of 16-bit params on top:
        ZeRO-2: 2 N + 18 N / w        ZeRO-3: 4 L + 18 N / w   (L = largest layer, gathered)
    With fp32 parameters the 16-bit and fp32 gradient are one 4-byte tensor, the parameters take
    4 bytes, the separate fp32 master copy DeepSpeed still keeps takes 4, Adam 8:
        ZeRO-2: 4 N + (4 + 4 + 8) N / w   ZeRO-3: 4 L + (4 + 4 + 4 + 8) N / w
    (at ZeRO-3 the parameters are partitioned too; DeepSpeed's ZeRO-3 formula has no term for
    the 16-bit parameter partition, which these 4 bytes replace).
    """
    return {"zero2": 4 * total + 16 * total / world, "zero3": 4 * largest + 20 * total / world}


# -- rows ------------------------------------------------------------------------------------------


def _worst_rank(variant: dict[str, Any]) -> dict[str, Any]:
    """The rank holding the most model state (ZeRO-2 partitions differ slightly between ranks)."""
    return max(variant["memory"]["per_rank"], key=lambda r: r["model_state_bytes"])


def _breakdown(rank: dict[str, Any]) -> str:
    b = rank["bytes"]
    parts = [f"{k} {b.get(k, 0) / MIB:.2f}" for k in ("params", "grads", "master", "optimizer")]
    return "MiB: " + ", ".join(parts)


LABELS = {"zero0": "ZeRO-0", "zero2": "ZeRO-2", "zero3": "ZeRO-3",
          "zero3_deepspeed_defaults": "ZeRO-3, DeepSpeed's defaults (before)",
          "zero3_release": "ZeRO-3, release after use"}
"""Row labels of the worker's variants (`bench/zero_worker.py` VARIANTS)."""


def _sizes(variant: dict[str, Any]) -> str:
    z = variant["zero_settings"]
    return (f"persistence threshold {z['persistence_threshold']:,}, prefetch bucket {z['prefetch_bucket_size']:,}, "
            f"reduce bucket {z['reduce_bucket_size']:,}, max reuse distance {z['max_reuse_distance']:,}")


def memory_rows(result: dict[str, Any]) -> list[Row]:
    """Measured model state per rank, DeepSpeed's and the fp32-adjusted estimates, their ratios."""
    est, variants, world = result["estimates"], result["variants"], result["world_size"]
    total, largest = est["total_params"], est["largest_layer_params"]
    fp32 = fp32_estimates(total, largest, world)
    ds = {"zero2": est["zero2_bytes"], "zero3": est["zero3_bytes"]}
    measured = {name: _worst_rank(v) for name, v in variants.items()}
    base = measured["zero0"]["model_state_bytes"]
    rows = []
    for name, label in LABELS.items():
        m = measured[name]["model_state_bytes"]
        note = _breakdown(measured[name])
        if name.startswith("zero3"):
            note += f"; {_sizes(variants[name])}"
        rows.append(Row(SECTION, f"model state per rank, {label}", m / MIB, "MiB",
                        ratio=None if name == "zero0" else m / base, baseline="" if name == "zero0" else "ZeRO-0",
                        note=note))
    target = "ZeRO-3 per-rank model state within 10% of DeepSpeed's estimate (fp32-adjusted)"
    formulas = {"zero2": ("2N + 18N/w", "4N + 16N/w"), "zero3": ("4L + 18N/w", "4L + 20N/w")}
    for stage in ("zero2", "zero3"):
        label = LABELS[stage]
        m = measured[stage]["model_state_bytes"]
        rows.append(Row(SECTION, f"{label} estimate per rank, DeepSpeed (16-bit)", ds[stage] / MIB, "MiB",
                        note=formulas[stage][0]))
        rows.append(Row(SECTION, f"{label} estimate per rank, fp32-adjusted", fp32[stage] / MIB, "MiB",
                        note=formulas[stage][1]))
        rows.append(Row(SECTION, f"{label} measured / DeepSpeed estimate", m / ds[stage], "x",
                        ratio=m / ds[stage], baseline="DeepSpeed estimate (16-bit)"))
        ratio = m / fp32[stage]
        rows.append(Row(SECTION, f"{label} measured / fp32-adjusted estimate", ratio, "x", ratio=ratio,
                        baseline="fp32-adjusted estimate", target=target if stage == "zero3" else "",
                        met=abs(ratio - 1) <= 0.10 if stage == "zero3" else None,
                        note="the framework's ZeRO-3 (engines.sized_for)" if stage == "zero3" else ""))
    for name in ("zero3_deepspeed_defaults",):
        m = measured[name]["model_state_bytes"]
        rows.append(Row(SECTION, f"{LABELS[name]}, measured / fp32-adjusted estimate", m / fp32["zero3"], "x",
                        ratio=m / fp32["zero3"], baseline="fp32-adjusted estimate",
                        note=f"measured / DeepSpeed estimate = {m / ds['zero3']:.3f}"))
    for name in ("zero3", "zero3_deepspeed_defaults"):
        r = measured[name]
        rows.append(Row(SECTION, f"parameters held per rank, {LABELS[name]}", r["local_params"], "params",
                        ratio=r["local_params"] / total, baseline=f"total parameters ({total:,})",
                        note=f"partition plus {r['persistent_params']:,} persistent parameters held whole "
                             f"(threshold {variants[name]['zero_settings']['persistence_threshold']:,} elements)"))
    for name in ("zero3", "zero3_deepspeed_defaults", "zero3_release"):
        peak = measured[name]["gathered_peak_bytes"]
        z = variants[name]["zero_settings"]
        rows.append(Row(SECTION, f"peak gathered parameters in forward, {LABELS[name]}", peak / MIB, "MiB",
                        ratio=peak / est["largest_layer_bytes"], baseline="4L (DeepSpeed's largest-layer term)",
                        note=f"transient, not in the model state above; {peak / (4 * total):.2f} x the whole model; "
                             f"prefetch bucket {z['prefetch_bucket_size']:,}, max reuse distance "
                             f"{z['max_reuse_distance']:,} elements"))
    for name in ("zero3", "zero3_deepspeed_defaults", "zero3_release"):
        r = measured[name]
        both = r["model_state_bytes"] + r["gathered_peak_bytes"]
        rows.append(Row(SECTION, f"model state + peak gathered per rank, {LABELS[name]}", both / MIB, "MiB",
                        ratio=both / fp32["zero3"], baseline="fp32-adjusted estimate (4L + 20N/w)",
                        note="the estimate's 4L term budgets this transient"))
    for name in ("zero3", "zero3_deepspeed_defaults"):
        r = measured[name]
        size = variants[name]["zero_settings"]["reduce_bucket_size"]
        rows.append(Row(SECTION, f"reduce bucket allocated per rank, {LABELS[name]}",
                        r["bytes"].get("reduce_buckets", 0) / MIB, "MiB",
                        note=f"reduce_bucket_size {size:,} elements x 4 bytes (torch.empty); "
                             f"process RSS {r['rss_bytes'] / MIB:,.0f} MiB"))
    return rows


def generation_rows(result: dict[str, Any], spec: dict[str, Any]) -> list[Row]:
    """Generation times: ZeRO-3 gathered (hook-free, hooks kept) and ungathered against ZeRO-0."""
    v = result["variants"]
    size = f"{spec['n_prompts']} prompts x {spec['max_new_tokens']} new tokens"
    zero0 = v["zero0"]["generation"]["plain"]["median_s"]
    rows = [Row(SECTION, f"generate {size}, ZeRO-0", zero0, "s")]
    for name in ("zero3", "zero3_deepspeed_defaults"):
        label, g = LABELS[name], v[name]["generation"]
        is_main = name == "zero3"
        fast, kept, slow = (g[m]["median_s"] for m in ("gathered", "gathered_hooks_kept", "ungathered"))
        rows += [
            Row(SECTION, f"generate, {label} gathered", fast, "s", ratio=fast / zero0, baseline="ZeRO-0",
                target="gathered ZeRO-3 generation within 2x of ZeRO-0" if is_main else "",
                met=fast / zero0 <= 2.0 if is_main else None,
                note="engines.gathered (gather + ZeRO-3 hooks removed), the PPO loop's path"),
            Row(SECTION, f"generate, {label} gathered, hooks kept", kept, "s", ratio=kept / zero0, baseline="ZeRO-0",
                note=f"deepspeed.zero.GatheredParameters alone (the old path); {kept / fast:.2f}x hook-free gathered"),
            Row(SECTION, f"generate, {label} ungathered", slow, "s", ratio=slow / fast, baseline=f"{label} gathered",
                note="DeepSpeed fetches each module's parameters on every forward"),
        ]
    return rows


def notes(result: dict[str, Any], spec: dict[str, Any]) -> str:
    """The section's explanation, with this run's numbers."""
    est, v, world = result["estimates"], result["variants"], result["world_size"]
    total, largest = est["total_params"], est["largest_layer_params"]
    fp32 = fp32_estimates(total, largest, world)["zero3"]
    z3, before, rel = (_worst_rank(v[n]) for n in ("zero3", "zero3_deepspeed_defaults", "zero3_release"))
    s3, s_before = v["zero3"]["zero_settings"], v["zero3_deepspeed_defaults"]["zero_settings"]
    h = s3["hidden_size"]
    tokens = {f"{name}/{mode}": g["response_tokens"] for name in ("zero0", "zero3", "zero3_deepspeed_defaults")
              for mode, g in v[name]["generation"].items()}
    same = ("the same number of response tokens" if len(set(tokens.values())) == 1
            else f"these response token counts: {tokens}")
    method = (
        f"Two ranks (`deepspeed --num_gpus {world}`, gloo on CPU) build the testbed policy as a training engine "
        "as `loops/ppo.py` does (`ds_config` + `train_engine`, AdamW, fp32). Model state is counted when "
        "parameters, gradients and Adam states are all live (after warm-up steps, then one more "
        "forward+backward): the distinct tensor storages each rank holds for parameters (ZeRO-3: `ds_tensor` "
        "partitions plus persistent parameters held whole), gradient partitions, DeepSpeed's fp32 master "
        "partition and Adam's `exp_avg`/`exp_avg_sq`; the figure is the larger rank's. Reduce buckets are "
        "listed apart.")
    estimates = (
        "DeepSpeed's estimators (`estimate_zero2/3_model_states_mem_needs_all_live` print, in GB to two "
        "decimals, what `estimate_zero2/3_model_states_mem_needs` return; those bytes are used here) assume "
        f"16-bit parameters and gradients: ZeRO-2 `2N + 18N/w`, ZeRO-3 `4L + 18N/w`, with N = {total:,} "
        f"parameters, L = {largest:,} (largest layer), w = {world}. The fp32-adjusted expectation keeps the "
        "same terms at fp32 sizes: parameters 4 bytes (replicated at ZeRO-2, partitioned at ZeRO-3), one 4-byte "
        "gradient instead of the 16-bit + fp32 pair, the 4-byte fp32 master copy DeepSpeed keeps even for an "
        "fp32 model, 8 bytes of Adam moments: ZeRO-2 `4N + 16N/w`, ZeRO-3 `4L + 20N/w`. The target is checked "
        "against the fp32-adjusted one, for the framework's ZeRO-3 (the `ZeRO-3` rows).")
    def state_and_peak(r: dict[str, Any]) -> str:
        return f"{(r['model_state_bytes'] + r['gathered_peak_bytes']) / MIB:.2f} MiB"

    sizing = (
        f"ZeRO-3 sizing. `engines.sized_for` (inside `train_engine` and `frozen_model`) now scales the ZeRO-3 "
        f"sizes the user's JSON does not set to the hidden size h (= {h} here): "
        f"`stage3_param_persistence_threshold` = 10h = {s3['persistence_threshold']:,}, "
        f"`stage3_prefetch_bucket_size` = 0.9h² = {s3['prefetch_bucket_size']:,}, `reduce_bucket_size` = h² = "
        f"{s3['reduce_bucket_size']:,} elements. With DeepSpeed's defaults (the framework before; set explicitly "
        f"in the `DeepSpeed's defaults (before)` variant: {s_before['persistence_threshold']:,}, "
        f"{s_before['prefetch_bucket_size']:,}, {s_before['reduce_bucket_size']:,}) every parameter under 1e5 "
        f"elements stays whole on every rank besides its partition: {before['persistent_params']:,} of "
        f"{total:,} parameters, and the measured ZeRO-3 state was {before['model_state_bytes'] / fp32:.3f} x the "
        f"fp32-adjusted estimate. With the framework's sizes {z3['persistent_params']:,} parameters stay "
        f"whole and it is {z3['model_state_bytes'] / fp32:.3f} x (the estimators ignore persistence), "
        f"{z3['model_state_bytes'] / (20 * total / world):.3f} x `20N/w`: the state alone sits below the "
        "estimate by about its `4L` term, which budgets a transient, the gathered working set, measured apart "
        "(so the 10% target depends on L/N: the tiny testbed's larger share of `4L` puts it further below). The peak of gathered non-persistent parameters, sampled around every module's "
        f"forward of a training step, is {z3['gathered_peak_bytes'] / (4 * largest):.2f} x `4L` "
        f"({z3['gathered_peak_bytes'] / (4 * total):.2f} x the whole model) with the framework's sizes and "
        f"{before['gathered_peak_bytes'] / (4 * largest):.2f} x `4L` with DeepSpeed's defaults (where only the "
        "parameters above the threshold are ever gathered and released). The smaller prefetch bucket does not bound it: "
        f"`stage3_max_reuse_distance` ({s3['max_reuse_distance']:,} elements, which `sized_for` leaves) keeps "
        "every parameter gathered from its forward use to its backward use, and DeepSpeed keeps a parameter "
        "the prefetcher passes over while it is gathered until that later use. Releasing after every use "
        "(`stage3_max_reuse_distance` = 0 and no prefetch, the `release after use` variant) brings the peak to "
        f"{rel['gathered_peak_bytes'] / (4 * largest):.2f} x `4L`. State plus that transient per rank: "
        f"{state_and_peak(z3)} with the framework's sizes, {state_and_peak(before)} with DeepSpeed's defaults, "
        f"{state_and_peak(rel)} releasing after use, against {fp32 / MIB:.2f} MiB estimated (`4L + 20N/w`); "
        "the training-time cost of releasing after use (re-gathering in backward, no prefetch) is not measured "
        "here. The reduce bucket allocated per rank went from "
        f"{before['bytes'].get('reduce_buckets', 0) / MIB:,.1f} MiB (`torch.empty`, mostly never touched: "
        f"process RSS {before['rss_bytes'] / MIB:,.0f} MiB) to {z3['bytes'].get('reduce_buckets', 0) / MIB:,.2f} MiB.")
    g3, gb = v["zero3"]["generation"], v["zero3_deepspeed_defaults"]["generation"]
    zero0 = v["zero0"]["generation"]["plain"]["median_s"]
    generation = (
        f"Generation: the same {spec['n_prompts']} prompts and seed on both ranks (both run the same number "
        "of forwards, which ungathered ZeRO-3 needs), the three engines side by side and the repeats "
        "interleaved round-robin over all modes (the machine is shared), the slower rank's time, median of "
        f"{spec['repeats']} after {spec['warmup']} warm-up round(s). Every mode sampled {same}. Inside "
        "`deepspeed.zero.GatheredParameters` alone, DeepSpeed's ZeRO-3 module hooks still run on every "
        "submodule call of every token (parameter-coordinator bookkeeping, autograd wrapper functions, "
        "signature inspection) although they fetch nothing; `engines.gathered` now also removes them for the "
        "block and registers them again after it (TRL's `remove_hooks`/`add_hooks`, as its "
        "`unwrap_model_for_generation` does). Gathered generation at ZeRO-3 (framework sizes) is "
        f"{g3['gathered']['median_s'] / zero0:.2f} x ZeRO-0 with the hooks removed and "
        f"{g3['gathered_hooks_kept']['median_s'] / zero0:.2f} x with them kept; the old path in full (DeepSpeed's "
        f"defaults, hooks kept) is {gb['gathered_hooks_kept']['median_s'] / zero0:.2f} x. Ungathered generation "
        f"is {g3['ungathered']['median_s'] / zero0:.2f} x ZeRO-0 with the framework's sizes and "
        f"{gb['ungathered']['median_s'] / zero0:.2f} x with DeepSpeed's defaults (under which "
        f"{before['persistent_params']:,} of the {total:,} parameters stay whole and are never fetched).")
    return f"{method}\n\n{estimates}\n\n{sizing}\n\n{generation}"


def run(ctx: BenchContext) -> list[Row]:
    launcher = shutil.which("deepspeed")
    if launcher is None:
        return [Row(SECTION, "ZeRO sharding", 0.0, "", note="skipped: the deepspeed launcher is not on PATH")]
    spec = worker_spec(ctx)
    result = launch(ctx, spec, launcher)
    ctx.extra[f"{SECTION}_notes"] = notes(result, spec)
    ctx.extra[f"{SECTION}_result"] = result
    return memory_rows(result) + generation_rows(result, spec)
