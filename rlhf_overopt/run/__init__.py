"""What every run stands on, whatever the method.

    directory.py    the run directory (config.yaml, curves.jsonl, summary.json, samples.jsonl), atomic writes
    lifecycle.py    the run lifecycle around a driver: process group, threads, seeds, run directory, testbed
    dist.py         ranks and cross-rank math: one code path for `python` and `deepspeed` launches
    identity.py     what a run's seed fixed (proxies, initial policy, eval prompts), recorded under _meta.identity
    seeds.py        every seed a run draws from
    models.py       loading Hugging Face models and tokenizers, scalar reward models built from them
    engines.py      DeepSpeed engines for trained and frozen models
    checkpoints.py  exact resume
    tracking.py     Weights & Biases (offline by default)
    progress.py     progress bars that stay readable in log files
    preflight.py    `launch/train.py --check`: a config resolved into its run's plan without loading weights
"""
