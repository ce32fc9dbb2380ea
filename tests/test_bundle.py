"""The bundle builder: the requirement walk that keeps the bundle lean, the real Kaggle bundle
for both of Kaggle's Pythons, a kernel for every step with its parameters in the first cell,
and the split of a large bundle into parts. The offline install from it is run end to end in
tests/test_kaggle_offline.py."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import jupytext
import numpy as np
import pytest
from packaging.utils import canonicalize_name, parse_wheel_filename

from kaggle_utils import bundle
from kaggle_utils.common.paths import COMPETITION_NAME
from kaggle_utils.common.provenance import git_commit

from conftest import pydicom_test_file

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20


def fake_wheels(folder: Path, sizes_mb: dict[str, float]) -> None:
    folder.mkdir(parents=True)
    for name, size in sizes_mb.items():
        (folder / f"{name}-1.0-py3-none-any.whl").write_bytes(b"\0" * int(size * MB))


def test_parts_hold_every_wheel_once_and_stay_under_the_limit(tmp_path: Path) -> None:
    sizes = {"opencv": 54, "polars": 51, "a": 20, "b": 18, "c": 9, "d": 5, "e": 0.5}
    wheels = tmp_path / "wheels"
    fake_wheels(wheels, sizes)
    layout = bundle._split_into_parts(wheels, 56)
    assert not list(wheels.glob("*.whl"))  # all moved into parts
    placed = [name for names in layout.values() for name in names]
    assert sorted(placed) == sorted(f"{n}-1.0-py3-none-any.whl" for n in sizes)
    for part in layout:
        total = sum(p.stat().st_size for p in (wheels / part).glob("*.whl"))
        assert total <= 56 * MB, part
    # first-fit decreasing packs 157.5 MB into 3 parts, the fewest 56 MB parts can hold
    assert len(layout) == 3


def test_a_wheel_larger_than_a_part_gets_one_of_its_own(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    fake_wheels(wheels, {"huge": 3, "small": 1})
    layout = bundle._split_into_parts(wheels, 2)
    assert layout == {
        "part-1": ["huge-1.0-py3-none-any.whl"],
        "part-2": ["small-1.0-py3-none-any.whl"],
    }


# --------------------------------------------------------------------------- the requirement walk


def metadata_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A wheel file holding only its METADATA (what the walk reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", "\n".join(lines))
    return path


@pytest.fixture
def index(tmp_path: Path) -> Path:
    """A local 'index' as the walk would find it after pip's downloads."""
    folder = tmp_path / "wheels"
    metadata_wheel(folder, "decoder", "1.0", ["numpy>=1.24", "codec-core>=2"])
    metadata_wheel(folder, "codec-core", "2.5", ["nvidia-cublas-cu12; platform_system == 'Linux'"])
    metadata_wheel(
        folder, "segmenter", "1.6", ["torch>=2.4", "numpy<3,>=1.24", "plots; extra == 'viz'"]
    )
    metadata_wheel(folder, "plots", "1.0", [])
    metadata_wheel(folder, "old-only", "1.0", ["sklearn-compat; python_version < '3.8'"])
    return folder


def walk(index: Path, requires: list[str], preinstalled: dict[str, str | None], **kwargs):
    root = metadata_wheel(index, "project", "0.1.0", requires)
    target = bundle.Target("3.12", preinstalled=preinstalled)
    return bundle.resolve_wheels([(root, ())], target, index, download=False, **kwargs)


def test_the_walk_stops_at_preinstalled_and_never_takes_torch_or_cuda(index: Path) -> None:
    chosen = walk(
        index,
        ["decoder", "segmenter", "old-only", "torch>=2.3", "timm"],
        {"numpy": "2.0.2", "timm": "1.0.26"},
    )
    assert set(chosen) == {"project", "decoder", "codec-core", "segmenter", "old-only"}
    # torch, its CUDA wheels and whatever else preinstalled or marked out is never taken
    assert not {"torch", "nvidia-cublas-cu12", "numpy", "timm", "plots", "sklearn-compat"} & set(
        chosen
    )


