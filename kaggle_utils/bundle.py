"""The offline install for Kaggle, and a Kaggle kernel for every notebook: `make kaggle-bundle`
(`python -m kaggle_utils.bundle`).

Kaggle's scoring run has no internet, so everything the notebooks import must come from
attached inputs. `make kaggle-bundle` writes:

    dist/kaggle-bundle/
        dataset/                 upload as one dataset (`kaggle datasets create -p ... -r zip`)
            wheels/              this project's wheel and the wheels of every package it needs
                                 that Kaggle's image lacks, for each target Python
            manifest.json        target Pythons and platform, wheels per Python, sizes, licences,
                                 what was left out as preinstalled, the git commit
            LICENSES.md          each wheel's licence (the dataset's licence follows from them)
            dataset-metadata.json
        kernels/<slug>/          one folder per step (`kaggle kernels push -p ...`): notebook 01
                                 once per cache shard (CPU), 02 and 03 (GPU) and 04 (GPU, the
                                 submission), each with its kernel-metadata.json and its
                                 parameters set in the notebook's first cell

Only the wheels Kaggle lacks go in: the requirement graph is walked from this project's
wheel, one `pip download --no-deps` round at a time, and stops at every package the image
preinstalls (`constraints-kaggle.txt`, with Kaggle's versions: a requirement Kaggle's version
does not meet is an error, not a surprise on Kaggle). torch, torchvision, triton, nvidia-* and
cuda-* are never bundled, whatever the target: every image this project runs on brings its own
CUDA build. Native wheels are fetched for each target Python (3.12, Kaggle's image; 3.13,
Colab's, which Kaggle's tracks); pure-Python wheels are shared.

Every notebook's set-up cell finds `wheels/` under /kaggle/input, checks the manifest for the
running Python, and runs `pip install --no-index --find-links <wheels> kaggle-utils-voco2d`.
"""

from __future__ import annotations

import argparse
import ast
import email.parser
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from kaggle_utils.common.paths import COMPETITION_NAME
from kaggle_utils.common.provenance import BUILD_COMMIT, git_commit

PROJECT_NAME = "kaggle-utils-voco2d"
CONSTRAINTS_FILE = "constraints-kaggle.txt"
# Kaggle's image (Python 3.12) and Colab's (3.13 since 2026-08-19), which Kaggle's tracks.
KAGGLE_PYTHONS: tuple[str, ...] = ("3.12", "3.13")
# Never in a bundle: each platform's own CUDA build must stay (and one wheel of them alone is
# larger than a Kaggle dataset should be). Patterns over canonical names.
NEVER_BUNDLED: tuple[str, ...] = (
    "torch",
    "torchvision",
    "torchaudio",
    "triton",
    "nvidia-*",
    "cuda-*",
)
# manylinux tags a Kaggle image (Ubuntu 22.04, glibc 2.35, x86_64) can install
KAGGLE_PLATFORMS: tuple[str, ...] = (
    "manylinux2014_x86_64",
    *(f"manylinux_2_{minor}_x86_64" for minor in range(17, 36)),
    "linux_x86_64",
)
DEFAULT_OUTPUT = Path("dist") / "kaggle-bundle"
NOTEBOOKS = {
    "01": "01_dicom_preprocess.ipynb",
    "02": "02_voco2d_pretrain.ipynb",
    "03": "03_finetune_bilstm.ipynb",
    "04": "04_submission.ipynb",
}
# Kaggle's default GPU ("GPU T4 x2"; kaggle CLI 1.8.4 and later send it with `kernels push`).
# Without a machine shape older sessions landed on a P100, which Kaggle's torch cannot use.
GPU_MACHINE_SHAPE = "NvidiaTeslaT4"
# Notebooks 02 and 03 stop cleanly this long into Kaggle's 12-hour session (43,200 s), with
# their checkpoint written; re-run with resume_from to go on.
KAGGLE_TIME_LIMIT_S = 41_000.0


class BundleError(RuntimeError):
    """The bundle cannot be made as asked (a conflict with the target image, a wheel missing)."""


def project_root() -> Path:
    return Path(__file__).resolve().parents[1]


def never_bundled(name: str) -> bool:
    name = canonicalize_name(name)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in NEVER_BUNDLED)


