"""The sweep supervisor: runs a sweep's planned runs as processes of launch/train.py.

launch/sweep_plan.py reads the sweep file and plans the runs (names, validated configs, what
each run directory says to do); this module runs them, `parallel` at a time, and is the one import
point of both (it re-exports the planning API, see `__all__`). What makes a sweep safe to
interrupt and run again:

- Whether a run is new, resumed or already completed is decided by the run directory alone
  (`check_run_dir`, re-read just before the run starts): a completed run is never started again;
  one with a ``config.yaml`` but no completed summary is continued with ``resume=true`` from its
  last checkpoint.
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
import fcntl
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from launch.sweep_plan import (
    REPO_ROOT,
    TRAIN_SCRIPT,
    PlannedRun,
    Resources,
    Sweep,
    SweepError,
    build_command,
    cluster_command,
    cluster_launcher,
    expand_grid,
    load_sweep,
    override_item,
    plan_runs,
    refresh_action,
    run_names,
    sweep_dir,
    wandb_sweep_spec,
)
from rlhf_overopt.errors import ConfigError
from rlhf_overopt.run.directory import atomic_write_json, file_lock, read_jsonl

# The planning API of launch/sweep_plan.py plus this module's runner, state and progress view.
__all__ = [
    "LOCK_DIR", "LOG_DIR", "REPO_ROOT", "STATE_FILE", "TRAIN_SCRIPT", "PlannedRun", "ProgressView",
    "Resources", "RunProgress", "Sweep", "SweepError", "SweepInterrupted", "SweepRunner", "SweepState",
    "build_command", "cluster_command", "cluster_launcher", "expand_grid", "free_port", "load_sweep",
    "override_item", "plan_runs", "read_last_eval", "refresh_action", "render_progress", "run_names",
    "sweep_dir", "try_lock", "wandb_sweep_spec",
]

log = logging.getLogger("launch.supervisor")

STATE_FILE = "sweep.json"
LOCK_DIR = ".locks"
LOG_DIR = "logs"


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

    def start_attempt(self, run: PlannedRun, action: str, pid: int | None, command: list[str],
                      job_id: str | None = None) -> None:
        """A run was started (the local runner: `pid`) or submitted (an executor: `job_id`)."""
        with self.update() as data:
            entry = data["runs"][run.name]
            entry["status"] = "running" if job_id is None else "submitted"
            attempt = {
                "invocation": self.invocation, "action": action, "pid": pid, "command": command,
                "started_at": _now(), "started_at_unix": round(time.time(), 3),
                "ended_at": None, "elapsed_s": None, "returncode": None, "outcome": None,
            }
            if job_id is not None:
                attempt["job_id"] = job_id
            entry["attempts"].append(attempt)

    def record_submission(self, submission: dict[str, Any], job_ids: dict[str, str]) -> None:
        """An executor's submission (executor, folder, parameters) and the job id of each run it took."""
        with self.update() as data:
            invocation = data["invocations"][self.invocation]
            record = invocation.setdefault("submission", {**submission, "job_ids": {}})
            record["job_ids"].update(job_ids)

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


