"""The configuration sections: one frozen dataclass per YAML section, each field with a one-line
docstring, and each section's ``check()`` of its own fields (ranges, and combinations of fields
within the section). What involves more than one section, or the method, is checked by
``rlhf_overopt.config.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from rlhf_overopt.errors import ConfigError
from rlhf_overopt.ops.aggregate import AGGREGATOR_NAMES

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
    """Parameter dtype of the policy and its reference; bfloat16 turns on DeepSpeed's bf16 mode
    for the policy and value engines and needs `device: cuda` (refused on a CPU)."""
    dropout_off: bool = True
    """Set every dropout probability to 0 (required for PPO log-prob consistency)."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward (Chen et al. 2016) on the trained policy and value backbone."""
    lora_r: int = 0
    """LoRA rank of the trained policy (Hu et al. 2021); 0 = full fine-tuning. With LoRA the
    reference is the same model with its adapters disabled (no second copy); ZeRO stages 0-2."""
    lora_alpha: int = 16
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA input; keep 0 for PPO (the sampling and training passes must agree)."""
    lora_target_modules: str = "all-linear"
    """Modules that get adapters: peft's 'all-linear' (every linear layer but the output head) or
    comma-separated module names (e.g. 'q_proj,v_proj')."""

    def check(self) -> None:
        """LoRA settings; the path's existence is checked by validate()."""
        _non_negative(self, "policy", "lora_r", "lora_dropout")
        _positive(self, "policy", "lora_alpha")
        require(self.lora_dropout < 1, "policy.lora_dropout", "must be < 1")
        require(bool(self.lora_target_modules.strip()), "policy.lora_target_modules", "must name modules or be 'all-linear'")


@dataclass(frozen=True)
class GoldConfig:
    """The gold reward the policy never optimizes."""

    path: str = "testbed"
    """'testbed' for the embedded rule-based gold scorer, or a local path / hub name of a
    sequence-classification model (1 label: reward; 2 labels: positive-class log-odds)."""
    batch_size: int = 64
    """Responses per gold scoring batch (model gold only)."""
    trust_remote_code: bool = False
    """Allow model code shipped with the gold checkpoint to run."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype of a model gold (bfloat16/float16 on GPU; float32 on CPU)."""

    def check(self) -> None:
        _positive(self, "gold", "batch_size")


@dataclass(frozen=True)
class ProxyConfig:
    """The proxy reward ensemble trained on gold-labelled (noisy) preferences."""

    kind: Literal["independent", "pretrain", "multihead", "lora", "warm"] = "independent"
    """independent: K full models; pretrain: members from differently seeded pretraining runs;
    multihead: one backbone with K heads; lora: one frozen base with K LoRA adapters; warm: K members
    from one initialization (head included), differing in data order, weight-averaged into one model
    (Ramé et al. 2024, WARM) that scores as a single member."""
    k: int = 5
    """Number of ensemble members (kind=warm: members averaged, >= 2; the ensemble then has one)."""
    backbone: str = "policy"
    """'policy' initializes members from the SFT policy; otherwise a local path / hub name of a causal
    LM or sequence-classification checkpoint, with its own tokenizer (proxies read text)."""
    dataset: str = "testbed"
    """Preference pairs the members train on: 'testbed', or a path / hub name of a dataset in TRL's
    formats (prompt/chosen/rejected, or implicit-prompt chosen/rejected), e.g. a label_preferences run's
    preferences/ folder; gold_chosen/gold_rejected (or chosen_gold/rejected_gold) give clean accuracy."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype the members are scored in (bfloat16/float16 on GPU; training stays float32)."""
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
    """kind=independent|pretrain|warm on CPU: members trained at once in this many processes, each with
    this process's torch thread count; 0 = as many as the cores allow (up to K), 1 = one after
    another here. The weights do not depend on it (each member is seeded on its own)."""
    multihead_bootstrap: bool = True
    """kind=multihead: each head trains on its own resample (with replacement) of every batch, so heads see different data."""
    score_method: Literal["loop", "vmap"] = "loop"
    """kind=independent|pretrain: score members one by one, or all at once with torch.func.vmap over stacked
    weights. Keep "loop" on CPU: vmap measured 1.3x (K=1) to 2.6x (K=5) slower there (BENCHMARKS.md)."""

    def check(self) -> None:
        require(self.kind != "warm" or self.k >= 2, "proxy.k",
                f"kind=warm averages the weights of proxy.k members and needs at least 2, got {self.k}")
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
    shaping: Literal["none", "par"] = "none"
    """none | par: PAR (Fu et al. 2025) replaces the aggregated score r by mean_j sigmoid(r - r_ref,j)
    over par_references reference responses of the prompt, sampled once from the initial policy."""
    par_references: int = 4
    """k, the reference responses per prompt with shaping=par (sampled with ppo.temperature and
    ppo.max_new_tokens, scored by the proxy members once, cached in <run>/par_references/)."""

    def check(self) -> None:
        _non_negative(self, "aggregate", "uwo_lambda", "std_k")
        _positive(self, "aggregate", "par_references")
        check_aggregator_name(self.name, "aggregate.name")  # member_<i>'s range needs proxy.k: validate()


