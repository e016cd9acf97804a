"""The one sweep run loop: starts a sweep's planned runs, `parallel` at a time, and records them.

launch/sweep_plan.py plans the runs (names, validated configs, what each run directory says to
do); this module runs them. How a run is started is a backend with one small interface
(`ProcessBackend` below: a local process of launch/train.py; launch/executor.py's
`SubmititBackend`: a submitit job, local or Slurm); everything that makes a sweep safe to
interrupt and run again is here, the same for both:

- Whether a run is new, resumed or already completed is decided by the run directory alone
  (`check_run_dir`, re-read just before the run starts): a completed run is never started again;
  one with a ``config.yaml`` but no completed summary is continued with ``resume=true`` from its
  last checkpoint.
- A run is started only while its lock file (``.locks/<run>.lock``) is free. A local process
  inherits the lock's file descriptor, so a run that outlives a killed sweep process still holds
  it; a submitit task takes the lock itself. Either way a second sweep process never starts the
  same run twice at once ("busy").
- ``sweep.json`` (written atomically, read-modify-written under ``.locks/state.lock``) records
  every invocation and every attempt of every run: when it started, how (new/resume), how it
  ended (completed/failed/interrupted/busy), its exit status (`run_outcome` classifies it) and,
  for submitit, the submission and job ids.
- A progress table (rich on a terminal, plain text in a log) shows every run and its last
  evaluation.

This module launches processes and reads run directories; it never imports training loops.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
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
from typing import IO, Any, Protocol

from launch.sweep_plan import PlannedRun, Sweep, SweepError, build_command, refresh_action
from rlhf_overopt.errors import ConfigError
from rlhf_overopt.run.directory import atomic_write_json, file_lock, read_jsonl

STATE_FILE = "sweep.json"
LOCK_DIR = ".locks"
LOG_DIR = "logs"


def free_port() -> int:
    """A TCP port that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def timestamp() -> str:
    """Local time as written into sweep.json and the run logs."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


# ---------------------------------------------------------------------------------------------
# Locks, outcomes and the sweep.json state file
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


def run_lock_path(folder: Path, name: str) -> Path:
    """The lock file of run `name` of the sweep in `folder`."""
    return folder / LOCK_DIR / f"{name}.lock"


def _lock_busy(path: Path) -> bool:
    if not path.exists():
        return False
    handle = try_lock(path)
    if handle is None:
        return True
    handle.close()
    return False


def run_outcome(run: PlannedRun, returncode: int | None) -> str:
    """ "completed" when the process exited 0 and its summary says completed, else "failed"."""
    try:
        summary = json.loads((run.output_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "failed"
    return "completed" if returncode == 0 and summary.get("status") == "completed" else "failed"


class SweepState:
    """`sweep.json`: every invocation of a sweep and every attempt of every run.

    Layout::

        {"sweep": name, "sweep_file": ..., "base": ..., "grid": {...}, "set": {...},
         "invocations": [{"id", "pid", "argv", "started_at", "ended_at", "skipped_completed": [...],
                          "submission": {...} (submitit only), "result": {...}}],
         "runs": {name: {"output_dir", "params", "status", "last_eval",
                         "attempts": [{"invocation", "action", "pid", "job_id" (submitit only), "command",
                                       "started_at", "ended_at", "elapsed_s", "returncode", "outcome"}]}}}

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
            data["updated_at"] = timestamp()
            atomic_write_json(self.path, data)

    def begin(self, sweep: Sweep, runs: Sequence[PlannedRun], argv: Sequence[str]) -> None:
        """Record a new invocation; attempts left open by a dead sweep process become "interrupted"."""
        with self.update() as data:
            data.update(sweep=sweep.name, sweep_file=str(sweep.path), base=str(sweep.base),
                        grid=sweep.grid, set=sweep.fixed)
            data.setdefault("created_at", timestamp())
            invocations = data.setdefault("invocations", [])
            self.invocation = len(invocations)
            invocations.append({
                "id": self.invocation, "pid": os.getpid(), "argv": list(argv), "started_at": timestamp(),
                "ended_at": None, "skipped_completed": [r.name for r in runs if r.action == "completed"],
            })
            all_runs = data.setdefault("runs", {})
            for run in runs:
                entry = all_runs.setdefault(run.name, {"attempts": []})
                entry.update(output_dir=str(run.output_dir), params=run.params)
                for attempt in entry["attempts"]:
                    if attempt.get("outcome") is None and not _lock_busy(run_lock_path(self.folder, run.name)):
                        attempt["outcome"] = "interrupted"
                entry["status"] = {"new": "pending", "resume": "to resume"}.get(run.action, run.action)

    def start_attempt(self, run: PlannedRun, action: str, pid: int | None, command: list[str],
                      job_id: str | None = None) -> None:
        """A run was started (a local process: `pid`) or submitted (a submitit job: `job_id`)."""
        with self.update() as data:
            entry = data["runs"][run.name]
            entry["status"] = "running" if job_id is None else "submitted"
            attempt = {
                "invocation": self.invocation, "action": action, "pid": pid, "command": command,
                "started_at": timestamp(), "started_at_unix": round(time.time(), 3),
                "ended_at": None, "elapsed_s": None, "returncode": None, "outcome": None,
            }
            if job_id is not None:
                attempt["job_id"] = job_id
            entry["attempts"].append(attempt)

    def record_submission(self, submission: dict[str, Any], job_ids: dict[str, str]) -> None:
        """A submitit submission (executor, folder, parameters) and the job id of each run it took."""
        with self.update() as data:
            invocation = data["invocations"][self.invocation]
            record = invocation.setdefault("submission", {**submission, "job_ids": {}})
            record["job_ids"].update(job_ids)

    def end_attempt(self, run: PlannedRun, returncode: int | None, outcome: str, elapsed: float,
                    last_eval: dict[str, Any] | None, *, command: list[str] | None = None,
                    action: str | None = None) -> None:
        """The last attempt ended; `command`/`action`: what a submitit task actually ran, when known."""
        with self.update() as data:
            entry = data["runs"][run.name]
            attempt = entry["attempts"][-1]
            attempt.update(ended_at=timestamp(), elapsed_s=round(elapsed, 2), returncode=returncode, outcome=outcome)
            if command:
                attempt.update(command=command, action=action)
            entry["status"] = outcome
            if last_eval:
                entry["last_eval"] = last_eval

    def drop_attempt(self, run: PlannedRun) -> None:
        """The last attempt ran nothing: its task found the run's lock held by another process."""
        with self.update() as data:
            data["runs"][run.name]["attempts"][-1].update(ended_at=timestamp(), outcome="busy")

    def finish(self, statuses: dict[str, str]) -> None:
        with self.update() as data:
            invocation = data["invocations"][self.invocation]
            invocation["ended_at"] = timestamp()
            invocation["result"] = statuses


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


