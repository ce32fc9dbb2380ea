"""The offline install for Kaggle: `make kaggle-bundle` (`python -m kaggle_utils.bundle`).

Kaggle's scoring run has no internet, so everything notebook 04 imports must come from attached
datasets. The bundle is one dataset folder:

    dist/kaggle-bundle/
        wheels/                  this project's wheel, and wheels of every runtime dependency
                                 the target image lacks (all of their own dependencies too)
        dataset-metadata.json    for `kaggle datasets create -p dist/kaggle-bundle -r zip`
        manifest.json            target Python and platform, wheels and sizes, what was left out
        kernel/                  notebook 04 with its kernel-metadata.json (competition and
                                 dataset sources, internet off, GPU on): `kaggle kernels push`

Every notebook's set-up cell finds `wheels/` under /kaggle/input and runs
`pip install --no-index --find-links <wheels> kaggle-utils-voco2d`. Wheels are resolved by pip
for the target (`--python-version`, `--platform`, binary wheels only), then the wheels of
packages the target already has are dropped (`--preinstalled`): Kaggle's image ships torch,
timm, pydicom, polars, albumentations and more, but not dicomsdl or the pylibjpeg plugins.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

from kaggle_utils.paths import COMPETITION_NAME

PROJECT_NAME = "kaggle-utils-voco2d"
# Kaggle's GPU image (2025-2026, Python 3.12, built on Colab's): what it ships, by name, from
# Kaggle/docker-python's Dockerfile and kaggle_requirements.txt and the pip freeze of the Colab
# image it starts from. Only packages certainly there: leaving one out costs a larger bundle,
# listing one that is missing breaks the offline install.
KAGGLE_PREINSTALLED: frozenset[str] = frozenset(
    {
        "torch", "torchvision", "timm", "numpy", "scipy", "pandas", "pydicom", "polars",
        "pyarrow", "scikit-learn", "albumentations", "albucore", "opencv-python-headless",
        "matplotlib", "tqdm", "nibabel", "papermill", "ipykernel", "ipython", "jupyter-client",
        "jupyter-core", "nbformat", "nbclient", "jupytext", "pillow", "packaging", "pyyaml",
        "pydantic", "pydantic-core", "typing-extensions", "filelock", "fsspec", "jinja2",
        "networkx", "sympy", "safetensors", "huggingface-hub", "requests", "joblib",
        "threadpoolctl", "importlib-resources", "traitlets", "tornado", "pyzmq",
    }
)  # fmt: skip
KAGGLE_PYTHON = "3.12"
# manylinux tags a Kaggle image (Ubuntu 22.04, glibc 2.35, x86_64) can install
KAGGLE_PLATFORMS: tuple[str, ...] = (
    "manylinux2014_x86_64",
    *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 36)),
    "linux_x86_64",
)
DEFAULT_OUTPUT = Path("dist") / "kaggle-bundle"
SUBMISSION_NOTEBOOK = Path("notebooks") / "04_submission.ipynb"


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def runtime_requirements(root: Path | None = None, extras: Sequence[str] = ()) -> list[str]:
    """The `dependencies` of pyproject.toml, plus those of the given extras."""
    project = tomllib.loads((Path(root or project_root()) / "pyproject.toml").read_text())
    requirements = list(project["project"]["dependencies"])
    for extra in extras:
        requirements += project["project"]["optional-dependencies"][extra]
    return requirements


def wheel_name(path: Path) -> str:
    return canonicalize_name(parse_wheel_filename(path.name)[0])


def build_bundle(
    output: Path = DEFAULT_OUTPUT,
    *,
    python_version: str | None = KAGGLE_PYTHON,
    platforms: Sequence[str] = KAGGLE_PLATFORMS,
    preinstalled: Iterable[str] = KAGGLE_PREINSTALLED,
    extras: Sequence[str] = (),
    kaggle_user: str = "",
    dataset_slug: str = "voco2d-bundle",
    models_slug: str = "voco2d-models",
    find_links: Sequence[str] = (),
    split_mb: float = 0.0,
) -> dict:
    """Write the bundle folder (see the module docstring); returns its manifest.

    `python_version` None targets this interpreter and platform (the offline test); the
    defaults target Kaggle's image. `preinstalled` names the packages the target has: their
    wheels are left out. `extras` adds optional dependency groups (e.g. "notebooks" for a
    machine without papermill). `find_links` are extra local wheel folders pip may use.
    `split_mb` > 0 spreads the wheels over `wheels/part-<k>/` folders of at most that size
    each (a wheel larger than that gets a folder of its own), for a machine that can only be
    sent so much at a time; they are installed one part at a time with `--no-deps`
    (`benchmarks/gpu_check.py --install-part`).

    Raises:
        subprocess.CalledProcessError: pip could not build or download a wheel (its output
            says which); nothing half-made is left in `output`.
    """
    root = project_root()
    output = Path(output)
    staging = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    (staging / "wheels").mkdir(parents=True)
    skip = {canonicalize_name(n) for n in preinstalled} - {canonicalize_name(PROJECT_NAME)}
    links = [arg for folder in find_links for arg in ("--find-links", str(folder))]
    pip = [sys.executable, "-m", "pip"]
    build = [*pip, "wheel", "--no-deps", "--quiet", "--wheel-dir", str(staging / "wheels")]
    subprocess.run([*build, str(root)], check=True)
    wanted = [
        line
        for line in runtime_requirements(root, extras)
        if canonicalize_name(Requirement(line).name) not in skip
    ]
    if wanted:
        target: list[str] = ["--only-binary=:all:"]
        if python_version:
            target += ["--python-version", python_version, "--implementation", "cp"]
            target += [arg for platform in platforms for arg in ("--platform", platform)]
        download = [*pip, "download", "--quiet", "--dest", str(staging / "wheels")]
        subprocess.run([*download, *target, *links, *wanted], check=True)
    dropped = []
    for path in sorted((staging / "wheels").glob("*.whl")):
        if wheel_name(path) in skip:
            dropped.append(path.name)
            path.unlink()
    parts = _split_into_parts(staging / "wheels", split_mb) if split_mb > 0 else {}
    manifest = {
        "project": PROJECT_NAME,
        "python_version": python_version or f"{sys.version_info.major}.{sys.version_info.minor}",
        "platforms": list(platforms) if python_version else ["this machine"],
        "preinstalled_left_out": sorted(skip),
        "wheels": {p.name: p.stat().st_size for p in sorted((staging / "wheels").rglob("*.whl"))},
        "parts": parts,
        "dropped_as_preinstalled": dropped,
    }
    manifest["total_mb"] = round(sum(manifest["wheels"].values()) / 2**20, 1)
    user = kaggle_user or os.environ.get("KAGGLE_USERNAME", "") or "YOUR-KAGGLE-USERNAME"
    _write_json(staging / "manifest.json", manifest)
    _write_json(
        staging / "dataset-metadata.json",
        {"title": "voco2d offline bundle", "id": f"{user}/{dataset_slug}",
         "licenses": [{"name": "CC0-1.0"}]},
    )  # fmt: skip
    kernel = staging / "kernel"
    kernel.mkdir()
    shutil.copy2(root / SUBMISSION_NOTEBOOK, kernel / SUBMISSION_NOTEBOOK.name)
    _write_json(kernel / "kernel-metadata.json", kernel_metadata(user, dataset_slug, models_slug))
    shutil.rmtree(output, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, output)
    return manifest


def _split_into_parts(wheels: Path, part_mb: float) -> dict[str, list[str]]:
    """Move the wheels into part-1/, part-2/, ... of at most `part_mb` MB each, largest wheel
    first into the first part with room (first-fit decreasing)."""
    budget = part_mb * 2**20
    parts: list[tuple[float, list[Path]]] = []
    for path in sorted(wheels.glob("*.whl"), key=lambda p: -p.stat().st_size):
        size = path.stat().st_size
        for index, (used, members) in enumerate(parts):
            if used + size <= budget:
                parts[index] = (used + size, [*members, path])
                break
        else:
            parts.append((size, [path]))
    layout: dict[str, list[str]] = {}
    for index, (_, members) in enumerate(parts, start=1):
        folder = wheels / f"part-{index}"
        folder.mkdir()
        for path in members:
            path.rename(folder / path.name)
        layout[folder.name] = sorted(p.name for p in members)
    return layout


def kernel_metadata(user: str, dataset_slug: str, models_slug: str) -> dict:
    """notebook 04 as a Kaggle kernel: the competition, the bundle and the models attached,
    internet off (as the scoring run), a T4 GPU."""
    return {
        "id": f"{user}/voco2d-submission",
        "title": "voco2d submission",
        "code_file": SUBMISSION_NOTEBOOK.name,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": True,
        "enable_tpu": False,
        "enable_internet": False,
        "machine_shape": "NvidiaTeslaT4",
        "dataset_sources": [f"{user}/{dataset_slug}", f"{user}/{models_slug}"],
        "competition_sources": [COMPETITION_NAME],
        "kernel_sources": [],
        "model_sources": [],
    }


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=1) + "\n")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--python-version", default=KAGGLE_PYTHON,
        help=f"target Python (default {KAGGLE_PYTHON}, Kaggle's); 'this' for this interpreter",
    )  # fmt: skip
    parser.add_argument(
        "--platform", action="append", default=None,
        help="target wheel platform tag, repeatable (default: Kaggle's manylinux x86_64 tags)",
    )  # fmt: skip
    parser.add_argument(
        "--preinstalled", default="kaggle",
        help="packages the target already has, left out: 'kaggle' (its image), 'none', or a "
        "comma-separated list of names",
    )  # fmt: skip
    parser.add_argument(
        "--also-preinstalled", default="", help="comma-separated names added to --preinstalled"
    )
    parser.add_argument("--extras", default="", help="comma-separated extras, e.g. notebooks")
    parser.add_argument("--kaggle-user", default="", help="default: $KAGGLE_USERNAME")
    parser.add_argument("--dataset-slug", default="voco2d-bundle")
    parser.add_argument("--models-slug", default="voco2d-models", help="notebook 03's output")
    parser.add_argument(
        "--split-mb", type=float, default=0.0,
        help="spread the wheels over wheels/part-<k>/ of at most this many MB (0: one folder)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    presets = {"kaggle": set(KAGGLE_PREINSTALLED), "none": set()}
    preinstalled = presets.get(args.preinstalled) or _names(args.preinstalled)
    preinstalled |= _names(args.also_preinstalled)
    this = args.python_version == "this"
    manifest = build_bundle(
        args.output,
        python_version=None if this else args.python_version,
        platforms=args.platform or KAGGLE_PLATFORMS,
        preinstalled=preinstalled,
        extras=[e for e in args.extras.split(",") if e],
        kaggle_user=args.kaggle_user,
        dataset_slug=args.dataset_slug,
        models_slug=args.models_slug,
        split_mb=args.split_mb,
    )
    for name, size in manifest["wheels"].items():
        print(f"{size / 2**20:8.1f} MB  {name}")
    print(
        f"{args.output}: {len(manifest['wheels'])} wheels, {manifest['total_mb']} MB, for Python "
        f"{manifest['python_version']}; left out as preinstalled: "
        f"{', '.join(manifest['dropped_as_preinstalled']) or 'nothing'}"
    )
    for part, names in manifest["parts"].items():
        size = sum(manifest["wheels"][n] for n in names) / 2**20
        print(f"{part}: {len(names)} wheels, {size:.1f} MB")
    print(
        "upload: kaggle datasets create -p "
        f"{args.output} -r zip   (then: kaggle kernels push -p {args.output / 'kernel'})"
    )


def _names(text: str) -> set[str]:
    return {canonicalize_name(name) for name in re.split(r"[,\s]+", text) if name}


if __name__ == "__main__":
    main()
