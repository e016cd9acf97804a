"""The configuration sections: one frozen dataclass per YAML section, each field with a one-line
docstring, and each section's ``check()`` of its own fields (ranges, and combinations of fields
within the section). What involves more than one section, or the method, is checked by
``rlhf_overopt.config.validate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from rlhf_overopt.aggregate import AGGREGATOR_NAMES
from rlhf_overopt.errors import ConfigError

GOLD_TERMS = ("sentiment", "repetition", "eos", "length")
"""The testbed gold's terms that component rewards are labelled by (rlhf_overopt/testbed/gold.py)."""


def require(cond: bool, key: str, message: str) -> None:
    """Raise ConfigError("<key>: <message>") unless cond holds."""
    if not cond:
        raise ConfigError(f"{key}: {message}")


def _positive(section: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        require(value > 0, f"{prefix}.{name}", f"must be positive, got {value}")


def _non_negative(section: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        require(value >= 0, f"{prefix}.{name}", f"must be >= 0, got {value}")


def _fraction(section: Any, prefix: str, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        require(0 <= value <= 1, f"{prefix}.{name}", f"must be in [0, 1], got {value}")


def check_aggregator_name(name: str, key: str) -> int | None:
    """Check that `name` is a known aggregator; return i for member_<i> (its range needs proxy.k)."""
    if name in AGGREGATOR_NAMES:
        return None
    if name.startswith("member_") and name[len("member_"):].isdigit():
        return int(name[len("member_"):])
    raise ConfigError(f"{key}: unknown aggregator {name!r} (known: {', '.join(AGGREGATOR_NAMES)}, member_<i>)")


@dataclass(frozen=True)
class TestbedConfig:
    """The embedded offline world: corpus, tokenizer, SFT policy, gold scorer, prompts, preferences."""

    __test__ = False  # not a pytest class despite the name

    seed: int = 0
    """Seed of everything the testbed builds; the same seed gives byte-identical artifacts."""
    cache_dir: str = ""
    """Root of the content-hashed testbed cache; empty means $RLHF_OVEROPT_CACHE or ~/.cache/rlhf_overopt."""
    n_reviews: int = 40000
    """Number of generated movie-review-like texts in the corpus."""
    vocab_size: int = 1024
    """Byte-level BPE vocabulary size (special tokens included)."""
    n_layer: int = 2
    """Transformer blocks of the SFT policy."""
    n_embd: int = 128
    """Hidden size of the SFT policy."""
    n_head: int = 4
    """Attention heads of the SFT policy."""
    n_positions: int = 128
    """Context length of the SFT policy in tokens."""
    sft_steps: int = 350
    """Optimizer steps of SFT training on the corpus."""
    sft_batch_size: int = 32
    """Sequences per SFT step."""
    sft_lr: float = 2e-3
    """Peak learning rate of SFT training (cosine decay, short warm-up)."""
    prompt_words: int = 4
    """Number of opening words of a review used as a prompt."""
    n_train_prompts: int = 6000
    """Prompts in the train split (the preference dataset has one pair per train prompt)."""
    n_eval_prompts: int = 512
    """Prompts in the held-out eval split."""
    max_new_tokens: int = 48
    """Response length cap when sampling the preference dataset."""
    label_noise: float = 0.25
    """Fraction of preference labels flipped at random (Coste et al. use 0.25)."""
    gold_eos_penalty: float = 2.0
    """Gold penalty for a response that never emits EOS (rarely seen in labelled pairs)."""
    gold_repetition_weight: float = 1.0
    """Gold weight of (1 - distinct-bigram ratio), a degeneracy penalty."""
    gold_length_target: int = 15
    """Centre of the response length band (words) that gold prefers; outside it responses lose gold."""
    gold_length_tolerance: int = 15
    """Half-width (words) of the penalty-free length band; the initial policy rarely leaves it."""
    gold_length_weight: float = 2.0
    """Gold lost per gold_length_target words outside the length band."""
    gen_batch_size: int = 512
    """Prompts per generation batch when sampling the preference dataset and eval statistics."""
    num_threads: int = 1
    """Torch intra-op threads while building (0 keeps torch's setting); 1 is fastest for these small
    models on a shared CPU, where a second spinning thread made steps up to 10x slower (measured)."""

    def check(self) -> None:
        _positive(self, "testbed", "n_reviews", "vocab_size", "n_layer", "n_embd", "n_head", "n_positions",
                  "sft_steps", "sft_batch_size", "prompt_words", "n_train_prompts", "n_eval_prompts",
                  "max_new_tokens", "gold_length_target", "gen_batch_size", "sft_lr")
        _non_negative(self, "testbed", "gold_eos_penalty", "gold_repetition_weight", "gold_length_weight",
                      "gold_length_tolerance")
        _fraction(self, "testbed", "label_noise")
        require(self.num_threads >= 0, "testbed.num_threads",
                f"must be >= 0 (0 keeps torch's setting), got {self.num_threads}")
        require(self.n_embd % self.n_head == 0, "testbed.n_embd", f"must be divisible by testbed.n_head ({self.n_head})")
        require(self.vocab_size >= 300, "testbed.vocab_size", "must be >= 300 (256 bytes + special tokens + merges)")
        # A prompt word is at most ~3 BPE tokens at the smallest allowed vocabulary: prompt plus
        # response must fit the testbed policy's context.
        require(self.fits_context(self.max_new_tokens), "testbed.max_new_tokens",
                f"3 * testbed.prompt_words + max_new_tokens must fit testbed.n_positions ({self.n_positions})")

    def fits_context(self, max_new_tokens: int) -> bool:
        """Whether a prompt plus `max_new_tokens` response tokens fit the testbed policy's context."""
        return 3 * self.prompt_words + max_new_tokens <= self.n_positions


@dataclass(frozen=True)
class PolicyConfig:
    """The initial (SFT) policy that every method starts from and measures KL against."""

    path: str = "testbed"
    """'testbed' for the embedded SFT policy, or a local path / hub name of a causal LM."""
    trust_remote_code: bool = False
    """Allow model code shipped with a checkpoint to run (off unless you trust the source)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype; use float32 on CPU."""
    dropout_off: bool = True
    """Set every dropout probability to 0 (required for PPO log-prob consistency)."""

    def check(self) -> None:
        """Every value its type allows is valid; the path's existence is checked by validate()."""


@dataclass(frozen=True)
class GoldConfig:
    """The gold reward the policy never optimizes."""

    path: str = "testbed"
    """'testbed' for the embedded rule-based gold scorer, or a path to a sequence-classification model."""
    batch_size: int = 64
    """Responses per gold scoring batch (model gold only)."""
    trust_remote_code: bool = False
    """Allow model code shipped with the gold checkpoint to run."""

    def check(self) -> None:
        _positive(self, "gold", "batch_size")


@dataclass(frozen=True)
class ProxyConfig:
    """The proxy reward ensemble trained on gold-labelled (noisy) preferences."""

    kind: Literal["independent", "pretrain", "multihead", "lora"] = "independent"
    """independent: K full models; pretrain: members from differently seeded pretraining runs;
    multihead: one backbone with K heads; lora: one frozen base with K LoRA adapters."""
    k: int = 5
    """Number of ensemble members."""
    backbone: str = "policy"
    """'policy' initializes members from the SFT policy; otherwise a path to a causal LM or
    sequence-classification checkpoint."""
    path: str = ""
    """Directory of an already trained ensemble to load; empty means train (or reuse from cache)."""
    n_layer: int = 0
    """Truncate the backbone to its first n_layer blocks (0 keeps all): smaller, cheaper proxies."""
    epochs: int = 2
    """Passes over the preference data per member."""
    lr: float = 1e-3
    """Learning rate of proxy training."""
    batch_size: int = 64
    """Preference pairs per proxy training step."""
    offset_eta: float = 0.0
    """Weight of the offset regularizer eta*(r+ + r-)^2 (Eisenstein et al. 2023)."""
    lora_r: int = 8
    """LoRA rank for kind=lora."""
    lora_alpha: int = 16
    """LoRA alpha for kind=lora."""
    standardize: bool = True
    """Standardize each member to mean 0, std 1 on initial-policy responses (Coste et al.)."""
    min_accuracy: float = 0.55
    """A member whose validation accuracy against noisy labels is below this is reported as failed."""
    on_failed_member: Literal["error", "warn", "drop"] = "warn"
    """What to do with a failed member: stop, keep it with a warning, or drop it."""
    score_batch_size: int = 256
    """Responses per proxy scoring batch."""
    max_length: int = 0
    """Token cap of prompt + response (+ EOS) fed to a proxy, keeping the end; 0 means the backbone's context length."""
    weight_decay: float = 0.0
    """AdamW weight decay of proxy training."""
    train_pairs: int = 0
    """Train on only the first train_pairs pairs of the (shuffled) train split; 0 uses all. Less
    preference data gives weaker proxies that are overoptimized sooner (Gao et al. 2022, Fig. 4)."""
    train_workers: int = 0
    """kind=independent|pretrain on CPU: members trained at once in this many processes, each with
    this process's torch thread count; 0 = as many as the cores allow (up to K), 1 = one after
    another here. The weights do not depend on it (each member is seeded on its own)."""
    multihead_bootstrap: bool = True
    """kind=multihead: each head trains on its own resample (with replacement) of every batch, so heads see different data."""
    score_method: Literal["loop", "vmap"] = "loop"
    """kind=independent|pretrain: score members one by one, or all at once with torch.func.vmap over stacked
    weights. Keep "loop" on CPU: vmap measured 1.3x (K=1) to 2.6x (K=5) slower there (BENCHMARKS.md)."""

    def check(self) -> None:
        _positive(self, "proxy", "k", "epochs", "batch_size", "lora_r", "lora_alpha", "score_batch_size", "lr")
        _non_negative(self, "proxy", "offset_eta")
        _fraction(self, "proxy", "min_accuracy")
        require(self.n_layer >= 0, "proxy.n_layer", "must be >= 0 (0 keeps all layers)")
        require(self.train_workers >= 0, "proxy.train_workers", f"must be >= 0, got {self.train_workers}")
        require(self.train_pairs == 0 or self.train_pairs >= 20, "proxy.train_pairs",
                f"must be 0 (all pairs) or at least 20, got {self.train_pairs}")


@dataclass(frozen=True)
class AggregateConfig:
    """How the K member scores become the one proxy score that is optimized."""

    name: str = "mean"
    """mean | wco | uwo | median | mean_minus_std | member_<i>."""
    uwo_lambda: float = 0.5
    """lambda in UWO = mean - lambda * variance (0.5 for BoN, 0.1 for PPO in Coste et al.)."""
    std_k: float = 1.0
    """k in mean - k * std."""
    variance: Literal["population", "sample"] = "population"
    """Variance estimator across members (the paper's population variance by default)."""

    def check(self) -> None:
        _non_negative(self, "aggregate", "uwo_lambda", "std_k")
        check_aggregator_name(self.name, "aggregate.name")  # member_<i>'s range needs proxy.k: validate()


@dataclass(frozen=True)
class EvalConfig:
    """Held-out evaluation: sampling settings and the KL estimator reported on curves."""

    n_prompts: int = 256
    """Held-out eval prompts scored at each evaluation."""
    every: int = 10
    """Evaluate every this many optimization steps (RL methods)."""
    max_new_tokens: int = 48
    """Response length cap at evaluation."""
    temperature: float = 1.0
    """Sampling temperature at evaluation (also used for the KL log-probs)."""
    top_p: float = 1.0
    """Nucleus sampling at evaluation (1.0 keeps the KL estimate exact)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimator for curves: k1 = r, k2 = r^2/2, k3 = exp(-r) - 1 + r."""
    batch_size: int = 128
    """Prompts per evaluation generation batch."""
    n_samples_logged: int = 4
    """Prompt/response examples written to samples.jsonl per evaluation."""

    def check(self) -> None:
        _positive(self, "eval", "n_prompts", "every", "max_new_tokens", "batch_size", "temperature")
        require(self.n_samples_logged >= 0, "eval.n_samples_logged", "must be >= 0")
        require(0 < self.top_p <= 1, "eval.top_p", f"must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class BonConfig:
    """Best-of-n: one pool of N samples per eval prompt gives every n's curve."""

    pool_size: int = 256
    """N, samples drawn per eval prompt."""
    n_grid: list[int] = field(default_factory=list)
    """Values of n to evaluate; empty means 1, 2, 4, ..., N."""
    aggregators: list[str] = field(
        default_factory=lambda: ["members", "mean", "wco", "uwo", "median", "mean_minus_std"]
    )
    """Aggregators to curve; 'members' expands to member_0 .. member_{K-1}."""
    temperature: float = 1.0
    """Sampling temperature of the pool."""
    top_p: float = 1.0
    """Nucleus sampling of the pool."""
    max_new_tokens: int = 48
    """Response length cap of the pool."""
    batch_size: int = 512
    """Sequences per generation batch."""

    def check(self) -> None:
        _positive(self, "bon", "pool_size", "max_new_tokens", "batch_size", "temperature")
        require(0 < self.top_p <= 1, "bon.top_p", f"must be in (0, 1], got {self.top_p}")
        for i, agg in enumerate(self.aggregators):
            if agg != "members":
                check_aggregator_name(agg, f"bon.aggregators[{i}]")
        require(len(self.aggregators) > 0, "bon.aggregators", "must name at least one aggregator")
        for i, n in enumerate(self.n_grid):
            require(1 <= n <= self.pool_size, f"bon.n_grid[{i}]",
                    f"n={n} must be between 1 and bon.pool_size ({self.pool_size})")


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
    loss_normalization: Literal["sequence", "token", "constant"] = "sequence"
    """sequence: mean over each response's tokens, then over responses (GRPO); token: one mean over the
    minibatch's tokens; constant: each response's token sum divided by ppo.max_new_tokens (Dr. GRPO)."""
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