def format_seconds(seconds: float | None) -> str:
    """H:MM:SS ("" for None)."""
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
        rows.append([p.name, p.status, str(p.attempts), format_seconds(p.elapsed_now()),
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
# How a run is started: the backend interface and the local-process backend
# ---------------------------------------------------------------------------------------------


@dataclass
class Ended:
    """How a started run ended, as its backend saw it."""

    returncode: int | None
    """The run's exit status (None: unknown, e.g. a submitit task that died)."""
    busy: bool = False
    """The task found the run's lock held by another process and ran nothing."""
    command: list[str] | None = None
    """What was actually run, where the backend learns it only at the end (a submitit task)."""
    action: str | None = None


class Started(Protocol):
    """One started run, as the loop sees it (`ProcessBackend`'s `_Process`, the submitit `_Job`)."""

    run: PlannedRun
    action: str
    command: list[str]
    pid: int | None
    job_id: str | None
    started: float

    def start_text(self) -> str: ...  # "started (new), pid 123" / "submitted (new) as job 7"
    def poll(self) -> Ended | None: ...  # None while it runs
    def end_text(self, returncode: int | None, elapsed: float) -> str: ...
    def interrupt(self) -> None: ...  # ask it to stop: it stays resumable
    def wait(self, deadline: float) -> int | None: ...  # until it ended (killed at `deadline`)
    def close(self) -> None: ...  # release what the sweep process holds for it


class Backend(Protocol):
    """A way to start runs: `ProcessBackend` here, launch/executor.py's `SubmititBackend`."""

    label: str  # in the sweep's first line: "" or "local executor, "
    verb: str  # "started" or "submitted"
    stop_text: str  # what an interrupted sweep does to its active runs, "{n}": how many
    submission: dict[str, Any] | None  # recorded in sweep.json's invocation (submitit) or None

    def prepare(self, folder: Path, parallel: int) -> None: ...
    def window(self, parallel: int, to_run: int) -> int: ...  # how many may be active at once
    def start(self, ready: Sequence[tuple[PlannedRun, str, IO[bytes]]]) -> list[Started]: ...


@dataclass
class _Process:
    run: PlannedRun
    action: str
    command: list[str]
    proc: subprocess.Popen
    lock: IO[bytes]
    log: IO[bytes]
    log_path: Path
    started: float
    job_id: str | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start_text(self) -> str:
        return f"started ({self.action}), pid {self.proc.pid}, log {self.log_path}"

    def poll(self) -> Ended | None:
        returncode = self.proc.poll()
        return None if returncode is None else Ended(returncode)

    def end_text(self, returncode: int | None, elapsed: float) -> str:
        return f"(exit {returncode}) in {format_seconds(elapsed)}"

    def interrupt(self) -> None:
        # SIGINT lets launch/train.py record a failed summary; the run stays resumable.
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)

    def wait(self, deadline: float) -> int | None:
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        self.log.close()
        self.lock.close()


class ProcessBackend:
    """Each run is a local process of launch/train.py (behind `launcher`, e.g. ``deepspeed``) that
    inherits the run's lock; its output goes to ``logs/<run>.log``."""

    label = ""
    verb = "started"
    stop_text = "stopping {n} running run(s)"
    submission = None

    def __init__(self, base: Path, launcher: str = "") -> None:
        self.base, self.launcher = base, launcher
        self.folder = Path()

    def prepare(self, folder: Path, parallel: int) -> None:
        self.folder = folder

    def window(self, parallel: int, to_run: int) -> int:
        return parallel

    def start(self, ready: Sequence[tuple[PlannedRun, str, IO[bytes]]]) -> list[Started]:
        started: list[Started] = []
        for run, action, lock in ready:
            port = free_port() if self.launcher else None
            command = build_command(run, self.base, action, launcher=self.launcher, port=port)
            log_path = self.folder / LOG_DIR / f"{run.name}.log"
            log_file = open(log_path, "ab")  # noqa: SIM115 - closed when the run ends
            log_file.write(f"\n===== {timestamp()} {action}: {shlex.join(command)}\n".encode())
            log_file.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    pass_fds=(lock.fileno(),))
            started.append(_Process(run=run, action=action, command=command, proc=proc, lock=lock, log=log_file,
                                    log_path=log_path, started=time.time()))
        return started


