"""The testbed's gold reward: a rule-based judge of a whole review, in pure Python plus VADER.

    gold = sentiment - repetition - eos - length

- sentiment: VADER compound score in [-1, 1] of the full review, prompt + response (Hutto and
  Gilbert 2014). VADER reads negation ("not good"), intensifiers and dampeners ("very",
  "barely") and contrast ("X, but Y" weighs Y more), so the reward is not a bag of words.
- repetition: `repetition_weight * (1 - distinct word bigrams / word bigrams)` of the full
  review, a degeneracy penalty (0 for a text with no repeated bigram).
- eos: `eos_penalty` when the response never emitted EOS (it was cut at the length cap).
- length: `length_weight * max(0, |n - length_target| - length_tolerance) / length_target`,
  with `n` the response's word count: free inside the band `length_target +- length_tolerance`
  and a linear cost per word outside it, in units of the target.

Why these terms (measured with a prototype of this testbed): overoptimization shows clearly only when gold values something
the preference data rarely shows. Responses of the initial policy almost always end with EOS and
almost never leave the length band, so labelled pairs hardly ever exercise the EOS and length
terms; proxies learn sentiment (and that longer effusive reviews score higher on it) and push a
policy into long, cut-off reviews that gold punishes — the testbed's analogue of length hacking
against human raters.

Deterministic, no torch model, thousands of reviews per second (the VADER analyzer is built once
and cached).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from rlhf_overopt.config.sections import TestbedConfig

_WORD = re.compile(r"[a-z0-9']+")


@functools.lru_cache(maxsize=1)
def _analyzer():
    """The VADER analyzer; building it reads the lexicon (~15 ms), so it is built once."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def sentiment(text: str) -> float:
    """VADER compound score of `text`, in [-1, 1]."""
    return float(_analyzer().polarity_scores(text)["compound"])


def words(text: str) -> list[str]:
    """Lower-cased words of `text` without punctuation (so "great. great." repeats a bigram)."""
    return _WORD.findall(text.lower())


def distinct_bigram_ratio(tokens: Sequence[str]) -> float:
    """Distinct bigrams / bigrams of a word sequence; 1.0 when it has fewer than two words."""
    bigrams = list(itertools.pairwise(tokens))
    if not bigrams:
        return 1.0
    return len(set(bigrams)) / len(bigrams)


def response_length(response: str) -> int:
    """Words in a response (whitespace-separated), the unit of the gold length term."""
    return len(response.split())


@dataclass(frozen=True)
class TestbedGold:
    """Gold reward of the testbed; see the module docstring for the formula and its rationale."""

    __test__ = False  # not a pytest class despite the name

    eos_penalty: float = 2.0
    """Subtracted when the response never emitted EOS."""
    repetition_weight: float = 1.0
    """Weight of (1 - distinct word-bigram ratio) of the full review."""
    length_target: int = 15
    """Centre of the penalty-free band of response lengths, in words."""
    length_tolerance: int = 15
    """Half-width of the penalty-free band, in words."""
    length_weight: float = 2.0
    """Gold lost per `length_target` words outside the band."""

    @classmethod
    def from_config(cls, cfg: TestbedConfig) -> TestbedGold:
        """The gold scorer described by a TestbedConfig."""
        return cls(
            eos_penalty=cfg.gold_eos_penalty,
            repetition_weight=cfg.gold_repetition_weight,
            length_target=cfg.gold_length_target,
            length_tolerance=cfg.gold_length_tolerance,
            length_weight=cfg.gold_length_weight,
        )

    def components(self, prompts: Sequence[str], responses: Sequence[str],
                   ended: Sequence[bool]) -> dict[str, torch.Tensor]:
        """Each gold term separately, signed as it enters the score; every tensor (B,) float32.

        Keys: "sentiment" (VADER compound of prompt + response), "repetition" (<= 0),
        "eos" (<= 0), "length" (<= 0). Their sum is `score`. `responses` are texts without the
        EOS token; `ended[i]` says whether response i emitted EOS.
        """
        if not (len(prompts) == len(responses) == len(ended)):
            raise ValueError(f"TestbedGold: got {len(prompts)} prompts, {len(responses)} responses, "
                             f"{len(ended)} ended flags")
        senti, rep, eos, length = [], [], [], []
        for prompt, response, done in zip(prompts, responses, ended):
            review = prompt + response
            senti.append(sentiment(review))
            rep.append(-self.repetition_weight * (1.0 - distinct_bigram_ratio(words(review))))
            eos.append(0.0 if done else -self.eos_penalty)
            outside = max(0, abs(response_length(response) - self.length_target) - self.length_tolerance)
            length.append(-self.length_weight * outside / self.length_target)
        as_tensor = functools.partial(torch.tensor, dtype=torch.float32)
        return {"sentiment": as_tensor(senti), "repetition": as_tensor(rep), "eos": as_tensor(eos),
                "length": as_tensor(length)}

    def score(self, prompts: Sequence[str], responses: Sequence[str], ended: Sequence[bool]) -> torch.Tensor:
        """Gold score (B,) float32 of each review prompt[i] + responses[i]."""
        parts = self.components(prompts, responses, ended)
        # Sum in a fixed order so the float result is reproducible bit for bit.
        return parts["sentiment"] + parts["repetition"] + parts["eos"] + parts["length"]
