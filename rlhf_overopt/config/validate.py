"""The checks of a loaded config that involve several sections or the method: which world each
source belongs to (the world rule), per-method combinations, paths, and the world size. Each section
checks its own fields (sections.py, train_sections.py); `load_config` calls `validate` and
`check_worlds` here after building the sections.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from rlhf_overopt.config.experiment import Config
from rlhf_overopt.config.methods import METHODS, SHAPING_METHODS, Method
from rlhf_overopt.config.sections import check_aggregator_name, require
from rlhf_overopt.config.train_sections import PPOConfig
from rlhf_overopt.errors import ConfigError


def has_scored_pool(cfg: Config) -> bool:
    """The run reads an existing scored pool (bon.pool, scaling.pool), which brings its own prompts and gold."""
    sections = METHODS[cfg.method].sections
    return ("bon" in sections and bool(cfg.bon.pool)) or ("scaling" in sections and bool(cfg.scaling.pool))


def world_sources(cfg: Config) -> dict[str, str]:
    """The keys of `cfg` that name where a part of the world comes from, for its method:
    {key: value} of the gold, the prompts, the preference pairs and the components."""
    method = METHODS[cfg.method]
    sections = method.sections
    out = {}
    pool = has_scored_pool(cfg)  # a scored pool brings its own prompts and gold
    if "gold" in sections and not pool:
        out["gold.path"] = cfg.gold.path
    if "data" in sections and not pool:
        out["data.prompts"] = cfg.data.prompts
    trains_proxies = "proxy" in sections and not cfg.proxy.path and not method.composite
    if trains_proxies:
        out["proxy.dataset"] = cfg.proxy.dataset
    if "dpo" in sections:
        out["dpo.dataset"] = cfg.dpo.dataset
    return out


def check_worlds(cfg: Config, explicit: set[str]) -> None:
    """Never mix the testbed's world with a user's silently: with a policy that is not the
    testbed's, every part of the world that would come from the testbed must say so explicitly."""
    if cfg.policy.path == "testbed":
        return
    for key, value in world_sources(cfg).items():
        require(value != "testbed" or key in explicit, key,
                f"policy.path is {cfg.policy.path!r}, not the testbed's, but {key} defaults to the testbed's; "
                f"name your own (see --list-keys), or set {key}=testbed to use the testbed's on purpose")



def unused_keys(cfg: Config, explicit: set[str]) -> list[tuple[str, str]]:
    """(key, why) for each key the user set explicitly that another setting makes unused, or that
    changes what the method estimates; load_config logs each as one line (`note_unused`). Defaults
    are never reported, and a missing column is still an error where it would be used.

    | set explicitly                      | with                        | note                                   |
    |-------------------------------------|-----------------------------|----------------------------------------|
    | any key of a section                | a method that does not read | e.g. ppo.* under bon or dpo, madpo.*   |
    |                                     | it (METHODS[m].sections)    | under dpo, grpo.* under ppo (one line  |
    |                                     |                             | per section)                           |
    | data.prompt_column                  | data.prompt_template        | the template builds each prompt from   |
    |                                     |                             | the row's columns                      |
    | grpo.std_normalize, grpo.eps        | method rloo                 | the leave-one-out baseline divides by  |
    |                                     |                             | no std                                 |
    | grpo.eps                            | grpo.std_normalize=false    | nothing is divided by the std          |
    | grpo.loss_normalization=sequence    | method rloo                 | adds GRPO's length bias to RLOO        |
    | aggregate.name                      | method bon                  | bon.aggregators name the curves        |
    | aggregate.par_references            | aggregate.shaping=none      | references are sampled only for PAR    |
    """
    method = METHODS[cfg.method]
    out = []
    by_section: dict[str, list[str]] = {}
    for key in sorted(explicit):
        section = key.split(".")[0]
        if "." in key and section not in method.sections:
            by_section.setdefault(section, []).append(key)
    for section, keys in by_section.items():
        out.append((", ".join(keys), f"method {cfg.method} does not read the {section} section"))
    sections = method.sections
    if "data" in sections and cfg.data.prompt_template and "data.prompt_column" in explicit:
        out.append(("data.prompt_column", "data.prompt_template builds each prompt from the row's columns"))
    if method.advantage == "leave_one_out":
        for key in ("grpo.std_normalize", "grpo.eps"):
            if key in explicit:
                out.append((key, "rloo's leave-one-out baseline divides by no group std"))
        if "grpo.loss_normalization" in explicit and cfg.grpo.loss_normalization == "sequence":
            why = ("divides each response's REINFORCE gradient by its length: GRPO's length bias, which RLOO "
                   "(Ahmadian et al. 2024) does not have; the default (auto) is constant")
            out.append(("grpo.loss_normalization=sequence", why))
    elif method.groups and not cfg.grpo.std_normalize and "grpo.eps" in explicit:
        out.append(("grpo.eps", "grpo.std_normalize=false divides by no group std"))
    if "bon" in sections and "aggregate.name" in explicit:
        out.append(("aggregate.name", "bon.aggregators name the aggregators best-of-n curves"))
    if "aggregate" in sections and cfg.aggregate.shaping == "none" and "aggregate.par_references" in explicit:
        out.append(("aggregate.par_references", "references are sampled only with aggregate.shaping=par"))
    return out


