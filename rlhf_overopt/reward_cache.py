"""TEMPORARY shim until the reward-side split lands."""
from types import SimpleNamespace


def ensure_proxies(cfg, testbed, info, run):
    from rlhf_overopt.loops.train_rm import ensure_proxies as old
    return old(SimpleNamespace(cfg=cfg, dist=info, run=run, state='new', testbed=testbed, device=info.device))


def ensure_components(cfg, testbed, info, run):
    from rlhf_overopt.components import ensure_components as old
    return old(SimpleNamespace(cfg=cfg, dist=info, run=run, state='new', testbed=testbed, device=info.device))


def ensemble_dir(cfg, testbed):
    from rlhf_overopt.loops.train_rm import ensemble_dir as old
    return old(cfg, testbed)


def first_member_backbone(root):
    from rlhf_overopt.loops.train_rm import first_member_backbone as old
    return old(root)
