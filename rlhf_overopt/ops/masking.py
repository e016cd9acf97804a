"""Response masks and masked statistics over response tokens.

Masks are 0/1 tensors (bool, integer or float) with the same shape as the data. Masked-out
positions are selected away with `torch.where`, never multiplied by 0, so NaN or inf left there
(e.g. log-probs of padding) cannot leak into sums or gradients.
"""

import torch


def _check_mask(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.shape != x.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match data shape {tuple(x.shape)}")
    return mask.bool()


def response_mask_after_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Mask that keeps each response up to and including its first EOS token.

    `mask[b, t] = 1` if no EOS occurs in `response_ids[b, :t]`, else 0: truncate at EOS and mask
    after it (Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO", response
    post-processing). A row with no EOS is all ones.
    response_ids: (B, T) integer. Returns (B, T) int64.
    """
    is_eos = (response_ids == eos_token_id).to(torch.int64)
    eos_before = is_eos.cumsum(dim=-1) - is_eos
    return (eos_before == 0).to(torch.int64)


def has_eos(response_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Whether each response contains the EOS token.

    response_ids: (B, T) integer. Returns (B,) bool.
    """
    return (response_ids == eos_token_id).any(dim=-1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """`sum_t mask_t * x_t` over `dim` (all elements when dim is None).

    x: any shape; mask: same shape, 0/1. Returns x reduced over dim (0-d when dim is None).
    """
    keep = _check_mask(x, mask)
    selected = torch.where(keep, x, torch.zeros_like(x))
    return selected.sum() if dim is None else selected.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """`sum_t mask_t * x_t / sum_t mask_t` over `dim` (all elements when dim is None).

    A reduction with no valid position gives 0 rather than NaN.
    x: any shape; mask: same shape, 0/1. Returns x reduced over dim (0-d when dim is None).
    """
    keep = _check_mask(x, mask)
    count = keep.to(x.dtype)
    count = count.sum() if dim is None else count.sum(dim=dim)
    return masked_sum(x, keep, dim) / count.clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the valid elements: `sum mask * (x - mu)^2 / (n - 1)` (or `/ n` if not unbiased).

    mu is the masked mean and n the number of valid elements. Raises ValueError when n is 0, or 1
    with unbiased=True.
    x: any shape; mask: same shape, 0/1. Returns a 0-d tensor.
    """
    keep = _check_mask(x, mask)
    n = int(keep.sum().item())
    if n == 0 or (unbiased and n == 1):
        raise ValueError(f"masked_var needs at least {2 if unbiased else 1} valid elements, got {n}")
    x = torch.where(keep, x, torch.zeros_like(x))
    mu = masked_mean(x, keep)
    sq = masked_sum((x - mu) ** 2, keep)
    return sq / (n - 1) if unbiased else sq / n


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """Whiten with masked statistics: `(x - mu) / sqrt(var + eps)`, plus mu back if not shift_mean.

    mu and var (unbiased) are computed over the valid elements only; positions where mask is 0
    are returned as 0. Advantage whitening as in Ziegler et al. 2019 and Huang et al. 2024,
    "The N+ Implementation Details of RLHF with PPO".
    x: any shape; mask: same shape, 0/1. Returns the shape of x.
    """
    keep = _check_mask(x, mask)
    x = torch.where(keep, x, torch.zeros_like(x))
    return _whiten(x, keep, masked_mean(x, keep), masked_var(x, keep, unbiased=True), shift_mean, eps)


def whiten_from_moments(
    x: torch.Tensor,
    mask: torch.Tensor,
    count: torch.Tensor,
    total: torch.Tensor,
    total_sq: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """`masked_whiten` with statistics from moments summed elsewhere (e.g. over data-parallel ranks).

    n = count, mu = total / n, var = (total_sq - n * mu^2) / (n - 1) (unbiased, as masked_whiten).
    With the moments of x itself this equals masked_whiten(x, mask) up to rounding.
    x: any shape; mask: same shape, 0/1; count, total, total_sq: 0-d. Returns the shape of x.
    """
    keep = _check_mask(x, mask)
    if float(count) < 2:
        raise ValueError(f"whitening needs at least 2 valid elements, got {float(count):g}")
    mu = total / count
    var = ((total_sq - count * mu * mu) / (count - 1)).clamp(min=0.0)
    return _whiten(torch.where(keep, x, torch.zeros_like(x)), keep, mu, var, shift_mean, eps)


def _whiten(x, keep, mu, var, shift_mean: bool, eps: float) -> torch.Tensor:
    whitened = (x - mu) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mu
    return torch.where(keep, whitened, torch.zeros_like(whitened))


def last_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last 1 in each row (e.g. the last real token, where the score is read).

    Rows with no 1 give -1.
    mask: (B, T), 0/1. Returns (B,) int64.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D (B, T), got shape {tuple(mask.shape)}")
    positions = torch.arange(mask.shape[-1], device=mask.device).expand(mask.shape)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens: `cumsum(mask) - 1`, clamped at 0.

    The first real token of every row gets position 0 however much left padding precedes it, so
    a left-padded row is computed exactly like the same row without padding. Padding positions get
    0 (on the left) or repeat the last real position (on the right); they are masked anyway.
    attention_mask: (B, T) 0/1. Returns (B, T) int64.
    """
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)
