"""Weights & Biases tracking (offline by default). The run directory stays the source of truth:
everything logged here is also in curves.jsonl / train_stats.jsonl / samples.jsonl.

Gold and proxy charts use `sqrt_kl` as their x-axis (`define_metric`), so W&B draws the
overoptimization picture directly; training statistics use `train/step`.
"""

from __future__ import annotations

import os
from typing import Any

from rlhf_overopt.config.experiment import Config, to_dict


class Tracker:
    """Rank 0 logs; other ranks and mode=disabled get a tracker whose calls do nothing."""

    def __init__(self, cfg: Config, enabled: bool = True, job_type: str | None = None) -> None:
        self.run = None
        if not enabled or cfg.wandb.mode == "disabled":
            return
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        self._wandb = wandb
        self.run = wandb.init(
            mode=cfg.wandb.mode,
            project=cfg.wandb.project,
            group=cfg.wandb.group or None,
            entity=cfg.wandb.entity or None,
            name=cfg.name,
            job_type=job_type or cfg.method,
            dir=str(cfg.run_dir),
            config=to_dict(cfg),
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.run.define_metric("sqrt_kl")
        for key in ("gold_score", "proxy_score", "kl", "proxy_member/*", "eval/*"):
            self.run.define_metric(key, step_metric="sqrt_kl")
        self.run.define_metric("train/step")
        self.run.define_metric("train/*", step_metric="train/step")

    @property
    def active(self) -> bool:
        return self.run is not None

    def log_eval(self, row: dict[str, Any]) -> None:
        """One curves.jsonl row: gold, proxy, KL and every member against sqrt_kl."""
        if not self.run:
            return
        data = {k: v for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for i, s in enumerate(row.get("proxy_member_scores", [])):
            data[f"proxy_member/{i}"] = s
        self.run.log(data)

    def log_train(self, step: int, stats: dict[str, float]) -> None:
        if not self.run:
            return
        self.run.log({"train/step": step, **{f"train/{k}": v for k, v in stats.items()}})

    def log_samples(self, step: int, rows: list[dict[str, Any]]) -> None:
        """A samples table per evaluation."""
        if not self.run or not rows:
            return
        columns = list(rows[0].keys())
        table = self._wandb.Table(columns=columns, data=[[str(r[c]) if isinstance(r[c], list) else r[c]
                                                         for c in columns] for r in rows])
        self.run.log({f"samples/step_{step}": table})

    def finish(self) -> None:
        if self.run:
            self.run.finish()
            self.run = None
