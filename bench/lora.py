"""LoRA vs full fine-tuning: per-rank model-state memory of the policy and value engines at ZeRO-2.

On the testbed policy (the tiny one with --tiny), in this process on 1 rank (gloo), two variants
are built as `engines.build_actors` builds them: the policy engine (full, or a peft LoRA policy,
Hu et al. 2021, with the configured policy.lora_* settings and rank `LORA_R` when the config's is
0) and a full value engine on the policy's backbone, both `train_engine` at ZeRO-2. For each:

    estimator   DeepSpeed's `estimate_zero2_model_states_mem_needs` (GPU side, cpu_offload False)
                for the trainable parameter count of policy + value: 4 + 16 / ranks bytes per
                trained parameter (16-bit weights and gradients; fp32 master, Adam moments and
                gradient partitions). Frozen base weights are outside its formula (their bytes
                are in the note).
    measured    the bytes of the distinct tensor storages the engines actually hold (fp32 here):
                module parameters (frozen ones included), gradients after one backward (`.grad`
                and DeepSpeed's gradient partitions), fp32 master partitions and the AdamW state
                tensors after one step (`bench.zero_worker.model_state_bytes`). DeepSpeed's
                reduce buckets are communication buffers, not model states, and are left out.

The full variant also needs a frozen reference copy of the policy; the LoRA one does not (its
reference is the same model with adapters disabled): rows "with reference" add it.
"""

from __future__ import annotations

from typing import Any

import torch

from bench.common import BenchContext, Row

TITLE = "LoRA vs full: model-state memory per rank (ZeRO-2)"
SECTION = "lora"
MIB = 2**20
LORA_R = 8
"""LoRA rank measured when the config's policy.lora_r is 0 (full fine-tuning)."""
STATE_KEYS = ("params", "grads", "master", "optimizer")


