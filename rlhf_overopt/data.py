"""The worlds a run reads from: where the initial policy lives and which prompts it is trained
and evaluated on.

    policy_path(cfg, testbed)              the testbed's SFT policy folder, or policy.path
    load_prompts(cfg, testbed, world, rank) train prompts, and this rank's share of the eval prompts
"""

from __future__ import annotations

from rlhf_overopt import dist
from rlhf_overopt.errors import InputError


def policy_path(cfg, testbed) -> str:
    """The initial policy: the testbed's SFT policy, or a local folder / hub name."""
    if cfg.policy.path == "testbed":
        if testbed is None:
            raise InputError("policy.path is 'testbed' but no testbed was opened")
        return str(testbed.policy_dir)
    return cfg.policy.path


def load_prompts(cfg, testbed, world: int, rank: int, min_train: int = 1) -> tuple[list[str], list[str]]:
    """(train prompts, this rank's contiguous share of the first eval.n_prompts eval prompts)."""
    if testbed is None:
        raise InputError("prompts come from the testbed, and no testbed was opened")
    prompts = testbed.load_prompts()
    train = list(prompts["train"]["prompt"])
    evaluation = list(prompts["eval"]["prompt"])[: cfg.eval.n_prompts]
    if len(train) < min_train:
        raise InputError(f"the train prompt split has {len(train)} prompts, fewer than one batch")
    return train, [evaluation[i] for i in dist.shard_indices(len(evaluation), rank, world)]
