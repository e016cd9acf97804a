"""Composite-reward math: Lagrangian mixing of reward streams (constrained RLHF) and dynamic reward
weights (hypervolume-guided and gradient-based). Pure tensor functions; torch and math only.

Sources:
- Moskovitz et al. 2023, "Confronting Reward Model Overoptimization with Constrained RLHF":
  §3 proxy points, §4 constrained PPO (mu-PPO: inequality constraints, sigmoid-squashed
  multipliers; xi-PPO: equality constraints, tanh-squashed), §4.3 NM-PPO.
- Lu et al. 2025, "Learning to Optimize Multi-Objective Alignment Through Dynamic Reward
  Weighting": hypervolume-guided reward scaling and gradient-based weight updates.

Conventions: N constraints (components), S = N + 1 reward streams with stream 0 the objective,
B sequences, T response tokens, D objectives of a hypervolume, J objectives of a weight vector,
P parameters. Every objective is maximized.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

CONSTRAINT_KINDS: tuple[str, ...] = ("inequality", "equality")


def squash_multipliers(multipliers: torch.Tensor, constraint: str) -> torch.Tensor:
    """The Lagrange weights f(mu) the policy sees (Moskovitz et al. 2023, §4).

    inequality (mu-PPO, `v_i >= theta_i`): f = sigmoid, a weight in (0, 1);
    equality (xi-PPO, `v_i = theta_i`): f = tanh, a weight in (-1, 1) that turns negative when
    the component should come down.
    multipliers: (N,) raw, unconstrained mu. Returns (N,).
    """
    if constraint == "inequality":
        return torch.sigmoid(multipliers)
    if constraint == "equality":
        return torch.tanh(multipliers)
    raise ValueError(f"unknown constraint kind {constraint!r} (known: {', '.join(CONSTRAINT_KINDS)})")


def lagrangian_coefficients(weights: torch.Tensor) -> torch.Tensor:
    """Stream coefficients of the mixed advantage: `[N - sum_i f_i, f_1, ..., f_N]`.

    Moskovitz et al. 2023, §4: the Lagrangian `v_0 + sum_i f(mu_i) (v_i - theta_i)` rescaled so
    that the objective keeps the weight the constraints do not take (with sigmoid weights the
    coefficients are non-negative and sum to N).
    weights: (N,) squashed multipliers f(mu). Returns (N + 1,).
    """
    n = weights.shape[0]
    return torch.cat([(n - weights.sum()).reshape(1), weights])


def combine_streams(advantages: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """`sum_s c_s * A_s`: one advantage from per-stream advantages.

    advantages: (S, B, T); coefficients: (S,). Returns (B, T).
    """
    if advantages.shape[0] != coefficients.shape[0]:
        raise ValueError(f"{advantages.shape[0]} streams but {coefficients.shape[0]} coefficients")
    c = coefficients.to(advantages.dtype).reshape(-1, *([1] * (advantages.dim() - 1)))
    return (c * advantages).sum(0)


def mixed_advantages(objective_advantages: torch.Tensor, constraint_advantages: torch.Tensor,
                     multipliers: torch.Tensor, constraint: str) -> torch.Tensor:
    """`(N - sum_i f(mu_i)) * A_0 + sum_i f(mu_i) * A_i` (Moskovitz et al. 2023, §4).

    Pass per-stream normalized advantages (each stream whitened on its own), as the paper does,
    so that no stream dominates by the scale of its reward. The multipliers are used as
    constants (detached): the policy does not move them.
    objective_advantages: (B, T); constraint_advantages: (N, B, T); multipliers: (N,) raw mu.
    Returns (B, T).
    """
    weights = squash_multipliers(multipliers.detach(), constraint)
    streams = torch.cat([objective_advantages.unsqueeze(0), constraint_advantages], dim=0)
    return combine_streams(streams, lagrangian_coefficients(weights))


def stream_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Return of each sequence from its first response token: `sum_t gamma^t r_t` over valid t.

    The reward-to-go at the start state, whose batch mean estimates a stream's value v_i
    (Moskovitz et al. 2023, §4: the constraint is on `v_i = E[sum_t gamma^t r_i,t]`).
    rewards: (..., B, T); mask: (B, T) 0/1. Returns (..., B).
    """
    t = rewards.shape[-1]
    discount = gamma ** torch.arange(t, dtype=rewards.dtype, device=rewards.device)
    kept = torch.where(mask.bool(), rewards, torch.zeros_like(rewards))
    return (kept * discount).sum(-1)