def wheel_name(path: Path | str) -> str:
    return canonicalize_name(parse_wheel_filename(Path(path).name)[0])


def wheel_version(path: Path | str) -> Version:
    return parse_wheel_filename(Path(path).name)[1]


# --------------------------------------------------------------------------- the target image


def marker_environment(python_version: str | None) -> dict[str, str]:
    """The values PEP 508 markers are evaluated with: this interpreter's, or a Linux x86_64
    CPython of `python_version` ("3.12")."""
    environment = dict(default_environment())
    if python_version:
        environment |= {
            "python_version": python_version,
            "python_full_version": f"{python_version}.0",
            "implementation_name": "cpython",
            "platform_python_implementation": "CPython",
            "sys_platform": "linux",
            "platform_system": "Linux",
            "platform_machine": "x86_64",
            "os_name": "posix",
        }
    return environment


def read_constraints(
    path: Path | None = None, python_version: str | None = "3.12"
) -> dict[str, str]:
    """`constraints-kaggle.txt` as {canonical name: version} for one Python (its markers
    evaluated; None: this interpreter's)."""
    path = Path(path or project_root() / CONSTRAINTS_FILE)
    environment = marker_environment(python_version)
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        (specifier,) = requirement.specifier
        if specifier.operator != "==":
            raise ValueError(f"{path}: {line!r} is not an exact pin")
        pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


@dataclass(frozen=True)
class Target:
    """What the wheels are for: a Python version on Linux x86_64 (None: this interpreter and
    platform, for the offline test), and what that image preinstalls ({name: version}, the
    version None where unknown)."""

    python_version: str | None
    platforms: tuple[str, ...] = KAGGLE_PLATFORMS
    preinstalled: Mapping[str, str | None] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.python_version:
            return self.python_version
        return f"{sys.version_info.major}.{sys.version_info.minor}"

    def pip_arguments(self) -> list[str]:
        """pip's target options (binary wheels for that Python and platform)."""
        arguments = ["--only-binary=:all:"]
        if self.python_version:
            arguments += ["--python-version", self.python_version, "--implementation", "cp"]
            arguments += [arg for platform in self.platforms for arg in ("--platform", platform)]
        return arguments


# --------------------------------------------------------------------------- resolving wheels


def wheel_metadata(path: Path) -> email.message.Message:
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        return email.parser.Parser().parsestr(archive.read(name).decode())


def wheel_requirements(path: Path) -> list[Requirement]:
    """The Requires-Dist of a wheel (markers are evaluated later, against the target)."""
    return [Requirement(line) for line in wheel_metadata(path).get_all("Requires-Dist") or []]


def applies(
    requirement: Requirement, environment: Mapping[str, str], extras: Iterable[str]
) -> bool:
    """Whether a requirement holds on the target, for a package asked for with `extras`."""
    if requirement.marker is None:
        return True
    return any(
        requirement.marker.evaluate({**environment, "extra": extra}) for extra in {"", *extras}
    )


def wheel_licence(path: Path) -> str:
    """The licence a wheel declares: License-Expression, else License, else its classifiers."""
    metadata = wheel_metadata(path)
    expression = (metadata.get("License-Expression") or "").strip()
    if expression:
        return expression
    licence = (metadata.get("License") or "").strip().splitlines()
    if licence and len(licence[0]) < 60:
        return licence[0]
    classifiers = [
        c.split("::")[-1].strip()
        for c in metadata.get_all("Classifier") or []
        if c.startswith("License ::")
    ]
    return "; ".join(classifiers) or "unknown"


def is_gpl3(licence: str) -> bool:
    text = licence.upper().replace(" ", "")
    return "GPL" in text and "LGPL" not in text and "AGPL" not in text and "3" in text


