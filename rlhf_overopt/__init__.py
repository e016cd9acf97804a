"""rlhf_overopt: a research framework for reward-model overoptimization in RLHF.

A policy is optimized against proxy reward models (an ensemble of K, combined by an aggregation
rule) and scored by a gold reward it never optimizes; gold and proxy are drawn against
d = sqrt(KL(pi || pi_init)). The folders are the pipeline's stages; each folder's docstring maps
its modules.

    config/      one YAML -> typed, self-checking sections; the ONE method table; loading,
                 validation, the plan of derived sizes
    data/        the worlds' data: prompts, preference pairs (one schema), gold labelling, the
                 best-of-n pool sampled from the initial policy
    rewards/     proxies (ensemble, member kinds, Bradley-Terry training, the load-or-train cache),
                 gold, component rewards, MADPO margins, reward functions for TRL trainers
    ops/         pure torch math: losses, advantages, kl, masking, aggregate, bon, constrained,
                 shaping, scaling fits, weight averaging, signals (imports nothing else of the project)
    run/         what every run stands on: run directory, lifecycle, ranks, seeds, models,
                 DeepSpeed engines, checkpoints, tracking, progress, --check
    testbed/     the embedded offline world: corpus, tokenizer, SFT policy, rule gold, prompts, pairs
    loops/       one readable driver per method, numbered stages; reached only through the method
                 table (launch/train.py), and no driver imports another

The stages of one RL iteration, in the order a driver calls them:

    prompts ──▶ rollout ──▶ proxy ensemble ──▶ aggregate ──▶ advantages ──▶ update ──▶ gold eval ──▶ curves
    data/       rollout.py  rewards/ensemble   ops/          ops/           update.py  evaluate.py  run/directory
                values.py   rewards/gold                     streams.py
                references.py

    records.py       the typed records passed between stages (PromptBatch, Rollout, EvalSamples, EvalPoint)
    rollout.py       sample responses from a policy; per-token log-probs
    values.py        the value model of PPO-style methods (S scalar heads)
    references.py    PAR's reference responses per prompt (reward shaping by reference)
    streams.py       the experience stage of the composite methods (one reward stream per component)
    update.py        optimizer steps of the trained engines on one batch of experience
    evaluate.py      the gold evaluation: one evaluator -> one typed evaluation record -> curves.jsonl
    pool.py          best-of-n over one scored pool: every n and objective (selection replaces the update)
    errors.py        errors that end a run with exit status 2 and one line naming the problem
"""
