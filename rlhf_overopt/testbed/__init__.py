"""The embedded testbed: an offline world of generated reviews, a BPE tokenizer, a small SFT
policy, a rule-based gold reward, prompts and gold-labelled preferences.

`build_testbed(cfg)` builds it once per config into a content-hashed cache and returns a
`Testbed` of paths with loaders; `TestbedGold` is the gold reward.
"""

from rlhf_overopt.testbed.build import TESTBED_VERSION, Testbed, build_testbed, config_hash, resolve_root
from rlhf_overopt.testbed.corpus import generate_reviews
from rlhf_overopt.testbed.data import PREF_COLUMNS, sample_responses
from rlhf_overopt.testbed.gold import TestbedGold
from rlhf_overopt.testbed.sft import train_sft_policy
from rlhf_overopt.testbed.tokenizer import EOS_TOKEN, PAD_TOKEN, load_tokenizer, train_tokenizer

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "PREF_COLUMNS",
    "TESTBED_VERSION",
    "Testbed",
    "TestbedGold",
    "build_testbed",
    "config_hash",
    "generate_reviews",
    "load_tokenizer",
    "resolve_root",
    "sample_responses",
    "train_sft_policy",
    "train_tokenizer",
]
