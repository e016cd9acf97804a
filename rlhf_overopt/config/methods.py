"""The one table of methods: the `method` choices, the driver module that runs each, and what each
method reads, evaluates and splits over ranks. Everything that depends on the method (config
checks, the plan, --check, the docs) reads these columns instead of comparing method names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# ---------------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """One value of the config's `method`: what runs it and what it reads."""

    name: str
    """The config `method`."""
    driver: str
    """Driver module (in the package's loops folder) exposing run(ctx)."""
    sections: tuple[str, ...]
    """Config sections the method reads (for --check and docs)."""
    evaluates: bool
    """Writes gold evaluation points to curves.jsonl (so eval.n_prompts must fit the testbed's eval split)."""
    fit_form: str | None
    """The Gao et al. (2022) form analysis fits to its curves: "bon", "rl", or None (no curves to fit)."""
    composite: bool
    """Trains on component rewards (components / constrained / nm / weighting sections)."""
    rollouts: bool
    """Samples rollouts from the policy with ppo.* settings (PPO-style RL)."""
    split_keys: tuple[str, ...]
    """Batch sizes split evenly over data-parallel ranks."""
    response_caps: tuple[str, ...]
    """max_new_tokens keys that must fit the testbed policy's context."""
    summary: str
    """One line, for the README table / --list-methods."""
    advantage: Literal["gae", "group", "leave_one_out"] | None = None
    """The policy gradient's advantage: gae (a trained value model, PPO family), group (GRPO's group-normalized
    reward), leave_one_out (RLOO's baseline), None (no policy-gradient update)."""
    trains_policy: bool = False
    """Updates the policy against a frozen copy of its start, the reference (RL and direct alignment)."""
    shapes_rewards: bool = False
    """Its training reward is the aggregated proxy score that aggregate.shaping=par may shape."""
    margins: bool = False
    """Weights preference pairs by the proxy ensemble's margins (madpo.*)."""
    builds_testbed: bool = False
    """Builds the offline testbed itself (so it opens the testbed whatever the model paths say)."""

    @property
    def value_model(self) -> bool:
        """Trains a value model beside the policy (GAE advantages)."""
        return self.advantage == "gae"

    @property
    def groups(self) -> bool:
        """Samples grpo.group_size responses per prompt; advantages are relative to the group (GRPO, RLOO)."""
        return self.advantage in ("group", "leave_one_out")


