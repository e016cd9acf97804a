"""Byte-level BPE tokenizer of the testbed, trained on its corpus with the `tokenizers` library.

Byte-level BPE (as in GPT-2) maps every string to tokens without an unknown token, and with no
prefix space and no normalizer `decode(encode(text)) == text` holds exactly, which the gold
scorer relies on (it scores decoded responses). The pad token is distinct from EOS so that
padding can never be mistaken for a finished response (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO").
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
"""End of a review; the policy must learn to emit it."""
PAD_TOKEN = "<|pad|>"
"""Padding only; never a training target."""
SPECIAL_TOKENS: tuple[str, ...] = (EOS_TOKEN, PAD_TOKEN)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of `vocab_size` tokens (specials included) and save it to `out_dir`.

    Returns the wrapped tokenizer: EOS "<|endoftext|>" (also used as BOS/UNK so that generic code
    that asks for them gets a real token), PAD "<|pad|>", left padding (generation needs the
    prompt to end at the same position in every row).
    """
    n_specials = len(SPECIAL_TOKENS)
    base = len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < base + n_specials:
        raise ValueError(f"train_tokenizer: vocab_size must be >= {base + n_specials}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    # add_prefix_space=False keeps the encoding of a text independent of what precedes it, so a
    # prompt's tokens are a prefix of the tokens of prompt + response whenever the response
    # starts with a space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Sorted input makes the merge order independent of how the caller ordered the corpus.
    tok.train_from_iterator(sorted(texts), trainer=trainer)
    wrapped = wrap_tokenizer(tok)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out))
    return wrapped


def wrap_tokenizer(tok: Tokenizer) -> PreTrainedTokenizerFast:
    """Wrap a raw `tokenizers.Tokenizer` with the testbed's special tokens and padding side."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        truncation_side="left",
        model_max_length=1_000_000,
        # Cleaning would remove spaces before punctuation and break the exact round trip.
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by `train_tokenizer` (left padding, distinct PAD and EOS)."""
    tok = PreTrainedTokenizerFast.from_pretrained(str(path))
    tok.padding_side = "left"
    return tok
