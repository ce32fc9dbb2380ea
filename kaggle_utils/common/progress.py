"""Progress bars that suit both a terminal and a log.

Under papermill (`--log-output`), in a notebook's stored output or in CI, every tqdm refresh
becomes a line of its own: with a bar per batch, `make demo`'s executed notebook 03 held 3,604
stream outputs, 588 KB of them progress lines. So bars are per epoch, fold or series, and
where stderr is not a terminal they refresh at most once a minute (the final state is always
printed).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.std import tqdm

LOG_REFRESH_SECONDS = 60.0


def progress_bar(iterable: Iterable[Any] | None = None, **options: Any) -> tqdm:
    """tqdm for the loops: live on a terminal; where the output is a log (papermill's
    `--log-output`, a notebook's stored output, CI) every refresh becomes a line, so there it
    refreshes at most once a minute and the caller's bars are per epoch or per fold."""
    if not interactive():
        options.setdefault("mininterval", LOG_REFRESH_SECONDS)
    return tqdm(iterable, **options)


def interactive() -> bool:
    """Whether stderr is a terminal (not a log, a notebook's stored output or CI)."""
    stream = sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)())