def multiplier_loss(multipliers: torch.Tensor, constraint_values: torch.Tensor, thresholds: torch.Tensor,
                    constraint: str) -> torch.Tensor:
    """`sum_i f(mu_i) * stopgrad(v_i - theta_i)`, minimized by the multipliers' own optimizer.

    Moskovitz et al. 2023, §4 (the Lagrangian's multiplier side): the gradient on mu_i is
    `f'(mu_i) * (v_i - theta_i)`, so gradient descent raises mu_i while its constraint is
    violated (v_i < theta_i) and lowers it while it is slack. For an equality constraint the
    same rule drives tanh(mu_i) negative when v_i overshoots, pushing v_i back down.
    multipliers: (N,) raw mu with grad; constraint_values: (N,) v_i; thresholds: (N,).
    Returns a 0-d tensor.
    """
    violation = (constraint_values - thresholds).detach().to(multipliers.dtype)
    return (squash_multipliers(multipliers, constraint) * violation).sum()


# ---------------------------------------------------------------------------------------------
# Hypervolume (Lu et al. 2025)
# ---------------------------------------------------------------------------------------------


def pareto_mask(points: torch.Tensor) -> torch.Tensor:
    """Which points no other point dominates (maximization).

    q dominates p when `q >= p` in every objective and `q > p` in at least one; equal points do
    not dominate each other, so duplicates are all kept.
    points: (P, D). Returns (P,) bool.
    """
    if points.dim() != 2:
        raise ValueError(f"points must be (P, D), got shape {tuple(points.shape)}")
    ge = (points.unsqueeze(0) >= points.unsqueeze(1)).all(-1)  # ge[p, q]: q >= p everywhere
    gt = (points.unsqueeze(0) > points.unsqueeze(1)).any(-1)
    return ~(ge & gt).any(-1)


