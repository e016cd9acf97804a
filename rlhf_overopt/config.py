"""Typed experiment configuration.

One YAML file selects the method and everything else; ``key.sub=value`` arguments override it.
Every section is a frozen dataclass (rlhf_overopt/sections.py) whose fields carry a one-line
docstring and whose ``check()`` validates them. Loading is strict: an unknown key, a value of the
wrong type, an impossible value or combination, or a missing file raises ``ConfigError`` with one
line naming the key, before any work starts.

``METHODS`` is the one table of methods: the ``method`` choices, the driver module, and what each
method reads, evaluates and splits over ranks are all derived from it.
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

from rlhf_overopt.errors import ConfigError
from rlhf_overopt.sections import (
    GOLD_TERMS,
    AggregateConfig,
    BonConfig,
    DataConfig,
    EvalConfig,
    GoldConfig,
    LabelConfig,
    PolicyConfig,
    ProxyConfig,
    TestbedConfig,
    check_aggregator_name,
    require,
)
from rlhf_overopt.train_sections import (
    ComponentsConfig,
    ConstrainedConfig,
    DeepSpeedConfig,
    DPOConfig,
    DynamicWeightingConfig,
    GRPOConfig,
    MADPOConfig,
    NelderMeadConfig,
    PPOConfig,
    ProxyPointsConfig,
    ProxySize,
    ScalingConfig,
    WandbConfig,
)

__all__ = [
    "COMPOSITE_METHODS", "GOLD_TERMS", "GRPO_METHODS", "METHODS", "AggregateConfig", "BonConfig",
    "ComponentsConfig", "Config", "ConfigError", "ConstrainedConfig", "DPOConfig", "DataConfig", "DeepSpeedConfig",
    "DynamicWeightingConfig", "EvalConfig", "GRPOConfig", "GoldConfig", "LabelConfig", "MADPOConfig", "Method",
    "NelderMeadConfig", "PPOConfig", "PolicyConfig", "ProxyConfig", "ProxyPointsConfig", "ProxySize",
    "ScalingConfig", "TestbedConfig", "WandbConfig", "check_world_size", "dump_yaml", "field_docs", "load_config", "parse_override", "to_dict",
    "validate",
]


# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One value of the config's `method`: what runs it and what it reads."""

    name: str
    """The config `method`."""
    driver: str
    """Driver module (in the package's loops folder) exposing run(ctx)."""
    sections: tuple[str, ...]
    """Config sections the method reads (for --check and docs)."""
    evaluates: bool
    """Writes gold evaluation points to curves.jsonl (so eval.n_prompts must fit the testbed's eval split)."""
    fit_form: str | None
    """The Gao et al. (2022) form analysis fits to its curves: "bon", "rl", or None (no curves to fit)."""
    composite: bool
    """Trains on component rewards (components / constrained / nm / weighting sections)."""
    rollouts: bool
    """Samples rollouts from the policy with ppo.* settings (PPO-style RL)."""
    split_keys: tuple[str, ...]
    """Batch sizes split evenly over data-parallel ranks."""
    response_caps: tuple[str, ...]
    """max_new_tokens keys that must fit the testbed policy's context."""
    summary: str
    """One line, for the README table / --list-methods."""


