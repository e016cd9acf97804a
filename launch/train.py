"""Run one experiment.

    python launch/train.py --config configs/bon_ensemble.yaml [key.sub=value ...]
    deepspeed --num_gpus 2 launch/train.py --config configs/ppo_ensemble.yaml [key.sub=value ...]

The config's `method` picks the driver in rlhf_overopt/loops/. Configuration problems exit with
status 2 and one line naming the key, before any work and before a run directory is created.
`--list-keys` prints every config key with its type, default and meaning.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from rlhf_overopt.config import ConfigError, check_world_size, field_docs, load_config  # noqa: E402

# method -> module in rlhf_overopt.loops exposing `run(ctx) -> dict | None`
DRIVERS = {
    "build_testbed": "build_testbed",
    "train_rm": "train_rm",
    "bon": "bon",
    "ppo": "ppo",
    "dpo": "dpo",
    "madpo": "dpo",
    "constrained_ppo": "constrained_ppo",
    "nm_ppo": "constrained_ppo",
    "dynamic_ppo": "dynamic_ppo",
    "proxy_points": "proxy_points",
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="launch/train.py",
        description="Run one rlhf_overopt experiment from a YAML config with key.sub=value overrides.",
    )
    parser.add_argument("--config", help="YAML experiment config (see configs/)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by deepspeed
    parser.add_argument("--list-keys", action="store_true", help="print every config key and exit")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides applied after the YAML file")
    return parser.parse_args(argv)


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
        check_world_size(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        module_name = DRIVERS[cfg.method]
        if importlib.util.find_spec(f"rlhf_overopt.loops.{module_name}") is None:
            raise ConfigError(f"method: {cfg.method!r} is not built yet")
        from rlhf_overopt.runs import check_run_dir

        # Rank 0 alone inspects the run directory (the others would race with its creation);
        # its verdict is broadcast once the process group exists.
        state = check_run_dir(cfg) if int(os.environ.get("RANK", "0")) == 0 else "pending"
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if state == "completed":
        print(f"{cfg.output_dir}: already completed; nothing to do")
        if "WORLD_SIZE" not in os.environ:
            return 0  # under a launcher every rank still joins the process group, then stops

    from rlhf_overopt.loops.common import execute

    driver = importlib.import_module(f"rlhf_overopt.loops.{module_name}")
    return execute(cfg, state, driver.run, argv=[sys.argv[0], *argv])


if __name__ == "__main__":
    sys.exit(main())
