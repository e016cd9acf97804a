"""The configuration sections of the optimizers and of the composite-reward methods (PPO, the
GRPO family, the DPO family, DeepSpeed, W&B, components, constraints, Nelder-Mead, weighting,
proxy points, and the scaling-law grid); the world and reward sections are in
rlhf_overopt.config.sections. Each section checks its own fields in ``check()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from rlhf_overopt.config.sections import (
    GOLD_TERMS,
    _fraction,
    _non_negative,
    _positive,
    check_aggregator_name,
    require,
)


@dataclass(frozen=True)
class PPOConfig:
    """Language-model PPO (Ziegler et al. 2019; Huang et al. 2024 'N implementation details')."""

    steps: int = 100
    """PPO iterations (each: one rollout batch, then ppo_epochs over it)."""
    batch_size: int = 32
    """Rollouts per iteration, over all ranks."""
    mini_batch_size: int = 8
    """Rollouts per optimizer step, over all ranks."""
    ppo_epochs: int = 4
    """Passes over each rollout batch."""
    lr: float = 1e-4
    """Policy learning rate."""
    value_lr: float = 1e-4
    """Value model learning rate."""
    lr_final_ratio: float = 1.0
    """Cosine decay of both learning rates to this fraction at the last step (1.0: constant)."""
    clip_range: float = 0.2
    """PPO ratio clip epsilon."""
    clip_range_value: float = 0.2
    """Value clip around the old values."""
    vf_coef: float = 0.5
    """Weight of the value loss (value model is separate; scales its loss)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.01
    """KL penalty coefficient (initial value when adaptive)."""
    adaptive_kl: bool = False
    """Adapt the KL coefficient towards kl_target (Ziegler et al.)."""
    kl_target: float = 6.0
    """Target sequence KL (nats) of the adaptive controller."""
    kl_horizon: int = 10000
    """Horizon (in rollouts) of the adaptive controller."""
    kl_penalty_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator used in the reward penalty."""
    whiten_rewards: bool = False
    """Whiten the per-token rewards before GAE."""
    whiten_advantages: bool = True
    """Whiten advantages per rollout batch."""
    no_eos_penalty: float = 0.0
    """Added to the score of a response that never emits EOS (negative to penalize; 0 disables)."""
    temperature: float = 1.0
    """Rollout sampling temperature (log-probs are divided by it in every pass)."""
    max_new_tokens: int = 48
    """Rollout response length cap."""
    value_init: Literal["proxy", "policy"] = "policy"
    """Initialize the value model from a proxy member's backbone or from the policy."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    save_every: int = 50
    """Checkpoint every this many iterations (and at the end)."""

    def check(self) -> None:
        _positive(self, "ppo", "steps", "batch_size", "mini_batch_size", "ppo_epochs", "max_new_tokens", "kl_horizon",
                  "save_every", "lr", "value_lr", "temperature", "clip_range", "clip_range_value", "kl_target",
                  "max_grad_norm")
        _non_negative(self, "ppo", "kl_coef", "vf_coef")
        require(0 <= self.lam <= 1, "ppo.lam", f"must be in [0, 1], got {self.lam}")
        require(0 < self.gamma <= 1, "ppo.gamma", f"must be in (0, 1], got {self.gamma}")
        require(0 < self.lr_final_ratio <= 1, "ppo.lr_final_ratio", "must be in (0, 1]")
        require(self.batch_size % self.mini_batch_size == 0, "ppo.mini_batch_size",
                f"must divide ppo.batch_size ({self.batch_size}), got {self.mini_batch_size}")