def deepspeed_estimate(trainable: int) -> int:
    """DeepSpeed's ZeRO-2 per-GPU model-state estimate for `trainable` parameters on 1 rank."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    return int(estimate_zero2_model_states_mem_needs(trainable, num_gpus_per_node=1, num_nodes=1,
                                                     cpu_offload=False)[1])


def measure_variant(ctx: BenchContext, lora_r: int, seq_len: int) -> dict[str, Any]:
    """Build policy + value engines (LoRA policy when lora_r > 0), one backward and one step each;
    their model-state bytes and parameter counts."""
    import dataclasses

    from bench.zero_worker import model_state_bytes
    from rlhf_overopt.run.engines import ds_config, enable_gradient_checkpointing, lora_policy, train_engine
    from rlhf_overopt.run.models import load_causal_lm
    from rlhf_overopt.values import ValueModel

    cfg = ctx.config
    pc = dataclasses.replace(cfg.policy, lora_r=lora_r)
    path = str(ctx.testbed.policy_dir)
    engine_cfg = ds_config(zero_stage=2, micro_batch_per_rank=2, world_size=1, max_grad_norm=1.0)
    torch.manual_seed(cfg.seed)
    policy = load_causal_lm(path, dtype=torch.float32, dropout_off=True)
    if pc.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    if lora_r > 0:
        policy = lora_policy(policy, pc)
    engines = {"policy": train_engine(policy, lr=1e-4, total_steps=10, final_ratio=1.0, config=engine_cfg),
               "value": train_engine(ValueModel.from_pretrained_backbone(path), lr=1e-4, total_steps=10,
                                     final_ratio=1.0, config=engine_cfg)}
    vocab = policy.config.vocab_size
    x = torch.randint(0, vocab, (2, seq_len), generator=torch.Generator().manual_seed(cfg.seed))
    mask = torch.ones_like(x)
    totals = dict.fromkeys(STATE_KEYS, 0)
    per_engine: dict[str, int] = {}
    counts = {"trainable": 0, "total": 0, "frozen_bytes": 0}
    for name, engine in engines.items():
        engine.train()
        out = engine(input_ids=x, labels=x).loss if name == "policy" else engine(x, mask).pow(2).mean()
        engine.backward(out)
        after_backward = model_state_bytes(engine)
        engine.step()
        after_step = model_state_bytes(engine)
        totals["params"] += after_backward["params"]
        totals["grads"] += after_backward["grads"]
        totals["master"] += after_step["master"]
        totals["optimizer"] += after_step["optimizer"]
        per_engine[name] = (after_backward["params"] + after_backward["grads"] + after_step["master"]
                            + after_step["optimizer"])
        for q in engine.module.parameters():
            counts["total"] += q.numel()
            if q.requires_grad:
                counts["trainable"] += q.numel()
            else:
                counts["frozen_bytes"] += q.numel() * q.element_size()
    # the full variant's frozen reference is a second copy of the policy; LoRA's is the policy itself
    reference = 0 if lora_r > 0 else sum(q.numel() * q.element_size() for q in engines["policy"].module.parameters())
    return {**counts, "states": totals, "per_engine": per_engine, "measured": sum(totals.values()), "reference_bytes": reference,
            "estimate": deepspeed_estimate(counts["trainable"])}


def rows_for(full: dict[str, Any], lora: dict[str, Any], lora_r: int) -> list[Row]:
    def mib(x: float) -> float:
        return x / MIB

    def parts(v: dict[str, Any]) -> str:
        return ", ".join(f"{k} {mib(b):.2f}" for k, b in v["states"].items()) + " MiB"

    out = [Row(SECTION, "trainable parameters, full", full["trainable"], "params",
               note=f"policy + value, {full['total']:,} in all"),
           Row(SECTION, f"trainable parameters, LoRA r={lora_r}", lora["trainable"], "params",
               ratio=lora["trainable"] / full["trainable"], baseline="full",
               note=f"policy adapters + full value model, {lora['total']:,} in all")]
    out += [Row(SECTION, "DeepSpeed estimate, full", mib(full["estimate"]), "MiB",
                note="estimate_zero2_model_states_mem_needs(trainable), 1 rank, no offload"),
            Row(SECTION, f"DeepSpeed estimate, LoRA r={lora_r}", mib(lora["estimate"]), "MiB",
                ratio=lora["estimate"] / full["estimate"], baseline="full",
                note=f"frozen base weights outside the formula: {mib(lora['frozen_bytes']):.2f} MiB (fp32)")]
    out += [Row(SECTION, "measured model states, full", mib(full["measured"]), "MiB", note=parts(full)),
            Row(SECTION, f"measured model states, LoRA r={lora_r}", mib(lora["measured"]), "MiB",
                ratio=lora["measured"] / full["measured"], baseline="full", note=parts(lora))]
    out += [Row(SECTION, "measured policy engine only, full", mib(full["per_engine"]["policy"]), "MiB"),
            Row(SECTION, f"measured policy engine only, LoRA r={lora_r}", mib(lora["per_engine"]["policy"]), "MiB",
                ratio=lora["per_engine"]["policy"] / full["per_engine"]["policy"], baseline="full",
                note="frozen base weights + adapters with their gradients, master and Adam states")]
    with_ref = [v["measured"] + v["reference_bytes"] for v in (full, lora)]
    out += [Row(SECTION, "measured + reference copy, full", mib(with_ref[0]), "MiB",
                note=f"frozen reference {mib(full['reference_bytes']):.2f} MiB"),
            Row(SECTION, f"measured + reference copy, LoRA r={lora_r}", mib(with_ref[1]), "MiB",
                ratio=with_ref[1] / with_ref[0], baseline="full", note="reference = adapters disabled, no copy")]
    return out


def run(ctx: BenchContext) -> list[Row]:
    from rlhf_overopt.run.engines import ensure_process_group

    ensure_process_group(torch.device("cpu"))
    lora_r = ctx.config.policy.lora_r or LORA_R
    seq_len = 16 if ctx.quick else 64
    full = measure_variant(ctx, 0, seq_len)
    lora = measure_variant(ctx, lora_r, seq_len)
    ctx.extra[f"{SECTION}_notes"] = (
        "Policy and value engines at ZeRO-2 on 1 rank, fp32. The estimator counts 20 bytes per trainable "
        "parameter on 1 rank (16-bit weights and gradients, fp32 master, Adam moments, gradient partition) and "
        "nothing for frozen ones; the measured bytes are fp32 (4 + 4 + 4 + 8 per trained parameter) and include "
        "the frozen base weights a LoRA policy keeps.")
    return rows_for(full, lora, lora_r)
