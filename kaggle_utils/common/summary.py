"""The closing cell of every notebook: what it wrote, and the command that runs the next step.

`show_outputs(folder, next_steps)` prints the files of a run's output folder (relative path and
size, sorted; hidden files such as the atomic writer's temporary ones left out; a sub-folder
of many files, such as a cache's volumes, as one line) and the next step, which
`papermill_command` writes as a command line.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaggle_utils.common.config import yaml_flow

NOTEBOOKS_DIR = "notebooks"


@dataclass(frozen=True)
class OutputEntry:
    """One line of the listing: a file, or a folder of many files (`path` ends with "/")."""

    path: str  # relative to the listed folder, with "/" separators
    size: int  # bytes; a folder: of all its files
    n_files: int = 1


def _visible_files(folder: Path) -> list[Path]:
    """Every file under `folder`, hidden files and folders (".name") left out."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts)
    )


def list_outputs(
    folder: str | Path, files: Iterable[str | Path] | None = None, max_files_per_folder: int = 12
) -> list[OutputEntry]:
    """The files under `folder` (or only `files`, those of them that exist), sorted by path.

    A sub-folder holding more than `max_files_per_folder` files (counted at any depth) is one
    entry with their number and total size; smaller ones are listed file by file."""
    folder = Path(folder)
    if files is not None:
        chosen = sorted({Path(f) if Path(f).is_absolute() else folder / f for f in files})
        return [
            OutputEntry(_relative(path, folder), path.stat().st_size)
            for path in chosen
            if path.is_file() and not path.name.startswith(".")
        ]
    if not folder.is_dir():
        return []
    return _entries(folder, folder, max_files_per_folder)


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return path.as_posix()


def _entries(folder: Path, root: Path, limit: int) -> list[OutputEntry]:
    entries = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file():
            entries.append(OutputEntry(_relative(child, root), child.stat().st_size))
        elif child.is_dir():
            inside = _visible_files(child)
            if len(inside) > limit:
                size = sum(p.stat().st_size for p in inside)
                entries.append(OutputEntry(_relative(child, root) + "/", size, len(inside)))
            elif inside:
                entries.extend(_entries(child, root, limit))
    return entries


def human_size(n_bytes: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n_bytes < 1000 or unit == "GB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    raise AssertionError("unreachable")


def format_outputs(folder: str | Path, entries: Sequence[OutputEntry]) -> str:
    """The listing as text: a header with the totals, then one line per entry."""
    n_files = sum(e.n_files for e in entries)
    total = human_size(sum(e.size for e in entries))
    lines = [f"{folder}: {n_files} files, {total}"]
    width = max((len(e.path) for e in entries), default=0)
    for entry in entries:
        files = f" in {entry.n_files} files" if entry.path.endswith("/") else ""
        lines.append(f"  {entry.path:<{width}}  {human_size(entry.size):>9}{files}")
    return "\n".join(lines)


def papermill_command(notebook: str, output_dir: str | Path, /, **parameters: Any) -> str:
    """The command line that runs `notebooks/<notebook>.ipynb` with `parameters` into
    `<output_dir>/<notebook>.ipynb` (papermill needs that folder to exist). Strings, numbers
    and paths go with `-p`, lists and mappings with `-y` (papermill's `-p` passes them as
    strings); parameters given as None are left out (the notebook's default)."""
    words = ["papermill", f"{NOTEBOOKS_DIR}/{notebook}.ipynb", str(Path(output_dir) / notebook)]
    words[-1] += ".ipynb"
    command = " ".join(shlex.quote(w) for w in words)
    for name, value in parameters.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple, Mapping)):
            command += f" -y {shlex.quote(f'{name}: {yaml_flow(value)}')}"
        else:
            text = str(value) if not isinstance(value, bool) else ("True" if value else "False")
            command += f" -p {name} {shlex.quote(text)}"
    return command


def show_outputs(
    folder: str | Path,
    next_steps: str | Sequence[str],
    files: Iterable[str | Path] | None = None,
) -> None:
    """Print what a notebook wrote under `folder` (`list_outputs`) and the next step(s).
    Returns nothing, so that a notebook's last line does not also display a list."""
    entries = list_outputs(folder, files)
    print(format_outputs(folder, entries))
    steps = [next_steps] if isinstance(next_steps, str) else list(next_steps)
    for number, step in enumerate(steps):
        print(f"\n{'next' if number == 0 else 'or'}: {step}")