@dataclass(frozen=True)
class GRPOConfig:
    """Group-relative policy optimization without a value model: GRPO (Shao et al. 2024, DeepSeekMath
    §4.1) and RLOO (Ahmadian et al. 2024). Rollouts, optimizer and clipping come from ppo.*."""

    group_size: int = 4
    """Responses sampled per prompt (G >= 2); ppo.batch_size counts responses, so it holds whole groups."""
    std_normalize: bool = True
    """Divide each group's centred rewards by their std (GRPO); Dr. GRPO (Liu et al. 2025) drops it. Ignored by rloo."""
    loss_normalization: Literal["auto", "sequence", "token", "constant"] = "auto"
    """auto: constant for rloo (REINFORCE's summed log-prob gradient, Ahmadian et al. 2024), sequence for grpo;
    sequence: mean over each response's tokens, then over responses (GRPO, which biases the length); token: one
    mean over the minibatch's tokens; constant: each response's token sum divided by ppo.max_new_tokens (Dr. GRPO)."""
    kl_coef: float = 0.0
    """beta of the KL to the reference policy (DeepSeekMath uses 0.04; many recipes 0)."""
    kl_in: Literal["loss", "reward"] = "loss"
    """loss: the per-token k3 estimator added to the loss (GRPO); reward: beta times the summed per-token
    ppo.kl_penalty_estimator subtracted from each response's reward before the advantage (RLOO)."""
    eps: float = 1e-4
    """Added to the group std before dividing by it."""

    def check(self) -> None:
        # A group of one has no baseline: its advantage would be 0 (GRPO) or undefined (RLOO's leave-one-out).
        require(self.group_size >= 2, "grpo.group_size", f"must be >= 2, got {self.group_size}")
        _non_negative(self, "grpo", "kl_coef")
        _positive(self, "grpo", "eps")


