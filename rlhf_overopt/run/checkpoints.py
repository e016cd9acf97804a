"""One checkpointer for any set of DeepSpeed engines plus the driver's own small state.

Layout: `checkpoints/<engine name>/step_N/` (DeepSpeed's `save_checkpoint`), then
`checkpoints/state.json` = {"step": N, "tag": "step_N", "engines": [...], **state}, written last
and atomically: a checkpoint counts only once state.json names it, so a run killed while saving
resumes from the previous complete one. The last `keep` checkpoints of each engine are kept.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from rlhf_overopt.run import dist
from rlhf_overopt.run.directory import atomic_write_json


class Checkpointer:
    """Save and load {name: engine} together with a JSON-able driver state (KL controller,
    Lagrange multipliers, reward weights, ...)."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    @property
    def state_path(self) -> Path:
        return self.root / "state.json"

    def latest(self) -> dict[str, Any] | None:
        """The state of the last complete checkpoint, or None."""
        if not self.state_path.exists():
            return None
        return json.loads(self.state_path.read_text())

    def save(self, step: int, engines: dict[str, Any], state: dict[str, Any], is_main: bool) -> None:
        tag = f"step_{step}"
        for name, engine in engines.items():
            engine.save_checkpoint(str(self.root / name), tag=tag)
        dist.barrier()
        if is_main:
            atomic_write_json(self.state_path, {"step": step, "tag": tag, "engines": list(engines), **state})
            for name in engines:
                tags = sorted((d for d in (self.root / name).glob("step_*") if d.is_dir()),
                              key=lambda d: int(d.name.split("_")[1]))
                for old in tags[:-self.keep]:
                    shutil.rmtree(old, ignore_errors=True)
        dist.barrier()

    def load(self, state: dict[str, Any], engines: dict[str, Any]) -> int:
        """Load every engine at the checkpoint `state` names; returns its step."""
        for name, engine in engines.items():
            path, _ = engine.load_checkpoint(str(self.root / name), tag=state["tag"])
            if path is None:
                raise RuntimeError(f"checkpoint {self.root / name / state['tag']} could not be loaded")
        return int(state["step"])