def test_an_extra_that_is_asked_for_is_followed(index: Path) -> None:
    chosen = walk(index, ["segmenter[viz]"], {"numpy": "2.0.2"})
    assert "plots" in chosen


def test_a_requirement_the_image_does_not_meet_is_an_error_not_a_surprise_on_kaggle(
    index: Path,
) -> None:
    with pytest.raises(bundle.BundleError, match=r"segmenter needs numpy<3,>=1.24.*is 1.21"):
        walk(index, ["segmenter"], {"numpy": "1.21.0"})
    with pytest.raises(bundle.BundleError, match=r"project needs timm>=1.1.*is 1.0.26"):
        walk(index, ["timm>=1.1"], {"timm": "1.0.26"})
    # a preinstalled package of unknown version is trusted; an excluded one is left out
    chosen = walk(index, ["segmenter", "decoder"], {"numpy": None}, exclude=["decoder"])
    assert "decoder" not in chosen and "segmenter" in chosen


def test_the_constraints_file_reads_per_python() -> None:
    py312, py313 = (bundle.read_constraints(python_version=v) for v in bundle.KAGGLE_PYTHONS)
    assert py312["numpy"] == "2.0.2" and py313["numpy"] == "2.1.3"  # numpy 2.0 has no cp313
    assert py312["polars"] == py313["polars"] == "1.35.2"
    assert not any(bundle.never_bundled(name) for name in py312)


# --------------------------------------------------------------------------- the real bundle


