"""What every driver loop shares: process group, seeds, run directory lifecycle, testbed, tracking.

`execute(cfg, driver)` wraps one method's driver: it prepares the run (rank 0 creates the run
directory and builds the testbed while other ranks wait), calls ``driver(ctx)``, and records the
outcome in summary.json — "completed" with the driver's summary, or "failed" with the error.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rlhf_overopt import dist
from rlhf_overopt.config import COMPOSITE_METHODS, Config
from rlhf_overopt.errors import InputError, NonFiniteError
from rlhf_overopt.runs import RunDir, read_jsonl, summarize_curves, write_jsonl

log = logging.getLogger("rlhf_overopt")


@dataclass
class RunContext:
    """Everything a driver needs besides the config."""

    cfg: Config
    dist: dist.DistInfo
    run: RunDir
    state: str  # "new" | "resume"
    testbed: Any = None  # rlhf_overopt.testbed.build.Testbed when the config uses the testbed
    started: float = field(default_factory=time.time)

    @property
    def device(self) -> torch.device:
        return self.dist.device


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (each rank passes seed + rank)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


STEP_LOGS = ("train_stats.jsonl", "samples.jsonl")
"""Per-step logs that a resumed run cuts back to its checkpoint along with curves.jsonl."""


def truncate_logs(run: RunDir, step: int, extra_logs: tuple[str, ...] = ()) -> None:
    """Drop rows logged after `step` (-1: all rows) from curves.jsonl and the per-step logs:
    a resumed run produces them again."""
    run.truncate_curves(step)
    for name in STEP_LOGS + extra_logs:
        path = run.root / name
        if run.writable and path.exists():
            write_jsonl(path, [r for r in read_jsonl(path) if r["step"] <= step])


def resume_step(ctx: RunContext, checkpointer: Any, load: Callable[[dict[str, Any]], int],
                extra_logs: tuple[str, ...] = ()) -> tuple[int, dict[str, Any] | None]:
    """(step to start from, checkpoint state) for a driver loop.

    A new run starts at 0. A resumed run loads `checkpointer.latest()` with `load(state) -> step`
    and cuts its logs back to that step; one interrupted before its first checkpoint starts over
    and drops everything it had logged.
    """
    if ctx.state != "resume":
        return 0, None
    state = checkpointer.latest()
    start = 0 if state is None else load(state)
    if ctx.dist.is_main:
        truncate_logs(ctx.run, start if state is not None else -1, extra_logs)
    dist.barrier()
    if state is None:
        log.info("resume: no checkpoint yet, starting over")
    else:
        log.info("resumed at step %d", start)
    return start, state


class EvalLog:
    """Where a driver's evaluations go: curves.jsonl, samples.jsonl and the tracker.

    Each row gets `gold_score_initial`, the gold of the step-0 evaluation (read back from
    curves.jsonl when a run resumes), so curves can be shown relative to the initial policy.
    """

    def __init__(self, ctx: RunContext, tracker: Any) -> None:
        self.run, self.tracker = ctx.run, tracker
        self.gold_initial = next((r["gold_score"] for r in ctx.run.curves() if r["step"] == 0), None)

    def record(self, step: int, row: dict[str, Any], samples: list[dict[str, Any]]) -> None:
        if self.gold_initial is None:
            self.gold_initial = row["gold_score"]
        row["gold_score_initial"] = self.gold_initial
        self.run.log_curve(row)
        self.run.log_samples(samples)
        self.tracker.log_eval(row)
        self.tracker.log_samples(step, samples)


def uses_testbed(cfg: Config) -> bool:
    return cfg.method == "build_testbed" or "testbed" in (cfg.policy.path, cfg.gold.path, cfg.dpo.dataset)


def setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("rlhf_overopt").setLevel(level)


def execute(cfg: Config, state: str, driver: Callable[[RunContext], dict[str, Any] | None],
            argv: list[str] | None = None) -> int:
    """Run `driver` inside the shared lifecycle; returns the process exit status."""
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
    ctx = RunContext(cfg=cfg, dist=info, run=run, state=state)
    try:
        if info.is_main:
            run.init(cfg, argv)
            log.info("run directory %s (%s), %d rank(s) on %s", run.root, state, info.world_size, info.device)
        if uses_testbed(cfg):
            from rlhf_overopt.testbed.build import build_testbed

            # Rank 0 builds (or finds) the testbed first; the others then open the cached copy.
            if info.is_main:
                ctx.testbed = build_testbed(cfg.testbed, progress=True)
            dist.barrier()
            if not info.is_main:
                ctx.testbed = build_testbed(cfg.testbed, progress=False)
        summary = driver(ctx) or {}
        dist.barrier()
        if info.is_main:
            run.write_summary({
                "status": "completed",
                "method": cfg.method,
                "wall_time_s": round(time.time() - ctx.started, 2),
                "curves": summarize_curves(run.curves()),
                **summary,
            })
            write_report(run, cfg.method)
            log.info("done in %.1f s; results in %s", time.time() - ctx.started, run.root)
        return 0
    except InputError as exc:
        _record_failure(ctx, exc)
        log.error("input error: %s", exc)
        return 2
    except NonFiniteError as exc:
        # stopped at the step it appeared; the last checkpoint is intact for resume=true
        _record_failure(ctx, exc)
        log.error("non-finite error: %s", exc)
        return 2
    except KeyboardInterrupt as exc:
        _record_failure(ctx, exc)
        raise
    except Exception as exc:
        _record_failure(ctx, exc)
        raise


def write_report(run: RunDir, method: str = "") -> None:
    """Gold/proxy-vs-sqrt(KL) plots and the fitted table in <run>/report, drawn by analysis/ from
    the run directory like any reader (Gao's BoN form for best-of-n, the RL form otherwise);
    composite-reward runs add analysis.composite's table and figure (components against their
    thresholds, multipliers or weights, hypervolume), a proxy_points run its fits."""
    report = run.root / "report"
    try:  # a plotting problem must not fail a finished experiment
        if method == "proxy_points" and (run.root / "thresholds.json").exists():
            from analysis.composite import plot_proxy_points

            plot_proxy_points(json.loads((run.root / "thresholds.json").read_text()), report / "proxy_points.png")
        if not run.curves_path.exists():
            return
        from analysis.load import load_runs
        from analysis.report import write_report as draw

        draw(load_runs([run.root]), report, form="auto")
        if method in COMPOSITE_METHODS:
            from analysis.composite import composite_markdown, load_composite, plot_composite

            composite = [load_composite(run.root)]
            (report / "composite.md").write_text(composite_markdown(composite), encoding="utf-8")
            plot_composite(composite, report / "composite.png")
    except Exception as exc:  # noqa: BLE001
        log.warning("report not written: %s", exc)


def _record_failure(ctx: RunContext, exc: BaseException) -> None:
    if ctx.dist.is_main and ctx.run.root.exists():
        ctx.run.write_summary({
            "status": "failed",
            "method": ctx.cfg.method,
            "error": f"{type(exc).__name__}: {exc}",
            "traceback": traceback.format_exc(limit=8),
            "wall_time_s": round(time.time() - ctx.started, 2),
        })
