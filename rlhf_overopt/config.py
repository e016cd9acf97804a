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
    "ScalingConfig", "TestbedConfig", "WandbConfig", "dump_yaml", "field_docs", "load_config", "parse_override",
    "to_dict",
]  # validate, check_world_size and the other cross-section checks: rlhf_overopt.validate (also importable here)


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
    from rlhf_overopt.validate import check_worlds, validate

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


_IN_VALIDATE = ("SHAPING_METHODS", "_value", "check_world_size", "check_worlds", "has_scored_pool", "validate",
                "world_sources")


def __getattr__(name: str) -> Any:
    """The cross-section checks live in rlhf_overopt/validate.py (which imports this module); their
    names stay importable from here."""
    if name in _IN_VALIDATE:
        from rlhf_overopt import validate as checks

        return getattr(checks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