@dataclass(frozen=True)
class DataConfig:
    """Where prompts come from: the testbed, or any dataset (local file or folder, or a hub name)."""

    prompts: str = "testbed"
    """'testbed', a .jsonl/.json/.csv/.parquet file, a `datasets.save_to_disk` folder, or a hub name
    (loaded with datasets.load_dataset; needs a network, never used by default)."""
    subset: str = ""
    """Configuration name of a hub dataset (datasets.load_dataset's second argument), e.g. AlpacaFarm's
    "alpaca_instructions"; empty for none."""
    prompt_column: str = "prompt"
    """Column holding the prompt (a string, or a list of chat messages with data.chat_template); unused with a template."""
    prompt_template: str = ""
    """Python format string over the row's columns, e.g. "{instruction}\n\n{input}" (AlpacaFarm); a
    paragraph whose fields are all empty is left out, as AlpacaFarm does for an empty input (blank lines:
    a double-quoted YAML string's escapes, or real newlines on a command line, e.g. bash $'...')."""
    prompt_words: int = 0
    """Keep only the first prompt_words words of each prompt (IMDB continuation prompts); 0 keeps all."""
    chat_template: bool = False
    """Apply the policy tokenizer's chat template (add_generation_prompt=True) to each prompt."""
    train_split: str = "train"
    """Split (DatasetDict key, or hub split) of the train prompts."""
    eval_split: str = ""
    """Split of the held-out eval prompts; empty means hold out data.eval_size prompts of train_split."""
    eval_size: int = 0
    """Prompts held out of train_split for evaluation (a seeded, deterministic choice) when eval_split is empty."""

    def check(self) -> None:
        require(bool(self.prompts), "data.prompts", "must name 'testbed' or a dataset")
        require(bool(self.prompt_column) or bool(self.prompt_template), "data.prompt_column",
                "must not be empty (or give data.prompt_template)")
        require(self.eval_size >= 0, "data.eval_size", f"must be >= 0, got {self.eval_size}")
        require(self.prompt_words >= 0, "data.prompt_words", f"must be >= 0, got {self.prompt_words}")
        require(bool(self.train_split), "data.train_split", "must not be empty")
        require(not (self.eval_split and self.eval_size), "data.eval_size",
                f"give data.eval_split ({self.eval_split!r}) or data.eval_size, not both")
        require(self.eval_split != self.train_split, "data.eval_split",
                f"is the train split ({self.train_split!r}); eval prompts must be held out (or set data.eval_size)")
        if self.prompts == "testbed":
            # the testbed's prompts are plain strings in fixed splits: these keys would be silently ignored
            for key, default in (("prompt_column", "prompt"), ("prompt_template", ""), ("train_split", "train"),
                                 ("eval_split", ""), ("eval_size", 0)):
                require(getattr(self, key) == default, f"data.{key}",
                        "applies to a dataset, and data.prompts is 'testbed'")
        if self.prompt_template:
            import string

            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(self.prompt_template) if f is not None]
            except ValueError as exc:
                raise ConfigError(f"data.prompt_template: not a valid format string ({exc})") from None
            require(all(f and f.isidentifier() for f in fields), "data.prompt_template",
                    f"fields must be column names, e.g. {{instruction}}; got {self.prompt_template!r}")


