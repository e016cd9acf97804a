"""KL estimators between the policy and a reference policy, and KL-coefficient controllers."""

import torch

from rlhf_overopt.ops.masking import masked_sum

KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_penalty_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token sample estimate of KL(pi || pi_ref) for tokens sampled from pi.

    With `r = log pi(a) - log pi_ref(a)`:
    k1 = r (unbiased, can be negative); k2 = r^2 / 2 (biased, low variance; Coste et al. 2023 plot
    it); k3 = (exp(-r) - 1) + r (unbiased, never negative).
    Source: J. Schulman, "Approximating KL Divergence" (2020 blog note).
    logprobs, ref_logprobs: (B, T). Returns (B, T).
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)} and ref_logprobs {tuple(ref_logprobs.shape)} differ in shape"
        )
    r = logprobs - ref_logprobs
    estimators = {
        "k1": lambda: r,
        "k2": lambda: 0.5 * r**2,
        "k3": lambda: torch.expm1(-r) + r,
    }
    if estimator not in estimators:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    return estimators[estimator]()


def sequence_kl(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, estimator: str
) -> torch.Tensor:
    """Sequence KL: the per-token estimate summed over valid response tokens,
    `KL_b = sum_t mask_bt * k(r_bt)`.

    Source: Schulman's KL note (per-token estimators); sum over response tokens as in Gao et al.
    2022 §2 and Coste et al. 2023.
    logprobs, ref_logprobs, mask: (B, T). Returns (B,).
    """
    return masked_sum(kl_penalty_per_token(logprobs, ref_logprobs, estimator), mask, dim=-1)


class FixedKLController:
    """Constant KL coefficient beta (Ziegler et al. 2019, §2.2)."""

    def __init__(self, kl_coef: float) -> None:
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """No-op: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient that steers the observed KL toward a target.

    `e = clip(KL_current / KL_target - 1, -0.2, 0.2)`, `beta <- beta * (1 + e * n_steps / horizon)`.
    Source: Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", §2.2.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if target <= 0:
            raise ValueError(f"target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | torch.Tensor, n_steps: int) -> None:
        """Scale the coefficient after n_steps samples that showed a mean KL of current_kl."""
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def kl_controller(kl_coef: float, adaptive: bool = False, target: float = 6.0,
                  horizon: float = 10000) -> FixedKLController | AdaptiveKLController:
    """A fixed controller, or the adaptive one steering the KL toward `target` (Ziegler et al. 2019, §2.2)."""
    return AdaptiveKLController(kl_coef, target, horizon) if adaptive else FixedKLController(kl_coef)
