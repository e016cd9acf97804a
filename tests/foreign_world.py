"""A user's own world, built from nothing for tests: tiny random-init checkpoints of real
architectures saved to disk with their own tokenizers, and instruction prompts in a jsonl.

    policy   GPT-NeoX (Pythia's architecture: rotary, parallel residual, untied embeddings), its own
             byte-level BPE tokenizer with an EOS and NO pad token (as Pythia ships)
    gold     Llama-architecture sequence classifier (1 label) with a *different* tokenizer
    proxy    Llama-architecture causal LM (a proxy backbone) with the gold's tokenizer family
    prompts  instruction / input rows (AlpacaFarm's columns), some inputs empty

Nothing is downloaded: every file is written by transformers/tokenizers here.
"""

from __future__ import annotations

import json
from pathlib import Path

WORDS = ("the film was good bad great awful plot acting score not very but boring fun story ending "
         "write a short review of movie explain why summarize this text list three reasons").split()


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def bpe_tokenizer(out: Path, *, vocab_size: int, eos: str, pad: str | None, bos: str | None = None,
                  seed: int = 0):
    """A byte-level BPE tokenizer trained on the word list, saved to `out` (save_pretrained)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (eos, pad, bos) if t]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(seed=seed), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    kwargs = {"eos_token": eos, **({"pad_token": pad} if pad else {}), **({"bos_token": bos} if bos else {})}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.save_pretrained(out)
    return fast


def neox_policy(out: Path, *, seed: int = 0) -> Path:
    """A tiny GPT-NeoX causal LM with its own tokenizer (EOS, no pad), saved to `out`."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tok = bpe_tokenizer(out, vocab_size=320, eos="<|endoftext|>", pad=None, seed=seed)
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, rotary_pct=0.25,
                        eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, tie_word_embeddings=False,
                        hidden_dropout=0.0, attention_dropout=0.0)
    GPTNeoXForCausalLM(cfg).save_pretrained(out)
    return out


def llama_model(out: Path, *, kind: str, seed: int = 1, max_positions: int = 256) -> Path:
    """A tiny Llama-architecture model ("classifier": 1-label sequence classifier; "causal": LM)
    with a different tokenizer (BOS and EOS, no pad), saved to `out`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tok = bpe_tokenizer(out, vocab_size=360, eos="</s>", pad=None, bos="<s>", seed=seed)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=max_positions,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, num_labels=1,
                      tie_word_embeddings=False)
    model = LlamaForSequenceClassification(cfg) if kind == "classifier" else LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    return out


def instruction_prompts(out: Path, n: int = 48, seed: int = 2) -> Path:
    """A jsonl of AlpacaFarm-style rows: instruction, input (every third one empty), id."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        instruction = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))).capitalize() + "."
        text = "" if i % 3 == 0 else " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        rows.append({"id": i, "instruction": instruction, "input": text})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def build(root: Path) -> dict[str, Path]:
    """Every part of the foreign world under `root`; returns their paths."""
    root = Path(root)
    return {"policy": neox_policy(root / "policy"), "gold": llama_model(root / "gold", kind="classifier"),
            "proxy_backbone": llama_model(root / "proxy_backbone", kind="causal", seed=3),
            "prompts": instruction_prompts(root / "prompts.jsonl")}


if __name__ == "__main__":
    import sys

    paths = build(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/foreign_world/models"))
    for name, path in paths.items():
        print(f"{name}: {path}")
