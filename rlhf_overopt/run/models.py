"""Loading Hugging Face models and tokenizers, and scalar reward models built from them.

A proxy (or gold) reward model here is any `AutoModelForSequenceClassification` with
`num_labels=1`: the transformers class reads the score at the last non-pad token, so a
checkpoint of any architecture can be an ensemble member. `reward_model_from_pretrained` builds
one from a causal-LM checkpoint (the SFT policy): transformer weights copied, the LM head
dropped, a fresh scalar head initialized N(0, std = 1/sqrt(d + 1)) (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO";
Ziegler et al. 2019), optionally keeping only the first `n_layer` blocks.

Inputs follow the left-padding contract of the whole framework: a pad token distinct from EOS,
padding on the left, position ids that count real tokens only (`position_ids_from_mask`), so a
padded row scores exactly like the same row without padding (Huang et al. 2024). A policy
tokenizer without such a pad (Pythia, Llama) gets `<|pad|>` from `load_tokenizer`, and the models
that read its ids grow a row for it (`fit_embeddings`); proxy/ensemble tokenizers are only
checked (`check_tokenizer`), never modified here.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from rlhf_overopt.errors import InputError
from rlhf_overopt.ops.masking import position_ids_from_mask

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------------
# Quiet loading
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports and per-shard progress bars for the block, then restore.

    Building a reward model from a causal LM always reports the dropped LM head and the new
    score head as unexpected/missing keys; that is the intended outcome, not news for the user.
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            # peft switches Conv1D targets to fan_in_fan_out itself; transformers deprecations
            # raised from inside peft are not actionable here.
            warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------
# Dropout
# ---------------------------------------------------------------------------------------------


def _is_dropout_name(name: str) -> bool:
    lowered = name.lower()
    return "dropout" in lowered or "pdrop" in lowered


def _zero_config_dropout(config: object, seen: set[int]) -> None:
    """Set every float `*dropout*` / `*pdrop*` attribute of a config (and sub-configs) to 0."""
    if id(config) in seen:
        return
    seen.add(id(config))
    from transformers import PretrainedConfig

    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _zero_config_dropout(value, seen)
        elif _is_dropout_name(name) and isinstance(value, float):
            setattr(config, name, 0.0)


def set_dropout_zero(model: nn.Module) -> nn.Module:
    """Switch off every dropout of `model` in place, in train mode too; returns the model.

    Three places hold dropout in transformers models: config attributes (`attn_pdrop`,
    `attention_dropout`, ... read when modules are built or at forward time), `nn.Dropout`
    modules, and float attributes of attention modules read at forward time (e.g.
    `self.attention_dropout` passed to SDPA). All three are zeroed, so `model.train()` for
    gradients computes exactly what `model.eval()` computes — PPO log-prob ratios and reward
    training both rely on it (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO": dropout off).
    """
    seen: set[int] = set()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            _zero_config_dropout(config, seen)
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if _is_dropout_name(name) and isinstance(value, float):
                setattr(module, name, 0.0)
    return model


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_causal_lm(
    path: PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    dropout_off: bool = True,
    tokenizer=None,
) -> nn.Module:
    """Load a causal LM (local folder or hub name) in eval mode.

    Weights are read from safetensors files when the checkpoint has them (transformers'
    default preference); dtype float32 is the right choice on CPU (bf16 matmuls measured ~100x slower there).
    With `dropout_off`, every dropout probability is set to 0 (see `set_dropout_zero`). With a
    `tokenizer` (e.g. one `load_tokenizer` gave a pad token), embeddings with fewer rows than
    the tokenizer has tokens are grown to fit (`fit_embeddings`); otherwise nothing changes.
    """
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=dtype, trust_remote_code=trust_remote_code
        )
    model.eval()
    if tokenizer is not None:
        fit_embeddings(model, tokenizer)
    if dropout_off:
        set_dropout_zero(model)
    return model


PAD_TOKEN = "<|pad|>"
"""The pad token `load_tokenizer` adds to a tokenizer without one distinct from EOS."""

_ANNOUNCED_PADS: set[str] = set()


def add_pad_token(tokenizer, where: str = "") -> bool:
    """Give a tokenizer whose pad is missing or equal to EOS the pad token `<|pad|>`; True if it did.

    Pythia and Llama tokenizers ship without a pad (or with pad = EOS); the left-padding contract
    needs a pad distinct from EOS (Huang et al. 2024, "The N+ Implementation Details of RLHF with
    PPO"), so one is added and the models reading this tokenizer's ids get a row for it
    (`fit_embeddings`). Said once per `where` in the log, however often the tokenizer is loaded.
    """
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if eos is None or (pad is not None and pad != eos):
        return False
    tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    if where not in _ANNOUNCED_PADS:
        _ANNOUNCED_PADS.add(where)
        logger.info("%s: the tokenizer had %s; padding with %s (id %d) instead, and a model with fewer "
                    "than %d embedding rows gets a row for it", where or "tokenizer",
                    "no pad token" if pad is None else "pad = EOS", PAD_TOKEN, tokenizer.pad_token_id,
                    len(tokenizer))
    return True


def _grow_rows_to_mean(embedding: nn.Module, old_rows: int) -> None:
    with torch.no_grad():
        weight = embedding.weight
        weight[old_rows:] = weight[:old_rows].float().mean(dim=0).to(weight.dtype)


def fit_embeddings(model: nn.Module, tokenizer) -> bool:
    """Grow the model's input (and untied output) embeddings by the one row of the pad token
    `add_pad_token` appended; True if it did. A model with enough rows is left untouched
    (bit-identical), and so is one short of other tokens: that is a mismatched vocabulary (a
    tokenizer of another model), which `check_vocabulary` reports rather than hides.

    New rows are set to the mean of the existing ones, deterministically (no random draw): the
    policy, its reference and the value backbone, each resized on its own, must agree exactly,
    or the KL would not start at 0.
    """
    embeddings = model.get_input_embeddings()
    old_rows, wanted = embeddings.num_embeddings, len(tokenizer)
    if wanted <= old_rows:
        return False
    if not (wanted == old_rows + 1 and tokenizer.pad_token == PAD_TOKEN and tokenizer.pad_token_id == old_rows):
        return False
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    untied = output is not None and output.weight is not embeddings.weight
    output_rows = output.weight.shape[0] if output is not None else None
    # transformers draws the new rows from the global RNG before we overwrite them; keep the
    # draw from shifting everything seeded after loading (e.g. the value heads).
    with torch.random.fork_rng(devices=[]):
        model.resize_token_embeddings(wanted, mean_resizing=False)
    _grow_rows_to_mean(model.get_input_embeddings(), old_rows)
    if untied and output_rows == old_rows:
        out = model.get_output_embeddings()
        _grow_rows_to_mean(out, old_rows)
        if getattr(out, "bias", None) is not None:
            with torch.no_grad():
                out.bias[old_rows:] = out.bias[:old_rows].float().mean().to(out.bias.dtype)
    logger.debug("resized %s embeddings from %d to %d rows", type(model).__name__, old_rows, wanted)
    return True


def check_tokenizer(tokenizer) -> None:
    """Raise InputError (a ValueError) unless the tokenizer has an EOS and a pad token distinct from it."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no eos_token; responses could never be marked as ended")
    if pad is None or pad == eos:
        # A pad equal to EOS makes "last real token" and "did the response end" ambiguous for
        # anything that looks at token ids (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO").
        raise InputError(
            f"the tokenizer needs a pad token distinct from EOS (pad_token_id={pad}, "
            f"eos_token_id={eos}); add one, e.g. tokenizer.add_special_tokens("
            "{'pad_token': '<|pad|>'}), and resize the model's embeddings"
        )


def check_vocabulary(tokenizer, model: nn.Module, what: str = "policy.path") -> None:
    """Every token id the tokenizer can produce must have an embedding row in the model."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise InputError(f"{what}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
                         f"{rows} rows (mismatched vocabulary)")


def load_tokenizer(path: PathLike, trust_remote_code: bool = False, *, add_pad: bool = True):
    """Load a tokenizer, pad and truncate on the left; returns it.

    With `add_pad` (the policy's tokenizer) a missing pad, or a pad equal to EOS, becomes the
    added `<|pad|>` (`add_pad_token`, logged once); without it such a tokenizer is refused
    (`check_tokenizer`, ValueError) — for tokenizers whose models must not be modified.
    Left truncation keeps the end of a text: the end of a response (and whether it emitted EOS)
    is what a last-token reward model reads.
    """
    from transformers import AutoTokenizer

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if add_pad:
        add_pad_token(tokenizer, str(path))
    check_tokenizer(tokenizer)
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    return tokenizer


# ---------------------------------------------------------------------------------------------
# Text -> reward-model input
# ---------------------------------------------------------------------------------------------


def tokenize_for_reward(
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    ended: Sequence[bool],
    max_length: int,
    *,
    add_special_tokens: bool = False,
) -> list[list[int]]:
    """Token ids of `prompt + response` (string concatenation), plus EOS where `ended`.

    The EOS is appended as a token id, never as text, so a response that did not emit EOS can
    never look finished. Longer sequences keep their last `max_length` tokens (the end carries
    the score). `add_special_tokens=False` by default: the reward model sees exactly the text
    tokens, as the policy produced them (some tokenizers map BOS to EOS).
    Returns one list of ids per row, unpadded.
    """
    if not len(prompts) == len(responses) == len(ended):
        raise ValueError(
            f"prompts ({len(prompts)}), responses ({len(responses)}) and ended ({len(ended)}) "
            "must have the same length"
        )
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    check_tokenizer(tokenizer)
    eos = tokenizer.eos_token_id
    texts = [p + r for p, r in zip(prompts, responses)]
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]
    out = []
    for i, (ids, end) in enumerate(zip(encoded, ended)):
        ids = list(ids) + ([eos] if bool(end) else [])
        if not ids:
            raise ValueError(f"row {i}: prompt + response is empty and not ended; nothing to score")
        out.append(ids[-max_length:])
    return out


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists into (input_ids (B, T) int64, attention_mask (B, T) int64)."""
    width = max((len(s) for s in sequences), default=0)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            input_ids[i, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            attention_mask[i, width - len(seq) :] = 1
    return input_ids, attention_mask


# ---------------------------------------------------------------------------------------------
# Scalar reward models
# ---------------------------------------------------------------------------------------------


def context_length(config) -> int | None:
    """The model's maximum number of positions, when its config states one."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _truncate_layers(config, n_layer: int) -> None:
    """Keep only the first `n_layer` transformer blocks (config side; weights of the rest are
    simply not loaded)."""
    if n_layer <= 0:
        return
    current = getattr(config, "num_hidden_layers", None)
    if current is None:
        raise ValueError(
            f"cannot truncate {type(config).__name__} to n_layer={n_layer}: its config has no "
            "num_hidden_layers"
        )
    if n_layer > current:
        raise ValueError(f"n_layer={n_layer} exceeds the backbone's {current} layers")
    config.num_hidden_layers = n_layer
    # Newer configs list a per-layer type (sliding vs full attention); keep it consistent.
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == current:
        config.layer_types = layer_types[:n_layer]


def reward_head(model: nn.Module) -> nn.Linear:
    """The scalar head of a sequence-classification model (`score` or `classifier`)."""
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    for name in ("score", "classifier"):
        head = getattr(base, name, None)
        if isinstance(head, nn.Linear):
            return head
        # peft wraps the head of SEQ_CLS adapters (ModulesToSaveWrapper): the active copy.
        active = getattr(head, "modules_to_save", None)
        if isinstance(active, nn.ModuleDict) and head.active_adapters:
            return active[head.active_adapters[0]]
    raise ValueError(f"cannot find a Linear `score` or `classifier` head on {type(base).__name__}")


def init_reward_head_(head: nn.Linear, generator: torch.Generator | None = None) -> nn.Linear:
    """Initialize a reward head in place: weight ~ N(0, std = 1/sqrt(d + 1)), bias 0.

    Source: Ziegler et al. 2019 (lm-human-preferences), kept by the RLHF PPO implementations
    (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO"). d = head.in_features.
    """
    d = head.in_features
    with torch.no_grad():
        noise = torch.randn(head.weight.shape, generator=generator, dtype=torch.float32)
        head.weight.copy_(noise * (1.0 / math.sqrt(d + 1)))
        if head.bias is not None:
            head.bias.zero_()
    return head


def reward_model_from_pretrained(
    path: PathLike,
    *,
    pad_token_id: int,
    seed: int = 0,
    n_layer: int = 0,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    dropout_off: bool = True,
    init_head: bool = True,
) -> nn.Module:
    """A scalar reward model (`AutoModelForSequenceClassification`, num_labels=1) from a checkpoint.

    From a causal LM (the SFT policy) the transformer weights are copied and the LM head is
    dropped; from a sequence-classification checkpoint its weights are loaded (a head of another
    size is replaced). With `init_head` the head is re-initialized N(0, 1/sqrt(d+1)) from a
    generator seeded with `seed`, so ensemble members differ by seed (Coste et al. 2023).
    `n_layer > 0` keeps the first n_layer blocks. `pad_token_id` goes into the config: the
    transformers class finds the last real token as the rightmost non-pad token, which is
    correct with left padding. Returned in eval mode, dropout off unless asked otherwise.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        config.num_labels = 1
        config.pad_token_id = pad_token_id
        config.use_cache = False
        _truncate_layers(config, n_layer)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path),
            config=config,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=True,
        )
    if init_head:
        generator = torch.Generator().manual_seed(seed)
        init_reward_head_(reward_head(model), generator)
    model.eval()
    if dropout_off:
        set_dropout_zero(model)
    return model


def backbone_from_pretrained(
    path: PathLike,
    *,
    n_layer: int = 0,
    dtype: torch.dtype = torch.float32,
    trust_remote_code: bool = False,
    dropout_off: bool = True,
) -> nn.Module:
    """The headless transformer (`AutoModel`) of a causal-LM or reward-model checkpoint.

    Used by the shared-backbone (multi-head) ensemble. `n_layer > 0` keeps the first n_layer
    blocks. Eval mode, dropout off unless asked otherwise.
    """
    from transformers import AutoConfig, AutoModel

    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        config.use_cache = False
        _truncate_layers(config, n_layer)
        model = AutoModel.from_pretrained(
            str(path), config=config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    model.eval()
    if dropout_off:
        set_dropout_zero(model)
    return model


def _accepts_position_ids(model: nn.Module) -> bool:
    from peft import PeftModel

    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return "position_ids" in inspect.signature(base.forward).parameters


def reward_scores(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar scores of a sequence-classification reward model on left-padded input.

    Position ids are derived from the mask (when the model takes them) so padding does not
    shift positions. input_ids, attention_mask: (B, T). Returns (B,) float (gradients kept;
    wrap in torch.no_grad() for scoring).
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if _accepts_position_ids(model):
        kwargs["position_ids"] = position_ids_from_mask(attention_mask)
    logits = model(**kwargs).logits
    if logits.dim() != 2 or logits.shape[-1] != 1:
        raise ValueError(f"a reward model must output (B, 1) logits, got {tuple(logits.shape)}")
    return logits[:, 0]


def model_device(model: nn.Module) -> torch.device:
    """Device of a model's first parameter (CPU for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")
