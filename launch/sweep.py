"""Run a sweep: a grid of config overrides, one run directory per grid point, then the report.

    python launch/sweep.py --config configs/sweeps/kl_sweep.yaml [--parallel N]
        [--launcher "deepspeed --num_gpus 2"] [--name NAME] [--runs-root runs] [--dry-run]
        [--wandb-sweep sweep.yaml] [--no-report] [key.sub=value ...] [--select key=value ...]
        [--executor local|slurm]

Runs land in ``<runs-root>/<sweep name>/<run name>``; ``sweep.json`` there records every attempt,
``logs/<run>.log`` each run's output, ``report/`` the table and frontier plots. Running the same
command again skips completed runs, resumes interrupted ones and rebuilds the report.
``key.sub=value`` items apply to every run (e.g. ``ppo.steps=50``); ``--select`` restricts the
sweep to the grid points with the given values (``--select aggregate.name=uwo``).

Without ``--executor`` the runs are local processes, ``--parallel`` at a time.
``--executor local|slurm`` submits them through submitit instead, as a job array of one run per
task (launch/executor.py): ``local`` as local processes, ``slurm`` with the sweep file's
``resources`` (gpus_per_node, nodes, cpus_per_task, mem_gb, timeout_min, partition, account,
constraint); ``--parallel`` is the array's parallelism. Either way the run directories say what
is left to do, so the same command again skips completed runs and resumes interrupted ones:
both are the one run loop of launch/runner.py, over launch/sweep_plan.py's plan.

Exit status: 0 when every run completed (or for --dry-run / --wandb-sweep), 1 when a run failed
or another process holds a run, 2 for a bad sweep file or config (before any run starts), 130
when interrupted.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import yaml

from launch.executor import SubmititBackend
from launch.runner import ProcessBackend, SweepInterrupted, SweepRunner
from launch.sweep_plan import (
    PlannedRun,
    Sweep,
    SweepError,
    build_command,
    expand_grid,
    load_sweep,
    plan_runs,
    run_names,
    sweep_dir,
    wandb_sweep_spec,
)

log = logging.getLogger("launch.sweep")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/sweep.py",
        description="Expand a sweep file's grid into runs of launch/train.py; run, resume and report them.",
    )
    parser.add_argument("--config", required=True, help="sweep YAML (see configs/sweeps/)")
    parser.add_argument("--parallel", type=int, default=1, metavar="N", help="runs at once (default 1)")
    parser.add_argument("--launcher", default="", metavar="CMD",
                        help='prefix for each run, e.g. "deepspeed --num_gpus 2" ({port}: a free port)')
    parser.add_argument("--name", default=None, help="sweep name (folder and W&B group); default: the file's")
    parser.add_argument("--runs-root", default="runs", metavar="DIR", help="folder of sweep folders (default runs)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the runs; start nothing")
    parser.add_argument("--wandb-sweep", metavar="FILE", help="write the equivalent W&B sweep spec to FILE and exit")
    parser.add_argument("--no-report", action="store_true", help="skip the analysis report at the end")
    parser.add_argument("--select", nargs="+", default=[], metavar="KEY=VALUE",
                        help="only the grid points with these values of grid keys")
    parser.add_argument("--executor", choices=("local", "slurm"), default=None,
                        help="submit the runs through submitit as a job array (default: local processes)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides for every run")
    return parser.parse_args(argv)


def threads_per_run(parallel: int) -> int:
    """torch threads per run when several share the machine (0: let launch/train.py decide)."""
    return max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else 0


def print_plan(sweep: Sweep, runs: list[PlannedRun], launcher: str) -> None:
    """The dry-run listing: each run's action and command."""
    print(f"sweep {sweep.name}: {len(runs)} runs from {sweep.base} (group {sweep.name})")
    for run in runs:
        command = build_command(run, sweep.base, run.action, launcher=launcher, port=None)
        print(f"  {run.name:<28} {run.action:<9} {shlex.join(command)}")


def write_report(sweep: Sweep, folder: Path, runs: list[PlannedRun]) -> int:
    """Table and frontier plots of every run of the grid that has curves, in `folder/report`.

    The report is also uploaded to the sweep's W&B group unless the runs have W&B disabled.
    Returns 0, or 1 when nothing could be reported.
    """
    from analysis.load import RunDirError, load_runs
    from analysis.report import upload_to_wandb
    from analysis.report import write_report as write_analysis

    names = run_names(expand_grid(sweep.grid), sweep.varied_keys)
    dirs = [folder / name for name in names if (folder / name / "curves.jsonl").is_file()]
    if not dirs:
        log.warning("no run of %s has curves yet; no report", sweep.name)
        return 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            curves = load_runs(dirs)
        except RunDirError as exc:
            log.warning("report skipped: %s", exc)
            return 1
    for warning in caught:
        log.warning("%s", warning.message)
    if not curves:
        return 1
    report = write_analysis(curves, folder / "report")
    print(f"\n{report.group_table}\n{report.table}", end="")
    print(f"report: {report.table_path.parent}")
    mode = runs[0].config.wandb.mode
    if mode != "disabled":
        try:
            upload_to_wandb(report, curves, mode=mode, name=f"{sweep.name}-report")
        except Exception as exc:  # noqa: BLE001 - the report on disk is what matters; W&B is a copy
            log.warning("W&B upload of the report failed: %s", exc)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    if args.parallel < 1:
        print(f"config error: --parallel: must be >= 1, got {args.parallel}", file=sys.stderr)
        return 2
    try:
        sweep = load_sweep(args.config, args.overrides, name=args.name)
        # A Slurm task has its node(s) to itself: the config's thread count, not a share of this machine.
        threads = 0 if args.executor == "slurm" else threads_per_run(args.parallel)
        runs = plan_runs(sweep, args.runs_root, threads_per_run=threads, select=args.select)
    except SweepError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2

    if args.wandb_sweep:
        first = runs[0].config.wandb
        spec = wandb_sweep_spec(sweep, project=first.project, entity=first.entity, runs_root=args.runs_root)
        Path(args.wandb_sweep).write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
        print(f"wrote W&B sweep spec {args.wandb_sweep}: wandb sweep {args.wandb_sweep}, then wandb agent <id>")
        return 0
    if args.dry_run:
        print_plan(sweep, runs, args.launcher)
        return 0

    folder = sweep_dir(sweep, args.runs_root)
    try:
        backend = (SubmititBackend(args.executor, sweep, launcher=args.launcher) if args.executor
                   else ProcessBackend(sweep.base, args.launcher))
        runner = SweepRunner(sweep, runs, folder, backend, parallel=args.parallel, argv=[sys.argv[0], *argv])
        statuses = runner.run()
    except SweepInterrupted:
        return 130
    except SweepError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    completed = sum(status == "completed" for status in statuses.values())
    print(f"sweep {sweep.name}: {completed}/{len(statuses)} runs completed; state in {folder / 'sweep.json'}")
    if not args.no_report:
        write_report(sweep, folder, runs)
    return 0 if completed == len(statuses) else 1


if __name__ == "__main__":
    sys.exit(main())
