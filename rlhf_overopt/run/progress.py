"""Progress bars that stay readable in log files.

On a terminal: a normal tqdm bar. Redirected to a file (CI, sweeps, nohup): one line at most
every 30 s instead of a carriage-return update per step, which would bloat logs by megabytes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm


def bar(iterable: Any = None, **kwargs: Any) -> tqdm:
    """tqdm with log-friendly settings when stderr is not a terminal."""
    if not sys.stderr.isatty():
        kwargs.setdefault("mininterval", 30.0)
        kwargs.setdefault("ascii", True)
    return tqdm(iterable, **kwargs)


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence the `datasets` progress bars inside the block and restore the caller's setting."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()