@pytest.fixture(scope="module")
def kaggle_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`make kaggle-bundle`, for real (wheels from the package index)."""
    output = tmp_path_factory.mktemp("bundle") / "kaggle-bundle"
    bundle.main(["--output", str(output), "--kaggle-user", "me", "--shards", "2"])
    return output


def native(wheel: str) -> bool:
    return any(tag.abi != "none" for tag in parse_wheel_filename(wheel)[3])


@pytest.mark.slow
def test_the_kaggle_bundle_is_lean_and_complete_for_both_pythons(kaggle_bundle: Path) -> None:
    manifest = json.loads((kaggle_bundle / "dataset" / "manifest.json").read_text())
    wheels = sorted(p.name for p in (kaggle_bundle / "dataset" / "wheels").glob("*.whl"))
    names = {canonicalize_name(parse_wheel_filename(w)[0]) for w in wheels}
    preinstalled = set(bundle.read_constraints(python_version="3.12"))
    assert names == {
        "kaggle-utils-voco2d",
        "dicomsdl",
        "pylibjpeg",
        "pylibjpeg-libjpeg",
        "pylibjpeg-openjpeg",
        "pylibjpeg-rle",
        "monai",
    }
    assert not names & preinstalled
    assert not any(bundle.never_bundled(n) for n in names)
    for name in {canonicalize_name(parse_wheel_filename(w)[0]) for w in wheels if native(w)}:
        tags = {
            tag.interpreter
            for w in wheels
            if canonicalize_name(parse_wheel_filename(w)[0]) == name
            for tag in parse_wheel_filename(w)[3]
        }
        assert {"cp312", "cp313"} <= tags, (name, tags)
    size_mb = sum(manifest["wheels"].values()) / MB
    print(f"Kaggle bundle: {len(wheels)} wheels, {size_mb:.1f} MB, Python {manifest['pythons']}")
    assert size_mb < 25
    assert manifest["pythons"] == ["3.12", "3.13"]
    # the project's wheel knows the commit it was built from (provenance on Kaggle)
    (project,) = (kaggle_bundle / "dataset" / "wheels").glob("kaggle_utils_voco2d-*.whl")
    with zipfile.ZipFile(project) as archive:
        built_from = archive.read("kaggle_utils/BUILD_COMMIT").decode().strip()
    assert built_from == manifest["git_commit"] == git_commit(ROOT)
    # the dataset's licence follows its wheels: pylibjpeg-libjpeg is GPL-3.0
    dataset = json.loads((kaggle_bundle / "dataset" / "dataset-metadata.json").read_text())
    assert dataset["id"] == "me/voco2d-bundle"
    assert dataset["licenses"] == [{"name": "GPL-3.0"}]
    licences = (kaggle_bundle / "dataset" / "LICENSES.md").read_text()
    assert "pylibjpeg_libjpeg" in licences and "GPL" in licences


def interpreter(version: str) -> Path | None:
    """A CPython of that version on this machine that runs (pyenv's, or on PATH), else None."""
    candidates = sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python{version}"))
    on_path = shutil.which(f"python{version}")  # may be a pyenv shim with no version selected
    candidates += [Path(on_path)] if on_path else []
    for candidate in candidates:
        if subprocess.run([str(candidate), "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


DECODE = """
import sys, numpy as np, pydicom, dicomsdl
expected = np.load(sys.argv[1], allow_pickle=True).item()
for name, (path, reference) in expected.items():
    ours = pydicom.dcmread(path).pixel_array  # through the pylibjpeg plugins
    fast = dicomsdl.open(path).pixelData()
    assert np.array_equal(ours, reference), name
    assert np.array_equal(fast.reshape(reference.shape), reference), name
print("decoded", sorted(expected), "on", sys.version.split()[0])
"""


@pytest.mark.slow
@pytest.mark.parametrize("python", bundle.KAGGLE_PYTHONS)
def test_each_pythons_wheels_install_and_decode_there(
    kaggle_bundle: Path, python: str, tmp_path: Path
) -> None:
    """The native wheels for that Python install offline into a venv of it (with its image's
    numpy and pydicom) and decode RLE, JPEG 2000 and JPEG lossless as this environment does;
    the package compiles under that Python."""
    executable = interpreter(python)
    if executable is None:
        pytest.skip(f"no Python {python} on this machine")
    venv = tmp_path / "venv"
    subprocess.run([str(executable), "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-compile"]
    versions = bundle.read_constraints(python_version=python)
    subprocess.run(
        [*pip, f"numpy=={versions['numpy']}", f"pydicom=={versions['pydicom']}"], check=True
    )
    manifest = json.loads((kaggle_bundle / "dataset" / "manifest.json").read_text())
    wheels = kaggle_bundle / "dataset" / "wheels"
    decoders = [
        wheels / w
        for w in manifest["wheels_per_python"][python]
        if "pylibjpeg" in w or "dicomsdl" in w
    ]
    subprocess.run([*pip, "--no-index", "--no-deps", *map(str, decoders)], check=True)
    import pydicom

    files = {
        "rle": "MR_small_RLE.dcm",
        "jpeg2000": "MR_small_jp2klossless.dcm",
        "jpeg-lossless": "JPEG-LL.dcm",
    }
    expected = {}
    for kind, name in files.items():
        path = str(pydicom_test_file(name))
        expected[kind] = (path, pydicom.dcmread(path).pixel_array)
    np.save(tmp_path / "expected.npy", np.array(expected, dtype=object), allow_pickle=True)
    run = subprocess.run(
        [str(venv / "bin" / "python"), "-c", DECODE, str(tmp_path / "expected.npy")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"on {python}" in run.stdout
    compiled = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "compileall", "-q", str(ROOT / "kaggle_utils")],
        capture_output=True,
        text=True,
    )
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr


# --------------------------------------------------------------------------- kernels


def test_every_step_is_a_kernel_with_its_machine_and_inputs() -> None:
    plans = {p.slug: p for p in bundle.kaggle_kernels(shards=3)}
    assert list(plans) == [
        "voco2d-cache-0",
        "voco2d-cache-1",
        "voco2d-cache-2",
        "voco2d-pretrain",
        "voco2d-finetune",
        "voco2d-submission",
    ]
    meta = {slug: bundle.kernel_metadata("me", "voco2d-bundle", p) for slug, p in plans.items()}
    for slug, kernel in meta.items():
        assert kernel["id"] == f"me/{slug}"
        assert kernel["dataset_sources"] == ["me/voco2d-bundle"]  # the offline install
        assert kernel["enable_internet"] is False  # nothing downloads at run time
        assert (ROOT / "notebooks" / kernel["code_file"]).is_file()
        # a GPU kernel names its machine: without it a kernel may land on a P100
        assert kernel.get("machine_shape") == ("NvidiaTeslaT4" if kernel["enable_gpu"] else None)
    for k in range(3):
        cache = meta[f"voco2d-cache-{k}"]
        assert cache["enable_gpu"] is False and cache["code_file"] == "01_dicom_preprocess.ipynb"
        assert cache["competition_sources"] == [COMPETITION_NAME]
        assert plans[f"voco2d-cache-{k}"].parameters == {
            "split": "train",
            "shard_index": k,
            "num_shards": 3,
        }
    caches = [f"me/voco2d-cache-{k}" for k in range(3)]
    assert meta["voco2d-pretrain"]["kernel_sources"] == caches
    assert meta["voco2d-pretrain"]["competition_sources"] == []  # no labels in pretraining
    assert meta["voco2d-finetune"]["kernel_sources"] == [*caches, "me/voco2d-pretrain"]
    assert meta["voco2d-finetune"]["competition_sources"] == [COMPETITION_NAME]
    submission = meta["voco2d-submission"]
    assert submission["code_file"] == "04_submission.ipynb" and submission["enable_gpu"] is True
    assert submission["kernel_sources"] == ["me/voco2d-finetune"]
    assert submission["competition_sources"] == [COMPETITION_NAME]


@pytest.mark.parametrize("plan", bundle.kaggle_kernels(shards=2), ids=lambda p: p.slug)
def test_a_kernel_notebook_shows_its_settings_in_its_first_cell(
    plan: bundle.KernelPlan, tmp_path: Path
) -> None:
    bundle.write_kernel(tmp_path / plan.slug, plan, "me", "voco2d-bundle")
    notebook = jupytext.read(tmp_path / plan.slug / plan.notebook)
    original = jupytext.read(ROOT / "notebooks" / plan.notebook)
    at = next(i for i, c in enumerate(notebook.cells) if c.cell_type == "code")
    cell = notebook.cells[at]
    assert "parameters" in cell.metadata["tags"]
    values = {
        node.targets[0].id if isinstance(node, ast.Assign) else node.target.id: node.value
        for node in ast.parse(cell.source).body
        if isinstance(node, ast.Assign | ast.AnnAssign)
    }
    for name, value in plan.parameters.items():
        assert ast.literal_eval(values[name]) == value, name
    # every other line, its comment included, is the notebook's own
    before = next(c for c in original.cells if c.cell_type == "code").source.splitlines()
    after = cell.source.splitlines()
    assert len(before) == len(after)
    changed = [a for a, b in zip(after, before, strict=True) if a != b]
    assert len(changed) <= len(plan.parameters)
    assert all("  # " in line for line in changed)  # the comments stayed
    others = [c.source for i, c in enumerate(notebook.cells) if i != at]
    assert others == [c.source for i, c in enumerate(original.cells) if i != at]
    metadata = json.loads((tmp_path / plan.slug / "kernel-metadata.json").read_text())
    assert metadata["code_file"] == plan.notebook


def test_set_parameters_refuses_a_name_the_notebook_does_not_have() -> None:
    with pytest.raises(KeyError, match="shard_count"):
        bundle.set_parameters("shard_index: int = 0  # which\n", {"shard_count": 3})
    assert bundle.set_parameters('x = ""  # type: list|str  a comment\n', {"x": ["a*"]}) == (
        "x = ['a*']  # type: list|str  a comment\n"
    )
