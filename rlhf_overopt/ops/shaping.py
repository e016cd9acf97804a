"""Reward shaping of the aggregated proxy score, applied after aggregation and before the KL
penalty and the advantages: `proxy_score (B,) -> shaped score (B,)`.

    none   the aggregated proxy score itself
    par    Preference As Reward (Fu et al. 2025): the mean sigmoid of the score's margin over k
           reference responses of the same prompt, sampled once from the initial policy

Pure tensor functions (torch only); where the references come from is rlhf_overopt.references.
"""

import torch

SHAPING_NAMES: tuple[str, ...] = ("none", "par")
"""The values of aggregate.shaping."""


def par_reward(proxy_score: torch.Tensor, reference_scores: torch.Tensor) -> torch.Tensor:
    """Preference As Reward: `r'(x, y) = (1/k) sum_j sigmoid(r(x, y) - r(x, y_ref,j))`.

    r is the aggregated proxy score of the response and r(x, y_ref,j) the same aggregate of the
    j-th reference response to the same prompt x. Each term is the Bradley-Terry probability that
    the response beats reference j under the proxy, so r' lies in (0, 1), is 0.5 for a response
    scored like its references, and its slope sigmoid'(.) <= 1/4 vanishes as the margin grows: the
    bounded, centred and fast-then-slow-growing reward the paper argues mitigates reward hacking.
    Source: Fu et al. 2025, "Reward Shaping to Mitigate Reward Hacking in RLHF" (arXiv:2502.18770),
    (PAR, the sigmoid of the centred reward with k reference responses per prompt).

    proxy_score: (B,); reference_scores: (B, k), k >= 1. Returns (B,).
    """
    if proxy_score.dim() != 1:
        raise ValueError(f"proxy_score must be 1-D (B,), got shape {tuple(proxy_score.shape)}")
    if reference_scores.dim() != 2 or reference_scores.shape[0] != proxy_score.shape[0]:
        raise ValueError(f"reference_scores must be (B, k) with B = {proxy_score.shape[0]}, "
                         f"got shape {tuple(reference_scores.shape)}")
    if reference_scores.shape[1] < 1:
        raise ValueError("reference_scores needs at least one reference per prompt (k >= 1)")
    return torch.sigmoid(proxy_score[:, None] - reference_scores).mean(dim=1)
