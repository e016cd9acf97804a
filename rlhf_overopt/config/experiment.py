"""The experiment: one frozen dataclass `Config` holding every section, and its output forms
(a plain dict, YAML with provenance, and the documented list of every leaf key).

Every section is a frozen dataclass (config/sections.py, config/train_sections.py) whose fields
carry a one-line docstring and whose ``check()`` validates them.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf_overopt.config.methods import MethodName
from rlhf_overopt.config.sections import (
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
from rlhf_overopt.config.train_sections import (
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
    ScalingConfig,
    WandbConfig,
)

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


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


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
        rows.append((key, type_name(tp), default, docs.get(f.name, "")))
    return rows
