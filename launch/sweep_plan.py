"""Sweep files: a grid of config overrides expanded into planned, validated runs.

A sweep file names a base experiment config and a grid of config keys::

    base: configs/ppo_ensemble.yaml   # relative to the sweep file, the repository root or the cwd
    name: kl_sweep                    # optional; default: the sweep file's stem
    grid:                             # cartesian product, in this key order; any config key
      aggregate.name: [member_0, mean, wco, uwo]
      ppo.kl_coef: [0.003, 0.01, 0.03, 0.1]
    set: {ppo.steps: 100}             # optional fixed overrides for every run
    resources:                        # optional; what each run gets under --executor slurm
      {gpus_per_node: 8, nodes: 1, cpus_per_task: 32, mem_gb: 400, timeout_min: 1440,
       partition: gpu, account: my_lab, constraint: h100}

Each grid point becomes one run of ``launch/train.py`` in ``<runs root>/<sweep name>/<run name>``,
where the run name is built from the varied keys only (``uwo-kl_coef0.01``). Every run of a sweep
shares ``wandb.project`` and has ``wandb.group`` = the sweep name.

Before any run starts, every expanded config is loaded and validated (`load_config`) and its run
directory is checked against it (`check_run_dir`); one bad value stops the sweep with one line
naming the run and the key. `plan_runs` does that and decides, from the run directory alone,
whether each run is new, to be resumed or already completed; `build_command` is the command line
of one run, `cluster_command` the same run as a cluster task starts it (the launcher its
`resources` imply) and `wandb_sweep_spec` the equivalent W&B sweep. Running the plan is
launch/runner.py's job (local processes, or submitit jobs through launch/executor.py). Nothing here
starts a process or imports a training loop.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhf_overopt.config.experiment import Config
from rlhf_overopt.config.load import load_config, parse_override
from rlhf_overopt.errors import ConfigError
from rlhf_overopt.run.directory import check_run_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "launch" / "train.py"

SWEEP_FILE_KEYS = ("base", "name", "grid", "set", "description", "resources")
# Keys the sweep itself decides for every run; a grid or `set` may not vary them.
SWEEP_OWNED_KEYS = ("output_dir", "name", "resume", "wandb.group")
# Keys that must be the same for every run of a sweep (a grid may not vary them).
SHARED_KEYS = ("wandb.project", "wandb.entity")


class SweepError(ValueError):
    """A problem with the sweep file, its grid or one expanded run; the message is one line."""


# ---------------------------------------------------------------------------------------------
# The sweep file
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Resources:
    """The sweep file's `resources`: what one run (one task of the job array) asks Slurm for."""

    gpus_per_node: int = 0
    nodes: int = 1
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    timeout_min: int = 24 * 60
    partition: str | None = None
    account: str | None = None
    constraint: str | None = None


_RESOURCE_TYPES: dict[str, tuple[type, ...]] = {
    "gpus_per_node": (int,), "nodes": (int,), "cpus_per_task": (int,), "mem_gb": (int, float),
    "timeout_min": (int,), "partition": (str,), "account": (str,), "constraint": (str,),
}


def parse_resources(data: Any) -> Resources:
    """Check the sweep file's `resources` mapping; an unknown key or a bad value is one line."""
    if data is None:
        return Resources()
    if not isinstance(data, dict):
        raise SweepError(f"resources: must be a mapping of {', '.join(_RESOURCE_TYPES)}")
    for key, value in data.items():
        if key not in _RESOURCE_TYPES:
            raise SweepError(f"resources.{key}: unknown resources key (known: {', '.join(_RESOURCE_TYPES)})")
        types = _RESOURCE_TYPES[key]
        if isinstance(value, bool) or not isinstance(value, types):
            raise SweepError(f"resources.{key}: must be {' or '.join(t.__name__ for t in types)}, got {value!r}")
        if types[0] is not str and value < (1 if key in ("nodes", "timeout_min", "cpus_per_task") else 0):
            raise SweepError(f"resources.{key}: out of range, got {value!r}")
    if data.get("nodes", 1) > 1 and data.get("gpus_per_node", 0) < 1:
        raise SweepError("resources.nodes: several nodes need gpus_per_node >= 1 (DeepSpeed runs one rank per GPU)")
    return Resources(**data)


