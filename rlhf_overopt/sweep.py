"""Sweeps: a grid of config overrides expanded into runs, each with its own run directory.

A sweep file names a base experiment config and a grid of config keys::

    base: configs/ppo_ensemble.yaml   # relative to the sweep file, the repository root or the cwd
    name: kl_sweep                    # optional; default: the sweep file's stem
    grid:                             # cartesian product, in this key order; any config key
      aggregate.name: [member_0, mean, wco, uwo]
      ppo.kl_coef: [0.003, 0.01, 0.03, 0.1]
    set: {ppo.steps: 100}             # optional fixed overrides for every run

Each grid point becomes one run of ``launch/train.py`` in ``<runs root>/<sweep name>/<run name>``,
where the run name is built from the varied keys only (``uwo-kl_coef0.01``). Every run of a sweep
shares ``wandb.project`` and has ``wandb.group`` = the sweep name.

What makes a sweep safe to interrupt and run again:

- Before any run starts, every expanded config is loaded and validated (`load_config`) and its
  run directory is checked against it (`check_run_dir`); one bad value stops the sweep with one
  line naming the run and the key.
- Whether a run is new, resumed or already completed is decided by the run directory alone
  (`check_run_dir`): a completed run is never started again; one with a ``config.yaml`` but no
  completed summary is continued with ``resume=true`` from its last checkpoint.
- A run is started only while its lock file (``.locks/<run>.lock``) is held; the lock's file
  descriptor is inherited by the run's process, so a run that outlives a killed sweep process
  still holds it, and a second sweep process never starts the same run twice at once.
- ``sweep.json`` (written atomically, read-modify-written under ``.locks/state.lock``) records
  every invocation and every attempt of every run: when it started, how (new/resume), how it
  ended (completed/failed/interrupted) and its exit status.

This module launches processes and reads run directories; it never imports training loops.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import itertools
import json
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from rlhf_overopt.config import Config, ConfigError, load_config, parse_override
from rlhf_overopt.runs import atomic_write_json, check_run_dir, file_lock, read_jsonl

log = logging.getLogger("rlhf_overopt.sweep")

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "launch" / "train.py"
STATE_FILE = "sweep.json"
LOCK_DIR = ".locks"
LOG_DIR = "logs"

SWEEP_FILE_KEYS = ("base", "name", "grid", "set", "description")
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


def free_port() -> int:
    """A TCP port that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------------------------
# Locks and the sweep.json state file
# ---------------------------------------------------------------------------------------------


def try_lock(path: Path) -> IO[bytes] | None:
    """An open file holding an exclusive flock on `path`, or None when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+b")  # noqa: SIM115 - the caller keeps it open as long as the lock is held
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class SweepState:
    """`sweep.json`: every invocation of a sweep and every attempt of every run.

    Layout::

        {"sweep": name, "sweep_file": ..., "base": ..., "grid": {...}, "set": {...},
         "invocations": [{"id", "pid", "argv", "started_at", "ended_at", "skipped_completed": [...]}],
         "runs": {name: {"output_dir", "params", "status", "last_eval",
                         "attempts": [{"invocation", "action", "pid", "command", "started_at",
                                       "ended_at", "elapsed_s", "returncode", "outcome"}]}}}

    Each update re-reads the file under a lock and writes it atomically, so several sweep
    processes (e.g. W&B agents) can share one sweep folder.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.path = folder / STATE_FILE
        self.lock_path = folder / LOCK_DIR / "state.lock"
        self.invocation: int | None = None

    def read(self) -> dict[str, Any]:
        """The current state ({} when there is none yet)."""
        if not self.path.is_file():
            return {}
        return json.loads(self.path.read_text(encoding="utf-8"))

    @contextlib.contextmanager
    def update(self) -> Iterator[dict[str, Any]]:
        """Read-modify-write the state under the state lock."""
        with file_lock(self.lock_path):
            data = self.read()
            yield data
            data["updated_at"] = _now()
            atomic_write_json(self.path, data)

    def begin(self, sweep: Sweep, runs: Sequence[PlannedRun], argv: Sequence[str]) -> None:
        """Record a new invocation; attempts left open by a dead sweep process become "interrupted"."""
        with self.update() as data:
            data.update(sweep=sweep.name, sweep_file=str(sweep.path), base=str(sweep.base),
                        grid=sweep.grid, set=sweep.fixed)
            data.setdefault("created_at", _now())
            invocations = data.setdefault("invocations", [])
            self.invocation = len(invocations)
            invocations.append({
                "id": self.invocation, "pid": os.getpid(), "argv": list(argv), "started_at": _now(),
                "ended_at": None, "skipped_completed": [r.name for r in runs if r.action == "completed"],
            })
            all_runs = data.setdefault("runs", {})
            for run in runs:
                entry = all_runs.setdefault(run.name, {"attempts": []})
                entry.update(output_dir=str(run.output_dir), params=run.params)
                for attempt in entry["attempts"]:
                    if attempt.get("outcome") is None and not _lock_busy(self.run_lock_path(run.name)):
                        attempt["outcome"] = "interrupted"
                entry["status"] = {"new": "pending", "resume": "to resume"}.get(run.action, run.action)

    def run_lock_path(self, name: str) -> Path:
        return self.folder / LOCK_DIR / f"{name}.lock"

    def start_attempt(self, run: PlannedRun, action: str, pid: int, command: list[str]) -> None:
        with self.update() as data:
            entry = data["runs"][run.name]
            entry["status"] = "running"
            entry["attempts"].append({
                "invocation": self.invocation, "action": action, "pid": pid, "command": command,
                "started_at": _now(), "started_at_unix": round(time.time(), 3),
                "ended_at": None, "elapsed_s": None, "returncode": None, "outcome": None,
            })

    def end_attempt(self, run: PlannedRun, returncode: int | None, outcome: str, elapsed: float,
                    last_eval: dict[str, Any] | None) -> None:
        with self.update() as data:
            entry = data["runs"][run.name]
            attempt = entry["attempts"][-1]
            attempt.update(ended_at=_now(), elapsed_s=round(elapsed, 2), returncode=returncode, outcome=outcome)
            entry["status"] = outcome
            if last_eval:
                entry["last_eval"] = last_eval

    def finish(self, statuses: dict[str, str]) -> None:
        with self.update() as data:
            invocation = data["invocations"][self.invocation]
            invocation["ended_at"] = _now()
            invocation["result"] = statuses