def note_unused(cfg: Config, explicit: set[str]) -> None:
    """Log one line for each of `unused_keys`: the run goes on, and the user hears about it."""
    for key, why in unused_keys(cfg, explicit):
        logging.getLogger("rlhf_overopt").warning("%s: set, but %s", key, why)


# ---------------------------------------------------------------------------------------------
# Validation of combinations
# ---------------------------------------------------------------------------------------------


def _is_model_ref(path: str) -> bool:
    """True for a local directory; hub-like names ('org/model') pass as references to be loaded."""
    p = Path(path).expanduser()
    return p.exists() or (not path.startswith((".", "/", "~")) and path.count("/") == 1)


def _value(cfg: Config, key: str) -> Any:
    """The value of a dotted key such as "ppo.max_new_tokens"."""
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _check_member(name: str, k: int, key: str, warm: bool = False) -> None:
    index = check_aggregator_name(name, key)
    if index is not None:
        size = "a warm ensemble, which scores with one model (member_0)" if warm else f"an ensemble of proxy.k={k} members"
        require(index < k, key, f"{name} is out of range for {size}")


def validate(cfg: Config, *, check_paths: bool = True) -> None:
    """Check values and combinations; the first problem raises ConfigError naming its key.

    Each section checks its own fields (its ``check()``); what is left here involves several
    sections or the method: the testbed context fit, method-specific rules, and paths.
    """
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if dataclasses.is_dataclass(section):
            section.check()
    require(cfg.num_threads >= 0, "num_threads", "must be >= 0 (0 picks cores / local ranks)")
    method = METHODS[cfg.method]
    _validate_policy_training(cfg, method)

    tb = cfg.testbed
    # The context fit of testbed.max_new_tokens (testbed.check) again for the response caps of the
    # method that samples from the testbed policy.
    if cfg.policy.path == "testbed":
        for key in method.response_caps:
            value = _value(cfg, key)
            require(tb.fits_context(value), key,
                    f"3 * testbed.prompt_words + {value} does not fit testbed.n_positions ({tb.n_positions})")
    pool = has_scored_pool(cfg)  # a scored pool brings its own prompts and gold
    require(not method.evaluates or pool or cfg.data.prompts != "testbed" or cfg.eval.n_prompts <= tb.n_eval_prompts,
            "eval.n_prompts",
            f"asks for more prompts than the testbed's eval split holds ({tb.n_eval_prompts})")
    if "data" in method.sections and cfg.data.prompts != "testbed":
        validate_prompt_config(cfg, method.evaluates, check_paths)

    # Ensemble members exist only up to proxy.k (the sections checked the names themselves); a warm
    # ensemble scores with one model, the weight average of its k members.
    scoring_k = 1 if cfg.proxy.kind == "warm" else cfg.proxy.k
    warm = cfg.proxy.kind == "warm"
    _check_member(cfg.aggregate.name, scoring_k, "aggregate.name", warm)
    _check_member(cfg.madpo.margin_aggregator, scoring_k, "madpo.margin_aggregator", warm)
    for i, agg in enumerate(cfg.bon.aggregators):
        if agg != "members":
            _check_member(agg, scoring_k, f"bon.aggregators[{i}]", warm)
    for i, agg in enumerate(cfg.bon.selector_aggregators):
        if agg != "members":
            _check_member(agg, scoring_k, f"bon.selector_aggregators[{i}]", warm)
    _validate_shaping(cfg)
    if method.composite:
        _validate_composite(cfg, check_paths)
    if method.groups:
        _validate_grpo(cfg)
    if "scaling" in method.sections:
        _validate_scaling(cfg, check_paths)

    if check_paths:
        if cfg.policy.path != "testbed":
            require(_is_model_ref(cfg.policy.path), "policy.path", f"no such model directory: {cfg.policy.path}")
        if cfg.gold.path != "testbed":
            require(_is_model_ref(cfg.gold.path), "gold.path", f"no such model directory: {cfg.gold.path}")
        if cfg.proxy.path:
            require(Path(cfg.proxy.path).expanduser().is_dir(), "proxy.path", f"no such directory: {cfg.proxy.path}")
        if cfg.proxy.backbone != "policy":
            require(_is_model_ref(cfg.proxy.backbone), "proxy.backbone", f"no such model directory: {cfg.proxy.backbone}")
        if cfg.dpo.dataset != "testbed" and "dpo" in method.sections:
            require(Path(cfg.dpo.dataset).expanduser().exists(), "dpo.dataset", f"no such dataset path: {cfg.dpo.dataset}")
        if cfg.deepspeed.config:
            require(Path(cfg.deepspeed.config).is_file(), "deepspeed.config", f"file not found: {cfg.deepspeed.config}")
        if cfg.testbed.cache_dir:
            cache = Path(cfg.testbed.cache_dir).expanduser()
            require(not cache.exists() or cache.is_dir(), "testbed.cache_dir", f"{cache} is not a directory")


