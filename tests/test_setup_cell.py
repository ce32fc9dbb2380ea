"""The set-up cell every notebook starts with (right after its parameters): the same code in
all six, and the right install on Kaggle, Colab and locally. The Kaggle path is run for real,
offline, in tests/test_kaggle_offline.py."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def setup_cell(notebook: Path) -> str:
    cells = [c.source for c in jupytext.read(notebook).cells if c.cell_type == "code"]
    assert "parameters" in cells[0] or "smoke" in cells[0]
    assert "def install_kaggle_utils" in cells[1], (
        f"{notebook.name}: no set-up cell after parameters"
    )
    return cells[1]


def test_every_notebook_has_the_same_set_up_cell_right_after_its_parameters() -> None:
    cells = {p.name: setup_cell(p) for p in NOTEBOOKS}
    assert len(set(cells.values())) == 1, "the set-up cells differ: copy one to all notebooks"
    for notebook in NOTEBOOKS:
        parameters = next(c for c in jupytext.read(notebook).cells if c.cell_type == "code")
        assert 'install_from: str = ""' in parameters.source, notebook.name


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[Any, list[list[str]]]:
    """The cell's `install_kaggle_utils`, as if kaggle_utils were not installed yet, with pip
    calls recorded instead of run, under a fake root."""
    namespace: dict[str, Any] = {}
    source = setup_cell(NOTEBOOKS[0]).replace("print(install_kaggle_utils(install_from))", "")
    exec(compile(source, "setup_cell", "exec"), namespace)
    calls: list[list[str]] = []
    installed = {"done": False}

    def version(package: str) -> str:
        if not installed["done"]:
            raise importlib.metadata.PackageNotFoundError(package)
        return "0.1.0"

    def check_call(command: list[str]) -> int:
        calls.append(command)
        installed["done"] = True
        return 0

    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(subprocess, "check_call", check_call)
    for name in ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_UTILS_FAKE_ROOT", str(tmp_path))
    return namespace["install_kaggle_utils"], calls


def test_kaggle_installs_from_the_attached_bundle_with_no_index(
    install: tuple[Any, list[list[str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    function, calls = install
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    monkeypatch.setenv("COLAB_RELEASE_TAG", "kaggle-images-are-built-on-colab")
    with pytest.raises(FileNotFoundError, match="attach the bundle dataset"):
        function()
    wheels = tmp_path / "kaggle/input/datasets/someone/voco2d-bundle/wheels"
    wheels.mkdir(parents=True)
    (wheels / "kaggle_utils_voco2d-0.1.0-py3-none-any.whl").write_bytes(b"")
    assert "installed offline from" in function()
    assert calls[0][-4:] == ["--no-index", "--find-links", str(wheels), "kaggle-utils-voco2d"]


def test_colab_installs_the_clone_under_content(
    install: tuple[Any, list[list[str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    function, calls = install
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab")
    with pytest.raises(FileNotFoundError, match="clone the repository first"):
        function()
    # (the cell installs `install_from` instead when given; see the notebooks' parameters)
    clone = tmp_path / "content" / "voco2d"
    (clone / "kaggle_utils").mkdir(parents=True)
    (clone / "kaggle_utils" / "__init__.py").write_text("")
    said = function()
    assert f"installed from {clone}" in said and "Drive is not mounted" in said
    assert calls[-1][-1] == str(clone) and "--no-index" not in calls[-1]


def test_colab_installs_install_from_and_is_quiet_about_a_mounted_drive(
    install: tuple[Any, list[list[str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opened from its GitHub URL, a notebook has no clone beside it: `install_from` (a pip
    spec, e.g. git+https://github.com/<owner>/<repo>) installs it."""
    function, calls = install
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab")
    (tmp_path / "content" / "drive" / "MyDrive").mkdir(parents=True)
    said = function("git+https://github.com/someone/voco2d")
    assert said.endswith("installed from git+https://github.com/someone/voco2d")
    assert calls[-1][-1] == "git+https://github.com/someone/voco2d"


def bundle_dataset(root: Path, pythons: list[str]) -> Path:
    dataset = root / "kaggle/input/datasets/someone/voco2d-bundle"
    (dataset / "wheels").mkdir(parents=True)
    (dataset / "wheels" / "kaggle_utils_voco2d-0.1.0-py3-none-any.whl").write_bytes(b"")
    (dataset / "manifest.json").write_text(json.dumps({"pythons": pythons}))
    return dataset


def test_a_bundle_for_other_pythons_says_so_and_how_to_rebuild_it(
    install: tuple[Any, list[list[str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    function, calls = install
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    here = "{}.{}".format(*sys.version_info[:2])
    dataset = bundle_dataset(tmp_path, ["2.6", "2.7"])
    with pytest.raises(RuntimeError) as raised:
        function()
    message = str(raised.value)
    assert "wheels for Python 2.6, 2.7" in message and f"runs Python {here}" in message
    assert f"--python {here}" in message and calls == []  # pip never ran
    (dataset / "manifest.json").write_text(json.dumps({"pythons": ["2.7", here]}))
    assert "installed offline from" in function()


def test_a_failed_offline_install_says_what_to_do(
    install: tuple[Any, list[list[str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    function, _ = install
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    bundle_dataset(tmp_path, ["{}.{}".format(*sys.version_info[:2])])

    def pip_fails(command: list[str]) -> int:
        raise subprocess.CalledProcessError(1, command)

    monkeypatch.setattr(subprocess, "check_call", pip_fails)
    with pytest.raises(
        RuntimeError, match=r"could not install kaggle-utils-voco2d offline.*Rebuild"
    ):
        function()


def test_locally_it_installs_nothing(install: tuple[Any, list[list[str]]]) -> None:
    function, calls = install
    assert "make install" in function()
    assert calls == []
