"""The embedded testbed: an offline world of generated reviews, a BPE tokenizer, a small SFT
policy, a rule-based gold reward, prompts and gold-labelled preferences.

    build.py       build_testbed(cfg): builds it once per config into a content-hashed cache and
                   returns a `Testbed` of paths with loaders
    corpus.py      the seeded review generator (the pre-training corpus)
    tokenizer.py   the byte-level BPE tokenizer trained on it
    sft.py         supervised training of the initial policy
    gold.py        `TestbedGold`, the rule-based gold reward
    data.py        prompts and the gold-labelled preference dataset
"""