def _validate_policy_training(cfg: Config, method: Method) -> None:
    """policy.dtype against the device, and where LoRA applies.

    bf16 matmuls run about 100x slower than fp32 on the CPUs this framework is tested on, so a
    bf16 policy on a CPU is refused; with device auto the device is known only at run start,
    where `engines.check_policy_dtype` refuses it.
    """
    require(cfg.policy.dtype != "bfloat16" or cfg.device != "cpu", "policy.dtype",
            "bfloat16 needs a CUDA device (bf16 matmuls are ~100x slower than fp32 on a CPU); use float32 or device: cuda")
    if cfg.policy.lora_r > 0:
        require(cfg.deepspeed.zero_stage != 3, "policy.lora_r",
                "LoRA runs at ZeRO stages 0-2 (its reference shares the policy's parameters, which ZeRO-3 partitions)")
        require(method.driver != "dpo", "policy.lora_r", f"LoRA is for the RL drivers, not {cfg.method}")


def _validate_shaping(cfg: Config) -> None:
    """aggregate.shaping=par shapes the sequence-level reward of the single-objective RL drivers.
    The composite methods optimize component scores against thresholds and weights given in the
    components' own units (and proxy_points reads gold against those units), and best-of-n and the
    DPO family train on no reward: for them par would be ignored or change what a threshold means,
    so it is refused."""
    if cfg.aggregate.shaping == "none" or METHODS[cfg.method].shapes_rewards:
        return
    why = ("its constraint thresholds / reward weights are in unshaped component-score units"
           if METHODS[cfg.method].composite else "it trains on no RL reward")
    raise ConfigError(f"aggregate.shaping: {cfg.aggregate.shaping} is not supported by method {cfg.method} ({why}); "
                      f"use it with {', '.join(SHAPING_METHODS)}, or set aggregate.shaping=none")


