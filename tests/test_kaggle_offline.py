"""The Kaggle scoring run, simulated on the CPU: the bundle is built, a fresh environment holds
only what Kaggle's image preinstalls, the network is cut (`unshare -n`), and notebook 04 runs
through papermill on a fake `/kaggle` tree (competition folder, model dataset, bundle dataset
under kaggle/input), its set-up cell installing kaggle_utils from the bundle with
`pip install --no-index`, to a valid submission."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kaggle_utils import bundle, paths
from kaggle_utils.metric import validate_submission

ROOT = Path(__file__).resolve().parents[1]
# What the bundle must bring: never part of the fake image, or the test proves nothing.
NOT_ON_KAGGLE = {
    "kaggle-utils-voco2d", "dicomsdl", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
    "pylibjpeg-rle", "monai",
}  # fmt: skip


def network_can_be_cut() -> str:
    """'' when `unshare -n` with loopback up works here, else why not."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare or ip not installed"
    probe = subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True
    )
    return "" if probe.returncode == 0 else f"unshare -n not permitted: {probe.stderr.strip()}"


def preinstalled_closure(names: set[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions of `names` and everything they require (markers
    evaluated, requested extras followed, e.g. torch's `cuda-toolkit[cublas,...]`): what an
    image with those packages holds."""
    found: dict[str, importlib.metadata.Distribution] = {}
    followed: set[tuple[str, str]] = set()
    todo: list[tuple[str, frozenset[str]]] = [(n, frozenset()) for n in sorted(names)]
    while todo:
        raw_name, extras = todo.pop()
        name = canonicalize_name(raw_name)
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


def fake_kaggle_image(target: Path, names: set[str]) -> tuple[Path, set[str]]:
    """A venv whose site-packages holds only `names` (and their requirements), linked from
    this environment. Returns its python and the distribution names it holds."""
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    python = target / "bin" / "python"
    site = Path(
        subprocess.check_output(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            text=True,
        ).strip()
    )
    distributions = preinstalled_closure(names)
    for dist in distributions.values():
        base = Path(str(dist.locate_file("")))
        tops = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            link = site / top
            if not link.exists() and (base / top).exists():
                link.symlink_to(base / top)
    return python, set(distributions)


@pytest.mark.slow
def test_notebook_04_installs_offline_from_the_bundle_and_submits(
    tiny_competition: Path, model_dir: Path, tmp_path: Path
) -> None:
    why_not = network_can_be_cut()
    if why_not:
        pytest.skip(f"cannot simulate Kaggle's offline run here: {why_not}")
    wanted = {canonicalize_name(n) for n in bundle.KAGGLE_PREINSTALLED}
    python, image = fake_kaggle_image(tmp_path / "kaggle-image", wanted)
    assert not image & NOT_ON_KAGGLE, image & NOT_ON_KAGGLE
    assert {"torch", "timm", "polars", "pydicom", "albumentations", "papermill"} <= image

    # the bundle for this interpreter, leaving out what the fake image has
    fake_root = tmp_path / "root"
    inputs = fake_root / "kaggle" / "input"
    manifest = bundle.build_bundle(
        inputs / "voco2d-bundle", python_version=None, preinstalled=image
    )
    bundled = {bundle.wheel_name(Path(name)) for name in manifest["wheels"]}
    assert {"kaggle-utils-voco2d", "dicomsdl", "pylibjpeg-rle"} <= bundled
    assert not bundled & image  # nothing the image already has
    kernel = json.loads((inputs / "voco2d-bundle/kernel/kernel-metadata.json").read_text())
    assert kernel["enable_internet"] is False and kernel["enable_gpu"] is True
    assert kernel["competition_sources"] == [paths.COMPETITION_NAME]

    shutil.copytree(tiny_competition, inputs / paths.COMPETITION_NAME)
    shutil.copytree(model_dir, inputs / "voco2d-models")
    working = fake_root / "kaggle" / "working"
    working.mkdir(parents=True)
    home = tmp_path / "home"
    env = {
        "PATH": f"{python.parent}:/usr/sbin:/usr/bin:/bin",
        "HOME": str(home),
        "KAGGLE_KERNEL_RUN_TYPE": "Batch",
        "KAGGLE_UTILS_FAKE_ROOT": str(fake_root),
        "JUPYTER_DATA_DIR": str(home / "jupyter"),
        "JUPYTER_CONFIG_DIR": str(home / "jupyter-config"),
        "IPYTHONDIR": str(home / "ipython"),
        "MPLBACKEND": "Agg",
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PIP_CONFIG_FILE": os.devnull,  # this machine's pip.conf is not Kaggle's
        "OMP_NUM_THREADS": "1",
    }
    executed = tmp_path / "executed_04.ipynb"
    papermill = [
        str(python), "-m", "papermill", str(ROOT / "notebooks" / "04_submission.ipynb"),
        str(executed), "-p", "smoke", "True", "--cwd", str(working), "--kernel", "python3",
        "--no-progress-bar",
    ]  # fmt: skip
    offline = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *papermill]
    run = subprocess.run(offline, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]

    submission = working / "submission.csv"
    sample = pl.read_csv(inputs / paths.COMPETITION_NAME / "sample_submission.csv")
    validate_submission(pl.read_csv(submission), sample)
    text = executed.read_text()
    assert "installed offline from" in text  # the set-up cell did the install
    assert "dicomsdl" in text and "NO DECODER" not in text  # the decoders came with it
    # installed into the fake image itself, not found in this environment
    assert list((tmp_path / "kaggle-image").rglob("kaggle_utils_voco2d-*.dist-info"))
