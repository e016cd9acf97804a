"""Loading a config: one YAML file plus ``key.sub=value`` overrides, built strictly into the typed
`Config` and checked before any work starts.

Loading is strict: an unknown key, a value of the wrong type, an impossible value or combination,
or a missing file raises ``ConfigError`` with one line naming the key, before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from rlhf_overopt.config.experiment import Config, type_name
from rlhf_overopt.config.validate import check_worlds, note_unused, validate
from rlhf_overopt.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Building dataclasses from plain data, strictly
# ---------------------------------------------------------------------------------------------


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
        raise ConfigError(f"{key}: must be one of {type_name(tp)}, got {value!r}")
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
    explicit = _explicit_keys(data)
    check_worlds(cfg, explicit)
    note_unused(cfg, explicit)  # keys set explicitly that another setting makes unused: one line each
    return cfg


def _explicit_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys a config file and its overrides set (as opposed to defaults)."""
    keys = set()
    for k, v in data.items():
        key = f"{prefix}{k}"
        keys |= _explicit_keys(v, key + ".") if isinstance(v, dict) else {key}
    return keys