@dataclass(frozen=True)
class Sweep:
    """A parsed sweep file plus the command-line overrides that apply to every run."""

    path: Path
    """The sweep YAML file."""
    name: str
    """Sweep name: the folder under the runs root and the W&B group."""
    base: Path
    """The base experiment config every run starts from."""
    grid: dict[str, list[Any]]
    """Config key -> values; the runs are the cartesian product in key order."""
    fixed: dict[str, Any] = field(default_factory=dict)
    """The file's `set`: overrides applied to every run."""
    overrides: tuple[str, ...] = ()
    """`key=value` items from the command line, applied to every run after `set`."""
    description: str = ""
    """Free text from the sweep file."""
    resources: Resources = field(default_factory=Resources)
    """What each run gets as a cluster task (`--executor slurm`)."""

    @property
    def varied_keys(self) -> list[str]:
        """Grid keys with more than one value (the ones that name the runs)."""
        return [key for key, values in self.grid.items() if len(values) > 1]


def _resolve_base(base: str, sweep_path: Path) -> Path:
    """`base` as given if absolute, else relative to the sweep file, the repo root or the cwd."""
    candidate = Path(base).expanduser()
    if candidate.is_absolute():
        return candidate
    for root in (sweep_path.parent, REPO_ROOT, Path.cwd()):
        if (root / candidate).is_file():
            return (root / candidate).resolve()
    raise SweepError(f"base: config file not found: {base} (looked next to {sweep_path}, in {REPO_ROOT} and the cwd)")