# ---------------------------------------------------------------------------------------------
# The run loop
# ---------------------------------------------------------------------------------------------


class SweepInterrupted(Exception):
    """The sweep process got SIGINT or SIGTERM."""


class SweepRunner:
    """Runs the planned runs through `backend`, at most `parallel` active at once."""

    def __init__(
        self,
        sweep: Sweep,
        runs: Sequence[PlannedRun],
        folder: Path,
        backend: Backend,
        *,
        parallel: int = 1,
        poll_interval: float = 0.5,
        view: ProgressView | None = None,
        argv: Sequence[str] = (),
    ) -> None:
        if parallel < 1:
            raise SweepError(f"--parallel: must be >= 1, got {parallel}")
        self.sweep = sweep
        self.runs = list(runs)
        self.folder = folder
        self.backend = backend
        self.parallel = parallel
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
                        f"{len(self.runs) - len(pending)} already completed; {self.backend.label}"
                        f"up to {self.parallel} at once")
        self.backend.prepare(self.folder, self.parallel)
        window = self.backend.window(self.parallel, len(pending))
        active: dict[str, Started] = {}
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def interrupt(signum: int, _frame: Any) -> None:
            raise SweepInterrupted(signal.Signals(signum).name)

        for sig in previous:
            signal.signal(sig, interrupt)
        try:
            while pending or active:
                while pending and len(active) < window:
                    take = window - len(active)
                    batch, pending = pending[:take], pending[take:]
                    active.update((s.run.name, s) for s in self._start(batch))
                for name in list(active):
                    ended = active[name].poll()
                    if ended is not None:
                        self._finish(active.pop(name), ended)
                self._watch_curves(active)
                self.view.tick()
                if pending or active:
                    time.sleep(self.poll_interval)
        except SweepInterrupted as exc:
            self.view.event(f"{exc}: {self.backend.stop_text.format(n=len(active))}; "
                            "run the sweep again to continue")
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

    def _settle(self, run: PlannedRun, status: str, message: str, *, status_text: str | None = None) -> None:
        """`run` ends this invocation without running (busy, bad config, completed meanwhile)."""
        self.statuses[run.name] = status
        self.progress[run.name].status = status_text or status
        self.view.event(f"{run.name}: {message}")

    def _start(self, batch: Sequence[PlannedRun]) -> list[Started]:
        ready = []
        for run in batch:
            lock = try_lock(run_lock_path(self.folder, run.name))
            if lock is None:
                self._settle(run, "busy", "another process holds its lock; left to it")
                continue
            try:
                # The directory may have moved on since planning (another process, a W&B agent).
                action = refresh_action(run)
            except ConfigError as exc:
                lock.close()
                self._settle(run, "failed", f"not {self.backend.verb}: {exc}", status_text="failed (config)")
                continue
            if action == "completed":
                lock.close()
                self._settle(run, "completed", "completed meanwhile; skipped")
                continue
            ready.append((run, action, lock))
        if not ready:
            return []
        started = self.backend.start(ready)
        if self.backend.submission is not None:
            self.state.record_submission(self.backend.submission, {s.run.name: str(s.job_id) for s in started})
        for s in started:
            self.state.start_attempt(s.run, s.action, s.pid, s.command, job_id=s.job_id)
            progress = self.progress[s.run.name]
            progress.status = "running" if s.action == "new" else "resuming"
            progress.attempts += 1
            progress.started = s.started
            self.view.event(f"{s.run.name}: {s.start_text()}")
        return started

    def _finish(self, started: Started, ended: Ended) -> None:
        run = started.run
        if ended.busy:
            started.close()
            self.state.drop_attempt(run)
            self._settle(run, "busy", f"job {started.job_id}: another process holds its lock; left to it")
            return
        elapsed = time.time() - started.started
        outcome = run_outcome(run, ended.returncode)
        last_eval = read_last_eval(run.output_dir)
        self.state.end_attempt(run, ended.returncode, outcome, elapsed, last_eval,
                               command=ended.command, action=ended.action)
        started.close()  # after the record: a lock free with the attempt still open reads as "interrupted"
        progress = self.progress[run.name]
        progress.status = outcome if outcome == "completed" else f"failed ({ended.returncode})"
        progress.elapsed = elapsed
        progress.last_eval = last_eval or progress.last_eval
        self.statuses[run.name] = outcome
        hint = "" if outcome == "completed" else f"; see {self.folder / LOG_DIR / (run.name + '.log')}"
        self.view.event(f"{run.name}: {outcome} {started.end_text(ended.returncode, elapsed)}{hint}")

    def _watch_curves(self, active: dict[str, Started]) -> None:
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

    def _stop(self, active: dict[str, Started], grace: float = 20.0) -> None:
        """Ask every active run to stop (each records a failed summary and can be resumed); after
        `grace` seconds a local process is killed."""
        for started in active.values():
            started.interrupt()
        deadline = time.time() + grace
        for started in active.values():
            returncode = started.wait(deadline)
            # A cancelled job's exit status is unknown (None): its summary alone decides.
            completed = run_outcome(started.run, 0 if returncode is None else returncode) == "completed"
            outcome = "completed" if completed else "interrupted"
            self.state.end_attempt(started.run, returncode, outcome, time.time() - started.started,
                                   read_last_eval(started.run.output_dir))
            started.close()
            self.statuses[started.run.name] = outcome
            self.progress[started.run.name].status = outcome
