"""Typed experiment configuration.

One YAML file selects the method and everything else; ``key.sub=value`` arguments override it.
Every section is a frozen dataclass whose fields carry a one-line docstring. Loading is strict:
an unknown key, a value of the wrong type, an impossible value or a missing file raises
``ConfigError`` with one line naming the key, before any work starts (DESIGN.md §3, §6).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem; the message is one line that names the key."""


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestbedConfig:
    """The embedded offline world: corpus, tokenizer, SFT policy, gold scorer, prompts, preferences."""

    __test__ = False  # not a pytest class despite the name

    seed: int = 0
    """Seed of everything the testbed builds; the same seed gives byte-identical artifacts."""
    cache_dir: str = ""
    """Root of the content-hashed testbed cache; empty means $RLHF_OVEROPT_CACHE or ~/.cache/rlhf_overopt."""
    n_reviews: int = 40000
    """Number of generated movie-review-like texts in the corpus."""
    vocab_size: int = 1024
    """Byte-level BPE vocabulary size (special tokens included)."""
    n_layer: int = 2
    """Transformer blocks of the SFT policy."""
    n_embd: int = 128
    """Hidden size of the SFT policy."""
    n_head: int = 4
    """Attention heads of the SFT policy."""
    n_positions: int = 128
    """Context length of the SFT policy in tokens."""
    sft_steps: int = 350
    """Optimizer steps of SFT training on the corpus."""
    sft_batch_size: int = 32
    """Sequences per SFT step."""
    sft_lr: float = 2e-3
    """Peak learning rate of SFT training (cosine decay, short warm-up)."""
    prompt_words: int = 4
    """Number of opening words of a review used as a prompt."""
    n_train_prompts: int = 6000
    """Prompts in the train split (the preference dataset has one pair per train prompt)."""
    n_eval_prompts: int = 512
    """Prompts in the held-out eval split."""
    max_new_tokens: int = 48
    """Response length cap when sampling the preference dataset."""
    label_noise: float = 0.25
    """Fraction of preference labels flipped at random (Coste et al. use 0.25)."""
    gold_eos_penalty: float = 2.0
    """Gold penalty for a response that never emits EOS (rarely seen in labelled pairs)."""
    gold_repetition_weight: float = 1.0
    """Gold weight of (1 - distinct-bigram ratio), a degeneracy penalty."""
    gold_length_target: int = 15
    """Centre of the response length band (words) that gold prefers; outside it responses lose gold."""
    gold_length_tolerance: int = 15
    """Half-width (words) of the penalty-free length band; the initial policy rarely leaves it."""
    gold_length_weight: float = 2.0
    """Gold lost per gold_length_target words outside the length band."""
    gen_batch_size: int = 512
    """Prompts per generation batch when sampling the preference dataset and eval statistics."""
    num_threads: int = 1
    """Torch intra-op threads while building (0 keeps torch's setting); 1 is fastest for these small
    models on a shared CPU, where a second spinning thread made steps up to 10x slower (measured)."""


@dataclass(frozen=True)
class PolicyConfig:
    """The initial (SFT) policy that every method starts from and measures KL against."""

    path: str = "testbed"
    """'testbed' for the embedded SFT policy, or a local path / hub name of a causal LM."""
    trust_remote_code: bool = False
    """Allow model code shipped with a checkpoint to run (off unless you trust the source)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype; use float32 on CPU."""
    dropout_off: bool = True
    """Set every dropout probability to 0 (required for PPO log-prob consistency)."""


@dataclass(frozen=True)
class GoldConfig:
    """The gold reward the policy never optimizes."""

    path: str = "testbed"
    """'testbed' for the embedded rule-based gold scorer, or a path to a sequence-classification model."""
    batch_size: int = 64
    """Responses per gold scoring batch (model gold only)."""
    trust_remote_code: bool = False
    """Allow model code shipped with the gold checkpoint to run."""