def hypervolume(points: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Volume of the union of the boxes `[reference, p]` over points p (maximization).

    Exact, by slicing along the last objective (While et al. 2006, "HSO"): between consecutive
    distinct levels of the last coordinate, the dominated region is a prism whose base is the
    (D-1)-dimensional hypervolume of the points reaching that level. A point that does not
    exceed the reference in some objective adds nothing. Exponential in D only through the
    recursion; meant for the handful of objectives and buffered points of reward weighting.
    points: (P, D); reference: (D,). Returns a 0-d tensor (float64 arithmetic, input dtype out).
    """
    if points.dim() != 2 or reference.shape != points.shape[1:]:
        raise ValueError(f"points (P, D) and reference (D,) expected, got {tuple(points.shape)} "
                         f"and {tuple(reference.shape)}")
    ref = reference.double()
    pts = torch.maximum(points.double(), ref)
    return _hv(pts, ref).to(points.dtype)


def _hv(points: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if points.shape[0] == 0:
        return ref.new_zeros(())
    if points.shape[1] == 1:
        return points[:, 0].max() - ref[0]
    levels = torch.unique(points[:, -1]).flip(0)  # distinct last coordinates, descending
    lower = torch.cat([levels[1:], ref[-1:]])
    total = ref.new_zeros(())
    for level, below in zip(levels, lower):
        height = level - below
        if height > 0:
            reach = points[points[:, -1] >= level, :-1]
            total = total + height * _hv(reach, ref[:-1])
    return total


def hypervolume_gain(point: torch.Tensor, buffer: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`HV(buffer + {point}) - HV(buffer)`: the volume only `point` adds (>= 0).

    point: (D,); buffer: (P, D), P may be 0; reference: (D,). Returns a 0-d tensor.
    """
    both = torch.cat([buffer.reshape(-1, point.shape[0]).to(point.dtype), point.unsqueeze(0)])
    return hypervolume(both, reference) - hypervolume(both[:-1], reference)


def pareto_buffer_add(front: torch.Tensor, point: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Add `point` to a Pareto buffer: (the non-dominated points of `front` and `point`, the
    hypervolume `point` adds to `front`). The buffer step of hypervolume-guided weighting
    (Lu et al. 2025), shared by the PPO loop and the TRL reward function.

    front: (P, D), P may be 0; point: (D,); reference: (D,). float64 out.
    """
    point = point.double()
    gain = float(hypervolume_gain(point, front, reference))
    both = torch.cat([front.double().reshape(-1, point.shape[0]), point[None]])
    return both[pareto_mask(both)], gain


def weighted_reward(component_scores: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """`r_b = scale * sum_j w_j * s_jb`: the reward of each completion.

    component_scores: (N, B); weights: (N,) (used as given); scale: the reward scale.
    Returns (B,) float64.
    """
    if component_scores.dim() != 2 or weights.shape != component_scores.shape[:1]:
        raise ValueError(f"component_scores (N, B) and weights (N,) expected, got {tuple(component_scores.shape)} "
                         f"and {tuple(weights.shape)}")
    return scale * (weights.double() @ component_scores.double())


def normalized_weights(weights: list[float] | tuple[float, ...] | None, n: int) -> torch.Tensor:
    """`w / sum(w)`, (n,) float64; None means uniform. Raises ValueError unless there are n finite,
    non-negative weights with a positive sum."""
    if weights is None:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    values = [float(x) for x in weights]
    if len(values) != n:
        raise ValueError(f"weights: need one weight per component ({n}), got {len(values)}: {values}")
    if not all(math.isfinite(x) and x >= 0 for x in values) or sum(values) <= 0:
        raise ValueError(f"weights: need finite non-negative weights with a positive sum, got {values}")
    w = torch.tensor(values, dtype=torch.float64)
    return w / w.sum()


def hypervolume_scale(gain: torch.Tensor | float) -> torch.Tensor:
    """Reward scale of hypervolume-guided weighting: `0.5 + 1.5 * tanh(delta_HV)` (Lu et al. 2025).

    A point that adds nothing to the Pareto front halves the reward; a large gain doubles it.
    gain: 0-d tensor or float. Returns a 0-d tensor.
    """
    return 0.5 + 1.5 * torch.tanh(torch.as_tensor(gain, dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# Gradient-based weights (Lu et al. 2025)
# ---------------------------------------------------------------------------------------------


def objective_influence(grads: torch.Tensor) -> torch.Tensor:
    """`I_j = <g_j, sum_k g_k>`: how much objective j's gradient agrees with the joint direction.

    grads: (J, P) per-objective policy gradients (flattened). Returns (J,).
    """
    return grads @ grads.sum(0)


def gradient_weight_update(weights: torch.Tensor, grads: torch.Tensor, eta: float, mu: float) -> torch.Tensor:
    """`w_j <- w_j * exp(eta * I_j / mu)`, renormalized to sum 1 (Lu et al. 2025).

    eta is the actor learning rate and mu a temperature (1e-4 to 1e-5 in the paper). Computed as
    `softmax(log w + eta * I / mu)`, the same quantity without overflow.
    weights: (J,) positive, summing to 1; grads: (J, P). Returns (J,).
    """
    if not mu > 0:
        raise ValueError(f"mu must be > 0, got {mu}")
    logits = torch.log(weights.double()) + eta * objective_influence(grads.double()) / mu
    return torch.softmax(logits, dim=0).to(weights.dtype)


def quadratic_peak(coefficients: tuple[float, float, float], low: float, high: float) -> float:
    """Where `a + b x + c x^2` is largest on [low, high]: the vertex `-b / 2c` if the parabola opens
    downwards and the vertex lies inside, else the better end. Used to read a proxy point off a fit
    of gold against a component's value (Moskovitz et al. 2023, §3).
    """
    a, b, c = coefficients
    if c < 0:
        vertex = -b / (2 * c)
        if low <= vertex <= high:
            return vertex
    value_low, value_high = a + b * low + c * low * low, a + b * high + c * high * high
    return high if value_high >= value_low or math.isclose(value_high, value_low) else low


class Multipliers:
    """Raw multipliers mu (N,) trained by SGD with momentum and gradient-norm clipping on
    `multiplier_loss`, one step per PPO minibatch (Moskovitz et al. 2023, §4 and App.: SGD,
    lr 0.01-0.1, momentum 0.1, clip 0.5)."""

    def __init__(self, n: int, constraint: str, thresholds: list[float], *, init: float, lr: float, momentum: float,
                 grad_clip: float) -> None:
        self.constraint = constraint
        self.mu = nn.Parameter(torch.full((n,), float(init)))
        self.optimizer = torch.optim.SGD([self.mu], lr=lr, momentum=momentum)
        self.grad_clip = grad_clip
        self.thresholds = torch.tensor(thresholds, dtype=torch.float64)

    def weights(self) -> torch.Tensor:
        """f(mu) (N,): the weights of the constrained streams."""
        return squash_multipliers(self.mu.detach(), self.constraint)

    def step(self, constraint_values: torch.Tensor) -> float:
        """One optimizer step on `sum_i f(mu_i) (v_i - theta_i)`; returns the loss."""
        loss = multiplier_loss(self.mu, constraint_values.double().cpu(), self.thresholds, self.constraint)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([self.mu], self.grad_clip)
        self.optimizer.step()
        return float(loss.detach())

    def state_dict(self) -> dict[str, Any]:
        buf = self.optimizer.state.get(self.mu, {}).get("momentum_buffer")
        return {"mu": self.mu.detach().tolist(), "momentum_buffer": None if buf is None else buf.tolist(),
                "thresholds": self.thresholds.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.mu.copy_(torch.tensor(state["mu"]))
        if state["momentum_buffer"] is not None:
            self.optimizer.state[self.mu]["momentum_buffer"] = torch.tensor(state["momentum_buffer"])
        self.thresholds = torch.tensor(state["thresholds"], dtype=torch.float64)
