"""The submitit backend of the sweep runner: each run is one task of a job array (`--executor local|slurm`).

launch/runner.py's `SweepRunner` is the run loop (locks, skip-completed, resume, outcomes,
``sweep.json``, the progress table); `SubmititBackend` is how it starts a run under submitit, and
`run_task` what one task runs on its node:

- ``--executor local``: submitit's `LocalExecutor` (jobs are local processes; pickles and task
  logs in ``<sweep dir>/submitit``). It has no array parallelism, so at most ``--parallel`` jobs
  are in flight and the next one is submitted when one ends. Each task runs exactly the command
  the local process backend builds (``--launcher`` included).
- ``--executor slurm``: ``submitit.AutoExecutor(folder=<sweep dir>/submitit, cluster="slurm")``, one
  job array of every run to do, ``slurm_array_parallelism = --parallel``, the sweep file's
  ``resources`` as the Slurm parameters. Each task starts its run with the launcher the resources
  imply (`cluster_launcher`): plain ``python`` without GPUs; ``deepspeed --num_gpus <g>
  --master_port <port>`` on one node; on several nodes one task per node, each running::

      deepspeed --hostfile <sweep dir>/submitit/hostfiles/<job id> --no_ssh --node_rank $SLURM_NODEID \\
          --master_addr <first node of the job> --master_port <port> launch/train.py --config ...

  where the hostfile (``<node> slots=<gpus_per_node>`` per node of ``$SLURM_JOB_NODELIST``) is
  written by the task itself and the port is derived from the job id (the same on every node).

A task that finds a run directory written meanwhile (a requeued task) resumes it. The task, not
the sweep process, holds the run's lock (``.locks/<run>.lock``) while its run lives; a task that
finds the lock held ends without running ("busy"). ``sweep.json`` records the submission
(executor, folder, parameters, job ids) in the invocation and each run's attempt with its job
id. Interrupting the sweep process cancels its jobs; run the same command again to continue.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from launch.runner import LOG_DIR, Ended, Started, free_port, run_lock_path, timestamp, try_lock
from launch.sweep_plan import (
    REPO_ROOT,
    PlannedRun,
    Resources,
    Sweep,
    SweepError,
    build_command,
    cluster_launcher,
)

EXECUTORS = ("local", "slurm")
SUBMITIT_DIR = "submitit"
HOSTFILE_DIR = "hostfiles"
# A local process run has no time limit; submitit's LocalExecutor kills a job after timeout_min (2 by default).
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
        log_file.write(f"\n===== {timestamp()} {action} "
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
    """One submitted run, as `SweepRunner` sees it (see `launch.runner.Started`)."""

    run: PlannedRun
    action: str
    command: list[str]
    job: Any
    log_path: Path
    started: float
    pid: int | None = None

    @property
    def job_id(self) -> str:
        return str(self.job.job_id)

    def start_text(self) -> str:
        return f"submitted ({self.action}) as job {self.job_id}, log {self.log_path}"

    def poll(self) -> Ended | None:
        if not self.job.done():
            return None
        try:
            result = self.job.results()[0]  # the first node's task holds the run
        except Exception:  # noqa: BLE001 - a task that died (killed, out of memory) is a failed run
            return Ended(None)
        if result.get("status") == "busy":
            return Ended(None, busy=True)
        # What the task ran: a requeued task may have resumed.
        return Ended(result.get("returncode"), command=result.get("command"), action=result.get("action"))

    def end_text(self, returncode: int | None, elapsed: float) -> str:
        return f"(job {self.job_id}, exit {returncode})"

    def interrupt(self) -> None:
        with contextlib.suppress(Exception):
            self.job.cancel(check=False)

    def wait(self, deadline: float) -> int | None:
        while not self.job.done() and time.time() < deadline:
            time.sleep(0.2)
        return None  # a cancelled job's exit status is unknown

    def close(self) -> None:
        """Nothing to release: the task holds the run's lock and log."""


class SubmititBackend:
    """Each run is a submitit job running `run_task`: the `SweepRunner` backend for ``--executor``."""

    verb = "submitted"
    stop_text = "cancelling {n} job(s)"

    def __init__(self, kind: str, sweep: Sweep, *, launcher: str = "") -> None:
        if kind not in EXECUTORS:
            raise SweepError(f"--executor: must be one of {', '.join(EXECUTORS)}, got {kind!r}")
        if kind == "slurm" and launcher:
            raise SweepError("--launcher: the slurm executor builds each run's launcher from the sweep file's resources")
        self.kind, self.sweep, self.launcher = kind, sweep, launcher
        self.label = f"{kind} executor, "
        self.folder = Path()
        self.executor: Any = None
        self.submission: dict[str, Any] | None = None

    def prepare(self, folder: Path, parallel: int) -> None:
        self.folder = folder
        # The task imports this module from the checkout (the job runs `python -m submitit.core._submit`).
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        self.executor = make_executor(self.kind, folder / SUBMITIT_DIR, self.sweep.resources,
                                      parallel=parallel, name=self.sweep.name)
        self.submission = {"executor": self.kind, "folder": str(folder / SUBMITIT_DIR),
                           "parameters": json.loads(json.dumps(self.executor.parameters, default=str))}

    def window(self, parallel: int, to_run: int) -> int:
        # Slurm: one array of every run (the array's parallelism limits them); local: a rolling window.
        return max(1, to_run) if self.kind == "slurm" else parallel

    def spec(self, run: PlannedRun, action: str) -> tuple[dict[str, Any], list[str]]:
        """The task's spec and the command recorded for it (Slurm: with the launcher still to fill in)."""
        train_args = build_command(run, self.sweep.base, action)[1:]
        spec: dict[str, Any] = {
            "train_args": train_args, "action": action, "run_dir": str(run.output_dir),
            "log": str(self.folder / LOG_DIR / f"{run.name}.log"), "lock": str(run_lock_path(self.folder, run.name)),
            "hostfile_dir": str(self.folder / SUBMITIT_DIR / HOSTFILE_DIR), "resources": None, "env": {},
        }
        if self.kind == "local":
            port = free_port() if self.launcher else None
            command = build_command(run, self.sweep.base, action, launcher=self.launcher, port=port)
            spec["launcher"] = command[:len(command) - len(train_args)]
            # LocalExecutor hides the GPUs unless told how many; the local process backend leaves them as they are.
            spec["env"] = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
            return spec, command
        spec["resources"] = asdict(self.sweep.resources)
        # The task fills these in on its node(s); sweep.json shows the form.
        launcher = cluster_launcher(self.sweep.resources, port="<port>", node_rank="$SLURM_NODEID",  # type: ignore[arg-type]
                                    master_addr="<first node>", hostfile="<hostfile>")
        return spec, [*launcher, *train_args]

    def start(self, ready: Sequence[tuple[PlannedRun, str, IO[bytes]]]) -> list[Started]:
        specs = []
        for run, action, lock in ready:
            lock.close()  # the task takes the lock on its node
            specs.append((run, action, *self.spec(run, action)))
        if len(specs) == 1:
            jobs = [self.executor.submit(run_task, specs[0][2])]
        else:
            with self.executor.batch():
                jobs = [self.executor.submit(run_task, spec) for _, _, spec, _ in specs]
        now = time.time()
        return [_Job(run=run, action=action, command=command, job=job, log_path=Path(spec["log"]), started=now)
                for (run, action, spec, command), job in zip(specs, jobs)]