@dataclass(frozen=True)
class ProxyConfig:
    """The proxy reward ensemble trained on gold-labelled (noisy) preferences."""

    kind: Literal["independent", "pretrain", "multihead", "lora"] = "independent"
    """independent: K full models; pretrain: members from differently seeded pretraining runs;
    multihead: one backbone with K heads; lora: one frozen base with K LoRA adapters."""
    k: int = 5
    """Number of ensemble members."""
    backbone: str = "policy"
    """'policy' initializes members from the SFT policy; otherwise a path to a causal LM or
    sequence-classification checkpoint."""
    path: str = ""
    """Directory of an already trained ensemble to load; empty means train (or reuse from cache)."""
    n_layer: int = 0
    """Truncate the backbone to its first n_layer blocks (0 keeps all): smaller, cheaper proxies."""
    epochs: int = 2
    """Passes over the preference data per member."""
    lr: float = 1e-3
    """Learning rate of proxy training."""
    batch_size: int = 64
    """Preference pairs per proxy training step."""
    offset_eta: float = 0.0
    """Weight of the offset regularizer eta*(r+ + r-)^2 (Eisenstein et al. 2023)."""
    lora_r: int = 8
    """LoRA rank for kind=lora."""
    lora_alpha: int = 16
    """LoRA alpha for kind=lora."""
    standardize: bool = True
    """Standardize each member to mean 0, std 1 on initial-policy responses (Coste et al.)."""
    min_accuracy: float = 0.55
    """A member whose validation accuracy against noisy labels is below this is reported as failed."""
    on_failed_member: Literal["error", "warn", "drop"] = "warn"
    """What to do with a failed member: stop, keep it with a warning, or drop it."""
    score_batch_size: int = 256
    """Responses per proxy scoring batch."""
    max_length: int = 0
    """Token cap of prompt + response (+ EOS) fed to a proxy, keeping the end; 0 means the backbone's context length."""
    weight_decay: float = 0.0
    """AdamW weight decay of proxy training."""
    train_pairs: int = 0
    """Train on only the first train_pairs pairs of the (shuffled) train split; 0 uses all. Less
    preference data gives weaker proxies that are overoptimized sooner (Gao et al. 2022, Fig. 4)."""
    train_workers: int = 0
    """kind=independent|pretrain on CPU: members trained at once in this many processes, each with
    this process's torch thread count; 0 = as many as the cores allow (up to K), 1 = one after
    another here. The weights do not depend on it (each member is seeded on its own)."""
    multihead_bootstrap: bool = True
    """kind=multihead: each head trains on its own resample (with replacement) of every batch, so heads see different data."""
    score_method: Literal["loop", "vmap"] = "loop"
    """kind=independent|pretrain: score members one by one, or all at once with torch.func.vmap over stacked
    weights. Keep "loop" on CPU: vmap measured 1.3x (K=1) to 2.6x (K=5) slower there (BENCHMARKS.md)."""