def resolve_wheels(
    roots: Sequence[tuple[Path, Sequence[str]]],
    target: Target,
    dest: Path,
    *,
    exclude: Iterable[str] = (),
    find_links: Sequence[str | Path] = (),
    pins: Mapping[str, str] | None = None,
    download: bool = True,
) -> dict[str, Path]:
    """The wheels `roots` (wheel files, each with the extras wanted of it) need on `target`,
    downloaded into `dest`: {canonical name: wheel}, the roots included.

    Requirements are followed from the roots' metadata, markers evaluated for the target, one
    `pip download --no-deps` call per round. The walk stops at packages the target preinstalls,
    at `exclude` (not needed there) and at NEVER_BUNDLED names. `pins` ({name: version}, e.g.
    Kaggle's) choose the version of a package downloaded here, where they name it. Every
    requirement met on the way is checked against the version chosen for it, or the target's
    preinstalled version where known.

    Raises:
        BundleError: a requirement the chosen or preinstalled version does not meet.
        subprocess.CalledProcessError: pip found no wheel for the target (its output says which).
    """
    environment = marker_environment(target.python_version)
    preinstalled = {canonicalize_name(n): v for n, v in target.preinstalled.items()}
    skip = {canonicalize_name(n) for n in exclude}
    chosen: dict[str, Path] = {}
    seen: list[tuple[str, Requirement]] = []  # (who requires it, what)
    pending: list[tuple[str, Requirement]] = []
    for wheel, extras in roots:
        chosen[wheel_name(wheel)] = wheel
        pending += [
            (wheel_name(wheel), r)
            for r in wheel_requirements(wheel)
            if applies(r, environment, extras)
        ]
    while pending:
        wanted: dict[str, Requirement] = {}
        for requirer, requirement in pending:
            name = canonicalize_name(requirement.name)
            seen.append((requirer, requirement))
            if name in chosen or name in preinstalled or name in skip or never_bundled(name):
                continue
            if name in wanted:
                merged = wanted[name].specifier & requirement.specifier
                wanted[name] = Requirement(f"{name}{merged}")
                wanted[name].extras = wanted[name].extras | requirement.extras
            else:
                wanted[name] = Requirement(f"{name}{requirement.specifier}")
                wanted[name].extras = set(requirement.extras)
        pending = []
        if not wanted:
            break
        before = set(dest.glob("*.whl"))
        if download:
            links = [arg for folder in find_links for arg in ("--find-links", str(folder))]
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
            command += ["--dest", str(dest), *target.pip_arguments(), *links]
            specs = [
                f"{name}=={pins[name]}" if pins and name in pins else str(requirement)
                for name, requirement in wanted.items()
            ]
            subprocess.run([*command, *specs], check=True)
        arrived = {wheel_name(p): p for p in set(dest.glob("*.whl")) - before}
        for name, requirement in wanted.items():
            wheel = arrived.get(name) or _existing_wheel(dest, name, requirement.specifier)
            if wheel is None:
                raise BundleError(f"pip downloaded no wheel for {requirement} ({target.label})")
            chosen[name] = wheel
            pending += [
                (name, r)
                for r in wheel_requirements(wheel)
                if applies(r, environment, requirement.extras)
            ]
    conflicts = []
    for requirer, requirement in seen:
        name = canonicalize_name(requirement.name)
        if name in chosen:
            have, where = str(wheel_version(chosen[name])), "bundled"
        elif preinstalled.get(name):
            have, where = str(preinstalled[name]), "preinstalled"
        else:
            continue
        if not requirement.specifier.contains(have, prereleases=True):
            conflicts.append(f"{requirer} needs {requirement}, the {where} {name} is {have}")
    if conflicts:
        raise BundleError(
            f"for Python {target.label}: "
            + "; ".join(sorted(set(conflicts)))
            + " (lower this project's bound if the code allows it, or bundle the package: "
            "--not-preinstalled NAME)"
        )
    return chosen


def _existing_wheel(dest: Path, name: str, specifier: SpecifierSet) -> Path | None:
    """A wheel of `name` already in `dest` that meets `specifier` (pip skips files it has)."""
    for path in sorted(dest.glob("*.whl")):
        if wheel_name(path) == name and specifier.contains(wheel_version(path), prereleases=True):
            return path
    return None


# --------------------------------------------------------------------------- the bundle