_MODELS = ("testbed", "policy", "gold", "proxy")  # what every trained or evaluated method reads
_RL = (*_MODELS, "data", "eval", "ppo", "deepspeed", "wandb")
_RL_SPLIT = ("ppo.batch_size", "ppo.mini_batch_size", "eval.n_prompts")
_RL_CAPS = ("eval.max_new_tokens", "ppo.max_new_tokens")
_COMPOSITE = (*_RL, "aggregate", "components")  # aggregate: within each component's ensemble

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("build_testbed", "build_testbed", ("testbed",), evaluates=False, fit_form=None, composite=False,
           rollouts=False, split_keys=(), response_caps=(),
           builds_testbed=True,
           summary="Build (or reuse from cache) the offline testbed: corpus, tokenizer, SFT policy, gold, preferences."),
    Method("train_rm", "train_rm", ("testbed", "policy", "gold", "proxy", "wandb"), evaluates=False, fit_form=None,
           composite=False, rollouts=False, split_keys=(), response_caps=(),
           summary="Train the proxy reward ensemble on gold-labelled noisy preferences."),
    Method("label_preferences", "label_preferences", ("testbed", "policy", "gold", "data", "label"), evaluates=False,
           fit_form=None, composite=False, rollouts=False, split_keys=(), response_caps=("label.max_new_tokens",),
           summary="Gold-labelled preferences: initial-policy responses paired and labelled by gold, with label noise."),
    Method("bon", "bon", (*_MODELS, "data", "aggregate", "eval", "bon", "wandb"), evaluates=True, fit_form="bon",
           composite=False, rollouts=False, split_keys=("eval.n_prompts",),
           response_caps=("eval.max_new_tokens", "bon.max_new_tokens"),
           summary="Best-of-n against the aggregated proxy: every n's curve from one pool of N samples."),
    Method("ppo", "ppo", (*_RL, "aggregate"), evaluates=True, fit_form="rl", composite=False, rollouts=True,
           split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           advantage="gae", trains_policy=True, shapes_rewards=True,
           summary="PPO with a value model and a KL penalty on the aggregated proxy (Ziegler et al. 2019)."),
    Method("dpo", "dpo", (*_MODELS, "data", "aggregate", "eval", "dpo", "deepspeed", "wandb"), evaluates=True,
           fit_form="rl", composite=False, rollouts=False, split_keys=("dpo.batch_size", "eval.n_prompts"),
           response_caps=("eval.max_new_tokens",),
           trains_policy=True,
           summary="Direct alignment (DPO / IPO / SLiC) on the preference data (Rafailov et al. 2024)."),
    Method("madpo", "dpo", (*_MODELS, "data", "aggregate", "eval", "dpo", "madpo", "deepspeed", "wandb"), evaluates=True,
           fit_form="rl", composite=False, rollouts=False, split_keys=("dpo.batch_size", "eval.n_prompts"),
           response_caps=("eval.max_new_tokens",),
           trains_policy=True, margins=True,
           summary="DPO with margin-adaptive pair weights from the proxy ensemble (Rho 2025)."),
    Method("constrained_ppo", "constrained_ppo", (*_COMPOSITE, "constrained"), evaluates=True, fit_form="rl",
           composite=True, rollouts=True, split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           advantage="gae", trains_policy=True,
           summary="mu-PPO / xi-PPO: component rewards under Lagrange-multiplier constraints (Moskovitz et al. 2023)."),
    Method("nm_ppo", "constrained_ppo", (*_COMPOSITE, "constrained", "nm"), evaluates=True, fit_form="rl",
           composite=True, rollouts=True, split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           advantage="gae", trains_policy=True,
           summary="NM-PPO: Nelder-Mead over the constraint thresholds within one run (Moskovitz et al. 2023)."),
    Method("dynamic_ppo", "dynamic_ppo", (*_COMPOSITE, "weighting"), evaluates=True, fit_form="rl",
           composite=True, rollouts=True, split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           advantage="gae", trains_policy=True,
           summary="PPO on fixed, hypervolume-guided or gradient-based weights of component rewards (Lu et al. 2025)."),
    # Its own directory holds thresholds.json, not curves; the per-component runs it trains evaluate
    # (and are fitted as RL runs), and its own fit is a quadratic, not a Gao form.
    Method("proxy_points", "proxy_points", (*_COMPOSITE, "weighting", "proxy_points"), evaluates=True,
           fit_form=None, composite=True, rollouts=True, split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           advantage="gae", trains_policy=True,
           summary="Proxy points: where gold peaks against each component's value (Moskovitz et al. 2023, §3)."),
    Method("grpo", "grpo", (*_RL, "aggregate", "grpo"), evaluates=True, fit_form="rl", composite=False,
           rollouts=True, split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           advantage="group", trains_policy=True, shapes_rewards=True,
           summary="GRPO: group-normalized advantages, no value model (Shao et al. 2024; Dr. GRPO, Liu et al. 2025)."),
    Method("rloo", "grpo", (*_RL, "aggregate", "grpo"), evaluates=True, fit_form="rl", composite=False,
           rollouts=True, split_keys=_RL_SPLIT, response_caps=_RL_CAPS,
           advantage="leave_one_out", trains_policy=True, shapes_rewards=True,
           summary="RLOO: leave-one-out baseline within each group, no value model (Ahmadian et al. 2024)."),
    Method("scaling_law", "scaling_law", (*_MODELS, "data", "eval", "scaling", "wandb"), evaluates=True,
           fit_form="bon", composite=False, rollouts=False, split_keys=("eval.n_prompts",),
           response_caps=("eval.max_new_tokens", "scaling.max_new_tokens"),
           summary="Gao et al. 2022's scaling experiment: best-of-n with proxies of several sizes x data sizes, "
                   "Gao's form per proxy, alpha and beta against log size and log data."),
)}
"""Every method, by config name."""

MethodName = Literal[tuple(METHODS)]  # type: ignore[valid-type]  # the `method` choices, from the table

COMPOSITE_METHODS = tuple(n for n, m in METHODS.items() if m.composite)
"""Methods that train PPO on a composite of component rewards (their drivers: constrained_ppo, dynamic_ppo, proxy_points)."""
GRPO_METHODS = tuple(n for n, m in METHODS.items() if m.groups)
"""Methods that sample groups and read the grpo section: group-relative advantages, no value model."""
SHAPING_METHODS = tuple(n for n, m in METHODS.items() if m.shapes_rewards)
"""Methods whose training reward aggregate.shaping=par shapes."""


def fit_form(method: str) -> str:
    """The Gao et al. (2022) form to fit to a curve that `method` wrote: the table's fit_form, "rl" for a
    method without one or a name the table does not know (a run from another version)."""
    m = METHODS.get(method)
    return (m.fit_form if m is not None else None) or "rl"