def _validate_composite(cfg: Config, check_paths: bool) -> None:
    """Combinations of the components / constrained / nm / weighting / proxy_points sections."""
    comp, con, nm, w = cfg.components, cfg.constrained, cfg.nm, cfg.weighting
    n = len(comp.names)
    sections = METHODS[cfg.method].sections
    require(bool(comp.path) or cfg.gold.path == "testbed", "components.path",
            "components are labelled by the testbed gold's terms; with another gold, give trained components")
    require(cfg.ppo.no_eos_penalty == 0, "ppo.no_eos_penalty", "is not used by composite methods; leave it 0")
    require(not cfg.ppo.whiten_rewards, "ppo.whiten_rewards", "is not used by composite methods; leave it false")
    # mu-/xi-PPO mix per-stream advantages that are always whitened (Moskovitz et al. 2023, §4);
    # a switch that would do nothing is refused rather than ignored.
    constrained = "constrained" in sections  # mu-/xi-PPO and NM-PPO
    require(cfg.ppo.whiten_advantages or not constrained, "ppo.whiten_advantages",
            f"{cfg.method} always whitens each stream's advantages; leave it true")

    n_constraints = n - (con.objective != "kl")
    require(con.objective == "kl" or con.objective in comp.names, "constrained.objective",
            f"must be 'kl' or a component name ({', '.join(comp.names)}), got {con.objective!r}")
    if constrained:
        require(n_constraints >= 1, "constrained.objective", "leaves no component to constrain")
        require(bool(con.thresholds) or bool(con.thresholds_file), "constrained.thresholds",
                "give a threshold per constrained component, or constrained.thresholds_file")
        require(not con.thresholds or len(con.thresholds) == n_constraints, "constrained.thresholds",
                f"needs {n_constraints} value(s) (one per constrained component), got {len(con.thresholds)}")
        if "nm" in sections:
            require(bool(con.thresholds), "constrained.thresholds", "nm_ppo starts its simplex from these; give them")
        if check_paths and con.thresholds_file and not con.thresholds:
            require(Path(con.thresholds_file).expanduser().exists(), "constrained.thresholds_file",
                    f"no such file or run directory: {con.thresholds_file}")
    if "nm" in sections:
        require(nm.stretch_steps >= 1 and cfg.ppo.steps % nm.stretch_steps == 0, "nm.stretch_steps",
                f"must divide ppo.steps ({cfg.ppo.steps}), got {nm.stretch_steps}")
    if w.weights:
        require(len(w.weights) == n and all(x >= 0 for x in w.weights) and sum(w.weights) > 0, "weighting.weights",
                f"needs {n} non-negative weights with a positive sum, got {w.weights}")
    if cfg.method == "dynamic_ppo" and w.mode == "gradient":
        require(cfg.deepspeed.zero_stage < 3, "weighting.mode",
                "gradient weighting reads full per-objective gradients; use deepspeed.zero_stage <= 2")
    pp = cfg.proxy_points
    require(not pp.runs or len(pp.runs) == n, "proxy_points.runs", f"needs one run directory per component ({n})")
    if check_paths:
        for i, run in enumerate(pp.runs):
            require(Path(run).expanduser().is_dir(), f"proxy_points.runs[{i}]", f"no such run directory: {run}")
        if comp.path:
            require(Path(comp.path).expanduser().is_dir(), "components.path", f"no such directory: {comp.path}")


def _validate_grpo(cfg: Config) -> None:
    """GRPO / RLOO read ppo.*'s rollout and optimizer settings but train no value model and put
    their KL term where grpo.kl_in says: refuse the ppo.* options they would silently ignore."""
    ppo, g = cfg.ppo, cfg.grpo
    require(ppo.batch_size % g.group_size == 0, "grpo.group_size",
            f"must divide ppo.batch_size ({ppo.batch_size}, counted in responses), got {g.group_size}")
    require(ppo.kl_coef == 0, "ppo.kl_coef",
            f"is not used by {cfg.method}; set ppo.kl_coef=0 and give the KL coefficient as grpo.kl_coef")
    require(not ppo.adaptive_kl, "ppo.adaptive_kl", f"is not used by {cfg.method} (grpo.kl_coef is fixed); leave it false")
    require(not ppo.whiten_rewards, "ppo.whiten_rewards",
            f"is not used by {cfg.method} (grpo.std_normalize scales rewards per group); leave it false")
    default_init = PPOConfig().value_init
    require(ppo.value_init == default_init, "ppo.value_init",
            f"{cfg.method} trains no value model; leave it at its default {default_init!r}")


