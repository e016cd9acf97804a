"""rlhf_overopt: a research framework for reward-model overoptimization in RLHF.

A policy is optimized against proxy reward models (an ensemble of K, combined by an aggregation
rule) and scored by a gold reward it never optimizes; gold and proxy are drawn against
d = sqrt(KL(pi || pi_init)). The pipeline, with the module that owns each stage:

    config.py sections.py plan.py      one YAML -> typed, self-checking sections; the method table;
                                       derived sizes computed once (plan)
    testbed/ data.py                   the world: tokenizer, SFT policy, prompts, gold-labelled pairs
    rm_training.py members.py          proxies: Bradley-Terry training of K members of one kind
    ensemble.py reward_cache.py        the ensemble (scoring, standardization, failed members, save/load),
                                       trained once into a content-hashed cache
    components.py                      component rewards (composite methods), proxy points

    prompts ──▶ rollout ──▶ proxy ensemble ──▶ aggregate ──▶ advantages ──▶ update ──▶ gold eval ──▶ curves
    seeds.py   rollout.py   ensemble.py       aggregate.py  advantages.py  update.py  evaluate.py   runs.py
               (values.py)  gold.py                         (streams.py)   losses.py  (EvalPoint)   (curves.jsonl)
                                                            kl.py          engines.py

    pool.py bon.py                     best-of-n: one scored pool, every n and aggregator (selection
                                       replaces the update)
    preferences.py margins.py          DPO / IPO / SLiC / MADPO data, pair batches, MADPO margins
    constrained.py                     Lagrange multipliers, Nelder-Mead helpers, hypervolume, weights
    checkpoints.py lifecycle.py        exact resume; the run lifecycle around a driver
    dist.py engines.py                 ranks, cross-rank math, DeepSpeed engines (policy, value, reference)
    tracking.py trl_rewards.py         W&B (offline by default); ensemble/component rewards for TRL trainers

    loops/<method>.py                  one readable driver per method, numbered stages, calling the above;
                                       nothing outside loops/ imports a driver, and no driver imports another
"""