_MODELS = ("testbed", "policy", "gold", "proxy")  # what every trained or evaluated method reads
_RL = (*_MODELS, "data", "eval", "ppo", "deepspeed", "wandb")
_RL_SPLIT = ("ppo.batch_size", "ppo.mini_batch_size", "eval.n_prompts")
_RL_CAPS = ("eval.max_new_tokens", "ppo.max_new_tokens")
_COMPOSITE = (*_RL, "components")

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("build_testbed", "build_testbed", ("testbed",), evaluates=False, fit_form=None, composite=False,
           rollouts=False, split_keys=(), response_caps=(),
           summary="Build (or reuse from cache) the offline testbed: corpus, tokenizer, SFT policy, gold, preferences."),
    Method("train_rm", "train_rm", ("testbed", "policy", "gold", "proxy", "wandb"), evaluates=False, fit_form=None,
           composite=False, rollouts=False, split_keys=(), response_caps=(),
           summary="Train the proxy reward ensemble on gold-labelled noisy preferences."),
    Method("label_preferences", "label_preferences", ("testbed", "policy", "gold", "data", "label"), evaluates=False,
           fit_form=None, composite=False, rollouts=False, split_keys=(), response_caps=("label.max_new_tokens",),
           summary="Gold-labelled preferences: initial-policy responses paired and labelled by gold, with label noise."),
    Method("bon", "bon", (*_MODELS, "data", "aggregate", "eval", "bon", "wandb"), evaluates=True, fit_form="bon",
           composite=False, rollouts=False, split_keys=("eval.n_prompts",),
           response_caps=("eval.max_new_tokens", "bon.max_new_tokens"),
           summary="Best-of-n against the aggregated proxy: every n's curve from one pool of N samples."),
    Method("ppo", "ppo", (*_RL, "aggregate"), evaluates=True, fit_form="rl", composite=False, rollouts=True,
           split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           summary="PPO with a value model and a KL penalty on the aggregated proxy (Ziegler et al. 2019)."),
    Method("dpo", "dpo", (*_MODELS, "data", "aggregate", "eval", "dpo", "deepspeed", "wandb"), evaluates=True,
           fit_form="rl", composite=False, rollouts=False, split_keys=("dpo.batch_size", "eval.n_prompts"),
           response_caps=("eval.max_new_tokens",),
           summary="Direct alignment (DPO / IPO / SLiC) on the preference data (Rafailov et al. 2024)."),
    Method("madpo", "dpo", (*_MODELS, "data", "aggregate", "eval", "dpo", "madpo", "deepspeed", "wandb"), evaluates=True,
           fit_form="rl", composite=False, rollouts=False, split_keys=("dpo.batch_size", "eval.n_prompts"),
           response_caps=("eval.max_new_tokens",),
           summary="DPO with margin-adaptive pair weights from the proxy ensemble (Rho 2025)."),
    Method("constrained_ppo", "constrained_ppo", (*_COMPOSITE, "constrained"), evaluates=True, fit_form="rl",
           composite=True, rollouts=True, split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           summary="mu-PPO / xi-PPO: component rewards under Lagrange-multiplier constraints (Moskovitz et al. 2023)."),
    Method("nm_ppo", "constrained_ppo", (*_COMPOSITE, "constrained", "nm"), evaluates=True, fit_form="rl",
           composite=True, rollouts=True, split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           summary="NM-PPO: Nelder-Mead over the constraint thresholds within one run (Moskovitz et al. 2023)."),
    Method("dynamic_ppo", "dynamic_ppo", (*_COMPOSITE, "weighting"), evaluates=True, fit_form="rl",
           composite=True, rollouts=True, split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           summary="PPO on fixed, hypervolume-guided or gradient-based weights of component rewards (Lu et al. 2025)."),
    # Its own directory holds thresholds.json, not curves; the per-component runs it trains evaluate
    # (and are fitted as RL runs), and its own fit is a quadratic, not a Gao form.
    Method("proxy_points", "proxy_points", (*_COMPOSITE, "weighting", "proxy_points"), evaluates=True,
           fit_form=None, composite=True, rollouts=True, split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           summary="Proxy points: where gold peaks against each component's value (Moskovitz et al. 2023, §3)."),
    Method("grpo", "grpo", (*_RL, "aggregate", "grpo"), evaluates=True, fit_form="rl", composite=False,
           rollouts=True, split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           summary="GRPO: group-normalized advantages, no value model (Shao et al. 2024; Dr. GRPO, Liu et al. 2025)."),
    Method("rloo", "grpo", (*_RL, "aggregate", "grpo"), evaluates=True, fit_form="rl", composite=False,
           rollouts=True, split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           summary="RLOO: leave-one-out baseline within each group, no value model (Ahmadian et al. 2024)."),
    Method("scaling_law", "scaling_law", (*_MODELS, "data", "eval", "scaling", "wandb"), evaluates=True,
           fit_form="bon", composite=False, rollouts=False, split_keys=("eval.n_prompts",),
           response_caps=("eval.max_new_tokens", "scaling.max_new_tokens"),
           summary="Gao et al. 2022's scaling experiment: best-of-n with proxies of several sizes x data sizes, "
                   "Gao's form per proxy, alpha and beta against log size and log data."),
)}
"""Every method, by config name."""

MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]  # the `method` choices, from the table

COMPOSITE_METHODS = tuple(n for n, m in METHODS.items() if m.composite)
"""Methods that train PPO on a composite of component rewards (their drivers: constrained_ppo, dynamic_ppo, proxy_points)."""
GRPO_METHODS = tuple(n for n, m in METHODS.items() if "grpo" in m.sections)
"""Methods that read the grpo section: group-relative advantages, no value model."""