def _validate_scaling(cfg: Config, check_paths: bool) -> None:
    """scaling_law pretrains its proxy backbones on the testbed corpus and sets the per-cell proxy
    keys itself: refuse the proxy.* options it would silently override."""
    sc, p = cfg.scaling, cfg.proxy
    require(cfg.policy.path == "testbed", "policy.path",
            "scaling_law pretrains its proxy sizes on the testbed corpus; it needs the testbed policy")
    require(p.dataset == "testbed", "proxy.dataset", "scaling_law trains on the testbed's gold-labelled pairs")
    for key, value, default in (("kind", p.kind, "independent"), ("backbone", p.backbone, "policy"),
                                ("path", p.path, ""), ("n_layer", p.n_layer, 0), ("train_pairs", p.train_pairs, 0)):
        require(value == default, f"proxy.{key}",
                f"is set per cell by scaling.proxy_sizes / scaling.train_pairs; leave it at {default!r}")
    require(p.on_failed_member != "drop", "proxy.on_failed_member",
            "a cell has one proxy, and a near-chance proxy is a data point of the scaling law (Gao et al. 2022: "
            "below ~2k pairs proxies stay near chance); use warn or error")
    # The train split holds 90% of at most one pair per train prompt; the exact count (ties drop
    # pairs) is checked against the testbed's pairs before any work.
    most = int(0.9 * cfg.testbed.n_train_prompts)
    for i, n in enumerate(sc.train_pairs):
        require(n <= most, f"scaling.train_pairs[{i}]",
                f"{n} exceeds the train split (at most {most} pairs: 90% of testbed.n_train_prompts)")
    if check_paths and sc.pool:
        require(Path(sc.pool).expanduser().exists() or _is_model_ref(sc.pool), "scaling.pool",
                f"no such pool file or folder: {sc.pool}")


def check_world_size(cfg: Config, world_size: int) -> None:
    """Batch sizes that are split over data-parallel ranks must divide evenly by the rank count."""
    if world_size <= 1:
        return
    for key in METHODS[cfg.method].split_keys:
        value = _value(cfg, key)
        require(value % world_size == 0, key, f"{value} cannot be split evenly over {world_size} ranks")
    if METHODS[cfg.method].groups:
        # Each rank normalizes advantages within the groups it sampled, so a group must not straddle ranks.
        per_rank, g = cfg.ppo.batch_size // world_size, cfg.grpo.group_size
        require(per_rank % g == 0, "grpo.group_size",
                f"each of {world_size} ranks holds {per_rank} of ppo.batch_size's responses, not whole groups of {g}")


# Prompts from a dataset (the rows themselves are data.prompts.check_prompts' to read)

FILE_TYPES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
"""File suffixes data.prompts reads, and the `datasets` builder of each."""


def is_local_source(name: str) -> bool:
    """True when data.prompts names a local file or folder rather than a hub dataset: it exists,
    is written as a path (./, /, ~), or ends in a file suffix (a missing local file must say so,
    not turn into a hub lookup)."""
    return (Path(name).expanduser().exists() or name.startswith((".", "/", "~"))
            or Path(name).suffix.lower() in (*FILE_TYPES, ".txt", ".tsv", ".arrow"))


def validate_prompt_config(cfg, evaluates: bool, check_paths: bool) -> None:
    """Prompts from a dataset: what the config alone says about its eval prompts and its path, as a
    ConfigError (config.validate calls this; the rows are check_prompts' to read)."""
    d = cfg.data
    if evaluates:
        require(bool(d.eval_split) or d.eval_size > 0, "data.eval_size",
                f"data.prompts is a dataset ({d.prompts}); give its eval prompts: data.eval_split, or "
                f"data.eval_size (>= eval.n_prompts = {cfg.eval.n_prompts}) to hold them out of the train split")
        require(bool(d.eval_split) or d.eval_size >= cfg.eval.n_prompts, "data.eval_size",
                f"holds out {d.eval_size} prompts, fewer than eval.n_prompts ({cfg.eval.n_prompts})")
    if check_paths and is_local_source(d.prompts):
        p = Path(d.prompts).expanduser()
        require(p.exists(), "data.prompts", f"no such file or folder: {d.prompts}")
        require(p.is_dir() or p.suffix.lower() in FILE_TYPES, "data.prompts",
                f"unsupported file type {p.suffix!r} (use {', '.join(FILE_TYPES)}, or a save_to_disk folder)")