def _lock_busy(path: Path) -> bool:
    if not path.exists():
        return False
    handle = try_lock(path)
    if handle is None:
        return True
    handle.close()
    return False


# ---------------------------------------------------------------------------------------------
# Progress: a table of runs, refreshed on every event
# ---------------------------------------------------------------------------------------------


@dataclass
class RunProgress:
    """What the progress table shows about one run."""

    name: str
    status: str
    attempts: int = 0
    started: float | None = None
    elapsed: float | None = None
    last_eval: dict[str, Any] | None = None
    curves_mtime: float = 0.0

    def elapsed_now(self) -> float | None:
        if self.started is not None and self.status in ("running", "resuming"):
            return time.time() - self.started
        return self.elapsed


def read_last_eval(run_dir: Path) -> dict[str, Any] | None:
    """Step, sqrt_kl, gold and proxy of the last row of a run's curves.jsonl (None if none)."""
    try:
        rows = read_jsonl(run_dir / "curves.jsonl")
    except (OSError, ValueError):
        return None
    if not rows:
        return None
    last = rows[-1]
    return {k: last.get(k) for k in ("step", "sqrt_kl", "gold_score", "proxy_score")}


def _fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _fmt_number(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) else ""


TABLE_COLUMNS = ("run", "status", "tries", "elapsed", "step", "sqrt_kl", "gold", "proxy")


def progress_rows(progress: Sequence[RunProgress]) -> list[list[str]]:
    """Cells of the progress table, one list per run, in TABLE_COLUMNS order."""
    rows = []
    for p in progress:
        ev = p.last_eval or {}
        rows.append([p.name, p.status, str(p.attempts), _fmt_seconds(p.elapsed_now()),
                     "" if ev.get("step") is None else str(ev["step"]), _fmt_number(ev.get("sqrt_kl")),
                     _fmt_number(ev.get("gold_score")), _fmt_number(ev.get("proxy_score"))])
    return rows


