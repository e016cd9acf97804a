"""What every benchmark section shares: timing, machine facts, the matmul peak, result rows.

A section is a module in `bench/` with `run(ctx: BenchContext) -> list[Row]`. Rows carry a
measured value, and optionally a ratio against a baseline measured *in the same process* and a
target the ratio is checked against. `bench/run.py` prints every row as a table and writes
BENCHMARKS.md.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Row:
    """One measured figure."""

    section: str
    name: str
    value: float
    unit: str
    ratio: float | None = None
    """value / baseline, both measured in this process (None when the row is not a comparison)."""
    baseline: str = ""
    """What the ratio divides by, in words."""
    target: str = ""
    """The issue's target in words, e.g. '<= 1.3x one member'."""
    met: bool | None = None
    """Whether the target is met; None when the row has no target or it could not be checked."""
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class BenchContext:
    """Settings and shared objects for every section."""

    quick: bool
    """Fewer repeats and smaller sizes: a smoke run (tests, CI), not figures to report."""
    repeats: int
    """Timed repeats per measurement (the median is reported)."""
    testbed: Any
    """rlhf_overopt.testbed.build.Testbed the CPU sections run on."""
    config: Any
    """rlhf_overopt.config.experiment.Config of the main job, with the testbed section above."""
    work_dir: Path
    """Scratch folder for run directories, checkpoints and launcher logs."""
    threads: int = 1
    """torch intra-op threads of the timed code (the framework's default is 1)."""
    peak_gflops: float = 0.0
    """fp32 matmul peak measured at the start of the run (GFLOP/s), for MFU."""
    extra: dict[str, Any] = field(default_factory=dict)


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall seconds of `fn()` over `repeats` timed calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), times


def matmul_peak_gflops(threads: int, size: int = 1024, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of a (size x size) @ (size x size) matmul at `threads` intra-op threads.

    2 * size^3 FLOPs per product; the best of `repeats` timings of a batch of products is taken
    as the machine's attainable peak (the denominator of model FLOPs utilization).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        n = 8
        best = float("inf")
        torch.mm(a, b)
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(n):
                torch.mm(a, b)
            best = min(best, (time.perf_counter() - t) / n)
        return 2 * size**3 / best / 1e9
    finally:
        torch.set_num_threads(previous)


def machine_info() -> dict[str, str]:
    """CPU, cores, memory, accelerator and library versions, for the report header."""
    import importlib.metadata as md

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal")).split()[1])
        mem = f"{kb / 2**20:.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "accelerator": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }
    for pkg in ("torch", "transformers", "trl", "deepspeed", "datasets", "peft"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "missing"
    try:
        info["git_sha"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                         text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_sha"] = "unknown"
    return info


def python() -> str:
    """The interpreter running the benchmark (for subprocess launches)."""
    return sys.executable
