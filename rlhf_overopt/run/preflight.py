"""`launch/train.py --check`: a config resolved into the plan of its run, without loading weights.

For each model the run uses — policy (and its frozen reference), value model, proxy members, gold —
the architecture and parameter count come from its config file alone (the model is built on the
meta device: no weights are read, nothing is allocated). Then the ranks, the derived sizes
(rlhf_overopt.config.plan), the evaluations, and per-rank model-state memory of the trained models from
DeepSpeed's estimator at the configured ZeRO stage (its mixed-precision accounting: 16-bit
parameters plus fp32 optimizer states), and of the frozen ones at their dtype.

Hub names are resolved as given; where no hub is reachable, `stand_ins` maps a name to a local
folder of the same architecture family (the presets are checked here that way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rlhf_overopt.config.experiment import Config
from rlhf_overopt.config.methods import METHODS
from rlhf_overopt.config.validate import _value

BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelInfo:
    """What the plan needs to know of one model, from its config file."""

    role: str
    source: str
    architecture: str
    parameters: int
    context: int | None
    largest_layer: int


def _resolve(source: str, stand_ins: dict[str, str]) -> str:
    return stand_ins.get(source, source)


def model_info(role: str, source: str, stand_ins: dict[str, str], *, classifier: bool = False,
               testbed_cfg=None) -> ModelInfo:
    """Architecture and parameter count of `source` from its config (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, GPT2Config

    from rlhf_overopt.run.models import context_length, quiet_transformers

    with quiet_transformers():
        if source == "testbed":
            t = testbed_cfg
            config = GPT2Config(vocab_size=t.vocab_size, n_layer=t.n_layer, n_embd=t.n_embd, n_head=t.n_head,
                                n_positions=t.n_positions)
        else:
            config = AutoConfig.from_pretrained(_resolve(source, stand_ins))
        if classifier:
            config.num_labels = getattr(config, "num_labels", 1) or 1
        with torch.device("meta"):
            build = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
            model = build.from_config(config)
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return ModelInfo(role, source, type(model).__name__, sum(p.numel() for p in model.parameters()),
                     context_length(config), largest)


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def trained_state_bytes(params: int, largest_layer: int, stage: int, world: int) -> int:
    """Per-rank model-state bytes of a trained model from DeepSpeed's estimator (no offload)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if stage == 3:
        return estimate_zero3_model_states_mem_needs(params, largest_layer, num_gpus_per_node=world, cpu_offload=False,
                                                     cpu_offload_params=False)[1]
    # ZeRO-0/1 keep every state on every rank: the stage-2 formula on one rank
    return estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=world if stage == 2 else 1,
                                                 cpu_offload=False)[1]


def describe(cfg: Config, world: int, stand_ins: dict[str, str] | None = None) -> str:
    """The plan of `cfg` on `world` ranks, as text."""
    stand_ins = dict(stand_ins or {})
    method = METHODS[cfg.method]
    lines = [f"method {cfg.method}: {method.summary}", f"driver loops/{method.driver}.py, "
             f"{world} rank(s), ZeRO-{cfg.deepspeed.zero_stage}, output_dir {cfg.output_dir}"]
    models: list[tuple[ModelInfo, str, bool]] = []  # (info, dtype, trained)
    sections = method.sections
    if "policy" in sections:
        policy = model_info("policy", cfg.policy.path, stand_ins, testbed_cfg=cfg.testbed)
        trained = method.trains_policy
        models.append((policy, cfg.policy.dtype, trained))
        if trained:
            models.append((ModelInfo("reference (frozen initial policy)", policy.source, policy.architecture,
                                     policy.parameters, policy.context, policy.largest_layer), cfg.policy.dtype, False))
        if method.value_model:
            heads = len(cfg.components.names) + 1 if method.composite else 1
            models.append((ModelInfo(f"value model ({heads} head(s))", policy.source, policy.architecture,
                                     policy.parameters, policy.context, policy.largest_layer), "float32", True))
    if "scaling" in sections:
        sizes = ", ".join(f"L{z.n_layer}-d{z.n_embd}" for z in cfg.scaling.proxy_sizes)
        lines.append(f"proxies: one per cell, sizes [{sizes}] x train_pairs {list(cfg.scaling.train_pairs)} "
                     f"({len(cfg.scaling.proxy_sizes) * len(cfg.scaling.train_pairs)} cells; proxy.k is not read), "
                     f"each scoring one pool of {cfg.eval.n_prompts} prompts x {cfg.scaling.pool_size}"
                     + (f" from {cfg.scaling.pool}" if cfg.scaling.pool else " sampled from the initial policy"))
    elif "proxy" in sections:
        if cfg.proxy.path:
            lines.append(f"proxies: loaded from {cfg.proxy.path}")
        else:
            backbone = cfg.policy.path if cfg.proxy.backbone == "policy" else cfg.proxy.backbone
            member = model_info(f"proxy member x{cfg.proxy.k} ({cfg.proxy.kind})", backbone, stand_ins,
                                classifier=True, testbed_cfg=cfg.testbed)
            count = 1 if cfg.proxy.kind in ("multihead", "lora", "warm") else cfg.proxy.k
            if method.composite:
                count *= len(cfg.components.names)
            models.append((ModelInfo(member.role, member.source, member.architecture, member.parameters * count,
                                     member.context, member.largest_layer), cfg.proxy.dtype, False))
            lines.append(f"proxies: {cfg.proxy.k} {cfg.proxy.kind} member(s) from {backbone}, trained on "
                         f"{cfg.proxy.dataset} preferences")
    if "gold" in sections and cfg.gold.path != "testbed":
        models.append((model_info("gold", cfg.gold.path, stand_ins, classifier=True), cfg.gold.dtype, False))
    elif "gold" in sections:
        lines.append("gold: the testbed's rule-based gold (no model)")
    for info, dtype, trained in models:
        ctx = f", context {info.context}" if info.context else ""
        lines.append(f"{info.role}: {info.source} ({info.architecture}, {info.parameters / 1e6:.2f}M parameters"
                     f"{ctx}, {dtype}{', trained' if trained else ', frozen'})")
    if "data" in sections:
        d = cfg.data
        where = "the testbed's prompts" if d.prompts == "testbed" else (
            f"{d.prompts}{'/' + d.subset if d.subset else ''}: train split {d.train_split!r}, eval "
            + (f"split {d.eval_split!r}" if d.eval_split else f"{d.eval_size} held out"))
        lines.append(f"prompts: {where}" + (f", template {d.prompt_template!r}" if d.prompt_template else "")
                     + (", chat template" if d.chat_template else ""))
    lines.extend(_schedule(cfg, world))
    stage = cfg.deepspeed.zero_stage
    memory = []
    for info, dtype, trained in models:
        if trained:
            b = trained_state_bytes(info.parameters, info.largest_layer, stage, world)
            memory.append(f"{info.role} {_gib(b)} (trained, DeepSpeed estimate at ZeRO-{stage})")
        else:
            shard = world if stage == 3 and info.role.startswith("reference") else 1
            memory.append(f"{info.role} {_gib(info.parameters * BYTES[dtype] / shard)} ({dtype} weights)")
    if memory:
        lines.append("model states per rank:")
        lines.extend(f"  {m}" for m in memory)
    return "\n".join(lines)


def _schedule(cfg: Config, world: int) -> list[str]:
    method = METHODS[cfg.method]
    if method.rollouts:
        from rlhf_overopt.config.plan import make_plan

        plan = make_plan(cfg, world)
        p = cfg.ppo
        group = f", {plan.group_size} responses per prompt" if plan.group_size > 1 else ""
        return [f"plan: {p.steps} iterations x {p.batch_size} rollouts ({plan.local_batch} per rank{group}), "
                f"{p.ppo_epochs} epoch(s) of {p.batch_size // p.mini_batch_size} minibatch(es): "
                f"{plan.total_updates} optimizer steps",
                f"evaluations: {len(plan.eval_steps)} on {cfg.eval.n_prompts} held-out prompts "
                f"({plan.eval_per_rank} per rank) at steps {_steps(plan.eval_steps)}; checkpoints at {_steps(plan.save_steps)}"]
    if "bon" in method.sections:
        return [f"plan: {cfg.eval.n_prompts} eval prompts x pool {cfg.bon.pool_size} "
                f"({cfg.eval.n_prompts * cfg.bon.pool_size} samples{', from ' + cfg.bon.pool if cfg.bon.pool else ''}),"
                f" every n of the grid and aggregator from one scored pool"]
    if "dpo" in method.sections:
        d = cfg.dpo
        return [f"plan: {d.epochs:g} epoch(s) of {d.dataset} pairs in batches of {d.batch_size}, "
                f"{d.evals_per_epoch} evaluations per epoch on {cfg.eval.n_prompts} prompts"]
    if "label" in method.sections:
        lab = cfg.label
        return [f"plan: {lab.responses_per_prompt} responses per train prompt"
                f"{'' if not lab.max_prompts else f' (first {lab.max_prompts} prompts)'}, label noise {lab.noise:g}, "
                f"chunks of {lab.chunk_prompts} prompts"]
    return []


def _steps(steps: tuple[int, ...]) -> str:
    return ", ".join(map(str, steps)) if len(steps) <= 8 else f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


def stand_in_map(items: list[str]) -> dict[str, Any]:
    """--stand-in NAME=PATH items as a dict."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--stand-in: {item!r} must look like hub/name=local/path")
        name, path = item.split("=", 1)
        out[name] = path
    return out