# ---------------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """One experiment."""

    method: MethodName = "ppo"
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
    data: DataConfig = field(default_factory=DataConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    aggregate: AggregateConfig = field(default_factory=AggregateConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    bon: BonConfig = field(default_factory=BonConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    madpo: MADPOConfig = field(default_factory=MADPOConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    constrained: ConstrainedConfig = field(default_factory=ConstrainedConfig)
    nm: NelderMeadConfig = field(default_factory=NelderMeadConfig)
    weighting: DynamicWeightingConfig = field(default_factory=DynamicWeightingConfig)
    proxy_points: ProxyPointsConfig = field(default_factory=ProxyPointsConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)

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
    stem, empty = "run", None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"--config: {p} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"--config: {p} must hold a mapping of keys at the top level")
        loaded = {k: v for k, v in (loaded or {}).items() if k != "_meta"}  # _meta: provenance of resolved configs
        empty = p if not loaded else None
        data = loaded
        stem = p.stem
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, value)
    cfg = _build(Config, data)
    # A file with nothing in it (or only comments) is a mistake, e.g. one truncated while copied:
    # running the default method on it would start work nobody asked for. (Checked after the
    # overrides are read, so that a bad override is named first, as for any other file.)
    if empty is not None:
        raise ConfigError(f"--config: {empty} is empty; give at least the method (method: <name>, see configs/)")
    name = cfg.name or stem
    cfg = dataclasses.replace(cfg, name=name, output_dir=cfg.output_dir or str(Path("runs") / name))
    validate(cfg, check_paths=check_paths)
    check_worlds(cfg, _explicit_keys(data))
    return cfg


def _explicit_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys a config file and its overrides set (as opposed to defaults)."""
    keys = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        keys |= _explicit_keys(v, key + ".") if isinstance(v, dict) else {key}
    return keys


def has_scored_pool(cfg: Config) -> bool:
    """The run reads an existing scored pool (bon.pool, scaling.pool), which brings its own prompts and gold."""
    return (cfg.method == "bon" and bool(cfg.bon.pool)) or (cfg.method == "scaling_law" and bool(cfg.scaling.pool))


def world_sources(cfg: Config) -> dict[str, str]:
    """The keys of `cfg` that name where a part of the world comes from, for its method:
    {key: value} of the gold, the prompts, the preference pairs and the components."""
    sections = METHODS[cfg.method].sections
    out = {}
    pool = has_scored_pool(cfg)  # a scored pool brings its own prompts and gold
    if "gold" in sections and not pool:
        out["gold.path"] = cfg.gold.path
    if "data" in sections and not pool:
        out["data.prompts"] = cfg.data.prompts
    trains_proxies = "proxy" in sections and not cfg.proxy.path and cfg.method not in COMPOSITE_METHODS
    if trains_proxies:
        out["proxy.dataset"] = cfg.proxy.dataset
    if "dpo" in sections:
        out["dpo.dataset"] = cfg.dpo.dataset
    return out


def check_worlds(cfg: Config, explicit: set[str]) -> None:
    """Never mix the testbed's world with a user's silently: with a policy that is not the
    testbed's, every part of the world that would come from the testbed must say so explicitly."""
    if cfg.policy.path == "testbed":
        return
    for key, value in world_sources(cfg).items():
        require(value != "testbed" or key in explicit, key,
                f"policy.path is {cfg.policy.path!r}, not the testbed's, but {key} defaults to the testbed's; "
                f"name your own (see --list-keys), or set {key}=testbed to use the testbed's on purpose")




# ---------------------------------------------------------------------------------------------
# Validation of combinations
# ---------------------------------------------------------------------------------------------


def _is_model_ref(path: str) -> bool:
    """True for a local directory; hub-like names ('org/model') pass as references to be loaded."""
    p = Path(path).expanduser()
    return p.exists() or (not path.startswith((".", "/", "~")) and path.count("/") == 1)


def _value(cfg: Config, key: str) -> Any:
    """The value of a dotted key such as "ppo.max_new_tokens"."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _check_member(name: str, k: int, key: str, warm: bool = False) -> None:
    index = check_aggregator_name(name, key)
    if index is not None:
        size = "a warm ensemble, which scores with one model (member_0)" if warm else f"an ensemble of proxy.k={k} members"
        require(index < k, key, f"{name} is out of range for {size}")


def validate(cfg: Config, *, check_paths: bool = True) -> None:
    """Check values and combinations; the first problem raises ConfigError naming its key.

    Each section checks its own fields (its ``check()``); what is left here involves several
    sections or the method: the testbed context fit, method-specific rules, and paths.
    """
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            section.check()
    require(cfg.num_threads >= 0, "num_threads", "must be >= 0 (0 picks cores / local ranks)")
    method = METHODS[cfg.method]
    _validate_policy_training(cfg, method)

    tb = cfg.testbed
    # The context fit of testbed.max_new_tokens (testbed.check) again for the response caps of the
    # method that samples from the testbed policy.
    if cfg.policy.path == "testbed":
        for key in method.response_caps:
            value = _value(cfg, key)
            require(tb.fits_context(value), key,
                    f"3 * testbed.prompt_words + {value} does not fit testbed.n_positions ({tb.n_positions})")
    pool = has_scored_pool(cfg)  # a scored pool brings its own prompts and gold
    require(not method.evaluates or pool or cfg.data.prompts != "testbed" or cfg.eval.n_prompts <= tb.n_eval_prompts,
            "eval.n_prompts",
            f"asks for more prompts than the testbed's eval split holds ({tb.n_eval_prompts})")
    if "data" in method.sections and cfg.data.prompts != "testbed":
        from rlhf_overopt.data import validate_prompt_config

        validate_prompt_config(cfg, method.evaluates, check_paths)

    # Ensemble members exist only up to proxy.k (the sections checked the names themselves); a warm
    # ensemble scores with one model, the weight average of its k members.
    scoring_k = 1 if cfg.proxy.kind == "warm" else cfg.proxy.k
    warm = cfg.proxy.kind == "warm"
    _check_member(cfg.aggregate.name, scoring_k, "aggregate.name", warm)
    _check_member(cfg.madpo.margin_aggregator, scoring_k, "madpo.margin_aggregator", warm)
    for i, agg in enumerate(cfg.bon.aggregators):
        if agg != "members":
            _check_member(agg, scoring_k, f"bon.aggregators[{i}]", warm)
    for i, agg in enumerate(cfg.bon.selector_aggregators):
        if agg != "members":
            _check_member(agg, scoring_k, f"bon.selector_aggregators[{i}]", warm)
    _validate_shaping(cfg)
    if cfg.method in COMPOSITE_METHODS:
        _validate_composite(cfg, check_paths)
    if cfg.method in GRPO_METHODS:
        _validate_grpo(cfg)
    if cfg.method == "scaling_law":
        _validate_scaling(cfg, check_paths)

    if check_paths:
        if cfg.policy.path != "testbed":
            require(_is_model_ref(cfg.policy.path), "policy.path", f"no such model directory: {cfg.policy.path}")
        if cfg.gold.path != "testbed":
            require(_is_model_ref(cfg.gold.path), "gold.path", f"no such model directory: {cfg.gold.path}")
        if cfg.proxy.path:
            require(Path(cfg.proxy.path).expanduser().is_dir(), "proxy.path", f"no such directory: {cfg.proxy.path}")
        if cfg.proxy.backbone != "policy":
            require(_is_model_ref(cfg.proxy.backbone), "proxy.backbone", f"no such model directory: {cfg.proxy.backbone}")
        if cfg.dpo.dataset != "testbed" and "dpo" in method.sections:
            require(Path(cfg.dpo.dataset).expanduser().exists(), "dpo.dataset", f"no such dataset path: {cfg.dpo.dataset}")
        if cfg.deepspeed.config:
            require(Path(cfg.deepspeed.config).is_file(), "deepspeed.config", f"file not found: {cfg.deepspeed.config}")
        if cfg.testbed.cache_dir:
            cache = Path(cfg.testbed.cache_dir).expanduser()
            require(not cache.exists() or cache.is_dir(), "testbed.cache_dir", f"{cache} is not a directory")


def _validate_policy_training(cfg: Config, method: Method) -> None:
    """policy.dtype against the device, and where LoRA applies.

    bf16 matmuls run about 100x slower than fp32 on the CPUs this framework is tested on, so a
    bf16 policy on a CPU is refused; with device auto the device is known only at run start,
    where `engines.check_policy_dtype` refuses it.
    """
    require(cfg.policy.dtype != "bfloat16" or cfg.device != "cpu", "policy.dtype",
            "bfloat16 needs a CUDA device (bf16 matmuls are ~100x slower than fp32 on a CPU); use float32 or device: cuda")
    if cfg.policy.lora_r > 0:
        require(cfg.deepspeed.zero_stage != 3, "policy.lora_r",
                "LoRA runs at ZeRO stages 0-2 (its reference shares the policy's parameters, which ZeRO-3 partitions)")
        require(method.driver != "dpo", "policy.lora_r", f"LoRA is for the RL drivers, not {cfg.method}")


SHAPING_METHODS = ("ppo", "grpo", "rloo")
"""Methods whose training reward aggregate.shaping=par shapes."""


def _validate_shaping(cfg: Config) -> None:
    """aggregate.shaping=par shapes the sequence-level reward of the single-objective RL drivers.
    The composite methods optimize component scores against thresholds and weights given in the
    components' own units (and proxy_points reads gold against those units), and best-of-n and the
    DPO family train on no reward: for them par would be ignored or change what a threshold means,
    so it is refused."""
    if cfg.aggregate.shaping == "none" or cfg.method in SHAPING_METHODS:
        return
    why = ("its constraint thresholds / reward weights are in unshaped component-score units"
           if cfg.method in COMPOSITE_METHODS else "it trains on no RL reward")
    raise ConfigError(f"aggregate.shaping: {cfg.aggregate.shaping} is not supported by method {cfg.method} ({why}); "
                      f"use it with {', '.join(SHAPING_METHODS)}, or set aggregate.shaping=none")


def _validate_composite(cfg: Config, check_paths: bool) -> None:
    """Combinations of the components / constrained / nm / weighting / proxy_points sections."""
    comp, con, nm, w = cfg.components, cfg.constrained, cfg.nm, cfg.weighting
    n = len(comp.names)
    require(bool(comp.path) or cfg.gold.path == "testbed", "components.path",
            "components are labelled by the testbed gold's terms; with another gold, give trained components")
    require(cfg.ppo.no_eos_penalty == 0, "ppo.no_eos_penalty", "is not used by composite methods; leave it 0")
    require(not cfg.ppo.whiten_rewards, "ppo.whiten_rewards", "is not used by composite methods; leave it false")
    # mu-/xi-PPO mix per-stream advantages that are always whitened (Moskovitz et al. 2023, §4);
    # a switch that would do nothing is refused rather than ignored.
    require(cfg.ppo.whiten_advantages or cfg.method not in ("constrained_ppo", "nm_ppo"), "ppo.whiten_advantages",
            f"{cfg.method} always whitens each stream's advantages; leave it true")

    constrained = cfg.method in ("constrained_ppo", "nm_ppo")
    n_constraints = n - (con.objective != "kl")
    require(con.objective == "kl" or con.objective in comp.names, "constrained.objective",
            f"must be 'kl' or a component name ({', '.join(comp.names)}), got {con.objective!r}")
    if constrained:
        require(n_constraints >= 1, "constrained.objective", "leaves no component to constrain")
        require(bool(con.thresholds) or bool(con.thresholds_file), "constrained.thresholds",
                "give a threshold per constrained component, or constrained.thresholds_file")
        require(not con.thresholds or len(con.thresholds) == n_constraints, "constrained.thresholds",
                f"needs {n_constraints} value(s) (one per constrained component), got {len(con.thresholds)}")
        if cfg.method == "nm_ppo":
            require(bool(con.thresholds), "constrained.thresholds", "nm_ppo starts its simplex from these; give them")
        if check_paths and con.thresholds_file and not con.thresholds:
            require(Path(con.thresholds_file).expanduser().exists(), "constrained.thresholds_file",
                    f"no such file or run directory: {con.thresholds_file}")
    if cfg.method == "nm_ppo":
        require(nm.stretch_steps >= 1 and cfg.ppo.steps % nm.stretch_steps == 0, "nm.stretch_steps",
                f"must divide ppo.steps ({cfg.ppo.steps}), got {nm.stretch_steps}")
    if w.weights:
        require(len(w.weights) == n and all(x >= 0 for x in w.weights) and sum(w.weights) > 0, "weighting.weights",
                f"needs {n} non-negative weights with a positive sum, got {w.weights}")
    if cfg.method == "dynamic_ppo" and w.mode == "gradient":
        require(cfg.deepspeed.zero_stage < 3, "weighting.mode",
                "gradient weighting reads full per-objective gradients; use deepspeed.zero_stage <= 2")
    pp = cfg.proxy_points
    require(not pp.runs or len(pp.runs) == n, "proxy_points.runs", f"needs one run directory per component ({n})")
    if check_paths:
        for i, run in enumerate(pp.runs):
            require(Path(run).expanduser().is_dir(), f"proxy_points.runs[{i}]", f"no such run directory: {run}")
        if comp.path:
            require(Path(comp.path).expanduser().is_dir(), "components.path", f"no such directory: {comp.path}")


def _validate_grpo(cfg: Config) -> None:
    """GRPO / RLOO read ppo.*'s rollout and optimizer settings but train no value model and put
    their KL term where grpo.kl_in says: refuse the ppo.* options they would silently ignore."""
    ppo, g = cfg.ppo, cfg.grpo
    require(ppo.batch_size % g.group_size == 0, "grpo.group_size",
            f"must divide ppo.batch_size ({ppo.batch_size}, counted in responses), got {g.group_size}")
    require(ppo.kl_coef == 0, "ppo.kl_coef",
            f"is not used by {cfg.method}; set ppo.kl_coef=0 and give the KL coefficient as grpo.kl_coef")
    require(not ppo.adaptive_kl, "ppo.adaptive_kl", f"is not used by {cfg.method} (grpo.kl_coef is fixed); leave it false")
    require(not ppo.whiten_rewards, "ppo.whiten_rewards",
            f"is not used by {cfg.method} (grpo.std_normalize scales rewards per group); leave it false")
    default_init = PPOConfig().value_init
    require(ppo.value_init == default_init, "ppo.value_init",
            f"{cfg.method} trains no value model; leave it at its default {default_init!r}")


def _validate_scaling(cfg: Config, check_paths: bool) -> None:
    """scaling_law pretrains its proxy backbones on the testbed corpus and sets the per-cell proxy
    keys itself: refuse the proxy.* options it would silently override."""
    sc, p = cfg.scaling, cfg.proxy
    require(cfg.policy.path == "testbed", "policy.path",
            "scaling_law pretrains its proxy sizes on the testbed corpus; it needs the testbed policy")
    require(p.dataset == "testbed", "proxy.dataset", "scaling_law trains on the testbed's gold-labelled pairs")
    for key, value, default in (("kind", p.kind, "independent"), ("backbone", p.backbone, "policy"),
                                ("path", p.path, ""), ("n_layer", p.n_layer, 0), ("train_pairs", p.train_pairs, 0)):
        require(value == default, f"proxy.{key}",
                f"is set per cell by scaling.proxy_sizes / scaling.train_pairs; leave it at {default!r}")
    require(p.on_failed_member != "drop", "proxy.on_failed_member",
            "a cell has one proxy, and a near-chance proxy is a data point of the scaling law (Gao et al. 2022: "
            "below ~2k pairs proxies stay near chance); use warn or error")
    # The train split holds 90% of at most one pair per train prompt; the exact count (ties drop
    # pairs) is checked against the testbed's pairs before any work.
    most = int(0.9 * cfg.testbed.n_train_prompts)
    for i, n in enumerate(sc.train_pairs):
        require(n <= most, f"scaling.train_pairs[{i}]",
                f"{n} exceeds the train split (at most {most} pairs: 90% of testbed.n_train_prompts)")
    if check_paths and sc.pool:
        require(Path(sc.pool).expanduser().exists() or _is_model_ref(sc.pool), "scaling.pool",
                f"no such pool file or folder: {sc.pool}")


def check_world_size(cfg: Config, world_size: int) -> None:
    """Batch sizes that are split over data-parallel ranks must divide evenly by the rank count."""
    if world_size <= 1:
        return
    for key in METHODS[cfg.method].split_keys:
        value = _value(cfg, key)
        require(value % world_size == 0, key, f"{value} cannot be split evenly over {world_size} ranks")
    if cfg.method in GRPO_METHODS:
        # Each rank normalizes advantages within the groups it sampled, so a group must not straddle ranks.
        per_rank, g = cfg.ppo.batch_size // world_size, cfg.grpo.group_size
        require(per_rank % g == 0, "grpo.group_size",
                f"each of {world_size} ranks holds {per_rank} of ppo.batch_size's responses, not whole groups of {g}")


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
