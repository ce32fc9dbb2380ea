"""What made an artifact: this package's version and git commit, Python, torch and timm.

Every artifact's JSON records it (the cache's records, encoder.json, each fold's model.json,
calibration.json, preprocess.json), so that a model found in a Kaggle dataset can be traced to
the code that trained it, and notebook 04 can say when its preprocessing code is not the one
that made the training volumes. Nothing here imports torch: the cache's worker processes call
it too.
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import subprocess
from pathlib import Path

PACKAGE = "kaggle-utils-voco2d"
BUILD_COMMIT = Path(__file__).parents[1] / "BUILD_COMMIT"  # written into the bundle's wheel


def git_commit(root: str | Path | None = None) -> str:
    """The commit this code came from: `git rev-parse HEAD` (with "-dirty" for uncommitted
    changes) in a checkout, else the BUILD_COMMIT the bundle builder wrote into the wheel, else
    "unknown"."""
    root = Path(root or Path(__file__).resolve().parents[2])
    if (root / ".git").exists():
        try:
            head = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
            )
            status = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root, capture_output=True, text=True, timeout=10,
            )  # fmt: skip
            if head.returncode == 0:
                return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return BUILD_COMMIT.read_text().strip() if BUILD_COMMIT.is_file() else "unknown"


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.cache
def provenance() -> dict[str, str]:
    """{package, git_commit, python, torch, timm} of this process (computed once: artifacts
    are written many times per run)."""
    return {
        "package": f"{PACKAGE} {_version(PACKAGE)}",
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "timm": _version("timm"),
    }


def same_code(made_by: dict[str, str] | None) -> bool | None:
    """Whether an artifact's provenance names this code's commit; None when either is
    unknown (an artifact older than provenance, or code outside git and bundle)."""
    if not made_by:
        return None
    theirs, ours = made_by.get("git_commit", "unknown"), provenance()["git_commit"]
    if "unknown" in (theirs, ours):
        return None
    return theirs == ours
