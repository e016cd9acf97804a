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
