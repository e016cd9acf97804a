"""The run lifecycle around a driver: process group, threads, seeds, run directory, testbed,
summary.json — and nested runs (a driver that needs a run of another method asks for it here).

    execute(cfg, state, driver_for)   ->  exit status
        1. process group and this rank's device; torch threads; seeds (seed + rank)
        2. rank 0 builds (or finds) the testbed while the other ranks wait, then they open the
           cached copy; rank 0 computes the run's identity (run/identity.py: what its seed fixed)
           and creates the run directory (config.yaml with provenance and identity under _meta),
           or, resuming, checks the identity against the recorded one
        3. driver(ctx) -> its summary
        4. summary.json: "completed" with the driver's summary, or "failed" with the error

`driver_for(method)` resolves a method name to its driver's `run` function; the entry point
(launch/train.py) owns that table lookup, so nothing here imports a driver. The report is drawn
by the entry point after a completed run, like any other reader of the run directory.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_overopt.config.experiment import Config
from rlhf_overopt.config.methods import METHODS
from rlhf_overopt.config.validate import world_sources
from rlhf_overopt.errors import InputError, NonFiniteError
from rlhf_overopt.run import dist
from rlhf_overopt.run.directory import RunDir, read_jsonl, summarize_curves, write_jsonl
from rlhf_overopt.run.identity import check_identity, run_identity
from rlhf_overopt.run.seeds import seed_everything

log = logging.getLogger("rlhf_overopt")

Driver = Callable[["RunContext"], "dict[str, Any] | None"]

STEP_LOGS = ("train_stats.jsonl", "samples.jsonl")
"""Per-step logs that a resumed run cuts back to its checkpoint along with curves.jsonl."""


@dataclass
class RunContext:
    """Everything a driver gets besides its config: where it runs and where it writes."""

    cfg: Config
    dist: dist.DistInfo
    run: RunDir
    state: str  # "new" | "resume"
    testbed: Any = None  # rlhf_overopt.testbed.build.Testbed when the config uses the testbed
    driver_for: Callable[[str], Driver] | None = None
    started: float = field(default_factory=time.time)
    resumed: bool = False
    """A resumed run loaded its checkpoint: from here on it may write into its directory. Until then
    a failing resume (a corrupt checkpoint, a model that no longer loads) leaves every byte as it was."""

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def run_method(self, cfg: Config) -> Path:
        """A nested run of `cfg.method` into cfg.output_dir: reused when completed, resumed when
        interrupted, else started; returns its directory. Every rank takes part."""
        return run_child(self, cfg)


def uses_testbed(cfg: Config) -> bool:
    """Whether the run opens (and if need be builds) the testbed: the method builds it, or some part
    of the world the method reads comes from it (policy, gold, prompts, proxy or DPO pairs; the
    composite methods' component rewards train on its data). A key of a section the method does not
    read never counts: dpo.dataset's default alone once made every user-world run build the
    full-size testbed."""
    method = METHODS[cfg.method]
    return (method.builds_testbed or method.composite or cfg.policy.path == "testbed"
            or "testbed" in world_sources(cfg).values())


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("rlhf_overopt").setLevel(level)


def truncate_logs(run: RunDir, step: int, extra_logs: tuple[str, ...] = ()) -> None:
    """Drop rows logged after `step` (-1: all rows) from curves.jsonl and the per-step logs:
    a resumed run produces them again."""
    run.truncate_curves(step)
    for name in STEP_LOGS + extra_logs:
        path = run.root / name
        if run.writable and path.exists():
            write_jsonl(path, [r for r in read_jsonl(path) if r["step"] <= step])


def resume_step(ctx: RunContext, checkpointer: Any, engines: dict[str, Any],
                extra_logs: tuple[str, ...] = ()) -> tuple[int, dict[str, Any] | None]:
    """(step to start from, checkpoint state) for a driver loop.

    A new run starts at 0. A resumed run loads `checkpointer.latest()` into `engines` and cuts its
    logs back to that step; one interrupted before its first checkpoint starts over and drops
    everything it had logged.
    """
    if ctx.state != "resume":
        return 0, None
    state = checkpointer.latest()
    start = 0 if state is None else checkpointer.load(state, engines)
    ctx.resumed = True
    if ctx.dist.is_main:
        truncate_logs(ctx.run, start if state is not None else -1, extra_logs)
        ctx.run.write_summary({"status": "running"})
    dist.barrier()
    if state is None:
        log.info("resume: no checkpoint yet, starting over")
    else:
        log.info("resumed at step %d", start)
    return start, state


def _open_testbed(cfg: Config, info: dist.DistInfo):
    """Rank 0 builds (or finds) the testbed first; the others then open the cached copy."""
    from rlhf_overopt.testbed.build import build_testbed

    testbed = build_testbed(cfg.testbed, progress=True) if info.is_main else None
    dist.barrier()
    return testbed if info.is_main else build_testbed(cfg.testbed, progress=False)


def init_run_dir(cfg: Config, run: RunDir, testbed, info: dist.DistInfo, state: str,
                 argv: list[str] | None = None, mark_running: bool = True) -> dict[str, Any] | None:
    """Rank 0 computes the run's identity once (after the testbed is open), checks it against
    config.yaml's `_meta.identity` when resuming, and initializes the run directory with it (the
    identity enters config.yaml at first start only). A failure there stops every rank: rank 0
    raises its error, the others an error carrying its message. Returns the identity (rank 0)."""
    identity = failure = None
    if info.is_main:
        try:
            identity = run_identity(cfg, testbed)
            if state == "resume":
                check_identity(run.recorded_identity(), identity)
            run.init(cfg, argv, mark_running=mark_running, identity=identity)
        except Exception as exc:  # noqa: BLE001 — re-raised below, after the other ranks heard of it
            failure = exc
    message = dist.broadcast_object(None if failure is None else (isinstance(failure, InputError), str(failure)))
    if failure is not None:
        raise failure
    if message is not None:
        raise (InputError if message[0] else RuntimeError)(f"rank 0: {message[1]}")
    return identity


def _completed_summary(cfg: Config, run: RunDir, started: float, summary: dict[str, Any]) -> dict[str, Any]:
    return {"status": "completed", "method": cfg.method, "wall_time_s": round(time.time() - started, 2),
            "curves": summarize_curves(run.curves()), **summary}


def execute(cfg: Config, state: str, driver_for: Callable[[str], Driver], argv: list[str] | None = None) -> int:
    """Run the driver of `cfg.method` inside the shared lifecycle; returns the process exit status."""
    # 1. process group, threads, seeds
    info = dist.init(cfg.device)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    # Small models on few cores lose badly to oversubscription (measured 10x on a loaded 2-core box).
    torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // local_ranks))
    state = dist.broadcast_object(state)
    if state == "completed":
        return 0
    setup_logging(info.rank)
    seed_everything(cfg.seed + info.rank)
    run = RunDir(cfg.run_dir, writable=info.is_main)
    ctx = RunContext(cfg=cfg, dist=info, run=run, state=state, driver_for=driver_for)
    try:
        # 2. testbed, identity and run directory
        if uses_testbed(cfg):
            ctx.testbed = _open_testbed(cfg, info)
        init_run_dir(cfg, run, ctx.testbed, info, state, argv, mark_running=state != "resume")
        log.info("run directory %s (%s), %d rank(s) on %s", run.root, state, info.world_size, info.device)
        # 3. the driver
        summary = driver_for(cfg.method)(ctx) or {}
        dist.barrier()
        # 4. summary
        if info.is_main:
            run.write_summary(_completed_summary(cfg, run, ctx.started, summary))
            log.info("done in %.1f s; results in %s", time.time() - ctx.started, run.root)
        return 0
    except (InputError, NonFiniteError) as exc:
        # a non-finite value stopped the run at the step it appeared; the last checkpoint is intact
        _record_failure(ctx, exc)
        log.error("%s: %s", "input error" if isinstance(exc, InputError) else "non-finite error", exc)
        return 2
    except BaseException as exc:
        _record_failure(ctx, exc)
        raise


def run_child(parent: RunContext, cfg: Config) -> Path:
    """A nested run (see RunContext.run_method): same ranks, same testbed, its own directory."""
    out = Path(cfg.output_dir)
    summary_path = out / "summary.json"
    if summary_path.exists():
        import json

        if json.loads(summary_path.read_text()).get("status") == "completed":
            log.info("reusing the completed run %s", out)
            return out
    run = RunDir(out, writable=parent.dist.is_main)
    state = "resume" if (out / "config.yaml").exists() else "new"
    init_run_dir(cfg, run, parent.testbed, parent.dist, state)
    dist.barrier()
    log.info("nested %s run into %s (%s)", cfg.method, out, state)
    child = RunContext(cfg=cfg, dist=parent.dist, run=run, state=state, testbed=parent.testbed,
                       driver_for=parent.driver_for)
    summary = parent.driver_for(cfg.method)(child) or {}
    dist.barrier()
    if parent.dist.is_main:
        run.write_summary(_completed_summary(cfg, run, child.started, summary))
    return out


def _record_failure(ctx: RunContext, exc: BaseException) -> None:
    if ctx.state == "resume" and not ctx.resumed:
        return  # the run's files stay exactly as they were before this attempt
    # A failure before the run directory was initialized (testbed, identity) leaves no summary in a
    # folder without config.yaml, which a retry would refuse as "not empty and holds no run".
    if ctx.dist.is_main and ctx.run.config_path.exists():
        ctx.run.write_summary({
            "status": "failed",
            "method": ctx.cfg.method,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=8),
            "wall_time_s": round(time.time() - ctx.started, 2),
        })
