"""method: proxy_points — where gold peaks against each component's value (Moskovitz et al. 2023, §3).

A component reward is useful up to its proxy point: past it, raising the component lowers the
ground truth. This command finds each point and writes the thresholds that constrained_ppo reads:

    1. runs     one run per component that optimizes that component alone: dynamic_ppo with
                fixed one-hot weights and the ppo.* settings, trained here into runs/<name>/
                (completed ones are reused, interrupted ones resumed) — or, given
                proxy_points.runs, those run directories read as they are
    2. points   per component i, the run's evaluation points (component_scores[i], gold_score)
    3. fit      gold = a + b v + c v^2 by linear least squares (scipy.linalg.lstsq); the proxy
                point is the fitted maximum within the observed component values
    4. write    thresholds.json: names, thresholds, and per component the fit and its points

Components are correlated (pushing sentiment also changes fluency), so a point found with one
component pushed alone is an estimate of the joint point; NM-PPO refines the thresholds online.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from rlhf_overopt.config.validate import validate
from rlhf_overopt.errors import InputError
from rlhf_overopt.rewards.components import fit_proxy_point
from rlhf_overopt.run.directory import read_jsonl
from rlhf_overopt.run.lifecycle import RunContext

log = logging.getLogger("rlhf_overopt")

THRESHOLDS_FILE = "thresholds.json"


def _component_run(ctx: RunContext, i: int) -> Path:
    """Stage 1 for component i: the run that optimizes it alone, as a nested dynamic_ppo run with
    fixed one-hot weights (reused when completed, resumed when interrupted)."""
    cfg = ctx.cfg
    names = cfg.components.names
    one_hot = [1.0 if j == i else 0.0 for j in range(len(names))]
    sub_cfg = dataclasses.replace(cfg, method="dynamic_ppo", name=f"{cfg.name}-{names[i]}",
                                  output_dir=str(ctx.run.root / "runs" / names[i]), resume=True,
                                  weighting=dataclasses.replace(cfg.weighting, mode="fixed", weights=one_hot))
    validate(sub_cfg, check_paths=False)
    log.info("proxy points: %s alone", names[i])
    return ctx.run_method(sub_cfg)


def run(ctx: RunContext) -> dict[str, Any]:
    cfg = ctx.cfg
    names, pp = cfg.components.names, cfg.proxy_points
    # 1. runs: read the given ones, or train one per component
    dirs = [Path(r) for r in pp.runs] if pp.runs else [_component_run(ctx, i) for i in range(len(names))]
    fits: dict[str, Any] = {}
    for i, (name, run_dir) in enumerate(zip(names, dirs)):
        # 2. points: (component i's eval score, gold) at every evaluation of its run
        rows = sorted(read_jsonl(Path(run_dir) / "curves.jsonl"), key=lambda r: r["step"])
        rows = [r for r in rows if "component_scores" in r]
        if len(rows) < pp.min_points:
            raise InputError(f"proxy_points: {run_dir} has {len(rows)} evaluation points with component_scores; "
                             f"the fit needs {pp.min_points}")
        if rows[0].get("component_names", names) != names:
            raise InputError(f"proxy_points: {run_dir} scored components {rows[0]['component_names']}, not {names}")
        # 3. fit
        fits[name] = {"run": str(run_dir), "steps": [r["step"] for r in rows],
                      **fit_proxy_point([r["component_scores"][i] for r in rows], [r["gold_score"] for r in rows])}
        log.info("proxy point of %s: %.3f (observed gold peak %.3f at %.3f)", name, fits[name]["proxy_point"],
                 fits[name]["observed_peak_gold"], fits[name]["observed_peak_value"])
    # 4. write the thresholds for constrained_ppo / nm_ppo
    result = {"names": names, "thresholds": [fits[n]["proxy_point"] for n in names], "fit": "quadratic",
              "components": fits}
    if ctx.dist.is_main:
        ctx.run.write_json(THRESHOLDS_FILE, result)
    return {"thresholds": result["thresholds"], "names": names, "runs": [str(d) for d in dirs]}
