"""Pure torch math: tensors and scalars in, tensors out, formula and source in each docstring. Imports
nothing of the project outside ops/ (enforced by tests/test_layout.py).

    losses.py       PPO policy / value losses, Bradley-Terry, DPO / IPO / SLiC / MADPO losses
    advantages.py   GAE, whitening, group-relative (GRPO / RLOO) advantages
    kl.py           KL estimators and KL-coefficient controllers
    masking.py      response masks and masked statistics
    aggregate.py    (K, B) -> (B,) ensemble aggregation: mean, WCO, UWO, median, mean - k*std
    bon.py          best-of-n: analytic KL, the unbiased estimator over a pool, exact pool KL
    constrained.py  Lagrangian mixing, proxy points, hypervolume, dynamic weights
    shaping.py      reward shaping after aggregation
    scaling.py      Gao et al. (2022) functional forms and their fits
    warm.py         weight averaging of reward models (WARM)
    signals.py      overoptimization signals on an evaluation's samples
"""
