"""The reward side: proxies, gold, components.

    members.py       the members of a proxy ensemble, one class per way of holding K reward models
    ensemble.py      `ProxyEnsemble`: K members scored together -> proxy_scores (K, B), standardized, checked
    training.py      Bradley-Terry training of an ensemble's members (where proxies are trained)
    cache.py         the load-or-train cache of proxies and component rewards (content-hashed folders)
    gold.py          the gold scorer every method is evaluated with and none optimizes
    components.py    component rewards (one ensemble per aspect of gold), proxy points
    margins.py       MADPO's per-pair reward margins from the ensemble
    trl_rewards.py   ensemble / component rewards as reward functions for TRL's trainers
"""