@dataclass(frozen=True)
class LabelConfig:
    """method label_preferences: the gold-labelled preference data of Gao et al. 2022 §2 and Coste
    et al. 2023 §4 — responses of the initial policy, paired, labelled by gold, with label noise."""

    responses_per_prompt: int = 2
    """Responses sampled per train prompt (>= 2); consecutive responses form disjoint pairs."""
    noise: float = 0.25
    """Fraction of the labels flipped at random, seeded (Coste et al. use 0.25)."""
    max_prompts: int = 0
    """Label only the first max_prompts train prompts; 0 uses them all."""
    max_new_tokens: int = 48
    """Response length cap."""
    temperature: float = 1.0
    """Sampling temperature (the initial policy's own distribution at 1.0)."""
    top_p: float = 1.0
    """Nucleus sampling."""
    batch_size: int = 64
    """Prompts per generation batch."""
    chunk_prompts: int = 512
    """Prompts per resumable chunk: a killed run redoes at most one chunk per rank."""
    card_rows: int = 5
    """Example rows shown as a table in the dataset card (preferences/README.md)."""

    def check(self) -> None:
        require(self.responses_per_prompt >= 2, "label.responses_per_prompt",
                f"must be >= 2 (a pair needs two responses), got {self.responses_per_prompt}")
        _fraction(self, "label", "noise")
        require(self.noise < 0.5, "label.noise", f"must be below 0.5 (0.5 is coin-flip labels), got {self.noise}")
        require(self.max_prompts >= 0, "label.max_prompts", f"must be >= 0, got {self.max_prompts}")
        _positive(self, "label", "max_new_tokens", "temperature", "batch_size", "chunk_prompts")
        require(self.card_rows >= 0, "label.card_rows", f"must be >= 0, got {self.card_rows}")
        require(0 < self.top_p <= 1, "label.top_p", f"must be in (0, 1], got {self.top_p}")


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
    pool: str = ""
    """An existing scored pool to use instead of sampling one: a dataset (path or hub name) with
    prompt, response and gold score columns (and member scores when present; missing ones are computed
    by the proxies), e.g. Coste et al.'s released gold-scored generations."""
    pool_scores: Literal["rescore", "keep"] = "rescore"
    """What to do with member scores a bon.pool carries: rescore its responses with this run's proxies
    (the curves are then this ensemble's, e.g. another proxy kind on the same pool), or keep them (the
    pool's own ensemble, e.g. released scores; their member count must equal proxy.k)."""
    selectors: list[str] = field(default_factory=list)
    """Selectors curved on the same pool besides argmax best-of-n: rbon_kl (regularized best-of-n,
    objective + alpha * log pi_ref; Jinnai et al. 2024) and soft (pick y_i with probability
    proportional to exp(r_i / lambda); Verdun et al. 2025). Empty: none."""
    rbon_alphas: list[float] = field(default_factory=lambda: [0.01, 0.03, 0.1, 0.3])
    """alpha grid of rbon_kl (>= 0), weight of the summed response log-prob under the initial policy."""
    soft_temperatures: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0])
    """lambda grid of soft best-of-n (> 0), in units of the aggregated objective."""
    selector_aggregators: list[str] = field(default_factory=lambda: ["member_0"])
    """Aggregated objectives the selectors act on; 'members' expands to member_0 .. member_{K-1}."""

    SELECTORS = ("rbon_kl", "soft")  # no annotation: a class constant, not a config key

    def check(self) -> None:
        _positive(self, "bon", "pool_size", "max_new_tokens", "batch_size", "temperature")
        for i, name in enumerate(self.selectors):
            require(name in self.SELECTORS, f"bon.selectors[{i}]",
                    f"unknown selector {name!r} (known: {', '.join(self.SELECTORS)})")
        for i, alpha in enumerate(self.rbon_alphas):
            require(alpha >= 0, f"bon.rbon_alphas[{i}]", f"must be >= 0, got {alpha}")
        for i, temperature in enumerate(self.soft_temperatures):
            require(temperature > 0, f"bon.soft_temperatures[{i}]", f"must be positive, got {temperature}")
        for i, agg in enumerate(self.selector_aggregators):
            if agg != "members":
                check_aggregator_name(agg, f"bon.selector_aggregators[{i}]")
        if self.selectors:
            require(len(self.selector_aggregators) > 0, "bon.selector_aggregators",
                    "must name at least one aggregator when bon.selectors is set")
            require("rbon_kl" not in self.selectors or len(self.rbon_alphas) > 0, "bon.rbon_alphas",
                    "must hold at least one alpha when bon.selectors has rbon_kl")
            require("soft" not in self.selectors or len(self.soft_temperatures) > 0, "bon.soft_temperatures",
                    "must hold at least one temperature when bon.selectors has soft")
        require(0 < self.top_p <= 1, "bon.top_p", f"must be in (0, 1], got {self.top_p}")
        for i, agg in enumerate(self.aggregators):
            if agg != "members":
                check_aggregator_name(agg, f"bon.aggregators[{i}]")
        require(len(self.aggregators) > 0, "bon.aggregators", "must name at least one aggregator")
        for i, n in enumerate(self.n_grid):
            require(1 <= n <= self.pool_size, f"bon.n_grid[{i}]",
                    f"n={n} must be between 1 and bon.pool_size ({self.pool_size})")
