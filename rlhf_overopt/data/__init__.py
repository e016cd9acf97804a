"""The worlds' data.

    prompts.py         the initial policy's path and the train / eval prompts (testbed, file, folder, hub)
    preferences.py     preference pairs: reading, normalizing, validating, tokenized pair batches
    labeling.py        gold-labelled pairs from the initial policy's responses (Gao et al. 2022 §2)
    pool_sampling.py   the gold-scored best-of-n pool sampled from the initial policy (Gao et al. 2022 §3.1)
"""