def render_progress(progress: Sequence[RunProgress]) -> str:
    """The progress table as aligned plain text."""
    rows = [list(TABLE_COLUMNS), *progress_rows(progress)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class ProgressView:
    """Shows the progress table: a rich live table on a terminal, plain text otherwise.

    Plain text prints the whole table whenever a run starts or ends and one line per new
    evaluation point, so a log file reads as a sequence of events.
    """

    def __init__(self, progress: list[RunProgress], *, live: bool | None = None, stream: IO[str] | None = None):
        self.progress = progress
        self.stream = stream or sys.stdout
        self._live = None
        use_live = self.stream.isatty() if live is None else live
        if use_live:
            try:
                from rich.live import Live
            except ImportError:  # rich is optional: plain text works everywhere
                use_live = False
            else:
                self._live = Live(self._rich_table(), refresh_per_second=1, transient=False)
                self._live.start()

    def _rich_table(self) -> Any:
        from rich.table import Table

        table = Table(title="sweep progress", show_lines=False)
        for column in TABLE_COLUMNS:
            table.add_column(column, justify="right" if column not in ("run", "status") else "left")
        styles = {"completed": "green", "failed": "red", "running": "cyan", "resuming": "cyan",
                  "interrupted": "yellow"}
        for p, cells in zip(self.progress, progress_rows(self.progress)):
            table.add_row(*cells, style=styles.get(p.status))
        return table

    def event(self, message: str, *, full: bool = True) -> None:
        """Something happened; refresh the table (rich) or print it / one line (plain)."""
        if self._live is not None:
            self._live.update(self._rich_table())
            self._live.console.print(f"[{time.strftime('%H:%M:%S')}] {message}", markup=False, highlight=False)
            return
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=self.stream)
        if full:
            print(render_progress(self.progress), file=self.stream)
        self.stream.flush()

    def tick(self) -> None:
        """Periodic refresh (elapsed times); only the live table redraws."""
        if self._live is not None:
            self._live.update(self._rich_table())

    def close(self) -> None:
        if self._live is not None:
            self._live.update(self._rich_table())
            self._live.stop()
            self._live = None


# ---------------------------------------------------------------------------------------------
# Running: one process per run, at most `parallel` at once
# ---------------------------------------------------------------------------------------------


@dataclass
class _Active:
    run: PlannedRun
    proc: subprocess.Popen
    lock: IO[bytes]
    log: IO[bytes]
    started: float
    action: str


class SweepInterrupted(Exception):
    """The sweep process got SIGINT or SIGTERM."""


