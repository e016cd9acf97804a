"""Errors that end a run with exit status 2 and one line naming the problem (not a traceback)."""

from __future__ import annotations

import torch


class ConfigError(ValueError):
    """A configuration problem, found before any work starts; the message is one line that names the key."""


class InputError(ValueError):
    """Bad input found once work has started: a data row, a model or tokenizer, a dataset path."""


class NonFiniteError(RuntimeError):
    """A reward, loss or gradient that is NaN or inf, named by its source and step."""


def check_finite(t: torch.Tensor, what: str, step: int) -> None:
    """Stop at the step a non-finite number appears, naming where it came from."""
    if not torch.isfinite(t).all():
        bad = (~torch.isfinite(t)).nonzero()
        raise NonFiniteError(f"step {step}: {what} is not finite at index {bad[0].tolist()} "
                             f"({int(bad.shape[0])} value(s))")
