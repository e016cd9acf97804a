"""Sweeps through submitit: each run of the plan is one task of a job array (`--executor local|slurm`).

launch/sweep_plan.py plans the runs and launch/supervisor.py owns ``sweep.json`` and the locks;
this module submits the runs that are not completed as submitit jobs and waits for them:

- ``--executor local``: submitit's `LocalExecutor` (jobs are local processes; pickles and task
  logs in ``<sweep dir>/submitit``). It has no array parallelism, so at most ``--parallel`` jobs
  are in flight and the next one is submitted when one ends. Each task runs exactly the command
  the local process runner builds (``--launcher`` included).
- ``--executor slurm``: ``submitit.AutoExecutor(folder=<sweep dir>/submitit, cluster="slurm")``, one
  job array of every run to do, ``slurm_array_parallelism = --parallel``, the sweep file's
  ``resources`` as the Slurm parameters. Each task starts its run with the launcher the resources
  imply (`cluster_launcher`): plain ``python`` without GPUs; ``deepspeed --num_gpus <g>
  --master_port <port>`` on one node; on several nodes one task per node, each running::

      deepspeed --hostfile <sweep dir>/submitit/hostfiles/<job id> --no_ssh --node_rank $SLURM_NODEID \\
          --master_addr <first node of the job> --master_port <port> launch/train.py --config ...

  where the hostfile (``<node> slots=<gpus_per_node>`` per node of ``$SLURM_JOB_NODELIST``) is
  written by the task itself and the port is derived from the job id (the same on every node).

What is run is decided from the run directories, as for the local runner: a completed run is
skipped before submission, one whose directory holds a run is submitted with ``resume=true``
(`check_run_dir`), and a task that finds a run directory written meanwhile (a requeued task)
resumes it. A task holds the run's lock (``.locks/<run>.lock``) while its run lives, so a run is
never started twice at once; a task that finds the lock held ends without running ("busy").
``sweep.json`` records the submission (executor, folder, parameters, job ids) in the invocation
and each run's attempt with its job id. Interrupting the sweep process cancels its jobs; run the
same command again to continue.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from launch.supervisor import (  # the local runner's lock test and outcome rule
    LOG_DIR,
    REPO_ROOT,
    PlannedRun,
    ProgressView,
    Resources,
    RunProgress,
    Sweep,
    SweepError,
    SweepInterrupted,
    SweepState,
    _lock_busy,
    _outcome,
    build_command,
    cluster_launcher,
    free_port,
    read_last_eval,
    refresh_action,
    try_lock,
)
from rlhf_overopt.errors import ConfigError

log = logging.getLogger("launch.executor")

EXECUTORS = ("local", "slurm")
SUBMITIT_DIR = "submitit"
HOSTFILE_DIR = "hostfiles"
# The local runner has no time limit; submitit's LocalExecutor kills a job after timeout_min (2 by default).
LOCAL_TIMEOUT_MIN = 30 * 24 * 60
BASE_PORT = 29500


# ---------------------------------------------------------------------------------------------
# The task: what one job of the array runs (in the job's own process, on the job's node)
# ---------------------------------------------------------------------------------------------


def run_task(spec: dict[str, Any]) -> dict[str, Any]:
    """Start one run of launch/train.py and wait for it; return its exit status.

    `spec` (plain data, so that the pickle does not depend on this module's classes):
    ``train_args`` (launch/train.py and its arguments), ``action``, ``run_dir``, ``log``, ``lock``,
    ``launcher`` (a fixed argv prefix, local executor) or ``resources`` (Slurm: the launcher is
    built here, from the node the task landed on), ``hostfile_dir`` and ``env`` (variables to set;
    None unsets).
    """
    resources = Resources(**spec["resources"]) if spec.get("resources") is not None else None
    node_rank = int(os.environ.get("SLURM_NODEID", "0")) if resources is not None else 0
    lock = None
    if node_rank == 0:  # one lock per run: on several nodes the first node's task holds it
        lock = try_lock(Path(spec["lock"]))
        if lock is None:
            return {"status": "busy", "returncode": None}
    train_args, action = list(spec["train_args"]), spec["action"]
    multi_node = resources is not None and resources.nodes > 1
    requeued = int(os.environ.get("SLURM_RESTART_COUNT", "0")) > 0
    # A requeued or late task finds the run started meanwhile; every node decides the same way
    # (the restart count), since a single node may look at the directory being created.
    if "resume=true" not in train_args and (
        requeued or (not multi_node and (Path(spec["run_dir"]) / "config.yaml").is_file())
    ):
        train_args.append("resume=true")
        action = "resume"
    if resources is None:
        command = [*spec["launcher"], *train_args]
    else:
        job_id = os.environ.get("SLURM_JOB_ID", "0")
        launcher: dict[str, Any] = {"port": BASE_PORT + int(job_id) % 20000}
        if multi_node:
            hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                                   check=True, capture_output=True, text=True).stdout.split()
            hostfile = Path(spec["hostfile_dir"]) / job_id
            hostfile.parent.mkdir(parents=True, exist_ok=True)
            text = "".join(f"{h} slots={resources.gpus_per_node}\n" for h in hosts)
            tmp = hostfile.with_name(f"{hostfile.name}.{node_rank}.tmp")
            tmp.write_text(text)
            os.replace(tmp, hostfile)  # every node writes the same text; none reads a partial one
            launcher.update(node_rank=node_rank, master_addr=hosts[0], hostfile=str(hostfile))
        command = [*cluster_launcher(resources, **launcher), *train_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for key, value in spec.get("env", {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    log_path = Path(spec["log"])
    if node_rank:
        log_path = log_path.with_name(f"{log_path.stem}.node{node_rank}.log")
    with open(log_path, "ab") as log_file:
        log_file.write(f"\n===== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} {action} "
                       f"(job {os.environ.get('SLURM_JOB_ID') or os.getpid()}): {shlex.join(command)}\n".encode())
        log_file.flush()
        proc = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                pass_fds=(lock.fileno(),) if lock is not None else ())

        def stop(_signum: int, _frame: Any) -> None:
            # SIGINT lets launch/train.py record a failed summary; the run stays resumable.
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, stop)
        returncode = proc.wait()
    return {"status": "ran", "returncode": returncode, "action": action, "command": command,
            "node_rank": node_rank}


# ---------------------------------------------------------------------------------------------
# The sweep side: submit, wait, record
# ---------------------------------------------------------------------------------------------


def make_executor(kind: str, folder: Path, resources: Resources, *, parallel: int, name: str) -> Any:
    """The submitit executor for `kind` ("local" or "slurm"), its parameters set."""
    import submitit

    if kind == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=LOCAL_TIMEOUT_MIN)
        return executor
    if kind != "slurm":
        raise SweepError(f"--executor: must be one of {', '.join(EXECUTORS)}, got {kind!r}")
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    params: dict[str, Any] = {"name": name, "nodes": resources.nodes, "tasks_per_node": 1,
                              "timeout_min": resources.timeout_min, "slurm_array_parallelism": parallel}
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.cpus_per_task is not None:
        params["cpus_per_task"] = resources.cpus_per_task
    if resources.mem_gb is not None:
        params["mem_gb"] = resources.mem_gb
    for key in ("partition", "account", "constraint"):
        if getattr(resources, key) is not None:
            params[f"slurm_{key}"] = getattr(resources, key)
    executor.update_parameters(**params)
    return executor


@dataclass
class _Job:
    run: PlannedRun
    job: Any
    action: str
    submitted: float


class ExecutorRunner:
    """Runs the planned runs as submitit jobs; the same contract as `SweepRunner.run`."""

    def __init__(
        self,
        sweep: Sweep,
        runs: Sequence[PlannedRun],
        folder: Path,
        *,
        executor: str,
        parallel: int = 1,
        launcher: str = "",
        poll_interval: float = 0.5,
        argv: Sequence[str] = (),
        view: ProgressView | None = None,
    ) -> None:
        if executor not in EXECUTORS:
            raise SweepError(f"--executor: must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        if executor == "slurm" and launcher:
            raise SweepError("--launcher: the slurm executor builds each run's launcher from the sweep file's resources")
        self.sweep, self.runs, self.folder = sweep, list(runs), folder
        self.kind, self.parallel, self.launcher = executor, parallel, launcher
        self.poll_interval = poll_interval
        self.argv = list(argv)
        self.state = SweepState(folder)
        self.progress = {r.name: RunProgress(name=r.name, status={"new": "pending", "resume": "to resume"}.get(
            r.action, r.action), last_eval=read_last_eval(r.output_dir)) for r in self.runs}
        self.view = view or ProgressView(list(self.progress.values()))
        self.statuses: dict[str, str] = {}

    def run(self) -> dict[str, str]:
        """Submit every run that is not completed, wait for all; return run name -> final status."""
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / LOG_DIR).mkdir(exist_ok=True)
        self.state.begin(self.sweep, self.runs, self.argv)
        pending = [r for r in self.runs if r.action != "completed"]
        for run in self.runs:
            if run.action == "completed":
                self.statuses[run.name] = "completed"
        self.view.event(f"sweep {self.sweep.name}: {len(self.runs)} runs, {len(pending)} to run, "
                        f"{len(self.runs) - len(pending)} already completed; {self.kind} executor, "
                        f"up to {self.parallel} at once")
        # The task imports this module from the checkout (the job runs `python -m submitit.core._submit`).
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        executor = make_executor(self.kind, self.folder / SUBMITIT_DIR, self.sweep.resources,
                                 parallel=self.parallel, name=self.sweep.name)
        submission = {"executor": self.kind, "folder": str(self.folder / SUBMITIT_DIR),
                      "parameters": json.loads(json.dumps(executor.parameters, default=str))}
        # Slurm: one array of every run (the array's parallelism limits them); local: a rolling window.
        window = len(pending) if self.kind == "slurm" else self.parallel
        active: dict[str, _Job] = {}
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def interrupt(signum: int, _frame: Any) -> None:
            raise SweepInterrupted(signal.Signals(signum).name)

        for sig in previous:
            signal.signal(sig, interrupt)
        try:
            while pending or active:
                if pending and len(active) < window:
                    take = window - len(active)
                    batch, pending = pending[:take], pending[take:]
                    active.update(self._submit(executor, batch, submission))
                for name in list(active):
                    if active[name].job.done():
                        self._finish(active.pop(name))
                self.view.tick()
                if pending or active:
                    time.sleep(self.poll_interval)
        except SweepInterrupted as exc:
            self.view.event(f"{exc}: cancelling {len(active)} job(s); run the sweep again to continue")
            self._cancel(active)
            for run in pending:
                self.statuses[run.name] = "interrupted"
            raise
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.state.finish(self.statuses)
            self.view.close()
        return self.statuses

    def _spec(self, run: PlannedRun, action: str) -> tuple[dict[str, Any], list[str]]:
        """The task's spec and the command recorded for it (Slurm: with the launcher still to fill in)."""
        train_args = build_command(run, self.sweep.base, action)[1:]
        spec: dict[str, Any] = {
            "train_args": train_args, "action": action, "run_dir": str(run.output_dir),
            "log": str(self.folder / LOG_DIR / f"{run.name}.log"), "lock": str(self.state.run_lock_path(run.name)),
            "hostfile_dir": str(self.folder / SUBMITIT_DIR / HOSTFILE_DIR), "resources": None, "env": {},
        }
        if self.kind == "local":
            port = free_port() if self.launcher else None
            command = build_command(run, self.sweep.base, action, launcher=self.launcher, port=port)
            spec["launcher"] = command[:len(command) - len(train_args)]
            # LocalExecutor hides the GPUs unless told how many; the local runner leaves them as they are.
            spec["env"] = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
            return spec, command
        spec["resources"] = asdict(self.sweep.resources)
        # The task fills these in on its node(s); sweep.json shows the form.
        launcher = cluster_launcher(self.sweep.resources, port="<port>", node_rank="$SLURM_NODEID",  # type: ignore[arg-type]
                                    master_addr="<first node>", hostfile="<hostfile>")
        return spec, [*launcher, *train_args]

    def _submit(self, executor: Any, batch: Sequence[PlannedRun], submission: dict[str, Any]) -> dict[str, _Job]:
        ready: list[tuple[PlannedRun, str, dict[str, Any], list[str]]] = []
        for run in batch:
            if _lock_busy(self.state.run_lock_path(run.name)):
                self._settle(run, "busy", "another process holds its lock; left to it")
                continue
            try:
                action = refresh_action(run)  # the directory may have moved on since planning
            except ConfigError as exc:
                self._settle(run, "failed", f"not submitted: {exc}", status_text="failed (config)")
                continue
            if action == "completed":
                self._settle(run, "completed", "completed meanwhile; skipped")
                continue
            ready.append((run, action, *self._spec(run, action)))
        if not ready:
            return {}
        if len(ready) == 1:
            jobs = [executor.submit(run_task, ready[0][2])]
        else:
            with executor.batch():
                jobs = [executor.submit(run_task, spec) for _, _, spec, _ in ready]
        now = time.time()
        self.state.record_submission(submission, {run.name: str(job.job_id) for (run, *_), job in zip(ready, jobs)})
        submitted = {}
        for (run, action, _, command), job in zip(ready, jobs):
            self.state.start_attempt(run, action, None, command, job_id=str(job.job_id))
            progress = self.progress[run.name]
            progress.status = "running" if action == "new" else "resuming"
            progress.attempts += 1
            progress.started = now
            self.view.event(f"{run.name}: submitted ({action}) as job {job.job_id}, "
                            f"log {self.folder / LOG_DIR / (run.name + '.log')}")
            submitted[run.name] = _Job(run=run, job=job, action=action, submitted=now)
        return submitted

    def _settle(self, run: PlannedRun, status: str, message: str, *, status_text: str | None = None) -> None:
        self.statuses[run.name] = status
        self.progress[run.name].status = status_text or status
        self.view.event(f"{run.name}: {message}")

    def _finish(self, active: _Job) -> None:
        run = active.run
        try:
            result = active.job.results()[0]  # the first node's task holds the run
        except Exception as exc:  # noqa: BLE001 - a task that died (killed, out of memory) is a failed run
            result = {"status": "ran", "returncode": None, "error": str(exc).strip().splitlines()[-1:]}
        if result.get("status") == "busy":
            self._drop_attempt(run)
            self._settle(run, "busy", f"job {active.job.job_id}: another process holds its lock; left to it")
            return
        returncode = result.get("returncode")
        outcome = _outcome(run, returncode)
        elapsed = time.time() - active.submitted
        last_eval = read_last_eval(run.output_dir)
        if result.get("command"):  # what the task ran (a requeued task may have resumed)
            with self.state.update() as data:
                data["runs"][run.name]["attempts"][-1].update(command=result["command"], action=result["action"])
        self.state.end_attempt(run, returncode, outcome, elapsed, last_eval)
        progress = self.progress[run.name]
        progress.status = outcome if outcome == "completed" else f"failed ({returncode})"
        progress.elapsed = elapsed
        progress.last_eval = last_eval or progress.last_eval
        self.statuses[run.name] = outcome
        hint = "" if outcome == "completed" else f"; see {self.folder / LOG_DIR / (run.name + '.log')}"
        self.view.event(f"{run.name}: {outcome} (job {active.job.job_id}, exit {returncode}){hint}")

    def _drop_attempt(self, run: PlannedRun) -> None:
        with self.state.update() as data:
            attempt = data["runs"][run.name]["attempts"][-1]
            attempt.update(ended_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), outcome="busy")

    def _cancel(self, active: dict[str, _Job], grace: float = 20.0) -> None:
        for job in active.values():
            with contextlib.suppress(Exception):
                job.job.cancel(check=False)
        deadline = time.time() + grace
        for job in active.values():
            while not job.job.done() and time.time() < deadline:
                time.sleep(0.2)
            outcome = "completed" if _outcome(job.run, 0) == "completed" else "interrupted"
            self.state.end_attempt(job.run, None, outcome, time.time() - job.submitted, read_last_eval(job.run.output_dir))
            self.statuses[job.run.name] = outcome
            self.progress[job.run.name].status = outcome