@dataclass(frozen=True)
class AggregateConfig:
    """How the K member scores become the one proxy score that is optimized."""

    name: str = "mean"
    """mean | wco | uwo | median | mean_minus_std | member_<i>."""
    uwo_lambda: float = 0.5
    """lambda in UWO = mean - lambda * variance (0.5 for BoN, 0.1 for PPO in Coste et al.)."""
    std_k: float = 1.0
    """k in mean - k * std."""
    variance: Literal["population", "sample"] = "population"
    """Variance estimator across members (the paper's population variance by default)."""


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: sampling settings and the KL estimator reported on curves."""

    n_prompts: int = 256
    """Held-out eval prompts scored at each evaluation."""
    every: int = 10
    """Evaluate every this many optimization steps (RL methods)."""
    max_new_tokens: int = 48
    """Response length cap at evaluation."""
    temperature: float = 1.0
    """Sampling temperature at evaluation (also used for the KL log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling at evaluation (1.0 keeps the KL estimate exact)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator for curves: k1 = r, k2 = r^2/2, k3 = exp(-r) - 1 + r."""
    batch_size: int = 128
    """Prompts per evaluation generation batch."""
    n_samples_logged: int = 4
    """Prompt/response examples written to samples.jsonl per evaluation."""


@dataclass(frozen=True)
class BonConfig:
    """Best-of-n: one pool of N samples per eval prompt gives every n's curve."""

    pool_size: int = 256
    """N, samples drawn per eval prompt."""
    n_grid: list[int] = field(default_factory=list)
    """Values of n to evaluate; empty means 1, 2, 4, ..., N."""
    aggregators: list[str] = field(
        default_factory=lambda: ["members", "mean", "wco", "uwo", "median", "mean_minus_std"]
    )
    """Aggregators to curve; 'members' expands to member_0 .. member_{K-1}."""
    temperature: float = 1.0
    """Sampling temperature of the pool."""
    top_p: float = 1.0
    """Nucleus sampling of the pool."""
    max_new_tokens: int = 48
    """Response length cap of the pool."""
    batch_size: int = 512
    """Sequences per generation batch."""


@dataclass(frozen=True)
class PPOConfig:
    """Language-model PPO (Ziegler et al. 2019; Huang et al. 2024 'N implementation details')."""

    steps: int = 100
    """PPO iterations (each: one rollout batch, then ppo_epochs over it)."""
    batch_size: int = 32
    """Rollouts per iteration, over all ranks."""
    mini_batch_size: int = 8
    """Rollouts per optimizer step, over all ranks."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    lr: float = 1e-4
    """Policy learning rate."""
    value_lr: float = 1e-4
    """Value model learning rate."""
    lr_final_ratio: float = 1.0
    """Cosine decay of both learning rates to this fraction at the last step (1.0: constant)."""
    clip_range: float = 0.2
    """PPO ratio clip epsilon."""
    clip_range_value: float = 0.2
    """Value clip around the old values."""
    vf_coef: float = 0.5
    """Weight of the value loss (value model is separate; scales its loss)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.01
    """KL penalty coefficient (initial value when adaptive)."""
    adaptive_kl: bool = False
    """Adapt the KL coefficient towards kl_target (Ziegler et al.)."""
    kl_target: float = 6.0
    """Target sequence KL (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in rollouts) of the adaptive controller."""
    kl_penalty_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator used in the reward penalty."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards before GAE."""
    whiten_advantages: bool = True
    """Whiten advantages per rollout batch."""
    no_eos_penalty: float = 0.0
    """Added to the score of a response that never emits EOS (negative to penalize; 0 disables)."""
    temperature: float = 1.0
    """Rollout sampling temperature (log-probs are divided by it in every pass)."""
    max_new_tokens: int = 48
    """Rollout response length cap."""
    value_init: Literal["proxy", "policy"] = "policy"
    """Initialize the value model from a proxy member's backbone or from the policy."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    save_every: int = 50
    """Checkpoint every this many iterations (and at the end)."""


@dataclass(frozen=True)
class DPOConfig:
    """Direct alignment (DPO / IPO / SLiC); beta sets the KL budget (Rafailov et al. 2024)."""

    beta: float = 0.1
    """Inverse KL budget: small beta = large budget."""
    loss_type: Literal["dpo", "ipo", "slic"] = "dpo"
    """Loss family member."""
    lr: float = 5e-4
    """Learning rate."""
    lr_final_ratio: float = 1.0
    """Cosine decay of the learning rate to this fraction at the last step (1.0: constant)."""
    epochs: float = 1.0
    """Passes over the preference data (fractions allowed)."""
    batch_size: int = 32
    """Pairs per optimizer step, over all ranks."""
    dataset: str = "testbed"
    """'testbed' preferences, or a path to a `datasets` dataset with prompt/chosen/rejected."""
    quality: Literal["high", "medium", "low"] = "high"
    """Testbed data-quality tier: share of pairs whose one response comes from the corpus."""
    corpus_share_medium: float = 0.25
    """Share of pairs in the medium tier whose one response is replaced by a corpus review continuation."""
    corpus_share_low: float = 0.5
    """Share of pairs in the low tier whose one response is replaced by a corpus review continuation."""
    max_length: int = 0
    """Token cap of prompt + response (+ EOS) in training pairs; 0 means the policy's context length."""
    length_normalize: bool = False
    """Average each response's log-ratio over its tokens instead of summing (TRL does this for IPO)."""
    precompute_ref: bool = True
    """Compute reference log-probs once up front (else a frozen reference runs on every batch)."""
    logprob_batch_size: int = 64
    """Pairs per forward pass when precomputing reference log-probs and proxy margins."""
    evals_per_epoch: int = 8
    """Evaluation points per epoch (plus step 0 and the last step)."""
    save_every: int = 50
    """Checkpoint every this many optimizer steps (and at the end)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""


@dataclass(frozen=True)
class MADPOConfig:
    """Margin-adaptive DPO weights (Rho 2025); the margin comes from the proxy ensemble."""

    c_max: float = 2.0
    """Largest weight slope."""
    c_min: float = 0.0
    """Smallest slope; 0 means 1/c_max."""
    lam: float = 1.0
    """Steepness of the transition around tau."""
    tau: float = math.log(999)
    """Margin at which the weighting switches off."""
    margin_aggregator: str = "member_0"
    """Aggregator applied to the K member margins r_i(chosen) - r_i(rejected): member_<i> (the paper's single RM), mean, wco, uwo, ..."""
    standardized_margins: bool = False
    """Margins from standardized member scores; False keeps the raw Bradley-Terry logits the weight formula assumes."""


@dataclass(frozen=True)
class DeepSpeedConfig:
    """DeepSpeed engine settings for trained models."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO optimization stage."""
    config: str = ""
    """Optional DeepSpeed JSON whose entries are merged under the computed ones."""


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases tracking; the run directory stays the source of truth."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline needs no login and writes under the run directory."""
    project: str = "rlhf_overopt"
    """W&B project."""
    group: str = ""
    """W&B group (a sweep sets it)."""
    entity: str = ""
    """W&B entity (team or user); empty for the default."""


@dataclass(frozen=True)
class ComponentsConfig:
    """Component rewards (Moskovitz et al. 2023): one proxy ensemble per aspect of gold, each trained
    with the proxy.* settings on preferences labelled by its own group of gold terms."""

    names: list[str] = field(default_factory=lambda: ["sentiment", "fluency"])
    """Component names, in order: the order of constraints, thresholds, weights and logged lists."""
    terms: list[str] = field(default_factory=lambda: ["sentiment", "repetition+eos+length"])
    """Per component, the '+'-joined testbed gold terms (sentiment, repetition, eos, length) whose sum labels its pairs."""
    label_noise: float = 0.25
    """Fraction of each component's preference labels flipped at random."""
    pairs_per_prompt: int = 1
    """Response pairs per train prompt: 1 relabels the testbed's pairs; more samples extra pairs from the initial policy."""
    path: str = ""
    """Folder of trained components (a saved ensemble per name) to load; empty means train (or reuse from cache)."""


@dataclass(frozen=True)
class ConstrainedConfig:
    """Constrained RLHF with Lagrange multipliers: mu-PPO and xi-PPO (Moskovitz et al. 2023, §4)."""

    constraint: Literal["inequality", "equality"] = "inequality"
    """inequality: mu-PPO, v_i >= theta_i, sigmoid weights; equality: xi-PPO, v_i = theta_i, tanh weights."""
    objective: str = "kl"
    """Maximized subject to the constraints: 'kl' (minus the KL to the initial policy) or a component name (then unconstrained, with the ppo.kl_coef penalty)."""
    thresholds: list[float] = field(default_factory=list)
    """theta per constrained component (standardized proxy units); empty means read thresholds_file."""
    thresholds_file: str = ""
    """thresholds.json written by method proxy_points (or its run directory), used when thresholds is empty."""
    multiplier_init: float = 0.0
    """Initial raw multiplier mu of every constraint (sigmoid(0) = 0.5, tanh(0) = 0)."""
    multiplier_lr: float = 0.05
    """SGD learning rate of the multipliers (paper: 0.01 to 0.1)."""
    multiplier_momentum: float = 0.1
    """SGD momentum of the multipliers (paper: 0.1)."""
    multiplier_grad_clip: float = 0.5
    """Gradient-norm clip of each multiplier step (paper: 0.5)."""


@dataclass(frozen=True)
class NelderMeadConfig:
    """NM-PPO: Nelder-Mead (scipy) over the thresholds within one run (Moskovitz et al. 2023, §4.3)."""

    stretch_steps: int = 10
    """PPO iterations per function evaluation; each ends with a gold evaluation whose negative is minimized."""
    initial_step: float = 0.3
    """Edge of the initial simplex around constrained.thresholds, in standardized proxy units."""
    xatol: float = 0.01
    """Stop when the simplex is this small in thresholds (paper: tol 0.01)."""
    fatol: float = 0.01
    """Stop when the simplex's gold values differ by less than this (paper: tol 0.01)."""


@dataclass(frozen=True)
class DynamicWeightingConfig:
    """Weights of the component rewards: fixed, or adapted during RL (Lu et al. 2025)."""

    mode: Literal["fixed", "hypervolume", "gradient"] = "fixed"
    """fixed; hypervolume: reward scaled by 0.5 + 1.5 tanh(HV gain) at each eval; gradient: w_j *= exp(eta I_j / mu)."""
    weights: list[float] = field(default_factory=list)
    """Initial (for fixed: constant) weight per component, normalized to sum 1; empty means uniform."""
    hv_reference_offset: float = 1.0
    """Hypervolume reference point: the step-0 eval component scores minus this, in every objective."""
    gradient_eta: float = 0.0
    """eta of the gradient-based update; 0 means ppo.lr (the paper uses the actor learning rate)."""
    gradient_mu: float = 1e-4
    """Temperature mu of the gradient-based update (paper: 1e-4 to 1e-5)."""
    gradient_every: int = 1
    """Update the weights every this many PPO iterations."""


@dataclass(frozen=True)
class ProxyPointsConfig:
    """Proxy points: where gold peaks against each component's value (Moskovitz et al. 2023, §3)."""

    runs: list[str] = field(default_factory=list)
    """Run directories, one per component in components.names order, to read; empty means train one run per component (ppo.* settings, weight 1 on it)."""
    min_points: int = 3
    """Fewest evaluation points a component's run needs for the quadratic fit."""


@dataclass(frozen=True)
class Config:
    """One experiment."""

    method: Literal["build_testbed", "train_rm", "bon", "ppo", "dpo", "madpo", "constrained_ppo", "nm_ppo",
                    "dynamic_ppo", "proxy_points"] = "ppo"
    """What to run."""
    name: str = ""
    """Run name; empty means the config file's stem."""
    output_dir: str = ""
    """Run directory; empty means runs/<name>."""
    seed: int = 0
    """Seed of the run (each rank adds its rank)."""
    resume: bool = False
    """Continue from the last checkpoint in output_dir."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Compute device; auto picks cuda when available."""
    num_threads: int = 1
    """torch CPU threads per process (1 suits the testbed's tiny models and shared machines; 0 = cores / local ranks)."""
    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    gold: GoldConfig = field(default_factory=GoldConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bon: BonConfig = field(default_factory=BonConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    madpo: MADPOConfig = field(default_factory=MADPOConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    constrained: ConstrainedConfig = field(default_factory=ConstrainedConfig)
    nm: NelderMeadConfig = field(default_factory=NelderMeadConfig)
    weighting: DynamicWeightingConfig = field(default_factory=DynamicWeightingConfig)
    proxy_points: ProxyPointsConfig = field(default_factory=ProxyPointsConfig)

    @property
    def run_dir(self) -> Path:
        """The run directory (output_dir, resolved)."""
        return Path(self.output_dir)


# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, strictly
# ---------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it converted (int -> float only)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is Literal:
        choices = typing.get_args(tp)
        # YAML gives ints for "0"; compare by value and type so True never matches 1.
        for choice in choices:
            if value == choice and type(value) is type(choice):
                return choice
        raise ConfigError(f"{key}: must be one of {_type_name(tp)}, got {value!r}")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _convert(value, args[0], key)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string; read it as the number meant.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(float(value)):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {tp!r} at {key}")


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{full}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        full = f"{prefix}.{name}" if prefix else name
        kwargs[name] = _convert(value, hints[name], full)
    return cls(**kwargs)


def _field_type(cls: type, dotted: str) -> Any:
    """Annotation of a dotted key, or None when the key does not exist."""
    tp: Any = cls
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        hints = typing.get_type_hints(tp)
        if part not in hints:
            return None
        tp = hints[part]
    return tp


def parse_override(item: str) -> tuple[str, Any]:
    """Split ``a.b=value``; the value is read as YAML except for string fields, kept verbatim."""
    if "=" not in item:
        raise ConfigError(f"{item}: an override must look like key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{item}: an override needs a key before '='")
    tp = _field_type(Config, key)
    if tp is str:
        return key, raw
    try:
        return key, yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot read value {raw!r} ({exc.__class__.__name__})") from None


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section, cannot set {key}")
        node = child
    node[parts[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), *, check_paths: bool = True) -> Config:
    """Load a YAML config, apply ``key.sub=value`` overrides, fill derived defaults, validate.

    Raises ConfigError (one line naming the key) on any problem; nothing is written.
    """
    data: dict[str, Any] = {}
    stem = "run"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--config: {p} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config: {p} must hold a mapping of keys at the top level")
        loaded.pop("_meta", None)  # provenance written into resolved configs
        data = loaded
        stem = p.stem
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    cfg = _build(Config, data)
    name = cfg.name or stem
    cfg = dataclasses.replace(cfg, name=name, output_dir=cfg.output_dir or str(Path("runs") / name))
    validate(cfg, check_paths=check_paths)
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation of values and combinations
# ---------------------------------------------------------------------------------------------


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _is_model_ref(path: str) -> bool:
    """True for a local directory; hub-like names ('org/model') pass as references to be loaded."""
    p = Path(path).expanduser()
    return p.exists() or (not path.startswith((".", "/", "~")) and path.count("/") == 1)


def validate(cfg: Config, *, check_paths: bool = True) -> None:
    """Check values and combinations; the first problem raises ConfigError naming its key."""
    positive_ints = {
        "testbed.n_reviews": cfg.testbed.n_reviews,
        "testbed.vocab_size": cfg.testbed.vocab_size,
        "testbed.n_layer": cfg.testbed.n_layer,
        "testbed.n_embd": cfg.testbed.n_embd,
        "testbed.n_head": cfg.testbed.n_head,
        "testbed.n_positions": cfg.testbed.n_positions,
        "testbed.sft_steps": cfg.testbed.sft_steps,
        "testbed.sft_batch_size": cfg.testbed.sft_batch_size,
        "testbed.prompt_words": cfg.testbed.prompt_words,
        "testbed.n_train_prompts": cfg.testbed.n_train_prompts,
        "testbed.n_eval_prompts": cfg.testbed.n_eval_prompts,
        "testbed.max_new_tokens": cfg.testbed.max_new_tokens,
        "testbed.gold_length_target": cfg.testbed.gold_length_target,
        "testbed.gen_batch_size": cfg.testbed.gen_batch_size,
        "gold.batch_size": cfg.gold.batch_size,
        "proxy.k": cfg.proxy.k,
        "proxy.epochs": cfg.proxy.epochs,
        "proxy.batch_size": cfg.proxy.batch_size,
        "proxy.lora_r": cfg.proxy.lora_r,
        "proxy.lora_alpha": cfg.proxy.lora_alpha,
        "proxy.score_batch_size": cfg.proxy.score_batch_size,
        "eval.n_prompts": cfg.eval.n_prompts,
        "eval.every": cfg.eval.every,
        "eval.max_new_tokens": cfg.eval.max_new_tokens,
        "eval.batch_size": cfg.eval.batch_size,
        "bon.pool_size": cfg.bon.pool_size,
        "bon.max_new_tokens": cfg.bon.max_new_tokens,
        "bon.batch_size": cfg.bon.batch_size,
        "ppo.steps": cfg.ppo.steps,
        "ppo.batch_size": cfg.ppo.batch_size,
        "ppo.mini_batch_size": cfg.ppo.mini_batch_size,
        "ppo.ppo_epochs": cfg.ppo.ppo_epochs,
        "ppo.max_new_tokens": cfg.ppo.max_new_tokens,
        "ppo.kl_horizon": cfg.ppo.kl_horizon,
        "ppo.save_every": cfg.ppo.save_every,
        "dpo.batch_size": cfg.dpo.batch_size,
        "dpo.evals_per_epoch": cfg.dpo.evals_per_epoch,
        "dpo.logprob_batch_size": cfg.dpo.logprob_batch_size,
        "dpo.save_every": cfg.dpo.save_every,
    }
    for key, value in positive_ints.items():
        _require(value > 0, key, f"must be positive, got {value}")
    _require(cfg.eval.n_samples_logged >= 0, "eval.n_samples_logged", "must be >= 0")
    _require(cfg.num_threads >= 0, "num_threads", "must be >= 0 (0 picks cores / local ranks)")
    _require(cfg.proxy.n_layer >= 0, "proxy.n_layer", "must be >= 0 (0 keeps all layers)")
    _require(cfg.proxy.train_workers >= 0, "proxy.train_workers", f"must be >= 0, got {cfg.proxy.train_workers}")
    _require(cfg.proxy.train_pairs == 0 or cfg.proxy.train_pairs >= 20, "proxy.train_pairs",
             f"must be 0 (all pairs) or at least 20, got {cfg.proxy.train_pairs}")

    positive_floats = {
        "testbed.sft_lr": cfg.testbed.sft_lr,
        "proxy.lr": cfg.proxy.lr,
        "eval.temperature": cfg.eval.temperature,
        "bon.temperature": cfg.bon.temperature,
        "ppo.lr": cfg.ppo.lr,
        "ppo.value_lr": cfg.ppo.value_lr,
        "ppo.temperature": cfg.ppo.temperature,
        "ppo.clip_range": cfg.ppo.clip_range,
        "ppo.clip_range_value": cfg.ppo.clip_range_value,
        "ppo.kl_target": cfg.ppo.kl_target,
        "ppo.max_grad_norm": cfg.ppo.max_grad_norm,
        "dpo.beta": cfg.dpo.beta,
        "dpo.lr": cfg.dpo.lr,
        "dpo.epochs": cfg.dpo.epochs,
        "dpo.max_grad_norm": cfg.dpo.max_grad_norm,
        "madpo.lam": cfg.madpo.lam,
        "madpo.tau": cfg.madpo.tau,
    }
    for key, value in positive_floats.items():
        _require(value > 0, key, f"must be positive, got {value}")
    non_negative = {
        "proxy.offset_eta": cfg.proxy.offset_eta,
        "aggregate.uwo_lambda": cfg.aggregate.uwo_lambda,
        "aggregate.std_k": cfg.aggregate.std_k,
        "ppo.kl_coef": cfg.ppo.kl_coef,
        "ppo.vf_coef": cfg.ppo.vf_coef,
        "testbed.gold_eos_penalty": cfg.testbed.gold_eos_penalty,
        "testbed.gold_repetition_weight": cfg.testbed.gold_repetition_weight,
        "testbed.gold_length_weight": cfg.testbed.gold_length_weight,
        "testbed.gold_length_tolerance": cfg.testbed.gold_length_tolerance,
    }
    for key, value in non_negative.items():
        _require(value >= 0, key, f"must be >= 0, got {value}")
    for key, value in {"eval.top_p": cfg.eval.top_p, "bon.top_p": cfg.bon.top_p}.items():
        _require(0 < value <= 1, key, f"must be in (0, 1], got {value}")
    for key, value in {
        "testbed.label_noise": cfg.testbed.label_noise,
        "proxy.min_accuracy": cfg.proxy.min_accuracy,
    }.items():
        _require(0 <= value <= 1, key, f"must be in [0, 1], got {value}")
    _require(0 <= cfg.ppo.lam <= 1, "ppo.lam", f"must be in [0, 1], got {cfg.ppo.lam}")
    _require(0 < cfg.ppo.gamma <= 1, "ppo.gamma", f"must be in (0, 1], got {cfg.ppo.gamma}")
    _require(0 < cfg.ppo.lr_final_ratio <= 1, "ppo.lr_final_ratio", "must be in (0, 1]")
    _require(0 < cfg.dpo.lr_final_ratio <= 1, "dpo.lr_final_ratio", "must be in (0, 1]")
    _require(cfg.dpo.max_length >= 0, "dpo.max_length", "must be >= 0 (0 means the policy's context length)")
    for key, value in {"dpo.corpus_share_medium": cfg.dpo.corpus_share_medium,
                       "dpo.corpus_share_low": cfg.dpo.corpus_share_low}.items():
        _require(0 <= value <= 1, key, f"must be in [0, 1], got {value}")
    _require(cfg.dpo.quality == "high" or cfg.dpo.dataset == "testbed", "dpo.quality",
             "quality tiers are built from the testbed's preferences; use 'high' with a dpo.dataset path")
    _require(cfg.madpo.c_max > 1, "madpo.c_max", f"must be > 1, got {cfg.madpo.c_max}")
    _require(0 <= cfg.madpo.c_min < 1, "madpo.c_min", f"must be in [0, 1) (0 means 1/c_max), got {cfg.madpo.c_min}")

    tb = cfg.testbed
    _require(tb.num_threads >= 0, "testbed.num_threads", f"must be >= 0 (0 keeps torch's setting), got {tb.num_threads}")
    _require(tb.n_embd % tb.n_head == 0, "testbed.n_embd", f"must be divisible by testbed.n_head ({tb.n_head})")
    _require(tb.vocab_size >= 300, "testbed.vocab_size", "must be >= 300 (256 bytes + special tokens + merges)")
    # A prompt word is at most ~3 BPE tokens at the smallest allowed vocabulary: prompt plus
    # response must fit the testbed policy's context.
    _require(
        3 * tb.prompt_words + tb.max_new_tokens <= tb.n_positions,
        "testbed.max_new_tokens",
        f"3 * testbed.prompt_words + max_new_tokens must fit testbed.n_positions ({tb.n_positions})",
    )
    # The same fit for the response caps of the method that samples from the testbed policy.
    caps = ({"eval.max_new_tokens": cfg.eval.max_new_tokens}
            if cfg.method in ("bon", "ppo", "dpo", "madpo", *COMPOSITE_METHODS) else {})
    if cfg.method in ("ppo", "bon"):
        caps[f"{cfg.method}.max_new_tokens"] = getattr(cfg, cfg.method).max_new_tokens
    if cfg.method in COMPOSITE_METHODS:
        caps["ppo.max_new_tokens"] = cfg.ppo.max_new_tokens
    if cfg.policy.path == "testbed":
        for key, value in caps.items():
            _require(3 * tb.prompt_words + value <= tb.n_positions, key,
                     f"3 * testbed.prompt_words + {value} does not fit testbed.n_positions ({tb.n_positions})")
    evaluates = cfg.method in ("bon", "ppo", "dpo", "madpo", *COMPOSITE_METHODS)
    _require(not evaluates or cfg.eval.n_prompts <= tb.n_eval_prompts, "eval.n_prompts",
             f"asks for more prompts than the testbed's eval split holds ({tb.n_eval_prompts})")

    ppo = cfg.ppo
    _require(ppo.batch_size % ppo.mini_batch_size == 0, "ppo.mini_batch_size",
             f"must divide ppo.batch_size ({ppo.batch_size}), got {ppo.mini_batch_size}")

    names = ("mean", "wco", "uwo", "median", "mean_minus_std")
    _check_aggregator(cfg.aggregate.name, cfg.proxy.k, "aggregate.name", names)
    _check_aggregator(cfg.madpo.margin_aggregator, cfg.proxy.k, "madpo.margin_aggregator", names)
    for i, agg in enumerate(cfg.bon.aggregators):
        if agg != "members":
            _check_aggregator(agg, cfg.proxy.k, f"bon.aggregators[{i}]", names)
    _require(len(cfg.bon.aggregators) > 0, "bon.aggregators", "must name at least one aggregator")
    for i, n in enumerate(cfg.bon.n_grid):
        _require(1 <= n <= cfg.bon.pool_size, f"bon.n_grid[{i}]",
                 f"n={n} must be between 1 and bon.pool_size ({cfg.bon.pool_size})")
    if cfg.proxy.kind == "lora":
        _require(cfg.proxy.k >= 1, "proxy.k", "a LoRA ensemble needs at least one adapter")
    if cfg.method in COMPOSITE_METHODS:
        _validate_composite(cfg, check_paths)

    if check_paths:
        if cfg.policy.path != "testbed":
            _require(_is_model_ref(cfg.policy.path), "policy.path", f"no such model directory: {cfg.policy.path}")
        if cfg.gold.path != "testbed":
            _require(_is_model_ref(cfg.gold.path), "gold.path", f"no such model directory: {cfg.gold.path}")
        if cfg.proxy.path:
            _require(Path(cfg.proxy.path).expanduser().is_dir(), "proxy.path", f"no such directory: {cfg.proxy.path}")
        if cfg.proxy.backbone != "policy":
            _require(_is_model_ref(cfg.proxy.backbone), "proxy.backbone", f"no such model directory: {cfg.proxy.backbone}")
        if cfg.dpo.dataset != "testbed" and cfg.method in ("dpo", "madpo"):
            _require(Path(cfg.dpo.dataset).expanduser().exists(), "dpo.dataset", f"no such dataset path: {cfg.dpo.dataset}")
        if cfg.deepspeed.config:
            _require(Path(cfg.deepspeed.config).is_file(), "deepspeed.config", f"file not found: {cfg.deepspeed.config}")
        if cfg.testbed.cache_dir:
            cache = Path(cfg.testbed.cache_dir).expanduser()
            _require(not cache.exists() or cache.is_dir(), "testbed.cache_dir", f"{cache} is not a directory")


COMPOSITE_METHODS = ("constrained_ppo", "nm_ppo", "dynamic_ppo", "proxy_points")
"""Methods that train PPO on a composite of component rewards (the driver loops/constrained_ppo.py)."""
GOLD_TERMS = ("sentiment", "repetition", "eos", "length")
"""The testbed gold's terms that component rewards are labelled by (rlhf_overopt/testbed/gold.py)."""


def _validate_composite(cfg: Config, check_paths: bool) -> None:
    """Combinations of the components / constrained / nm / weighting / proxy_points sections."""
    comp, con, nm, w = cfg.components, cfg.constrained, cfg.nm, cfg.weighting
    n = len(comp.names)
    _require(n >= 1, "components.names", "needs at least one component")
    _require(len(set(comp.names)) == n and all(x and x.isidentifier() for x in comp.names), "components.names",
             f"must be distinct identifiers, got {comp.names}")
    _require(len(comp.terms) == n, "components.terms", f"needs one entry per component ({n}), got {len(comp.terms)}")
    for i, group in enumerate(comp.terms):
        parts = group.split("+")
        _require(all(t in GOLD_TERMS for t in parts) and len(set(parts)) == len(parts), f"components.terms[{i}]",
                 f"{group!r} must be '+'-joined distinct gold terms from {', '.join(GOLD_TERMS)}")
    _require(bool(comp.path) or cfg.gold.path == "testbed", "components.path",
             "components are labelled by the testbed gold's terms; with another gold, give trained components")
    _require(0 <= comp.label_noise < 0.5, "components.label_noise", f"must be in [0, 0.5), got {comp.label_noise}")
    _require(comp.pairs_per_prompt >= 1, "components.pairs_per_prompt", "must be >= 1")
    _require(cfg.ppo.no_eos_penalty == 0, "ppo.no_eos_penalty", "is not used by composite methods; leave it 0")
    _require(not cfg.ppo.whiten_rewards, "ppo.whiten_rewards", "is not used by composite methods; leave it false")

    constrained = cfg.method in ("constrained_ppo", "nm_ppo")
    n_constraints = n - (con.objective != "kl")
    _require(con.objective == "kl" or con.objective in comp.names, "constrained.objective",
             f"must be 'kl' or a component name ({', '.join(comp.names)}), got {con.objective!r}")
    if constrained:
        _require(n_constraints >= 1, "constrained.objective", "leaves no component to constrain")
        _require(bool(con.thresholds) or bool(con.thresholds_file), "constrained.thresholds",
                 "give a threshold per constrained component, or constrained.thresholds_file")
        _require(not con.thresholds or len(con.thresholds) == n_constraints, "constrained.thresholds",
                 f"needs {n_constraints} value(s) (one per constrained component), got {len(con.thresholds)}")
        if cfg.method == "nm_ppo":
            _require(bool(con.thresholds), "constrained.thresholds", "nm_ppo starts its simplex from these; give them")
        if check_paths and con.thresholds_file and not con.thresholds:
            _require(Path(con.thresholds_file).expanduser().exists(), "constrained.thresholds_file",
                     f"no such file or run directory: {con.thresholds_file}")
    for key, value in {"constrained.multiplier_lr": con.multiplier_lr,
                       "constrained.multiplier_grad_clip": con.multiplier_grad_clip,
                       "nm.initial_step": nm.initial_step, "nm.xatol": nm.xatol, "nm.fatol": nm.fatol,
                       "weighting.gradient_mu": w.gradient_mu,
                       "weighting.hv_reference_offset": w.hv_reference_offset}.items():
        _require(value > 0, key, f"must be positive, got {value}")
    _require(0 <= con.multiplier_momentum < 1, "constrained.multiplier_momentum", "must be in [0, 1)")
    _require(w.gradient_eta >= 0, "weighting.gradient_eta", "must be >= 0 (0 means ppo.lr)")
    _require(w.gradient_every >= 1, "weighting.gradient_every", "must be >= 1")
    if cfg.method == "nm_ppo":
        _require(nm.stretch_steps >= 1 and cfg.ppo.steps % nm.stretch_steps == 0, "nm.stretch_steps",
                 f"must divide ppo.steps ({cfg.ppo.steps}), got {nm.stretch_steps}")
    if w.weights:
        _require(len(w.weights) == n and all(x >= 0 for x in w.weights) and sum(w.weights) > 0, "weighting.weights",
                 f"needs {n} non-negative weights with a positive sum, got {w.weights}")
        _require(w.mode == "fixed" or all(x > 0 for x in w.weights), "weighting.weights",
                 "adaptive weighting needs every weight > 0 (a zero weight can never grow)")
    if cfg.method == "dynamic_ppo" and w.mode == "gradient":
        _require(cfg.deepspeed.zero_stage < 3, "weighting.mode",
                 "gradient weighting reads full per-objective gradients; use deepspeed.zero_stage <= 2")
    pp = cfg.proxy_points
    _require(not pp.runs or len(pp.runs) == n, "proxy_points.runs", f"needs one run directory per component ({n})")
    _require(pp.min_points >= 3, "proxy_points.min_points", "a quadratic fit needs at least 3 points")
    if check_paths:
        for i, run in enumerate(pp.runs):
            _require(Path(run).expanduser().is_dir(), f"proxy_points.runs[{i}]", f"no such run directory: {run}")
        if comp.path:
            _require(Path(comp.path).expanduser().is_dir(), "components.path", f"no such directory: {comp.path}")


def check_world_size(cfg: Config, world_size: int) -> None:
    """Batch sizes that are split over data-parallel ranks must divide evenly by the rank count."""
    if world_size <= 1:
        return
    shared = {
        "ppo.batch_size": cfg.ppo.batch_size if cfg.method in ("ppo", *COMPOSITE_METHODS) else None,
        "ppo.mini_batch_size": cfg.ppo.mini_batch_size if cfg.method in ("ppo", *COMPOSITE_METHODS) else None,
        "dpo.batch_size": cfg.dpo.batch_size if cfg.method in ("dpo", "madpo") else None,
        "eval.n_prompts": cfg.eval.n_prompts if cfg.method in ("ppo", "dpo", "madpo", "bon", *COMPOSITE_METHODS) else None,
    }
    for key, value in shared.items():
        if value is not None:
            _require(value % world_size == 0, key, f"{value} cannot be split evenly over {world_size} ranks")


def _check_aggregator(name: str, k: int, key: str, names: tuple[str, ...]) -> None:
    if name in names:
        return
    if name.startswith("member_") and name[len("member_"):].isdigit():
        index = int(name[len("member_"):])
        _require(index < k, key, f"{name} is out of range for an ensemble of proxy.k={k} members")
        return
    raise ConfigError(f"{key}: unknown aggregator {name!r} (known: {', '.join(names)}, member_<i>)")


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a config (or section), suitable for YAML."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, meta: dict[str, Any] | None = None) -> str:
    """The resolved config as YAML; `meta` (git SHA, versions) goes under `_meta`."""
    data = to_dict(cfg)
    if meta:
        data["_meta"] = meta
    return yaml.safe_dump(data, sort_keys=False)


def field_docs(cls: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(key, type, default, docstring) for every leaf field, read from the attribute docstrings."""
    source = inspect.getsource(cls)
    tree = ast.parse(source.lstrip() if source.startswith(" ") else source)
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(field_docs(tp, key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((key, _type_name(tp), default, docs.get(f.name, "")))
    return rows
