"""Packaging: the installed wheel declares what kaggle_utils imports, requirements.txt agrees
with it, and importing the package never reaches for the network."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
# import name -> distribution name, where they differ
DISTRIBUTIONS = {"sklearn": "scikit-learn", "PIL": "pillow", "yaml": "pyyaml"}
# imported by kaggle_utils but only optionally (guarded imports with a fallback)
# Imported only inside the functions that need them; papermill (the experiment batch's runner)
# is in the `notebooks` extra.
# google.colab: Colab's secrets, read only on Colab.
OPTIONAL_IMPORTS = {"pandas", "einops", "IPython", "papermill", "google"}


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_set(lines: list[str]) -> set[tuple[str, str]]:
    parsed = [Requirement(line) for line in lines]
    return {(r.name.lower(), str(r.specifier)) for r in parsed}


def test_requirements_txt_is_the_package_dependencies_plus_the_notebooks_extra() -> None:
    project = pyproject()["project"]
    declared = requirement_set(
        project["dependencies"] + project["optional-dependencies"]["notebooks"]
    )
    lines = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert requirement_set(lines) == declared


def test_every_third_party_import_of_the_package_is_declared() -> None:
    declared = {Requirement(r).name.lower() for r in pyproject()["project"]["dependencies"]}
    stdlib = set(sys.stdlib_module_names)
    imported: set[str] = set()
    for source in (ROOT / "kaggle_utils").rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - stdlib - {"kaggle_utils", "__future__"} - OPTIONAL_IMPORTS
    missing = {DISTRIBUTIONS.get(m, m).lower() for m in third_party} - declared
    assert not missing, f"imported by kaggle_utils but not in pyproject dependencies: {missing}"


def test_torch_is_a_range_never_a_pin() -> None:
    for line in pyproject()["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.name in ("torch", "torchvision"):
            assert all(s.operator == ">=" for s in requirement.specifier), line


def test_importing_the_package_never_opens_a_connection() -> None:
    """albumentations checks PyPI for updates at import unless NO_ALBUMENTATIONS_UPDATE is
    set: kaggle_utils sets it, so an offline scoring run never waits on the network."""
    script = textwrap.dedent(
        """
        import os, socket
        os.environ.pop("NO_ALBUMENTATIONS_UPDATE", None)
        attempts = []
        def refuse(self, address, *args):
            attempts.append(address)
            raise OSError("network disabled by the test")
        socket.socket.connect = refuse
        socket.create_connection = lambda address, *a, **k: refuse(None, address)
        import kaggle_utils.finetune.data as data
        data.build_transform(32, True, data.AugmentConfig())
        import kaggle_utils.pretrain.train  # with the next line, everything notebook 04 needs
        import kaggle_utils.submission.inference
        print("attempts:", attempts)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "attempts: []" in result.stdout, result.stdout + result.stderr[-2000:]


# What Kaggle's image lacks: the bundle brings these (tests/test_bundle.py builds it).
BUNDLED_FOR_KAGGLE = {
    "dicomsdl", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "monai",
}  # fmt: skip


def test_lower_bounds_hold_on_kaggle_and_every_dependency_is_accounted_for() -> None:
    """Each lower bound in pyproject.toml is met by Kaggle's version (constraints-kaggle.txt,
    for both of its Pythons), so what the suite proves on Kaggle's versions holds there; each
    dependency is either in Kaggle's image or brought by the bundle, so a new one forces that
    choice. (`make test-lowest-versions` runs the suite at the bounds themselves.)"""
    from packaging.utils import canonicalize_name

    from kaggle_utils.bundle import KAGGLE_PYTHONS, never_bundled, read_constraints

    project = pyproject()["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for r in project["optional-dependencies"]["notebooks"]]
    for python in KAGGLE_PYTHONS:
        pins = read_constraints(python_version=python)
        missing = set()
        for requirement in declared:
            name = canonicalize_name(requirement.name)
            if never_bundled(name):  # torch: the platform's own build
                continue
            if name in pins:
                assert requirement.specifier.contains(pins[name]), (python, str(requirement))
            else:
                missing.add(name)
        assert missing == BUNDLED_FOR_KAGGLE, (python, missing)


def test_license_and_citation_agree_with_the_package() -> None:
    """A fork on Kaggle needs a licence; a paper using the toolkit needs the citation: the
    LICENSE text, pyproject's SPDX expression and CITATION.cff say the same, for this version."""
    import yaml

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert project["license"] == citation["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
    assert citation["version"] == project["version"]
    assert "arXiv:2601.14593" in str(citation["preferred-citation"]["identifiers"])