def build_project_wheel(folder: Path) -> Path:
    """This checkout as a wheel (uncommitted changes included), with the git commit inside
    (`kaggle_utils/BUILD_COMMIT`, what `provenance` reports once installed from it)."""
    root = project_root()
    source = folder / "source"
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=root, capture_output=True, text=True,
    ).stdout.split("\0")  # fmt: skip
    names = [f for f in files if f and (root / f).is_file()] or _package_files(root)
    for name in names:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, source / name)
    (source / "kaggle_utils" / BUILD_COMMIT.name).write_text(git_commit(root) + "\n")
    wheels = folder / "project"
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir"]
    subprocess.run([*command, str(wheels), str(source)], check=True)
    (wheel,) = wheels.glob("*.whl")
    return wheel


def _package_files(root: Path) -> list[str]:
    """Outside a git checkout: what a wheel needs."""
    keep = [root / "pyproject.toml", root / "README.md", *(root / "kaggle_utils").rglob("*.py")]
    return [str(p.relative_to(root)) for p in keep if p.is_file()]


def build_bundle(
    output: Path = DEFAULT_OUTPUT,
    *,
    pythons: Sequence[str | None] = KAGGLE_PYTHONS,
    platforms: Sequence[str] = KAGGLE_PLATFORMS,
    preinstalled: Mapping[str, Mapping[str, str | None]] | None = None,
    extras: Sequence[str] = (),
    exclude: Iterable[str] = (),
    kaggle_user: str = "",
    dataset_slug: str = "voco2d-bundle",
    shards: int = 3,
    find_links: Sequence[str] = (),
    split_mb: float = 0.0,
    kernels: bool = True,
) -> dict:
    """Write the bundle folder (see the module docstring); returns its manifest.

    `pythons`: target Python versions ("3.12"), or None for this interpreter and platform (the
    offline test). `preinstalled`: per target Python, what its image has ({name: version or
    None}); default: `constraints-kaggle.txt` read for that Python. `exclude`: packages not
    needed where the bundle goes (left out, as if preinstalled). `extras`: optional dependency
    groups of this project (e.g. "notebooks" for a machine without papermill). `split_mb` > 0
    spreads the wheels over `wheels/part-<k>/` folders of at most that size each, for a machine
    that can only be sent so much at a time (`benchmarks/gpu_check.py --install-part`), the
    package's own requirements in the first parts, its extras' after them. `shards`: notebook
    01's kernels, one per cache shard.

    Raises:
        BundleError: a requirement a target's preinstalled version does not meet.
        subprocess.CalledProcessError: pip could not build or download a wheel (its output
            says which); nothing half-made is left in `output`.
    """
    output = Path(output)
    staging = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    dataset = staging / "dataset"
    wheels = dataset / "wheels"
    wheels.mkdir(parents=True)
    targets = {
        (python or "this"): Target(
            python,
            tuple(platforms),
            dict(preinstalled[python or "this"])
            if preinstalled is not None
            else read_constraints(python_version=python),
        )
        for python in pythons
    }
    per_target: dict[str, list[str]] = {}
    runtime_wheels: set[str] = set()  # what the package needs without its extras
    with tempfile.TemporaryDirectory() as scratch:
        project_wheel = build_project_wheel(Path(scratch))
        for key, target in targets.items():
            folder = Path(scratch) / f"wheels-{key}"
            folder.mkdir()
            root_wheel = folder / project_wheel.name
            shutil.copy2(project_wheel, root_wheel)
            chosen = resolve_wheels(
                [(root_wheel, extras)], target, folder, exclude=exclude, find_links=find_links,
                pins=read_constraints(python_version=target.python_version),
            )  # fmt: skip
            per_target[target.label] = sorted(p.name for p in chosen.values())
            if extras:  # the same walk without the extras: every wheel is already here
                base = resolve_wheels(
                    [(root_wheel, ())], target, folder, exclude=exclude, download=False
                )
                runtime_wheels |= {p.name for p in base.values()}
            for path in chosen.values():
                if not (wheels / path.name).exists():
                    shutil.copy2(path, wheels / path.name)
    sizes = {p.name: p.stat().st_size for p in sorted(wheels.glob("*.whl"))}
    licences = {p.name: wheel_licence(p) for p in sorted(wheels.glob("*.whl"))}
    parts = _split_into_parts(wheels, split_mb, first=runtime_wheels) if split_mb > 0 else {}
    manifest = {
        "project": PROJECT_NAME,
        "git_commit": git_commit(project_root()),
        "built": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "pythons": sorted(per_target),
        "platforms": list(platforms) if any(pythons) else ["this machine"],
        "wheels_per_python": per_target,
        "preinstalled": {t.label: sorted(t.preinstalled) for t in targets.values()},
        "never_bundled": list(NEVER_BUNDLED),
        "excluded": sorted(canonicalize_name(n) for n in exclude),
        "wheels": sizes,
        "licences": licences,
        "parts": parts,
        "total_mb": round(sum(sizes.values()) / 2**20, 1),
    }
    user = kaggle_user or os.environ.get("KAGGLE_USERNAME", "") or "YOUR-KAGGLE-USERNAME"
    write_json(dataset / "manifest.json", manifest)
    (dataset / "LICENSES.md").write_text(licences_text(licences))
    write_json(dataset / "dataset-metadata.json", dataset_metadata(user, dataset_slug, licences))
    if kernels:
        for plan in kaggle_kernels(shards):
            write_kernel(staging / "kernels" / plan.slug, plan, user, dataset_slug)
    shutil.rmtree(output, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    os.replace(staging, output)
    return manifest


def dataset_metadata(user: str, slug: str, licences: Mapping[str, str]) -> dict:
    """The bundle as a Kaggle dataset. Its licence follows its wheels: each keeps its own
    (LICENSES.md lists them), and redistributing a GPL-3.0 one (pylibjpeg-libjpeg) makes the
    whole GPL-3.0; else "other", pointing to LICENSES.md."""
    gpl = sorted({wheel_name(name) for name, licence in licences.items() if is_gpl3(licence)})
    return {
        "title": "voco2d offline bundle",
        "id": f"{user}/{slug}",
        "licenses": [{"name": "GPL-3.0" if gpl else "other"}],
        "subtitle": "Wheels for the 2D-VoCo notebooks' offline install on Kaggle",
        "description": (
            "Wheels of kaggle-utils-voco2d and of the packages it needs that Kaggle's image "
            "lacks, for Python "
            + ", ".join(sorted({_python_tag(n) for n in licences} - {""}))
            + ". Each wheel keeps its own licence (LICENSES.md)"
            + (f"; {', '.join(gpl)} is GPL-3.0, so the collection is GPL-3.0." if gpl else ".")
        ),
    }


def _python_tag(wheel: str) -> str:
    tags = parse_wheel_filename(wheel)[3]
    found = {t.interpreter for t in tags if re.fullmatch(r"cp3\d+", t.interpreter)}
    return ", ".join(f"3.{t[3:]}" for t in sorted(found))


def licences_text(licences: Mapping[str, str]) -> str:
    lines = ["# Licences of the wheels in this dataset", "", "| wheel | licence |", "|---|---|"]
    lines += [f"| {name} | {licence} |" for name, licence in licences.items()]
    return "\n".join(lines) + "\n"


def _split_into_parts(
    wheels: Path, part_mb: float, first: Iterable[str] = ()
) -> dict[str, list[str]]:
    """Move the wheels into part-1/, part-2/, ... of at most `part_mb` MB each, largest wheel
    first into the first part with room (first-fit decreasing), the wheels named in `first`
    (what the package needs without its extras) before the others, so that the first parts
    alone let it run."""
    budget = part_mb * 2**20
    parts: list[tuple[float, list[Path]]] = []
    early = set(first)
    order = sorted(wheels.glob("*.whl"), key=lambda p: (p.name not in early, -p.stat().st_size))
    for path in order:
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


# --------------------------------------------------------------------------- Kaggle kernels


@dataclass(frozen=True)
class KernelPlan:
    """One notebook as a Kaggle kernel: what it runs on and what it reads."""

    slug: str
    notebook: str  # file name under notebooks/
    gpu: bool
    parameters: dict[str, object]
    competition: bool = True
    kernel_sources: tuple[str, ...] = ()  # slugs of earlier steps whose output it reads
    internet: bool = False  # nothing downloads at run time; the set-up cell uses the bundle


def kaggle_kernels(shards: int) -> list[KernelPlan]:
    """The recipe as kernels: notebook 01 once per shard (CPU: decoding needs no GPU), 02
    reading every shard's output, 03 reading the shards and 02's encoder, 04 reading 03's fold
    models. Each reads the others' output as kernel sources (mounted at
    /kaggle/input/<slug>/ or /kaggle/input/notebooks/<owner>/<slug>/; the notebooks' paths
    are resolved in both layouts), so no step needs a dataset made by hand."""
    caches = tuple(f"voco2d-cache-{k}" for k in range(shards))
    cache_dir = ["voco2d-cache-*/cache"]
    steps = [
        KernelPlan(slug, NOTEBOOKS["01"], gpu=False,
                   parameters={"split": "train", "shard_index": k, "num_shards": shards})
        for k, slug in enumerate(caches)
    ]  # fmt: skip
    steps.append(
        KernelPlan("voco2d-pretrain", NOTEBOOKS["02"], gpu=True, competition=False,
                   kernel_sources=caches,
                   parameters={"cache_dir": cache_dir, "launch": "torchrun",
                               "time_limit_s": KAGGLE_TIME_LIMIT_S})
    )  # fmt: skip
    steps.append(
        KernelPlan("voco2d-finetune", NOTEBOOKS["03"], gpu=True,
                   kernel_sources=(*caches, "voco2d-pretrain"),
                   parameters={"cache_dir": cache_dir,
                               "encoder_file": "voco2d-pretrain/pretrain/encoder.pt",
                               "launch": "torchrun", "time_limit_s": KAGGLE_TIME_LIMIT_S})
    )  # fmt: skip
    steps.append(
        KernelPlan("voco2d-submission", NOTEBOOKS["04"], gpu=True,
                   kernel_sources=("voco2d-finetune",),
                   parameters={"model_dir": "voco2d-finetune/finetune"})
    )  # fmt: skip
    return steps


def kernel_metadata(user: str, dataset_slug: str, plan: KernelPlan) -> dict:
    """kernel-metadata.json for `kaggle kernels push` (kaggle CLI 1.8.4 or later sends
    `machine_shape`; older ones drop it, and the kernel may land on a GPU Kaggle's torch cannot
    use)."""
    metadata: dict[str, object] = {
        "id": f"{user}/{plan.slug}",
        "title": plan.slug.replace("-", " "),
        "code_file": plan.notebook,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": True,
        "enable_gpu": plan.gpu,
        "enable_tpu": False,
        "enable_internet": plan.internet,
        "dataset_sources": [f"{user}/{dataset_slug}"],
        "competition_sources": [COMPETITION_NAME] if plan.competition else [],
        "kernel_sources": [f"{user}/{slug}" for slug in plan.kernel_sources],
        "model_sources": [],
    }
    if plan.gpu:
        metadata["machine_shape"] = GPU_MACHINE_SHAPE
    return metadata


def write_kernel(folder: Path, plan: KernelPlan, user: str, dataset_slug: str) -> None:
    """The notebook with `plan.parameters` written into its parameters cell, beside its
    kernel-metadata.json."""
    folder.mkdir(parents=True, exist_ok=True)
    notebook = json.loads((project_root() / "notebooks" / plan.notebook).read_text())
    cell = next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))
    source = "".join(cell["source"])
    cell["source"] = set_parameters(source, plan.parameters).splitlines(keepends=True)
    write_json(folder / plan.notebook, notebook)
    write_json(folder / "kernel-metadata.json", kernel_metadata(user, dataset_slug, plan))


