"""The gold stage: the reward that every method is evaluated with and none optimizes.

`gold.path == "testbed"` selects the testbed's rule-based gold (`TestbedGold`); any other value is
a local folder or hub name of a Hugging Face sequence-classification model (a reward model with
one output, or a two-class classifier whose positive-minus-negative logit is the score, as in the
sentiment-classifier golds of Rafailov et al. 2023 and Rho 2025). Either way the input is the
text `prompt + response`, with the gold tokenizer's EOS token text appended when the response
ended, so a model gold can tell finished from cut-off responses too.

    prompts, responses, ended  ─▶  GoldScorer.score  ─▶  gold_score (B,)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rlhf_overopt.config import Config
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
                 tokenizer: PreTrainedTokenizerBase | None = None, batch_size: int = 64) -> None:
        if (testbed_gold is None) == (model is None):
            raise ValueError("GoldScorer: give exactly one of testbed_gold or model")
        if model is not None and tokenizer is None:
            raise ValueError("GoldScorer: a model gold needs its tokenizer")
        self.testbed_gold = testbed_gold
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size

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
                                   trust_remote_code=cfg.gold.trust_remote_code, device=resolve_device(cfg.device))

    @classmethod
    def from_pretrained(cls, path: str | Path, batch_size: int = 64, trust_remote_code: bool = False,
                        device: str | torch.device = "cpu") -> GoldScorer:
        """Load a sequence-classification gold (1 label: reward; 2 labels: positive-class log-odds).

        Safetensors weights are required when the folder has them and preferred otherwise. A
        tokenizer without a pad token pads with EOS (then an appended EOS looks like padding to
        heads that locate the last token by the pad id: give such a gold a distinct pad token).
        Batches are right-padded; truncation keeps the end of long texts, where the response and
        its EOS are.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        local = Path(path).expanduser()
        has_safetensors = local.is_dir() and any(local.glob("*.safetensors"))
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, use_safetensors=True if has_safetensors else None,
            dtype=torch.float32,
        )
        if model.config.num_labels not in (1, 2):
            raise ValueError(f"gold.path: {path} has {model.config.num_labels} labels; a gold needs 1 (reward) "
                             "or 2 (negative/positive classifier)")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if model.config.pad_token_id is None:
            # Sequence-classification heads find each row's last token through the pad id.
            model.config.pad_token_id = tokenizer.pad_token_id
        # Right padding keeps every real token at its unpadded position (absolute-position models
        # such as GPT-2 get no position ids from us), and the classification head finds each
        # row's last real token through the pad id; truncation keeps the end of long texts.
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "left"
        model.to(device).eval()
        return cls(model=model, tokenizer=tokenizer, batch_size=batch_size)

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
        limit = self.tokenizer.model_max_length
        positions = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", None)
        if positions is not None and (limit is None or limit > positions):
            limit = positions
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=limit is not None, max_length=limit).to(device)
            logits = self.model(**enc).logits.float()  # (b, num_labels)
            out.append((logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]).cpu())
        if not out:
            return torch.zeros(0, dtype=torch.float32)
        return torch.cat(out)
