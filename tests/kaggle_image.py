"""A virtual environment with the versions of Kaggle's image (`constraints-kaggle.txt`), for
`make test-kaggle-versions` and the offline test's fake Kaggle image; or, with `--lowest`, with
the lowest versions pyproject.toml allows (`make test-lowest-versions`).

Kaggle's torch is not installed: this machine's build is linked in instead (torch, torchvision
and what they need that the constraints file does not pin: triton, nvidia-*, sympy, ...), so
that the environment costs seconds and no second CUDA stack. Everything else comes from the
package index: at Kaggle's versions, or at the lowest ones (uv's `--resolution lowest-direct`,
torch held at the linked build).

    python tests/kaggle_image.py .venv-kaggle -- -r requirements-dev.txt -e .
    python tests/kaggle_image.py --lowest .venv-lowest -- -r requirements-dev.txt -e .
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kaggle_utils.bundle import read_constraints

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints-kaggle.txt"
LINKED = ("torch", "torchvision")


def requirement_closure(
    names: Sequence[str], stop: set[str]
) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions of `names` and of everything they require (markers
    evaluated, requested extras followed), not descending into `stop`."""
    found: dict[str, importlib.metadata.Distribution] = {}
    followed: set[tuple[str, str]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(n, frozenset()) for n in sorted(names)]
    while todo:
        raw_name, extras = todo.pop()
        name = canonicalize_name(raw_name)
        if name in stop:
            continue
        try:
            dist = found.get(name) or importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found[name] = dist
        for extra in {"", *extras} - {e for n, e in followed if n == name}:
            followed.add((name, extra))
            for line in dist.requires or []:
                requirement = Requirement(line)
                marker = requirement.marker
                if marker is None or marker.evaluate({"extra": extra}):
                    todo.append((requirement.name, frozenset(requirement.extras)))
    return found


def site_packages(python: Path) -> Path:
    return Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )


def link_distributions(
    distributions: Sequence[importlib.metadata.Distribution], site: Path
) -> None:
    """Symlink each distribution's top-level files and folders (its dist-info included, so
    pip counts it as installed) into `site`."""
    for dist in distributions:
        base = Path(str(dist.locate_file("")))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            link = site / top
            if not link.exists() and not link.is_symlink() and (base / top).exists():
                link.symlink_to(base / top)


def build(target: Path, pip_arguments: Sequence[str], constraints: Path = CONSTRAINTS) -> Path:
    """A venv at `target` with this machine's torch linked in, then `pip install -c
    <constraints> <pip_arguments>`. Returns its python."""
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(target)], check=True)
    python = target / "bin" / "python"
    pinned = set(read_constraints(constraints, python_version=None))
    torch = requirement_closure(LINKED, stop=pinned)
    link_distributions(list(torch.values()), site_packages(python))
    if pip_arguments:
        # no byte-compiling at install (Python compiles what it imports): a third of the time
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        pip.append("--no-compile")
        subprocess.run([*pip, "-c", str(constraints), *pip_arguments], check=True)
    return python


def build_lowest(target: Path, pip_arguments: Sequence[str]) -> Path:
    """A venv at `target` with this machine's torch linked in and everything else at the
    lowest version the requirements allow (uv, `--resolution lowest-direct`)."""
    python = build(target, [])
    pins = target / "torch-as-linked.txt"
    pins.write_text("".join(f"{n}=={importlib.metadata.version(n)}\n" for n in LINKED))
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "uv"], check=True)
    uv = [str(python), "-m", "uv", "pip", "install", "--python", str(python), "--quiet"]
    subprocess.run(
        [*uv, "--resolution", "lowest-direct", "-c", str(pins), *pip_arguments], check=True
    )
    return python


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("target", type=Path)
    parser.add_argument("pip_arguments", nargs="*", help="after --: what pip installs")
    parser.add_argument("--lowest", action="store_true", help="the lowest allowed versions")
    args = parser.parse_args(argv)
    if args.lowest:
        python = build_lowest(args.target, args.pip_arguments)
        listed = subprocess.check_output(
            [str(python), "-m", "pip", "list", "--format=freeze"], text=True
        )
        versions = " ".join(listed.split())
        print(f"{args.target}: torch linked from {sys.prefix}; lowest versions: {versions}")
        return
    python = build(args.target, args.pip_arguments)
    listed = subprocess.check_output(
        [str(python), "-m", "pip", "list", "--format=freeze"], text=True
    )
    pins = read_constraints(CONSTRAINTS, python_version=None)
    shown = [line for line in listed.split() if canonicalize_name(line.split("==")[0]) in pins]
    print(f"{args.target}: torch linked from {sys.prefix}; Kaggle's versions: {' '.join(shown)}")


if __name__ == "__main__":
    main()
