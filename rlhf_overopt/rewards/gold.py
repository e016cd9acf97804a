"""The gold stage: the reward that every method is evaluated with and none optimizes.

`gold.path == "testbed"` selects the testbed's rule-based gold (`TestbedGold`); any other value is
a local folder or hub name of a Hugging Face sequence-classification model (a reward model with
one output, or a two-class classifier whose positive-minus-negative logit is the score, as in the
sentiment-classifier golds of Rafailov et al. 2023 and Rho 2025). Either way the input is the
text `prompt + response`, with the gold tokenizer's EOS token text appended when the response
ended, so a model gold can tell finished from cut-off responses too. A model gold runs in
gold.dtype and returns float32 scores; `check_context` refuses one too short for a response.

    prompts, responses, ended  ─▶  GoldScorer.score  ─▶  gold_score (B,)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhf_overopt.config.experiment import Config
from rlhf_overopt.errors import InputError
from rlhf_overopt.testbed.gold import TestbedGold

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from rlhf_overopt.testbed.build import Testbed

logger = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda when available; otherwise the named device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class GoldScorer:
    """Scores (prompt, response, ended) triples with the testbed gold or a classification model.

    Build it with `from_config` (or `from_pretrained` for a model); `score` returns (B,) float32
    on the CPU, whatever device a model gold runs on.
    """

    def __init__(self, *, testbed_gold: TestbedGold | None = None, model: PreTrainedModel | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 64, path: str = "") -> None:
        if (testbed_gold is None) == (model is None):
            raise ValueError("GoldScorer: give exactly one of testbed_gold or model")
        if model is not None and tokenizer is None:
            raise ValueError("GoldScorer: a model gold needs its tokenizer")
        self.testbed_gold = testbed_gold
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.path = str(path)

    @classmethod
    def from_config(cls, cfg: Config, testbed: Testbed | None = None) -> GoldScorer:
        """The gold of `cfg.gold`: the testbed's rule-based gold, or a model loaded from its path.

        `testbed` is optional for the testbed gold (its parameters are in `cfg.testbed`); when
        given, a mismatch between the config it was built from and `cfg.testbed` is logged,
        since its preferences were then labelled by another gold.
        """
        if cfg.gold.path == "testbed":
            if testbed is not None:
                from rlhf_overopt.testbed.build import config_hash

                if config_hash(testbed.config()) != config_hash(cfg.testbed):
                    logger.warning("gold: the testbed at %s was built from another testbed config than "
                                   "cfg.testbed; scoring with cfg.testbed's gold", testbed.root)
            return cls(testbed_gold=TestbedGold.from_config(cfg.testbed))
        return cls.from_pretrained(cfg.gold.path, batch_size=cfg.gold.batch_size,
                                   trust_remote_code=cfg.gold.trust_remote_code, device=resolve_device(cfg.device),
                                   dtype=getattr(torch, cfg.gold.dtype))

    @classmethod
    def from_pretrained(cls, path: str | Path, batch_size: int = 64, trust_remote_code: bool = False,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> GoldScorer:
        """Load a sequence-classification gold (1 label: reward; 2 labels: positive-class log-odds)
        in `dtype` (gold.dtype; scores are returned float32 either way).

        Safetensors weights are required when the folder has them and preferred otherwise.
        Batches are right-padded; truncation keeps the end of long texts, where the response and
        its EOS are. A tokenizer without a pad token, or with pad = EOS (Llama's), gets `<|pad|>`
        added and the model a row for it: the classification head takes each row's last token
        that is not the pad id, so with pad = EOS an appended EOS would be read as padding and
        the score taken one token early. The new row is only ever seen at right-padded
        positions, after every real token, so causal attention never reads it: scores of real
        texts are unchanged.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rlhf_overopt.run.models import add_pad_token, fit_embeddings

        local = Path(path).expanduser()
        has_safetensors = local.is_dir() and any(local.glob("*.safetensors"))
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, use_safetensors=True if has_safetensors else None,
            dtype=dtype,
        )
        if model.config.num_labels not in (1, 2):
            raise ValueError(f"gold.path: {path} has {model.config.num_labels} labels; a gold needs 1 (reward) "
                             "or 2 (negative/positive classifier)")
        if tokenizer.eos_token is None and tokenizer.pad_token is None:
            raise InputError(f"gold.path: the tokenizer of {path} has neither a pad nor an EOS token")
        if add_pad_token(tokenizer, f"gold.path {path}"):
            fit_embeddings(model, tokenizer)
        # Sequence-classification heads find each row's last token through the pad id: it must be
        # the id the tokenizer pads with.
        model.config.pad_token_id = tokenizer.pad_token_id
        # Right padding keeps every real token at its unpadded position (absolute-position models
        # such as GPT-2 get no position ids from us), and the classification head finds each
        # row's last real token through the pad id; truncation keeps the end of long texts.
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"
        model.to(device).eval()
        return cls(model=model, tokenizer=tokenizer, batch_size=batch_size, path=str(path))

    def context_limit(self) -> int | None:
        """Tokens a model gold reads at most (its tokenizer's and its positions' limit); None for
        the testbed gold or a model without one."""
        if self.model is None or self.tokenizer is None:
            return None
        limit = self.tokenizer.model_max_length
        limit = limit if isinstance(limit, int) and 0 < limit < 10**8 else None  # "no limit" sentinel
        from rlhf_overopt.run.models import context_length

        positions = context_length(self.model.config)
        if positions is not None and (limit is None or limit > positions):
            limit = positions
        return limit

    def check_context(self, prompt_tokens_max: int, max_new_tokens: int) -> None:
        """Refuse, before any work, a gold whose context cannot hold a full response and its EOS.

        Truncation keeps the end of a text, so a long prompt only loses its beginning (logged); a
        context under `max_new_tokens + 1` would cut the responses themselves, and every gold
        score would judge a fragment. Lengths are in policy tokens: another tokenizer counts
        differently, so this is a floor. Raises InputError naming gold.path and the lengths.
        """
        limit = self.context_limit()
        if limit is None:
            return
        if limit < max_new_tokens + 1:
            raise InputError(f"gold.path: {self.path} reads at most {limit} tokens, fewer than a full response "
                             f"({max_new_tokens} new tokens + EOS): responses would be truncated away; use a gold "
                             f"with a longer context or fewer max_new_tokens")
        if limit < prompt_tokens_max + max_new_tokens + 1:
            logger.warning("gold.path: %s reads at most %d tokens; prompts of up to %d tokens plus %d new tokens "
                           "+ EOS lose their beginning", self.path, limit, prompt_tokens_max, max_new_tokens)

    def texts(self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool]) -> list[str]:
        """The texts a model gold reads: prompt + response (+ EOS token text when ended)."""
        eos = (self.tokenizer.eos_token or "") if self.tokenizer is not None else ""
        return [p + r + (eos if e else "") for p, r, e in zip(prompts, responses, ended)]

    def score(self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool]) -> torch.Tensor:
        """gold_score (B,) float32 on the CPU. `responses` exclude EOS; `ended[i]`: it emitted EOS."""
        if not (len(prompts) == len(responses) == len(ended)):
            raise ValueError(f"GoldScorer: got {len(prompts)} prompts, {len(responses)} responses, "
                             f"{len(ended)} ended flags")
        if self.testbed_gold is not None:
            return self.testbed_gold.score(prompts, responses, ended)
        return self._model_score(self.texts(prompts, responses, ended))

    def components(self, prompts: Sequence[str], responses: Sequence[str],
                   ended: Sequence[bool]) -> dict[str, torch.Tensor]:
        """The gold's terms, each (B,): the testbed's sentiment/repetition/eos/length, or {"score"}."""
        if self.testbed_gold is not None:
            return self.testbed_gold.components(prompts, responses, ended)
        return {"score": self.score(prompts, responses, ended)}

    @torch.no_grad()
    def _model_score(self, texts: list[str]) -> torch.Tensor:
        assert self.model is not None and self.tokenizer is not None
        device = next(self.model.parameters()).device
        limit = self.context_limit()
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=limit is not None, max_length=limit).to(device)
            logits = self.model(**enc).logits.float()  # (b, num_labels)
            out.append((logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]).cpu())
        if not out:
            return torch.zeros(0, dtype=torch.float32)
        return torch.cat(out)