def check_sources(cfg: Config) -> None:
    """Before any work: every model the run names can be read (its config file, locally or from
    the hub), and a model gold's context holds a full response. Raises InputError, one line."""
    from rlhf_overopt.errors import InputError

    method = METHODS[cfg.method]
    refs = {}
    if "policy" in method.sections and cfg.policy.path != "testbed":
        refs["policy.path"] = cfg.policy.path
    pool = "bon" in method.sections and bool(cfg.bon.pool)
    if "gold" in method.sections and cfg.gold.path != "testbed" and not pool:
        refs["gold.path"] = cfg.gold.path
    if "proxy" in method.sections and not cfg.proxy.path and cfg.proxy.backbone != "policy":
        refs["proxy.backbone"] = cfg.proxy.backbone
    import logging

    from transformers import AutoConfig, AutoTokenizer

    from rlhf_overopt.run.models import context_length, quiet_transformers

    configs = {}
    hub_log = logging.getLogger("huggingface_hub")  # it logs each failed request: the error below says it once
    level, hub_log.level = hub_log.level, logging.CRITICAL
    for key, ref in refs.items():
        try:
            with quiet_transformers():
                configs[key] = AutoConfig.from_pretrained(ref, trust_remote_code=False)
        except (OSError, ValueError) as exc:
            where = "from the hub (no network?)" if not Path(ref).expanduser().exists() else "as a model folder"
            raise InputError(f"{key}: could not read {ref} {where}: {str(exc).strip().splitlines()[0]}") from None
        finally:
            hub_log.setLevel(level)
    if "gold.path" in configs:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(refs["gold.path"])
        limit = tokenizer.model_max_length if 0 < (tokenizer.model_max_length or 0) < 10**8 else None
        positions = context_length(configs["gold.path"])
        limit = positions if limit is None or (positions is not None and positions < limit) else limit
        caps = [_value(cfg, key) for key in method.response_caps]
        if limit is not None and caps and limit < max(caps) + 1:
            raise InputError(f"gold.path: {refs['gold.path']} reads at most {limit} tokens, fewer than a full "
                             f"response ({max(caps)} new tokens + EOS): responses would be truncated away; use a gold "
                             "with a longer context or fewer max_new_tokens")
