"""End to end: wall time of the README's main job, from nothing and from a warm cache.

The command is the README's, run as a subprocess from the repository root:

    deepspeed --master_port P launch/train.py --config configs/ppo_ensemble.yaml \
        testbed.cache_dir=C output_dir=O wandb.mode=disabled

(`python launch/train.py ...` when the `deepspeed` launcher is not on PATH; with --quick the tiny
config `configs/tiny/ppo_ensemble.yaml`). C = <work dir>/e2e_cache is emptied first and
RLHF_OVEROPT_CACHE points there too, so the cold run builds the testbed and trains the proxy
ensemble from nothing; the warm run reuses both (same cache, a new output_dir). Installed packages
and compiled DeepSpeed ops are not part of "nothing".

Breakdown of each run (seconds):
    wall         the subprocess, launcher start to exit
    testbed      "testbed built in X s" in the log (stage timings from <cache>/testbed-*/manifest.json)
    proxies      "proxies trained in X s" in the log
    PPO loop     summary.json train_time_s: the first PPO step to the end (evaluations included)
    other setup  summary.json wall_time_s - testbed - proxies - PPO loop: the driver's lazy
                 imports, loading models and engines, the step-0 evaluation, the report
    start-up     wall - wall_time_s: the launcher, interpreter start and imports
Set BENCH_E2E_SKIP=1 to skip the section (a cold run of the main job takes 10+ minutes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import ROOT, BenchContext, Row, python

TITLE = "End to end"
SECTION = "end_to_end"
TARGET_S = 15 * 60
TIMEOUT_S = 2 * 3600
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                "CROSS_RANK", "CROSS_SIZE")
"""Set in this process by any section that made a one-rank process group; a child must not inherit them."""


@dataclass
class JobTimes:
    """One launch of the main job, in seconds."""

    wall: float
    testbed: float
    proxies: float
    ppo_loop: float
    driver_wall: float

    @property
    def other_setup(self) -> float:
        return max(self.driver_wall - self.testbed - self.proxies - self.ppo_loop, 0.0)

    @property
    def start_up(self) -> float:
        return max(self.wall - self.driver_wall, 0.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config: Path, cache: Path, out: Path) -> list[str]:
    """The README's command with the cache and output overrides."""
    launcher = shutil.which("deepspeed")
    head = ([launcher, "--master_port", str(free_port())] if launcher else [python()])
    return [*head, "launch/train.py", "--config", str(config.relative_to(ROOT)), f"testbed.cache_dir={cache}",
            f"output_dir={out}", "wandb.mode=disabled"]


def logged_seconds(log: str, pattern: str) -> float:
    """The X of the last log line matching `pattern` (with one ([\\d.]+) group); 0 when absent."""
    found = re.findall(pattern, log)
    return float(found[-1]) if found else 0.0


def launch(config: Path, cache: Path, out: Path, log_path: Path) -> JobTimes:
    """Run the main job once; raise with the log's tail if it fails."""
    if out.exists():
        shutil.rmtree(out)  # an existing completed run would make the job a no-op
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV}
    env["RLHF_OVEROPT_CACHE"] = str(cache)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as fh:
        proc = subprocess.run(command(config, cache, out), cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
                              timeout=TIMEOUT_S, check=False)
    wall = time.perf_counter() - start
    log = log_path.read_text(encoding="utf-8", errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"the main job exited with {proc.returncode}; log {log_path}:\n{log[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return JobTimes(wall=wall, testbed=logged_seconds(log, r"testbed built in ([\d.]+) s"),
                    proxies=logged_seconds(log, r"proxies trained in ([\d.]+) s"),
                    ppo_loop=float(summary.get("train_time_s", 0.0)), driver_wall=float(summary["wall_time_s"]))


def testbed_stages(cache: Path) -> str:
    """'stage X s, ...' from the manifest's timings."""
    manifests = sorted(cache.glob("testbed-*/manifest.json"))
    if not manifests:
        return "no testbed manifest found"
    timings = json.loads(manifests[0].read_text()).get("timings", {})
    return ", ".join(f"{name} {t['wall_s']:.1f} s" for name, t in timings.items() if name != "total")


def breakdown_rows(label: str, job: JobTimes) -> list[Row]:
    parts = {"testbed build": job.testbed, "proxy training": job.proxies, "PPO loop (train_time_s)": job.ppo_loop,
             "other setup (imports, models, step-0 eval, report)": job.other_setup,
             "start-up (launcher, imports)": job.start_up}
    return [Row(SECTION, f"{label}: {name}", seconds, "s", ratio=seconds / job.wall, baseline=f"{label} wall")
            for name, seconds in parts.items()]


def run(ctx: BenchContext) -> list[Row]:
    if os.environ.get("BENCH_E2E_SKIP") == "1":
        return [Row(SECTION, "main job from nothing", 0.0, "", note="skipped: BENCH_E2E_SKIP=1")]
    config = ROOT / "configs" / ("tiny" if ctx.quick else "") / "ppo_ensemble.yaml"
    which = "tiny config (--quick)" if ctx.quick else "configs/ppo_ensemble.yaml"
    cache = ctx.work_dir / "e2e_cache"
    if cache.exists():
        shutil.rmtree(cache)  # from nothing
    cache.mkdir(parents=True)

    cold = launch(config, cache, ctx.work_dir / "e2e_cold", ctx.work_dir / "e2e_cold.log")
    warm = launch(config, cache, ctx.work_dir / "e2e_warm", ctx.work_dir / "e2e_warm.log")

    launcher = "deepspeed launcher" if shutil.which("deepspeed") else "python launch/train.py"
    rows = [Row(SECTION, "main job from nothing", cold.wall, "s", target="<= 15 min on 2 cores",
                met=None if ctx.quick else cold.wall <= TARGET_S,
                note=f"{which}, {launcher}" + ("; target applies to the main config only" if ctx.quick else ""))]
    rows += breakdown_rows("cold", cold)
    rows.append(Row(SECTION, "main job, warm cache", warm.wall, "s", ratio=warm.wall / cold.wall,
                    baseline="from nothing", note=which))
    rows += breakdown_rows("warm", warm)
    ctx.extra[f"{SECTION}_notes"] = (
        f"Command: `{'deepspeed' if shutil.which('deepspeed') else 'python'} launch/train.py --config "
        f"{config.relative_to(ROOT)} testbed.cache_dir=<cache> output_dir=<out> wandb.mode=disabled` from the "
        f"repository root, RLHF_OVEROPT_CACHE and testbed.cache_dir pointing at an emptied "
        f"`{cache.name}` for the cold run; the warm run reuses that cache with a new output_dir. Testbed stages "
        f"(cold, from its manifest): {testbed_stages(cache)}. \"PPO loop\" is summary.json's train_time_s "
        f"(steps, periodic evaluations, checkpoints); \"other setup\" is the rest of summary.json's wall_time_s; "
        f"\"start-up\" is the subprocess wall time before the driver's clock starts (launcher, interpreter, "
        f"imports). The main job picks its own torch threads (all cores), unlike the timed code of other "
        f"sections.")
    return rows
