"""method: build_testbed — build (or find) the embedded testbed and record its manifest in the run."""

from __future__ import annotations

from typing import Any

from rlhf_overopt.run.lifecycle import RunContext


def run(ctx: RunContext) -> dict[str, Any]:
    # 1. the shared lifecycle already built the testbed on rank 0; record where it is and what it holds
    manifest = ctx.testbed.manifest()
    ctx.run.write_json("testbed_manifest.json", manifest)
    return {"testbed_root": str(ctx.testbed.root)}
