"""DeepSpeed engines for trained models and frozen models.

Trained models (policy, value) are `deepspeed.initialize` engines at the configured ZeRO stage;
frozen models (reference policy) are partitioned too at stage 3. A run without the launcher is a
one-process group of the same code, so `python launch/train.py` and `deepspeed launch/train.py`
share every line.

This module also owns how the trained policy is prepared for large models: gradient checkpointing
(Chen et al. 2016), bf16 on CUDA (DeepSpeed's bf16 section), and a LoRA policy (Hu et al. 2021)
whose reference is the same model with its adapters disabled (`AdapterDisabledReference`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import socket
import warnings
import weakref
from typing import Any, Callable, Iterator

import torch
import torch.distributed as tdist
from torch import nn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs a process group; outside a launcher make a one-rank group on a free port."""
    if tdist.is_initialized():
        return
    import deepspeed

    if "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def ds_config(*, zero_stage: int, micro_batch_per_rank: int, world_size: int, max_grad_norm: float,
              extra_path: str = "", dtype: str = "float32") -> dict[str, Any]:
    """The DeepSpeed JSON for one engine. Entries from `extra_path` sit under the computed ones."""
    config: dict[str, Any] = {}
    if extra_path:
        with open(extra_path, encoding="utf-8") as fh:
            config.update(json.load(fh))
    config.update({
        "train_micro_batch_size_per_gpu": micro_batch_per_rank,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro_batch_per_rank * world_size,
        "gradient_clipping": max_grad_norm,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    zero = dict(config.get("zero_optimization", {}))
    zero["stage"] = zero_stage
    config["zero_optimization"] = zero
    config["bf16"] = {"enabled": dtype == "bfloat16"}
    config["fp16"] = {"enabled": dtype == "float16"}
    return config


def cosine_schedule(total_steps: int, final_ratio: float) -> Callable[[int], float]:
    """LR multiplier: cosine from 1 to `final_ratio` over `total_steps` (constant when final_ratio=1)."""

    def factor(step: int) -> float:
        progress = min(step / max(total_steps, 1), 1.0)
        return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def checked_step(engine, what: str, step: int) -> None:
    """`engine.step()`, refusing a non-finite gradient: raises NonFiniteError naming `what` and
    the training step, with the model's weights as they were before this update.

    At ZeRO stage 0 the reduced gradients sit on the parameters after `backward`, and DeepSpeed
    would apply NaN/inf ones (and clip with a NaN coefficient), so their total norm is checked
    first and the gradients are dropped. At stages 1-3 DeepSpeed's own overflow check skips the
    update; its global gradient norm tells that it happened.
    """
    from rlhf_overopt.errors import NonFiniteError

    if engine.zero_optimization_stage() == 0:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if not torch.isfinite(norm):
            engine.zero_grad()
            raise NonFiniteError(f"step {step}: {what} gradient is not finite (norm {float(norm)}); "
                                 "the update was not applied")
        engine.step()
        return
    engine.step()
    norm = engine.get_global_grad_norm()
    if norm is not None and not math.isfinite(float(norm)):
        raise NonFiniteError(f"step {step}: {what} gradient is not finite (norm {float(norm)}); "
                             "DeepSpeed skipped the update")


_ENGINES: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()
"""module -> its DeepSpeed engine (weakly), so `gathered(module)` can reach the engine's ZeRO-3 hooks."""


def sized_for(config: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """The config with ZeRO-3 bucket and persistence sizes scaled to the model's hidden size h.

    DeepSpeed's defaults are sized for billion-parameter models: every parameter under 1e5
    elements stays whole on every rank (on the testbed that was 413k of 544k parameters, so
    ZeRO-3 barely partitioned anything), a 5e7-element prefetch gathers a small model at its first
    module, and a 5e8-element reduce bucket is allocated per rank (1.9 GiB of fp32). Scaled rules,
    applied only where the user's JSON does not set the key:
        stage3_param_persistence_threshold = 10 h,  stage3_prefetch_bucket_size = 0.9 h^2,
        reduce_bucket_size = h^2.
    """
    zero = dict(config.get("zero_optimization", {}))
    h = int(getattr(getattr(model, "config", None), "hidden_size", 0) or 0)
    if zero.get("stage") != 3 or h <= 0:
        return config
    zero.setdefault("stage3_param_persistence_threshold", 10 * h)
    zero.setdefault("stage3_prefetch_bucket_size", int(0.9 * h * h))
    zero.setdefault("reduce_bucket_size", h * h)
    return {**config, "zero_optimization": zero}


def offloads_optimizer(config: dict[str, Any]) -> bool:
    """Whether the DeepSpeed JSON puts optimizer states on the CPU (ZeRO-Offload), e.g.
    configs/deepspeed/zero{2,3}_offload.json through deepspeed.config."""
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") == "cpu"


def train_engine(model: nn.Module, *, lr: float, total_steps: int, final_ratio: float, config: dict[str, Any],
                 weight_decay: float = 0.0):
    """A DeepSpeed engine with AdamW and a cosine LR schedule stepped by `engine.step()`."""
    import deepspeed

    config = sized_for(config, model)

    params = [p for p in model.parameters() if p.requires_grad]
    if offloads_optimizer(config):
        # DeepSpeed refuses a torch optimizer with ZeRO-Offload: its CPU Adam steps the CPU-side
        # fp32 master weights (a C++ op built on first use)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        optimizer = DeepSpeedCPUAdam(params, lr=lr, weight_decay=weight_decay, eps=1e-5, adamw_mode=True)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, eps=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(total_steps, final_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=config)
    _ENGINES[engine.module] = weakref.ref(engine)
    return engine


def frozen_model(model: nn.Module, *, zero_stage: int, config: dict[str, Any], device: torch.device) -> nn.Module:
    """A model that is only evaluated: partitioned by a ZeRO-3 inference engine at stage 3."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if zero_stage != 3:
        return model.to(device)
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, config={**sized_for(config, model), "gradient_clipping": 0.0})
    engine.eval()
    _ENGINES[engine.module] = weakref.ref(engine)
    return engine.module


def _hooked_engine(module: nn.Module):
    """The ZeRO-3 engine whose per-module fetch/release hooks wrap `module`, or None (no engine
    registered, or one without the optimizer object that owns the hooks)."""
    ref = _ENGINES.get(module)
    engine = ref() if ref is not None else None
    optimizer = getattr(engine, "optimizer", None)
    owner = getattr(optimizer, "parameter_offload", optimizer)
    return engine if owner is not None and hasattr(owner, "forward_hooks") else None


@contextlib.contextmanager
def gathered(module: nn.Module, zero_stage: int) -> Iterator[None]:
    """Under ZeRO-3, gather all parameters once for a whole generation (not once per token).

    Inside the gather DeepSpeed's per-module hooks would still run around every submodule call
    of every generated token, fetching nothing: on the testbed that made gathered generation
    2.7x slower than ZeRO-0 (bench/zero.py). They are removed for the block and registered
    again after it, with the coordinator's recorded trace invalidated so the next training pass
    re-traces (what TRL's unwrap_model_for_generation does, through its remove_hooks/add_hooks).
    """
    if zero_stage != 3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        engine = _hooked_engine(module)
        if engine is None:
            yield
            return
        from trl.models.utils import add_hooks, remove_hooks

        remove_hooks(engine)
        try:
            yield
        finally:
            add_hooks(engine)


def local_parameter_count(module: nn.Module) -> int:
    """Parameter elements this rank holds: under ZeRO-3 its partition of each parameter, plus the
    whole tensor of parameters DeepSpeed keeps persistent (below the persistence threshold);
    otherwise the full tensors."""
    total = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel() + (p.ds_numel if getattr(p, "ds_persist", False) else 0)
        else:
            total += p.numel()
    return total


# ---------------------------------------------------------------------------------------------
# The trained and frozen models of an RL run
# ---------------------------------------------------------------------------------------------


def load_policy_model(cfg, policy_path: str, tokenizer=None) -> nn.Module:
    """The initial policy as configured (policy.dtype, policy.dropout_off, policy.trust_remote_code),
    its embeddings grown to the policy tokenizer's size when `load_tokenizer` added a pad token.

    Without `tokenizer` the policy's own is loaded from `policy_path` (as the drivers load it:
    the same pad is added, so the sizes agree).
    """
    from rlhf_overopt.run.models import load_causal_lm, load_tokenizer

    p = cfg.policy
    if tokenizer is None:
        tokenizer = load_tokenizer(policy_path, trust_remote_code=p.trust_remote_code)
    return load_causal_lm(policy_path, dtype=getattr(torch, p.dtype), trust_remote_code=p.trust_remote_code,
                          dropout_off=p.dropout_off, tokenizer=tokenizer)


def check_policy_dtype(cfg, device: torch.device) -> None:
    """Refuse a bf16 policy on a CPU at run start (device auto resolves only now): bf16 matmuls
    are ~100x slower than fp32 there. Raises InputError naming policy.dtype."""
    from rlhf_overopt.errors import InputError

    if cfg.policy.dtype == "bfloat16" and device.type != "cuda":
        raise InputError(f"policy.dtype: bfloat16 needs a CUDA device, this run is on {device.type} "
                         "(bf16 matmuls are ~100x slower than fp32 on a CPU); use policy.dtype=float32")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of keeping them (Chen et al. 2016):
    memory ~ sqrt(layers) for one more forward. Non-reentrant checkpointing, so the gradients equal
    those without it and frozen inputs (a LoRA base) need no `enable_input_require_grads`. It is
    active only in training mode: generation (eval mode, `use_cache=True` passed explicitly by
    `rollout.generate`) keeps its KV cache."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x's name for it
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def lora_policy(model: nn.Module, policy_cfg) -> nn.Module:
    """`model` as a peft PeftModel with trainable LoRA adapters (Hu et al. 2021) and frozen base weights."""
    from peft import LoraConfig, get_peft_model

    targets = policy_cfg.lora_target_modules.strip()
    config = LoraConfig(r=policy_cfg.lora_r, lora_alpha=policy_cfg.lora_alpha, lora_dropout=policy_cfg.lora_dropout,
                        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
                        task_type="CAUSAL_LM", bias="none")
    # peft 0.21 reads the model's is_gradient_checkpointing, which transformers 5.x deprecates in favour of
    # is_activation_checkpointing with a FutureWarning on every read; peft's answer (both names hold the same
    # flag) is unchanged, so only that warning is silenced here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


class AdapterDisabledReference(nn.Module):
    """The reference policy of a LoRA run: the trained PeftModel with its adapters disabled.

    The base weights never train, so the adapter-free model *is* the initial policy, and no second
    copy is loaded (what TRL and OpenRLHF do for LoRA/PEFT policies). Calls run under
    `disable_adapter()` and without gradients. The shared model is held as a submodule (so its
    device and parameters are found as for any reference), but `train()`/`eval()` on the
    reference do not touch the policy's mode.
    """

    def __init__(self, peft_model: nn.Module) -> None:
        super().__init__()
        self.model = peft_model

    def train(self, mode: bool = True) -> AdapterDisabledReference:
        self.training = mode
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), self.model.disable_adapter():
            return self.model(*args, **kwargs)


@dataclasses.dataclass
class Actors:
    """The models an RL driver trains and evaluates against: the policy engine, the value engine
    (None for value-free methods such as GRPO/RLOO), and the frozen reference (the initial policy)."""

    policy_engine: Any
    value_engine: Any
    reference: nn.Module

    @property
    def policy(self) -> nn.Module:
        return self.policy_engine.module

    def engines(self) -> dict[str, Any]:
        """{name: engine} of the trained engines, for checkpoints."""
        out = {"policy": self.policy_engine}
        if self.value_engine is not None:
            out["value"] = self.value_engine
        return out

    def parameter_counts(self) -> dict[str, int]:
        """Policy parameter elements: on this rank, in total, and trained (the LoRA adapters only,
        with policy.lora_r > 0); the value model's total and trained counts when there is one."""

        def numel(q) -> int:
            return int(getattr(q, "ds_numel", q.numel()))

        out = {"policy_local_params": local_parameter_count(self.policy),
               "policy_total_params": sum(numel(q) for q in self.policy.parameters()),
               "policy_trainable_params": sum(numel(q) for q in self.policy.parameters() if q.requires_grad)}
        if self.value_engine is not None:
            value = self.value_engine.module
            out["value_total_params"] = sum(numel(q) for q in value.parameters())
            out["value_trainable_params"] = sum(numel(q) for q in value.parameters() if q.requires_grad)
        return out


def build_actors(cfg, tokenizer, policy_path: str, *, micro_batch: int, world_size: int, total_updates: int,
                 value_path: str | None = None, value_heads: int = 1, device: torch.device) -> Actors:
    """Policy and value engines (AdamW, cosine schedule over `total_updates`, ppo.* learning rates)
    and the frozen reference, at deepspeed.zero_stage.

    The global RNG is seeded with cfg.seed before the value heads are drawn, so their
    initialization is the same on every rank. Policy, reference and value backbone are all grown
    to `len(tokenizer)` rows when the tokenizer got a pad token (`models.fit_embeddings`).

    policy.dtype bfloat16 (CUDA only, `check_policy_dtype`) gives both engines DeepSpeed's bf16
    section (fp32 master weights in the optimizer); the reference loads in policy.dtype.
    policy.gradient_checkpointing applies to the policy and the value backbone. With
    policy.lora_r > 0 the policy is a PeftModel training only its adapters and the reference is
    `AdapterDisabledReference(policy)`; the value model stays a full model (in the RLHF setups
    that use LoRA the value model is the small one, e.g. a reward-model-sized backbone).
    """
    from rlhf_overopt.run.models import check_vocabulary
    from rlhf_overopt.values import ValueModel

    check_policy_dtype(cfg, device)
    p, stage, pc = cfg.ppo, cfg.deepspeed.zero_stage, cfg.policy
    engine_cfg = ds_config(zero_stage=stage, micro_batch_per_rank=micro_batch, world_size=world_size,
                           max_grad_norm=p.max_grad_norm, extra_path=cfg.deepspeed.config, dtype=pc.dtype)
    torch.manual_seed(cfg.seed)
    policy_model = load_policy_model(cfg, policy_path, tokenizer)
    check_vocabulary(tokenizer, policy_model)
    if pc.gradient_checkpointing:
        enable_gradient_checkpointing(policy_model)
    if pc.lora_r > 0:
        policy_model = lora_policy(policy_model, pc)
    policy_engine = train_engine(policy_model, lr=p.lr, total_steps=total_updates, final_ratio=p.lr_final_ratio,
                                 config=engine_cfg)
    value_engine = None
    if value_path is not None:
        value_model = ValueModel.from_pretrained_backbone(value_path, value_heads, tokenizer=tokenizer)
        if pc.gradient_checkpointing:
            enable_gradient_checkpointing(value_model.backbone)
        value_engine = train_engine(value_model, lr=p.value_lr, total_steps=total_updates,
                                    final_ratio=p.lr_final_ratio, config=engine_cfg)
    if pc.lora_r > 0:
        reference = AdapterDisabledReference(policy_engine.module)
    else:
        reference = frozen_model(load_policy_model(cfg, policy_path, tokenizer), zero_stage=stage, config=engine_cfg,
                                 device=device)
    return Actors(policy_engine, value_engine, reference)


def savable(policy: nn.Module) -> nn.Module:
    """The model to write for `policy`: itself, or for a LoRA PeftModel a merged copy
    (`merge_and_unload` on a deep copy: W + (alpha / r) B A in every adapted layer), so the folder
    is a plain transformers model that `AutoModelForCausalLM.from_pretrained` loads without peft.
    The copy leaves the training model (and its engine's state) untouched."""
    if not hasattr(policy, "merge_and_unload"):
        return policy
    return copy.deepcopy(policy).merge_and_unload()


def save_policy(policy: nn.Module, tokenizer, directory, zero_stage: int, is_main: bool) -> None:
    """The trained policy as a transformers folder (safetensors), gathered under ZeRO-3; a LoRA
    policy is saved merged (`savable`)."""
    from rlhf_overopt.run import dist

    with gathered(policy, zero_stage):
        if is_main:
            savable(policy).save_pretrained(directory, safe_serialization=True)
            tokenizer.save_pretrained(directory)
    dist.barrier()