def load_sweep(path: str | os.PathLike, overrides: Sequence[str] = (), name: str | None = None) -> Sweep:
    """Read and check a sweep file; `overrides` (`key=value`) apply to every run.

    `name` replaces the file's sweep name (a second copy of a sweep with other overrides gets
    its own folder and W&B group).

    Raises:
        SweepError: the file is missing or malformed, the grid is empty or not a mapping of
            non-empty lists, or a grid/`set`/command-line key is one the sweep decides itself.
    """
    sweep_path = Path(path)
    if not sweep_path.is_file():
        raise SweepError(f"--config: sweep file not found: {sweep_path}")
    try:
        data = yaml.safe_load(sweep_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SweepError(f"--config: {sweep_path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SweepError(f"--config: {sweep_path} must hold a mapping (base, grid, set, name)")
    unknown = sorted(set(data) - set(SWEEP_FILE_KEYS))
    if unknown:
        raise SweepError(f"{unknown[0]}: unknown sweep file key (known: {', '.join(SWEEP_FILE_KEYS)})")
    if not isinstance(data.get("base"), str):
        raise SweepError("base: the sweep file must name a base config (base: configs/....yaml)")
    grid = data.get("grid") or {}
    if not isinstance(grid, dict) or not grid:
        raise SweepError("grid: must be a non-empty mapping of config key -> list of values")
    clean_grid: dict[str, list[Any]] = {}
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{key}: must be a non-empty list of values")
        if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
            raise SweepError(f"grid.{key}: repeats a value")
        clean_grid[str(key)] = list(values)
    fixed = data.get("set") or {}
    if not isinstance(fixed, dict):
        raise SweepError("set: must be a mapping of config key -> value")
    name = name or data.get("name") or sweep_path.stem
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SweepError(f"name: {name!r} must be letters, digits, '_', '.' or '-' (it names a folder)")
    cli_keys = []
    for item in overrides:
        try:
            cli_keys.append(parse_override(item)[0])
        except ConfigError as exc:
            raise SweepError(str(exc)) from None
    for key in [*clean_grid, *fixed, *cli_keys]:
        if key in SWEEP_OWNED_KEYS:
            raise SweepError(f"{key}: set by the sweep for every run; it cannot be a grid, set or command-line key")
    for key in clean_grid:
        if key in SHARED_KEYS:
            raise SweepError(f"grid.{key}: every run of a sweep shares it; put it under set instead")
        if key in fixed or key in cli_keys:
            raise SweepError(f"{key}: is a grid key and also a fixed override; change the grid instead")
    return Sweep(
        path=sweep_path,
        name=name,
        base=_resolve_base(data["base"], sweep_path),
        grid=clean_grid,
        fixed={str(k): v for k, v in fixed.items()},
        overrides=tuple(overrides),
        description=str(data.get("description") or ""),
        resources=parse_resources(data.get("resources")),
    )


# ---------------------------------------------------------------------------------------------
# Grid expansion and run names
# ---------------------------------------------------------------------------------------------


def expand_grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The cartesian product of the grid as a list of {key: value}, last key varying fastest."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def override_item(key: str, value: Any) -> str:
    """A `key=value` override that `parse_override` reads back as `value`.

    Strings are passed verbatim (string fields are not YAML-parsed); everything else as JSON,
    which is YAML that `parse_override` reads back with its type.
    """
    if isinstance(value, str):
        return f"{key}={value}"
    return f"{key}={json.dumps(value)}"


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, (list, tuple)):
        return "_".join(_format_value(v) for v in value)
    return str(value)


def _short_key(key: str) -> str:
    """`ppo.kl_coef` -> `kl_coef`; `aggregate.name` -> `aggregate` (a bare `name` says nothing)."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]+", "_", text).strip("_") or "x"


def run_names(points: Sequence[dict[str, Any]], varied: Sequence[str]) -> list[str]:
    """Short readable unique names of grid points, from their values of the varied keys.

    A string value stands alone (``uwo``); other values follow their short key
    (``kl_coef0.01``, ``seed2``); parts are joined by ``-``. When that is ambiguous the names
    fall back to ``shortkey_value`` parts, then to full dotted keys. A grid with nothing varied
    gives the single name ``run``.
    """
    if not varied:
        return ["run"] * len(points)

    def compact(point: dict[str, Any]) -> str:
        return "-".join(
            _format_value(point[k]) if isinstance(point[k], str) else f"{_short_key(k)}{_format_value(point[k])}"
            for k in varied
        )

    def keyed(point: dict[str, Any]) -> str:
        return "-".join(f"{_short_key(k)}_{_format_value(point[k])}" for k in varied)

    def full(point: dict[str, Any]) -> str:
        return "-".join(f"{k}={_format_value(point[k])}" for k in varied)

    for style in (compact, keyed, full):
        names = [_slug(style(p)) for p in points]
        if len(set(names)) == len(names):
            return names
    return [f"{_slug(full(p))}-{i}" for i, p in enumerate(points)]


# ---------------------------------------------------------------------------------------------
# Planning: every run's overrides, validated config and current state
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    """One grid point, resolved: its name, overrides, validated config and run-directory state."""

    name: str
    """Run name (folder name under the sweep folder)."""
    params: dict[str, Any]
    """This run's grid values."""
    overrides: tuple[str, ...]
    """Every `key=value` passed to launch/train.py (without `resume`)."""
    config: Config
    """The resolved, validated config (as launch/train.py will load it)."""
    action: str
    """What the run directory says to do now: "new", "resume" or "completed"."""

    @property
    def output_dir(self) -> Path:
        return self.config.run_dir


def sweep_dir(sweep: Sweep, runs_root: str | os.PathLike) -> Path:
    """The sweep folder: `<runs_root>/<sweep name>`."""
    return Path(runs_root) / sweep.name


def _stored_num_threads(run_dir: Path) -> int | None:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return None
    value = stored.get("num_threads") if isinstance(stored, dict) else None
    return value if isinstance(value, int) else None


def plan_runs(
    sweep: Sweep,
    runs_root: str | os.PathLike = "runs",
    *,
    threads_per_run: int = 0,
    select: Sequence[str] = (),
) -> list[PlannedRun]:
    """Expand, name and validate every run of the sweep; decide new/resume/completed for each.

    Args:
        sweep: the parsed sweep.
        runs_root: folder holding sweep folders (run directories are `<root>/<sweep>/<run>`).
        threads_per_run: `num_threads` for every run unless the base config file, `set`, grid
            or command line sets it (0: leave it to the config's default). A run being resumed keeps the
            thread count it was started with, since its stored config must match.
        select: `key=value` items on grid keys; only matching grid points are planned.

    Raises:
        SweepError: ``run <name>: <key>: <problem>`` for the first run whose config is invalid
            or whose run directory does not match it; or a selection that matches no grid point.
    """
    points = expand_grid(sweep.grid)
    names = run_names(points, sweep.varied_keys)
    wanted = _parse_selection(sweep, select)
    root = sweep_dir(sweep, runs_root)
    base_overrides = [override_item(k, v) for k, v in sweep.fixed.items()]
    user_sets_threads = "num_threads" in sweep.grid or "num_threads" in sweep.fixed or any(
        item.split("=", 1)[0].strip() == "num_threads" for item in sweep.overrides
    )
    if not user_sets_threads:
        try:
            base_yaml = yaml.safe_load(sweep.base.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise SweepError(f"base: cannot read {sweep.base} ({str(exc).splitlines()[0]})") from None
        user_sets_threads = isinstance(base_yaml, dict) and "num_threads" in base_yaml

    planned = []
    for name, point in zip(names, points):
        if any(point[k] != v for k, v in wanted.items()):
            continue
        run_dir = root / name
        overrides = [
            *base_overrides,
            *(override_item(k, v) for k, v in point.items()),
            *sweep.overrides,
            f"output_dir={run_dir}",
            f"name={name}",
            f"wandb.group={sweep.name}",
        ]
        if not user_sets_threads:
            threads = _stored_num_threads(run_dir)
            threads = threads_per_run if threads is None else threads
            if threads:
                overrides.append(f"num_threads={threads}")
        try:
            cfg = load_config(sweep.base, overrides)
            has_run = (run_dir / "config.yaml").is_file()
            action = check_run_dir(dataclasses.replace(cfg, resume=has_run))
        except ConfigError as exc:
            raise SweepError(f"run {name}: {exc}") from None
        planned.append(PlannedRun(name=name, params=point, overrides=tuple(overrides), config=cfg, action=action))
    if not planned:
        raise SweepError(f"--select: {' '.join(select)} matches no run of the grid")
    return planned


def _parse_selection(sweep: Sweep, select: Sequence[str]) -> dict[str, Any]:
    wanted: dict[str, Any] = {}
    for item in select:
        try:
            key, value = parse_override(item)
        except ConfigError as exc:
            raise SweepError(f"--select: {exc}") from None
        if key not in sweep.grid:
            raise SweepError(f"--select: {key} is not a grid key (grid: {', '.join(sweep.grid)})")
        # A W&B agent passes every value as text; match it to the grid value it spells.
        matches = [v for v in sweep.grid[key] if v == value or _format_value(v) == str(value)]
        if not matches:
            raise SweepError(f"--select: {key}={value!r} is not one of the grid's values {sweep.grid[key]}")
        wanted[key] = matches[0]
    return wanted


def refresh_action(run: PlannedRun) -> str:
    """Re-read the run directory: "new", "resume" or "completed" right now."""
    has_run = (run.output_dir / "config.yaml").is_file()
    return check_run_dir(dataclasses.replace(run.config, resume=has_run))


def build_command(
    run: PlannedRun,
    base: Path,
    action: str,
    *,
    launcher: str = "",
    python: str = sys.executable,
    port: int | None = None,
) -> list[str]:
    """The command line that runs (or resumes) one run of the sweep.

    With a launcher (e.g. ``deepspeed --num_gpus 2``) the train script follows the launcher's own
    arguments. ``{port}`` in the launcher is replaced by `port`; a ``deepspeed``/``torchrun``
    launcher without a master port gets ``--master_port=<port>`` so that runs launched at the
    same time do not fight over the default port.
    """
    args = [str(TRAIN_SCRIPT), "--config", str(base), *run.overrides]
    if action == "resume":
        args.append("resume=true")
    if not launcher:
        return [python, *args]
    parts = shlex.split(launcher)
    if port is not None:
        parts = [p.replace("{port}", str(port)) for p in parts]
        program = Path(parts[0]).name
        if program in ("deepspeed", "torchrun") and not any(p.startswith(("--master_port", "--master-port"))
                                                            for p in parts):
            parts.insert(1, f"--master_port={port}")
    return [*parts, *args]


def cluster_launcher(
    resources: Resources,
    *,
    port: int,
    node_rank: int = 0,
    master_addr: str = "",
    hostfile: str = "",
    python: str = sys.executable,
) -> list[str]:
    """The argv prefix that starts one run on the node(s) `resources` give a task.

    No GPU: the plain interpreter, as a local process run. One node: ``deepspeed --num_gpus <g>``
    with its own master port (array tasks may share a node). Several nodes: every node's task
    runs the DeepSpeed launcher on the same hostfile without ssh, with its own node rank
    (Slurm's ``$SLURM_NODEID``) and the first node as master.
    """
    if resources.nodes > 1:
        return ["deepspeed", "--hostfile", hostfile, "--no_ssh", "--node_rank", str(node_rank),
                "--master_addr", master_addr, "--master_port", str(port)]
    if resources.gpus_per_node >= 1:
        return ["deepspeed", "--num_gpus", str(resources.gpus_per_node), "--master_port", str(port)]
    return [python]


def cluster_command(run: PlannedRun, base: Path, action: str, resources: Resources, **launcher: Any) -> list[str]:
    """The full argv of one run as a cluster task starts it: `cluster_launcher` + the train arguments
    exactly as `build_command` gives them (``resume=true`` for a run to resume)."""
    return [*cluster_launcher(resources, **launcher), *build_command(run, base, action)[1:]]

# ---------------------------------------------------------------------------------------------
# The equivalent W&B sweep
# ---------------------------------------------------------------------------------------------


def wandb_sweep_spec(sweep: Sweep, *, project: str, entity: str = "", runs_root: str = "runs") -> dict[str, Any]:
    """A W&B sweep configuration (method grid) equivalent to this sweep.

    Each W&B agent run calls ``launch/sweep.py --select <grid key>=<value> ...`` for its grid
    point, so it gets the same run directory, name, group, validation and resume behaviour as
    the local sweep; the agent's run is the one launch/train.py logs to (wandb.mode=online).
    """
    sweep_file = _display_path(sweep.path)
    command = ["${env}", "${interpreter}", "${program}", "--config", sweep_file, "--name", sweep.name,
               "--runs-root", runs_root,
               "--no-report", *sweep.overrides, "wandb.mode=online", "--select", "${args_no_hyphens}"]
    spec: dict[str, Any] = {
        "name": sweep.name,
        "project": project,
        "description": sweep.description or f"grid over {', '.join(sweep.grid)} from {_display_path(sweep.base)}",
        "program": "launch/sweep.py",
        "method": "grid",
        "metric": {"name": "gold_score", "goal": "maximize"},
        "parameters": {key: {"values": values} for key, values in sweep.grid.items()},
        "command": command,
    }
    if entity:
        spec["entity"] = entity
    return spec


def _display_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)
