"""Files a killed run never leaves half-written, and the CSV logs a resumed run truncates.

Every writer here goes through `atomic_path`: the content is written to a hidden temporary
sibling (`.<name>.<pid>.tmp`) and renamed onto the target, which is atomic on one file system.
A reader (or a resumed run) sees the old file or the new one, never half of either; a
leftover temporary file is recognisable by its name and swept up by the next cache run.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import polars as pl
    from matplotlib.figure import Figure

TMP_SUFFIX = ".tmp"


def temporary_sibling(path: Path) -> Path:
    """Where `atomic_path` writes before the rename (hidden, per process)."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; on a clean exit it replaces `path`, on an error it
    is removed and `path` keeps what it held. Writers that pick a format from the file name
    must be told the format (the temporary name ends in `.tmp`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, payload: Any, indent: int | None = 1) -> None:
    write_text_atomic(path, json.dumps(payload, indent=indent))


def save_torch_atomic(payload: Any, path: str | Path) -> None:
    import torch  # here: the cache step writes files without importing torch

    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def save_npy_atomic(path: str | Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a handle: np.save adds no suffix
        np.save(handle, array)


def copy_file_atomic(source: str | Path, target: str | Path) -> None:
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def write_parquet_atomic(table: pl.DataFrame, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        table.write_parquet(tmp)


def save_figure_atomic(fig: Figure, path: str | Path, dpi: int = 80) -> None:
    """A matplotlib figure, tight, in the format its file name says."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=dpi, bbox_inches="tight")


def append_csv(path: Path, row: dict[str, Any], columns: Sequence[str]) -> None:
    """One log row, appended in place; a resumed run first cuts the log back to its checkpoint
    with `truncate_csv`."""
    new = not path.is_file()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_csv(path: Path, step: int, columns: Sequence[str], key: str = "step") -> None:
    """Drop log rows past the checkpoint a run resumes from (written before it was killed)."""
    if not path.is_file():
        return
    with open(path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if int(r[key]) <= step]
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