def set_parameters(source: str, values: Mapping[str, object]) -> str:
    """A notebook's parameters cell with the given values in place of the defaults (each
    line's comment kept), so that on Kaggle the first cell shows what the kernel runs with.

    Raises:
        KeyError: a name the cell does not assign.
    """
    lines = source.splitlines(keepends=True)
    found: dict[str, ast.expr] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            found[node.target.id] = node.value
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            found[node.targets[0].id] = node.value
    missing = set(values) - set(found)
    if missing:
        raise KeyError(f"not parameters of this notebook: {sorted(missing)}")
    # right to left within the cell, so earlier offsets stay valid
    for name in sorted(values, key=lambda n: (found[n].lineno, found[n].col_offset), reverse=True):
        node = found[name]
        if node.end_lineno != node.lineno:
            raise ValueError(f"parameter {name}: its default spans several lines")
        line = lines[node.lineno - 1]
        start, end = _char_offset(line, node.col_offset), _char_offset(line, node.end_col_offset)
        lines[node.lineno - 1] = line[:start] + repr(values[name]) + line[end:]
    return "".join(lines)


def _char_offset(line: str, byte_offset: int | None) -> int:
    """ast's column offsets count UTF-8 bytes."""
    return len(line.encode()[: int(byte_offset or 0)].decode())


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1) + "\n")


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument(
        "--python", action="append", default=None,
        help=f"target Python, repeatable (default: {', '.join(KAGGLE_PYTHONS)}); 'this' for "
        "this interpreter and platform",
    )  # fmt: skip
    parser.add_argument(
        "--platform", action="append", default=None,
        help="target wheel platform tag, repeatable (default: Kaggle's manylinux x86_64 tags)",
    )  # fmt: skip
    parser.add_argument(
        "--preinstalled", default="kaggle",
        help=f"what the target has: 'kaggle' ({CONSTRAINTS_FILE}, with its versions), 'none', "
        "or a comma-separated list of names",
    )  # fmt: skip
    parser.add_argument(
        "--not-preinstalled", default="", help="comma-separated names to bundle all the same"
    )
    parser.add_argument(
        "--exclude", default="", help="comma-separated packages not needed on the target"
    )
    parser.add_argument("--extras", default="", help="comma-separated extras, e.g. notebooks")
    parser.add_argument("--kaggle-user", default="", help="default: $KAGGLE_USERNAME")
    parser.add_argument("--dataset-slug", default="voco2d-bundle")
    parser.add_argument("--shards", type=int, default=3, help="notebook 01's cache shards")
    parser.add_argument(
        "--split-mb", type=float, default=0.0,
        help="spread the wheels over wheels/part-<k>/ of at most this many MB (0: one folder)",
    )  # fmt: skip
    parser.add_argument("--no-kernels", action="store_true", help="only the dataset")
    args = parser.parse_args(argv)
    pythons = [None if p == "this" else p for p in args.python or KAGGLE_PYTHONS]
    not_preinstalled = _names(args.not_preinstalled)
    preinstalled: dict[str, dict[str, str | None]] = {}
    for python in pythons:
        if args.preinstalled == "kaggle":
            have: dict[str, str | None] = dict(read_constraints(python_version=python))
        elif args.preinstalled == "none":
            have = {}
        else:
            have = dict.fromkeys(_names(args.preinstalled))
        preinstalled[python or "this"] = {
            n: v for n, v in have.items() if n not in not_preinstalled
        }
    manifest = build_bundle(
        args.output,
        pythons=pythons,
        platforms=args.platform or KAGGLE_PLATFORMS,
        preinstalled=preinstalled,
        extras=[e for e in args.extras.split(",") if e],
        exclude=_names(args.exclude),
        kaggle_user=args.kaggle_user,
        dataset_slug=args.dataset_slug,
        shards=args.shards,
        split_mb=args.split_mb,
        kernels=not args.no_kernels,
    )
    print(summary(manifest, args.output))


def summary(manifest: Mapping, output: Path) -> str:
    lines = [f"{size / 2**20:8.1f} MB  {name}" for name, size in manifest["wheels"].items()]
    lines.append(
        f"{output / 'dataset'}: {len(manifest['wheels'])} wheels, {manifest['total_mb']} MB, "
        f"for Python {', '.join(manifest['pythons'])}"
    )
    for part, names in manifest["parts"].items():
        size = sum(manifest["wheels"][n] for n in names) / 2**20
        lines.append(f"{part}: {len(names)} wheels, {size:.1f} MB")
    if (output / "kernels").is_dir():
        lines.append(
            f"upload: kaggle datasets create -p {output / 'dataset'} -r zip; then, in order, "
            f"kaggle kernels push -p {output / 'kernels'}/<step> (README: Kaggle)"
        )
    return "\n".join(lines)


def _names(text: str) -> set[str]:
    return {canonicalize_name(name) for name in re.split(r"[,\s]+", text) if name}


if __name__ == "__main__":
    main()