class SweepRunner:
    """Runs the planned runs as subprocesses of launch/train.py, `parallel` at a time."""

    def __init__(
        self,
        sweep: Sweep,
        runs: Sequence[PlannedRun],
        folder: Path,
        *,
        parallel: int = 1,
        launcher: str = "",
        poll_interval: float = 0.5,
        view: ProgressView | None = None,
        argv: Sequence[str] = (),
    ) -> None:
        if parallel < 1:
            raise SweepError(f"--parallel: must be >= 1, got {parallel}")
        self.sweep = sweep
        self.runs = list(runs)
        self.folder = folder
        self.parallel = parallel
        self.launcher = launcher
        self.poll_interval = poll_interval
        self.argv = list(argv)
        self.state = SweepState(folder)
        known = self.state.read().get("runs", {}) if self.state.path.is_file() else {}
        self.progress = {r.name: self._initial_progress(r, len(known.get(r.name, {}).get("attempts", [])))
                         for r in self.runs}
        self.view = view or ProgressView(list(self.progress.values()))
        self.statuses: dict[str, str] = {}

    def _initial_progress(self, run: PlannedRun, attempts: int) -> RunProgress:
        status = {"new": "pending", "resume": "to resume", "completed": "completed"}[run.action]
        progress = RunProgress(name=run.name, status=status, attempts=attempts,
                               last_eval=read_last_eval(run.output_dir))
        if run.action == "completed":
            try:
                summary = json.loads((run.output_dir / "summary.json").read_text(encoding="utf-8"))
                progress.elapsed = summary.get("wall_time_s")
            except (OSError, ValueError):
                pass
        return progress

    def run(self) -> dict[str, str]:
        """Run every run that is not completed; return run name -> final status.

        Final statuses: "completed", "failed", "busy" (another process holds the run's lock) or
        "interrupted" (this sweep was stopped by a signal while the run was pending or running).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / LOG_DIR).mkdir(exist_ok=True)
        self.state.begin(self.sweep, self.runs, self.argv)
        pending = [r for r in self.runs if r.action != "completed"]
        for run in self.runs:
            if run.action == "completed":
                self.statuses[run.name] = "completed"
        self.view.event(f"sweep {self.sweep.name}: {len(self.runs)} runs, {len(pending)} to run, "
                        f"{len(self.runs) - len(pending)} already completed; up to {self.parallel} at once")
        active: dict[str, _Active] = {}
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def interrupt(signum: int, _frame: Any) -> None:
            raise SweepInterrupted(signal.Signals(signum).name)

        for sig in previous:
            signal.signal(sig, interrupt)
        try:
            while pending or active:
                while pending and len(active) < self.parallel:
                    started = self._start(pending.pop(0))
                    if started is not None:
                        active[started.run.name] = started
                for name in list(active):
                    returncode = active[name].proc.poll()
                    if returncode is not None:
                        self._finish(active.pop(name), returncode)
                self._watch_curves(active)
                self.view.tick()
                if pending or active:
                    time.sleep(self.poll_interval)
        except SweepInterrupted as exc:
            self.view.event(f"{exc}: stopping {len(active)} running run(s); run the sweep again to continue")
            self._stop(active)
            for run in pending:
                self.statuses[run.name] = "interrupted"
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.state.finish(self.statuses)
            self.view.close()
        return self.statuses

    def _start(self, run: PlannedRun) -> _Active | None:
        lock = try_lock(self.state.run_lock_path(run.name))
        if lock is None:
            self.statuses[run.name] = "busy"
            self.progress[run.name].status = "busy"
            self.view.event(f"{run.name}: another process holds its lock; left to it")
            return None
        try:
            # The directory may have moved on since planning (another process, a W&B agent).
            action = refresh_action(run)
        except ConfigError as exc:
            lock.close()
            self.statuses[run.name] = "failed"
            self.progress[run.name].status = "failed (config)"
            self.view.event(f"{run.name}: not started: {exc}")
            return None
        if action == "completed":
            lock.close()
            self.statuses[run.name] = "completed"
            self.progress[run.name].status = "completed"
            self.view.event(f"{run.name}: completed meanwhile; skipped")
            return None
        port = free_port() if self.launcher else None
        command = build_command(run, self.sweep.base, action, launcher=self.launcher, port=port)
        log_path = self.folder / LOG_DIR / f"{run.name}.log"
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed when the run ends
        log_file.write(f"\n===== {_now()} {action}: {shlex.join(command)}\n".encode())
        log_file.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                pass_fds=(lock.fileno(),))
        self.state.start_attempt(run, action, proc.pid, command)
        progress = self.progress[run.name]
        progress.status = "running" if action == "new" else "resuming"
        progress.attempts += 1
        progress.started = time.time()
        self.view.event(f"{run.name}: started ({action}), pid {proc.pid}, log {log_path}")
        return _Active(run=run, proc=proc, lock=lock, log=log_file, started=progress.started, action=action)

    def _finish(self, active: _Active, returncode: int) -> None:
        run = active.run
        elapsed = time.time() - active.started
        outcome = _outcome(run, returncode)
        last_eval = read_last_eval(run.output_dir)
        self.state.end_attempt(run, returncode, outcome, elapsed, last_eval)
        active.log.close()
        active.lock.close()
        progress = self.progress[run.name]
        progress.status = outcome if outcome == "completed" else f"failed ({returncode})"
        progress.elapsed = elapsed
        progress.last_eval = last_eval or progress.last_eval
        self.statuses[run.name] = outcome
        hint = "" if outcome == "completed" else f"; see {self.folder / LOG_DIR / (run.name + '.log')}"
        self.view.event(f"{run.name}: {outcome} (exit {returncode}) in {_fmt_seconds(elapsed)}{hint}")

    def _watch_curves(self, active: dict[str, _Active]) -> None:
        for name, running in active.items():
            progress = self.progress[name]
            path = running.run.output_dir / "curves.jsonl"
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue
            if mtime != progress.curves_mtime:
                progress.curves_mtime = mtime
                last = read_last_eval(running.run.output_dir)
                if last and last != progress.last_eval:
                    progress.last_eval = last
                    self.view.event(f"{name}: eval step {last['step']}: sqrt_kl {_fmt_number(last['sqrt_kl'])} "
                                    f"gold {_fmt_number(last['gold_score'])}", full=False)

    def _stop(self, active: dict[str, _Active], grace: float = 20.0) -> None:
        """SIGINT every running run (each records a failed summary and can be resumed), then kill."""
        for a in active.values():
            with contextlib.suppress(ProcessLookupError):
                a.proc.send_signal(signal.SIGINT)
        deadline = time.time() + grace
        for a in active.values():
            try:
                a.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait()
            elapsed = time.time() - a.started
            outcome = "completed" if _outcome(a.run, a.proc.returncode) == "completed" else "interrupted"
            self.state.end_attempt(a.run, a.proc.returncode, outcome, elapsed, read_last_eval(a.run.output_dir))
            a.log.close()
            a.lock.close()
            self.statuses[a.run.name] = outcome
            self.progress[a.run.name].status = outcome


def _outcome(run: PlannedRun, returncode: int | None) -> str:
    """ "completed" when the process exited 0 and its summary says completed, else "failed"."""
    try:
        summary = json.loads((run.output_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "failed"
    return "completed" if returncode == 0 and summary.get("status") == "completed" else "failed"


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
