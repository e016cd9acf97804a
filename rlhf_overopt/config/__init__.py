"""Configuration: one YAML file -> typed, self-checking sections -> a frozen plan.

    methods.py          the ONE method table (name -> driver, sections, and what the method does)
    sections.py         the world's sections (testbed, policy, gold, proxy, data, label, aggregate, eval, bon)
    train_sections.py   the optimizers' and composite methods' sections (ppo, grpo, dpo, madpo, deepspeed, ...)
    experiment.py       `Config`, every section in one frozen dataclass; YAML out; the documented key list
    validate.py         checks that involve several sections or the method
    load.py             load_config: YAML + key.sub=value overrides -> a checked Config
    plan.py             derived sizes, computed once with exact division
"""