@dataclass(frozen=True)
class DPOConfig:
    """Direct alignment (DPO / IPO / SLiC); beta sets the KL budget (Rafailov et al. 2024)."""

    beta: float = 0.1
    """Inverse KL budget: small beta = large budget."""
    loss_type: Literal["dpo", "ipo", "slic"] = "dpo"
    """Loss family member."""
    lr: float = 5e-4
    """Learning rate."""
    lr_final_ratio: float = 1.0
    """Cosine decay of the learning rate to this fraction at the last step (1.0: constant)."""
    epochs: float = 1.0
    """Passes over the preference data (fractions allowed)."""
    batch_size: int = 32
    """Pairs per optimizer step, over all ranks."""
    dataset: str = "testbed"
    """'testbed' preferences, or a path to a `datasets` dataset with prompt/chosen/rejected."""
    quality: Literal["high", "medium", "low"] = "high"
    """Testbed data-quality tier: share of pairs whose one response comes from the corpus."""
    corpus_share_medium: float = 0.25
    """Share of pairs in the medium tier whose one response is replaced by a corpus review continuation."""
    corpus_share_low: float = 0.5
    """Share of pairs in the low tier whose one response is replaced by a corpus review continuation."""
    max_length: int = 0
    """Token cap of prompt + response (+ EOS) in training pairs; 0 means the policy's context length."""
    length_normalize: bool = False
    """Average each response's log-ratio over its tokens instead of summing (TRL does this for IPO)."""
    precompute_ref: bool = True
    """Compute reference log-probs once up front (else a frozen reference runs on every batch)."""
    logprob_batch_size: int = 64
    """Pairs per forward pass when precomputing reference log-probs and proxy margins."""
    evals_per_epoch: int = 8
    """Evaluation points per epoch (plus step 0 and the last step)."""
    save_every: int = 50
    """Checkpoint every this many optimizer steps (and at the end)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""

    def check(self) -> None:
        _positive(self, "dpo", "batch_size", "evals_per_epoch", "logprob_batch_size", "save_every", "beta", "lr",
                  "epochs", "max_grad_norm")
        require(0 < self.lr_final_ratio <= 1, "dpo.lr_final_ratio", "must be in (0, 1]")
        require(self.max_length >= 0, "dpo.max_length", "must be >= 0 (0 means the policy's context length)")
        _fraction(self, "dpo", "corpus_share_medium", "corpus_share_low")
        require(self.quality == "high" or self.dataset == "testbed", "dpo.quality",
                "quality tiers are built from the testbed's preferences; use 'high' with a dpo.dataset path")


@dataclass(frozen=True)
class MADPOConfig:
    """Margin-adaptive DPO weights (Rho 2025); the margin comes from the proxy ensemble."""

    c_max: float = 2.0
    """Largest weight slope."""
    c_min: float = 0.0
    """Smallest slope; 0 means 1/c_max."""
    lam: float = 1.0
    """Steepness of the transition around tau."""
    tau: float = math.log(999)
    """Margin at which the weighting switches off."""
    margin_aggregator: str = "member_0"
    """Aggregator applied to the K member margins r_i(chosen) - r_i(rejected): member_<i> (the paper's single RM), mean, wco, uwo, ..."""
    standardized_margins: bool = False
    """Margins from standardized member scores; False keeps the raw Bradley-Terry logits the weight formula assumes."""

    def check(self) -> None:
        _positive(self, "madpo", "lam", "tau")
        require(self.c_max > 1, "madpo.c_max", f"must be > 1, got {self.c_max}")
        require(0 <= self.c_min < 1, "madpo.c_min", f"must be in [0, 1) (0 means 1/c_max), got {self.c_min}")
        check_aggregator_name(self.margin_aggregator, "madpo.margin_aggregator")


@dataclass(frozen=True)
class DeepSpeedConfig:
    """DeepSpeed engine settings for trained models."""

    zero_stage: Literal[0, 1, 2, 3] = 0
    """ZeRO optimization stage."""
    config: str = ""
    """Optional DeepSpeed JSON whose entries are merged under the computed ones."""

    def check(self) -> None:
        """Every value its type allows is valid; the JSON file's existence is checked by validate()."""


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases tracking; the run directory stays the source of truth."""

    mode: Literal["offline", "online", "disabled"] = "offline"
    """offline needs no login and writes under the run directory."""
    project: str = "rlhf_overopt"
    """W&B project."""
    group: str = ""
    """W&B group (a sweep sets it)."""
    entity: str = ""
    """W&B entity (team or user); empty for the default."""

    def check(self) -> None:
        """Every value its type allows is valid."""


@dataclass(frozen=True)
class ComponentsConfig:
    """Component rewards (Moskovitz et al. 2023): one proxy ensemble per aspect of gold, each trained
    with the proxy.* settings on preferences labelled by its own group of gold terms."""

    names: list[str] = field(default_factory=lambda: ["sentiment", "fluency"])
    """Component names, in order: the order of constraints, thresholds, weights and logged lists."""
    terms: list[str] = field(default_factory=lambda: ["sentiment", "repetition+eos+length"])
    """Per component, the '+'-joined testbed gold terms (sentiment, repetition, eos, length) whose sum labels its pairs."""
    label_noise: float = 0.25
    """Fraction of each component's preference labels flipped at random."""
    pairs_per_prompt: int = 1
    """Response pairs per train prompt: 1 relabels the testbed's pairs; more samples extra pairs from the initial policy."""
    path: str = ""
    """Folder of trained components (a saved ensemble per name) to load; empty means train (or reuse from cache)."""

    def check(self) -> None:
        n = len(self.names)
        require(n >= 1, "components.names", "needs at least one component")
        require(len(set(self.names)) == n and all(x and x.isidentifier() for x in self.names), "components.names",
                f"must be distinct identifiers, got {self.names}")
        require(len(self.terms) == n, "components.terms",
                f"needs one entry per component ({n}), got {len(self.terms)}")
        for i, group in enumerate(self.terms):
            parts = group.split("+")
            require(all(t in GOLD_TERMS for t in parts) and len(set(parts)) == len(parts), f"components.terms[{i}]",
                    f"{group!r} must be '+'-joined distinct gold terms from {', '.join(GOLD_TERMS)}")
        require(0 <= self.label_noise < 0.5, "components.label_noise", f"must be in [0, 0.5), got {self.label_noise}")
        require(self.pairs_per_prompt >= 1, "components.pairs_per_prompt", "must be >= 1")


@dataclass(frozen=True)
class ConstrainedConfig:
    """Constrained RLHF with Lagrange multipliers: mu-PPO and xi-PPO (Moskovitz et al. 2023, §4)."""

    constraint: Literal["inequality", "equality"] = "inequality"
    """inequality: mu-PPO, v_i >= theta_i, sigmoid weights; equality: xi-PPO, v_i = theta_i, tanh weights."""
    objective: str = "kl"
    """Maximized subject to the constraints: 'kl' (minus the KL to the initial policy) or a component name (then unconstrained, with the ppo.kl_coef penalty)."""
    thresholds: list[float] = field(default_factory=list)
    """theta per constrained component (standardized proxy units); empty means read thresholds_file."""
    thresholds_file: str = ""
    """thresholds.json written by method proxy_points (or its run directory), used when thresholds is empty."""
    multiplier_init: float = 0.0
    """Initial raw multiplier mu of every constraint (sigmoid(0) = 0.5, tanh(0) = 0)."""
    multiplier_lr: float = 0.05
    """SGD learning rate of the multipliers (paper: 0.01 to 0.1)."""
    multiplier_momentum: float = 0.1
    """SGD momentum of the multipliers (paper: 0.1)."""
    multiplier_grad_clip: float = 0.5
    """Gradient-norm clip of each multiplier step (paper: 0.5)."""

    def check(self) -> None:
        _positive(self, "constrained", "multiplier_lr", "multiplier_grad_clip")
        require(0 <= self.multiplier_momentum < 1, "constrained.multiplier_momentum", "must be in [0, 1)")


@dataclass(frozen=True)
class NelderMeadConfig:
    """NM-PPO: Nelder-Mead (scipy) over the thresholds within one run (Moskovitz et al. 2023, §4.3)."""

    stretch_steps: int = 10
    """PPO iterations per function evaluation; each ends with a gold evaluation whose negative is minimized."""
    initial_step: float = 0.3
    """Edge of the initial simplex around constrained.thresholds, in standardized proxy units."""
    xatol: float = 0.01
    """Stop when the simplex is this small in thresholds (paper: tol 0.01)."""
    fatol: float = 0.01
    """Stop when the simplex's gold values differ by less than this (paper: tol 0.01)."""

    def check(self) -> None:
        _positive(self, "nm", "initial_step", "xatol", "fatol")


@dataclass(frozen=True)
class DynamicWeightingConfig:
    """Weights of the component rewards: fixed, or adapted during RL (Lu et al. 2025)."""

    mode: Literal["fixed", "hypervolume", "gradient"] = "fixed"
    """fixed; hypervolume: reward scaled by 0.5 + 1.5 tanh(HV gain) at each eval; gradient: w_j *= exp(eta I_j / mu)."""
    weights: list[float] = field(default_factory=list)
    """Initial (for fixed: constant) weight per component, normalized to sum 1; empty means uniform."""
    hv_reference_offset: float = 1.0
    """Hypervolume reference point: the step-0 eval component scores minus this, in every objective."""
    gradient_eta: float = 0.0
    """eta of the gradient-based update; 0 means ppo.lr (the paper uses the actor learning rate)."""
    gradient_mu: float = 1e-4
    """Temperature mu of the gradient-based update (paper: 1e-4 to 1e-5)."""
    gradient_every: int = 1
    """Update the weights every this many PPO iterations."""

    def check(self) -> None:
        _positive(self, "weighting", "gradient_mu", "hv_reference_offset")
        require(self.gradient_eta >= 0, "weighting.gradient_eta", "must be >= 0 (0 means ppo.lr)")
        require(self.gradient_every >= 1, "weighting.gradient_every", "must be >= 1")
        # Their count against components.names, sign and sum are checked by validate(), in one message.
        require(not self.weights or self.mode == "fixed" or all(x > 0 for x in self.weights), "weighting.weights",
                "adaptive weighting needs every weight > 0 (a zero weight can never grow)")


@dataclass(frozen=True)
class ProxyPointsConfig:
    """Proxy points: where gold peaks against each component's value (Moskovitz et al. 2023, §3)."""

    runs: list[str] = field(default_factory=list)
    """Run directories, one per component in components.names order, to read; empty means train one run per component (ppo.* settings, weight 1 on it)."""
    min_points: int = 3
    """Fewest evaluation points a component's run needs for the quadratic fit."""

    def check(self) -> None:
        require(self.min_points >= 3, "proxy_points.min_points", "a quadratic fit needs at least 3 points")


@dataclass(frozen=True)
class ProxySize:
    """One proxy size of the scaling grid: a GPT-2 backbone of this shape pretrained on the testbed
    corpus with the testbed's SFT recipe (the SFT policy itself when the shape is the policy's)."""

    n_layer: int = 2
    """Transformer blocks."""
    n_embd: int = 128
    """Hidden size."""
    n_head: int = 0
    """Attention heads; 0 means one per 32 hidden dimensions (at least 1)."""

    @property
    def heads(self) -> int:
        """n_head, or one head per 32 dimensions when 0."""
        return self.n_head or max(1, self.n_embd // 32)

    def check(self, key: str = "scaling.proxy_sizes[0]") -> None:
        require(self.n_layer >= 1, f"{key}.n_layer", f"must be >= 1, got {self.n_layer}")
        require(self.n_embd >= 1, f"{key}.n_embd", f"must be >= 1, got {self.n_embd}")
        require(self.n_head >= 0, f"{key}.n_head", f"must be >= 0 (0: one head per 32 dimensions), got {self.n_head}")
        require(self.n_embd % self.heads == 0, f"{key}.n_embd",
                f"must be divisible by the head count ({self.heads}), got {self.n_embd}")


@dataclass(frozen=True)
class ScalingConfig:
    """method scaling_law: Gao et al. (2022) §3.2 — one best-of-n pool, one proxy per (size, data
    size) cell, Gao's best-of-n form fitted per proxy, and its coefficients against log size and log
    data. Each cell trains ONE proxy (proxy.k is not read) with the other proxy.* settings."""

    proxy_sizes: list[ProxySize] = field(default_factory=lambda: [ProxySize(1, 32), ProxySize(1, 64),
                                                                  ProxySize(2, 128)])
    """Proxy backbone shapes, each {n_layer, n_embd, n_head}; its parameter count is recorded."""
    train_pairs: list[int] = field(default_factory=lambda: [500, 1500, 4500])
    """Data sizes: each proxy trains on the first train_pairs noisy train pairs (proxy.train_pairs
    semantics; 0 = all of them)."""
    pool: str = ""
    """An existing gold-scored pool (e.g. a bon run's pool/ folder, or anything bon.pool reads);
    empty means sample one from the initial policy, saved into the run directory."""
    pool_size: int = 256
    """N, samples per eval prompt (eval.n_prompts prompts)."""
    n_grid: list[int] = field(default_factory=list)
    """Values of n to evaluate; empty means 1, 2, 4, ..., N."""
    temperature: float = 1.0
    """Sampling temperature of a sampled pool."""
    top_p: float = 1.0
    """Nucleus sampling of a sampled pool."""
    max_new_tokens: int = 48
    """Response length cap of a sampled pool."""
    batch_size: int = 512
    """Sequences per generation batch of a sampled pool."""

    def check(self) -> None:
        require(len(self.proxy_sizes) > 0, "scaling.proxy_sizes", "must name at least one proxy size")
        require(len(self.train_pairs) > 0, "scaling.train_pairs", "must name at least one data size")
        for i, size in enumerate(self.proxy_sizes):
            size.check(f"scaling.proxy_sizes[{i}]")
        shapes = [(s.n_layer, s.n_embd, s.heads) for s in self.proxy_sizes]
        require(len(set(shapes)) == len(shapes), "scaling.proxy_sizes", f"has a size twice: {shapes}")
        for i, n in enumerate(self.train_pairs):
            require(n == 0 or n >= 20, f"scaling.train_pairs[{i}]", f"must be 0 (all pairs) or at least 20, got {n}")
        require(len(set(self.train_pairs)) == len(self.train_pairs), "scaling.train_pairs",
                f"has a data size twice: {self.train_pairs}")
        _positive(self, "scaling", "pool_size", "max_new_tokens", "batch_size", "temperature")
        require(0 < self.top_p <= 1, "scaling.top_p", f"must be in (0, 1], got {self.top_p}")
        for i, n in enumerate(self.n_grid):
            require(1 <= n <= self.pool_size, f"scaling.n_grid[{i}]",
                    f"n={n} must be between 1 and scaling.pool_size ({self.pool_size})")
