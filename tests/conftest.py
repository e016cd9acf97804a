"""Shared fixtures: the tiny testbed, built once per test session.

`tiny_testbed_config` reads the testbed section of configs/tiny/build_testbed.yaml (the one every
tiny config carries), so command-line runs of the tiny configs given
`testbed.cache_dir=<tiny_testbed.root.parent>` find this very testbed in the cache instead of
building their own.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `launch` (the sweep supervisor) is a folder of the checkout, not installed
    sys.path.insert(0, str(ROOT))
# Subprocesses (scripts written to tmp_path, spawned ranks, deepspeed workers) import this checkout's
# code too, not whatever copy of rlhf_overopt is installed (an editable install can point at another
# checkout, or at one that no longer exists).
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)

from rlhf_overopt.config.sections import TestbedConfig  # after the path set-up above

TINY_TESTBED_YAML = ROOT / "configs" / "tiny" / "build_testbed.yaml"


@pytest.fixture(scope="session")
def tiny_testbed_config(tmp_path_factory) -> TestbedConfig:
    """A TestbedConfig whose whole build takes seconds, cached under a session tmp dir."""
    cache = tmp_path_factory.mktemp("testbed_cache")
    section = yaml.safe_load(TINY_TESTBED_YAML.read_text())["testbed"]
    return TestbedConfig(**{**section, "cache_dir": str(cache)})


@pytest.fixture(scope="session")
def tiny_testbed(tiny_testbed_config):
    """The tiny testbed (rlhf_overopt.testbed.Testbed), built once per session."""
    from rlhf_overopt.testbed.build import build_testbed

    return build_testbed(tiny_testbed_config, progress=False)


@pytest.fixture(scope="session")
def foreign_world(tmp_path_factory):
    """A user's own world built from nothing (tests/foreign_world.py): a tiny GPT-NeoX policy
    without a pad token, a Llama-architecture gold with another tokenizer, a Llama proxy backbone,
    instruction/input prompts. Returns {"policy", "gold", "proxy_backbone", "prompts"} paths."""
    import sys

    sys.path.insert(0, str(ROOT / "tests"))
    import foreign_world as fw

    return fw.build(tmp_path_factory.mktemp("foreign_world"))


def _train_cli(config: Path, out: Path, cache: Path, *overrides: str, env: dict | None = None) -> Path:
    import subprocess

    cmd = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(config), f"output_dir={out}",
           f"testbed.cache_dir={cache}", *overrides]
    result = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


# Completed runs of the tiny configs, each made ONCE per session with the options the union of
# their readers needs. Read-only for the readers: a test that needs a run to resume, corrupt or
# continue makes its own (a copy would not do: a run refuses to resume under another output_dir);
# a command that must leave the run as it was (a no-op resume, a refused start) may run on it if
# the test checks that not a byte changed.


@pytest.fixture(scope="session")
def tiny_ppo_run(tmp_path_factory, tiny_testbed) -> Path:
    """configs/tiny/ppo_ensemble.yaml as it is (4 steps, evaluations at 0/2/4, checkpoints at 2/4),
    with W&B offline under name tiny-wandb, project overopt-tests, group tiny-group (test_wandb reads
    the log; W&B changes nothing else in the run: test_ppo and test_reliability compare it with runs
    made without it). Readers: test_ppo, test_reliability, test_wandb."""
    out = tmp_path_factory.mktemp("tiny_ppo") / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return _train_cli(ROOT / "configs" / "tiny" / "ppo_ensemble.yaml", out, tiny_testbed.root.parent,
                      "name=tiny-wandb", "wandb.mode=offline", "wandb.project=overopt-tests",
                      "wandb.group=tiny-group", env=env)


@pytest.fixture(scope="session")
def tiny_bon_run(tmp_path_factory, tiny_testbed) -> Path:
    """configs/tiny/bon_ensemble.yaml as it is (pool of 16 on 8 prompts, 3 proxies, every
    aggregator). Readers: test_bon."""
    out = tmp_path_factory.mktemp("tiny_bon") / "run"
    return _train_cli(ROOT / "configs" / "tiny" / "bon_ensemble.yaml", out, tiny_testbed.root.parent)
