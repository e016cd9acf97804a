"""One command for every benchmark: prints a table and writes BENCHMARKS.md.

    python bench/run.py                      # all CPU sections on the default testbed
    python bench/run.py --quick --tiny       # smoke run on the tiny testbed (seconds-scale sizes)
    python bench/run.py --sections ensemble,bon --out /tmp/B.md

Stages:
    1. setup      load the main job's config, build (or reuse) its testbed, record the machine
    2. peak       fp32 matmul peak at the benchmark's thread count, the denominator of MFU
    3. sections   each `bench/<section>.py` measures, in this process (or launchers it starts),
                  the figures it owns and their ratios against in-process baselines
    4. report     a table on stdout, BENCHMARKS.md and a JSON of every row

Each section runs in isolation: one that fails is reported as failed with its error, and the
others still run. The GPU section skips itself cleanly when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import BenchContext, Row, machine_info, matmul_peak_gflops  # noqa: E402

SECTIONS = ("ppo_step", "ensemble", "bon", "dpo", "zero", "lora", "end_to_end", "gpu")
"""Every section, in report order; `bench/<name>.py` defines `run(ctx) -> list[Row]` and TITLE."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (smoke run)")
    p.add_argument("--tiny", action="store_true", help="use the tiny testbed of configs/tiny/ instead of the default one")
    p.add_argument("--repeats", type=int, default=0, help="timed repeats per figure (default 5, 2 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the timed code (default 1)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown report path")
    p.add_argument("--json", default="", help="also write every row as JSON here (default: beside --out)")
    p.add_argument("--work-dir", default="", help="scratch folder (default: a temporary one)")
    p.add_argument("--cache-dir", default="", help="testbed cache root (default: the framework's)")
    args = p.parse_args(argv)
    names = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in names if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    args.sections = names
    if args.repeats < 0 or args.threads < 1:
        p.error("--repeats must be >= 0 and --threads >= 1")
    args.repeats = args.repeats or (2 if args.quick else 5)
    return args


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return ""
    if x == 0 or 1e-3 <= abs(x) < 1e6:
        return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{x:.3e}"


def table(rows: list[Row]) -> str:
    """Markdown table of rows (one section per block of rows)."""
    lines = ["| section | figure | value | unit | ratio | vs | target | met | note |",
             "|---|---|---:|---|---:|---|---|---|---|"]
    for r in rows:
        met = "" if r.met is None else ("yes" if r.met else "**no**")
        lines.append(f"| {r.section} | {r.name} | {fmt(r.value)} | {r.unit} | {fmt(r.ratio)} | {r.baseline} | "
                     f"{r.target} | {met} | {r.note} |")
    return "\n".join(lines)


def report(info: dict[str, str], ctx: BenchContext, rows: list[Row], titles: dict[str, str],
           failures: dict[str, str], args: argparse.Namespace, wall: float) -> str:
    out = ["# Benchmarks", "",
           f"Written by `python bench/run.py{' --quick' if args.quick else ''}{' --tiny' if args.tiny else ''}` "
           f"on {time.strftime('%Y-%m-%d %H:%M')} in {wall / 60:.1f} min. Medians over {ctx.repeats} timed repeats "
           f"after a warm-up; every ratio divides two figures measured in this one run. Timed code runs at "
           f"{ctx.threads} torch thread(s) unless a row says otherwise.", "", "## Machine", ""]
    out += [f"- **{k}**: {v}" for k, v in info.items()]
    out += [f"- **fp32 matmul peak** ({ctx.threads} thread(s), 1024² products): {ctx.peak_gflops:.1f} GFLOP/s",
            f"- **testbed**: `{ctx.testbed.root.name}`", ""]
    for name in args.sections:
        section_rows = [r for r in rows if r.section == name]
        out += [f"## {titles.get(name, name)}", ""]
        if name in failures:
            out += ["Failed:", "", "```", failures[name].strip()[-3000:], "```", ""]
        elif not section_rows:
            out += ["(no figures)", ""]
        else:
            out += [table(section_rows), ""]
            notes = ctx.extra.get(f"{name}_notes")
            if notes:
                out += [notes, ""]
    missed = [r for r in rows if r.met is False]
    out += ["## Targets", ""]
    if not any(r.target for r in rows):
        out.append("No targeted figures in this run.")
    for r in rows:
        if r.target:
            state = "met" if r.met else ("**missed**" if r.met is False else "not checked")
            out.append(f"- {r.section} / {r.name}: {r.target} — {state} ({fmt(r.ratio if r.ratio is not None else r.value)})")
    if missed:
        out += ["", f"{len(missed)} target(s) missed; see the issue's closing note for the profile that explains each."]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s bench] %(message)s", datefmt="%H:%M:%S")
    log = logging.getLogger("bench")
    started = time.time()

    # 1. setup
    import torch

    from rlhf_overopt.config.load import load_config
    from rlhf_overopt.testbed.build import build_testbed

    config_path = ROOT / "configs" / ("tiny" if args.tiny else "") / "ppo_ensemble.yaml"
    overrides = [f"testbed.cache_dir={args.cache_dir}"] if args.cache_dir else []
    cfg = load_config(config_path, overrides)
    torch.set_num_threads(args.threads)
    log.info("testbed of %s", config_path.relative_to(ROOT))
    testbed = build_testbed(cfg.testbed, progress=True)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="rlhf_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    info = machine_info()

    # 2. peak
    peak = matmul_peak_gflops(args.threads, size=512 if args.quick else 1024)
    log.info("fp32 matmul peak at %d thread(s): %.1f GFLOP/s", args.threads, peak)
    ctx = BenchContext(quick=args.quick, repeats=args.repeats, testbed=testbed, config=cfg, work_dir=work,
                       threads=args.threads, peak_gflops=peak)

    # 3. sections
    rows: list[Row] = []
    titles: dict[str, str] = {}
    failures: dict[str, str] = {}
    for name in args.sections:
        t = time.time()
        log.info("section %s ...", name)
        try:
            module = importlib.import_module(f"bench.{name}")
            titles[name] = getattr(module, "TITLE", name)
            torch.set_num_threads(args.threads)
            got = module.run(ctx)
            rows += got
            log.info("section %s: %d figures in %.1f s", name, len(got), time.time() - t)
        except Exception:  # a failing section is reported, the others still run
            failures[name] = traceback.format_exc()
            log.error("section %s failed:\n%s", name, failures[name])

    # 4. report
    print()
    print(table(rows))
    wall = time.time() - started
    text = report(info, ctx, rows, titles, failures, args, wall)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(out)
    json_path = Path(args.json) if args.json else out.with_suffix(".json")
    json_path.write_text(json.dumps({"machine": info, "written_at": time.strftime("%Y-%m-%d %H:%M"),
                                     "wall_min": round(wall / 60, 1), "peak_gflops": peak,
                                     "rows": [r.as_dict() for r in rows], "failures": failures}, indent=2))
    print(f"\nwrote {out} and {json_path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
