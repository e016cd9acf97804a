"""method: train_rm — train the proxy ensemble on gold-labelled (noisy) preferences and report it.

The ensemble is trained once into the testbed's reward cache (rlhf_overopt/rewards/cache.py) and
loaded from there by every later run that needs it.

    1. data       the testbed's preference pairs, split 90/10 into train and validation
    2. train      K members with the Bradley–Terry loss (rlhf_overopt.rewards.training.train_ensemble)
    3. check      validation accuracy per member vs noisy and clean labels; failed members handled
    4. save       the ensemble with its standardization statistics
    5. report     proxies.json and the summary: where the ensemble lives, per-member accuracies
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rlhf_overopt.rewards.cache import ensemble_dir, ensure_proxies, proxy_report
from rlhf_overopt.run.lifecycle import RunContext

log = logging.getLogger("rlhf_overopt")


def run(ctx: RunContext) -> dict[str, Any]:
    t = time.time()
    # 1-4. load from the cache, or train there first
    ensemble = ensure_proxies(ctx.cfg, ctx.testbed, ctx.dist, ctx.run)
    # 5. report
    report = proxy_report(ensemble, ensemble_dir(ctx.cfg, ctx.testbed))
    for name in ensemble.member_names:
        log.info("%s: val accuracy %.3f (noisy labels), %s (clean labels)", name, ensemble.val_accuracy.get(name, 0),
                 ensemble.val_accuracy_clean.get(name))
    return {"proxies": report, "wall_time_proxies_s": round(time.time() - t, 2)}
