"""What a run's seed fixed, recorded so that pairing arms by seed can be proven, not assumed.

Arms of a comparison that share a seed share that seed's proxy ensemble, initial policy and
evaluation prompts (common random numbers, as in Agarwal et al. 2021), so their per-seed differences are
paired. A run records those things' identities in config.yaml under `_meta.identity`, and
analysis/ pairs two runs only when seed and identity agree (analysis/stats.py `pair_runs`):

    proxy_cache_key       the proxy ensemble: its cache folder's name (proxies-<hash>), or with
                          proxy.path the sha256 of its ensemble.json (rewards/cache.py proxy_identity)
    components_cache_key  composite methods' component ensembles, the same way (components_identity)
    initial_policy        the policy every arm starts from (policy_identity)
    eval_prompts          sha256 of the eval prompts, unsharded and in order (prompts_identity)

A key is present only where it applies, read from the method table's columns and sections: proxies
for methods reading the proxy section that are not composite (composite methods train on
components), the initial policy for methods reading the policy section, eval prompts for methods
that evaluate. Rank 0 computes the identity once, after the testbed is opened (run/lifecycle.py);
a resumed run recomputes it and stops with one line when it changed (check_identity).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_overopt.config.experiment import Config
from rlhf_overopt.config.methods import METHODS
from rlhf_overopt.data.prompts import check_prompts
from rlhf_overopt.errors import InputError
from rlhf_overopt.rewards.cache import components_identity, proxy_identity
from rlhf_overopt.run.directory import sha256_file, sha256_json

IDENTITY_KEYS = ("proxy_cache_key", "components_cache_key", "initial_policy", "eval_prompts")
"""The keys `_meta.identity` may hold; analysis/ reads them by these names."""

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
"""Files of a checkpoint folder that hold weights (listed by name and size, not read)."""


def local_policy_identity(path: str | os.PathLike) -> str:
    """'local:sha256:<hex>' of a checkpoint folder: the sha256 of its config.json plus the sorted
    (relative name, size in bytes) list of its weight files (WEIGHT_SUFFIXES, at any depth).

    The weights themselves are not hashed: reading a 7B checkpoint takes minutes, and a checkpoint
    that differs only in weight values at identical file sizes and config is not told apart.
    """
    root = Path(path).expanduser()
    config = root / "config.json"
    weights = sorted((p.relative_to(root).as_posix(), p.stat().st_size) for p in root.rglob("*")
                     if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
    body = {"config.json": sha256_file(config) if config.is_file() else None, "weights": weights}
    return "local:" + sha256_json(body)


def policy_identity(cfg: Config, testbed) -> str | None:
    """The initial policy: 'testbed:<content-hashed testbed folder>/policy' for the testbed's SFT
    policy, local_policy_identity for a local folder, 'hub:<name>' for a hub name (the config names
    no revision, so the name is all that pins it). None for the testbed policy with no testbed open."""
    path = cfg.policy.path
    if path == "testbed":
        return None if testbed is None else f"testbed:{testbed.root.name}/{testbed.policy_dir.name}"
    if Path(path).expanduser().is_dir():
        return local_policy_identity(path)
    return f"hub:{path}"


def prompts_identity(prompts: Sequence[str]) -> str:
    """'sha256:<hex>' of a prompt list, in order (canonical JSON of the list)."""
    return sha256_json(list(prompts))


def eval_prompts_identity(cfg: Config, testbed) -> str:
    """prompts_identity of the run's eval prompts, unsharded, as every rank's shares concatenate:
    data.prompts.check_prompts' second list (the first eval.n_prompts, chat-templated when
    data.chat_template, with the policy tokenizer check_prompts loads itself), read again here."""
    _, evaluation = check_prompts(cfg, testbed, required=True)
    return prompts_identity(evaluation)


def run_identity(cfg: Config, testbed) -> dict[str, Any]:
    """{key: identity} of what cfg's seed fixed, for the keys that apply to cfg.method (module docstring)."""
    method = METHODS[cfg.method]
    identity: dict[str, Any] = {}
    if "proxy" in method.sections and not method.composite:
        identity["proxy_cache_key"] = proxy_identity(cfg, testbed)
    if method.composite:
        identity["components_cache_key"] = components_identity(cfg, testbed)
    if "policy" in method.sections:
        identity["initial_policy"] = policy_identity(cfg, testbed)
    if method.evaluates:
        identity["eval_prompts"] = eval_prompts_identity(cfg, testbed)
    return identity


def check_identity(recorded: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """A resumed run's identity must be the one it recorded: InputError (one line) naming the first
    key that changed. A run recorded before identities were (`recorded` None) is not checked."""
    if recorded is None:
        return
    for key in sorted(set(recorded) | set(now)):
        if recorded.get(key) != now.get(key):
            raise InputError(
                f"_meta.identity.{key}: the {key.replace('_', ' ')} changed under the run being resumed "
                f"({recorded.get(key)!r} recorded, {now.get(key)!r} now); restore it or start a new run"
            )
