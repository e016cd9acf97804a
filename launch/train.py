"""Run one experiment.

    python launch/train.py --config configs/bon_ensemble.yaml [key.sub=value ...]
    deepspeed --num_gpus 2 launch/train.py --config configs/ppo_ensemble.yaml [key.sub=value ...]

The config's `method` picks its driver from the method table (rlhf_overopt.config.methods.METHODS; one
module in rlhf_overopt/loops/ per driver). Configuration problems exit with status 2 and one line
naming the key, before any work and before a run directory is created. After a completed run,
rank 0 draws the report (<run>/report/) from the run directory, as any reader of it would.
`--list-keys` prints every config key with its type, default and meaning; `--check` prints the
plan of the run (models and their sizes from their config files, ranks, per-rank memory, steps,
evaluations) without loading weights.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlhf_overopt.config.experiment import field_docs
from rlhf_overopt.config.load import load_config
from rlhf_overopt.config.methods import METHODS
from rlhf_overopt.config.validate import check_world_size
from rlhf_overopt.errors import (
    ConfigError,
    InputError,
)

log = logging.getLogger("rlhf_overopt")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Run one rlhf_overopt experiment from a YAML config with key.sub=value overrides.",
    )
    parser.add_argument("--config", help="YAML experiment config (see configs/)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    parser.add_argument("--check", action="store_true",
                        help="resolve the config and print the plan (models and sizes from their config files, "
                             "ranks, memory, steps, evaluations) without loading weights; start nothing")
    parser.add_argument("--stand-in", action="append", default=[], metavar="HUB_NAME=PATH",
                        help="with --check: read a hub name's config from a local folder of the same architecture")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides applied after the YAML file")
    return parser.parse_args(argv)


def driver_for(method: str):
    """The `run(ctx)` of a method's driver module, looked up in the method table."""
    return importlib.import_module(f"rlhf_overopt.loops.{METHODS[method].driver}").run


def write_report(root: Path, method: str) -> None:
    """Gold/proxy-vs-sqrt(KL) plots and the fitted table in <run>/report, drawn by analysis/ from
    the run directory (Gao's BoN form for best-of-n, the RL form otherwise); composite-reward runs
    add analysis.composite's table and figure, a proxy_points run its fits, and a scaling_law run
    gets analysis.scaling's per-proxy table, trend table and figures instead."""
    report = root / "report"
    try:  # a plotting problem must not fail a finished experiment
        sections = METHODS[method].sections
        if "proxy_points" in sections and (root / "thresholds.json").exists():
            from analysis.composite import plot_proxy_points

            plot_proxy_points(json.loads((root / "thresholds.json").read_text()), report / "proxy_points.png")
        if not (root / "curves.jsonl").exists():
            return
        if "scaling" in sections:  # one curve per proxy cell: its own table, trends and figures
            from analysis.scaling import write_scaling_report

            write_scaling_report(root, report)
            return
        from analysis.load import load_runs
        from analysis.report import write_report as draw

        draw(load_runs([root]), report, form="auto")
        if METHODS[method].composite:
            from analysis.composite import composite_markdown, load_composite, plot_composite

            composite = [load_composite(root)]
            (report / "composite.md").write_text(composite_markdown(composite), encoding="utf-8")
            plot_composite(composite, report / "composite.png")
    except Exception as exc:  # noqa: BLE001
        log.warning("report not written: %s", exc)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list_keys:
        for key, tp, default, doc in field_docs():
            print(f"{key} ({tp}, default {default!r}): {doc}")
        return 0
    if not args.config:
        print("config error: --config: a YAML config file is required (see configs/)", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        check_world_size(cfg, world)
        if args.check:
            from rlhf_overopt.run.preflight import describe, stand_in_map

            print(describe(cfg, world, stand_in_map(args.stand_in)))
            return 0
        if METHODS[cfg.method].rollouts:
            from rlhf_overopt.config.plan import make_plan

            make_plan(cfg, world)  # every derived size divides exactly, or one line before any work
        from rlhf_overopt.run.directory import check_run_dir

        # Rank 0 alone inspects the run directory (the others would race with its creation);
        # its verdict is broadcast once the process group exists.
        state = check_run_dir(cfg) if int(os.environ.get("RANK", "0")) == 0 else "pending"
        if state != "completed":
            # bad models or prompt data cost seconds here, not a proxy training later
            from rlhf_overopt.run.preflight import check_sources

            check_sources(cfg)
            if "data" in METHODS[cfg.method].sections:
                from rlhf_overopt.data.prompts import check_prompts

                check_prompts(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"input error: {exc}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # --check: a config file or stand-in that cannot be read
        if not args.check:
            raise
        print(f"check error: {exc}", file=sys.stderr)
        return 2
    if state == "completed":
        print(f"{cfg.output_dir}: already completed; nothing to do")
        if "WORLD_SIZE" not in os.environ:
            return 0  # under a launcher every rank still joins the process group, then stops

    from rlhf_overopt.run.lifecycle import execute

    status = execute(cfg, state, driver_for, argv=[sys.argv[0], *argv])
    if status == 0 and state != "completed" and int(os.environ.get("RANK", "0")) == 0:
        write_report(cfg.run_dir, cfg.method)
    from rlhf_overopt.run import dist

    dist.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
