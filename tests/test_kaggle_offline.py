"""The Kaggle scoring run, simulated on the CPU: a fresh environment with Kaggle's versions of
what its image preinstalls (`constraints-kaggle.txt`, tests/kaggle_image.py; this machine's
torch linked in), the bundle built for it, the network cut (`unshare -n`), and the
submission kernel's own notebook (`kernels/voco2d-submission`, its first cell pointing at
notebook 03's kernel output) run through papermill on a fake `/kaggle` tree in the newer
mount layout (competitions/, datasets/<owner>/, notebooks/<owner>/), its set-up cell
installing kaggle_utils from the bundle with `pip install --no-index`, to a valid submission."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

from kaggle_utils import bundle
from kaggle_utils.common import paths
from kaggle_utils.submission.inference import predict_test_set

from kaggle_image import build as build_kaggle_image
from submission_checks import assert_no_notebook_warnings, assert_same_submission

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


def installed_versions(python: Path) -> dict[str, str]:
    listed = subprocess.check_output(
        [str(python), "-m", "pip", "list", "--format=json", "--disable-pip-version-check"],
        text=True,
    )
    return {canonicalize_name(d["name"]): d["version"] for d in json.loads(listed)}


@pytest.mark.slow
def test_notebook_04_installs_offline_from_the_bundle_and_submits(
    tiny_competition: Path, model_dir: Path, tmp_path: Path
) -> None:
    why_not = network_can_be_cut()
    if why_not:
        pytest.skip(f"cannot simulate Kaggle's offline run here: {why_not}")
    kaggle_versions = bundle.read_constraints(python_version=None)
    python = build_kaggle_image(tmp_path / "kaggle-image", sorted(kaggle_versions))
    image = installed_versions(python)
    assert not set(image) & NOT_ON_KAGGLE, set(image) & NOT_ON_KAGGLE
    assert {"torch", "timm", "polars", "pydicom", "albumentations", "papermill"} <= set(image)
    assert all(image[name] == version for name, version in kaggle_versions.items())

    # the bundle for this interpreter, leaving out what the fake image has (at its versions)
    built = bundle.build_bundle(
        tmp_path / "bundle", pythons=[None], preinstalled={"this": image}, kaggle_user="me"
    )
    bundled = {bundle.wheel_name(name) for name in built["wheels"]}
    assert {"kaggle-utils-voco2d", "dicomsdl", "pylibjpeg-rle", "monai"} <= bundled
    assert not bundled & set(image)  # nothing the image already has
    assert not any(bundle.never_bundled(name) for name in bundled)
    kernel_dir = tmp_path / "bundle" / "kernels" / "voco2d-submission"
    kernel = json.loads((kernel_dir / "kernel-metadata.json").read_text())
    assert kernel["enable_internet"] is False and kernel["enable_gpu"] is True
    assert kernel["competition_sources"] == [paths.COMPETITION_NAME]
    assert kernel["kernel_sources"] == ["me/voco2d-finetune"]

    # the newer mount layout: competitions/, datasets/<owner>/, notebooks/<owner>/
    fake_root = tmp_path / "root"
    inputs = fake_root / "kaggle" / "input"
    shutil.copytree(tmp_path / "bundle" / "dataset", inputs / "datasets/me/voco2d-bundle")
    shutil.copytree(tiny_competition, inputs / "competitions" / paths.COMPETITION_NAME)
    shutil.copytree(model_dir, inputs / "notebooks/me/voco2d-finetune/finetune")
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
        str(python), "-m", "papermill", str(kernel_dir / "04_submission.ipynb"),
        str(executed), "-p", "smoke", "True", "-p", "max_prior_share", "0", "--cwd",
        str(working), "--kernel", "python3", "--no-progress-bar",
    ]  # fmt: skip
    offline = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *papermill]
    run = subprocess.run(offline, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]

    # what this environment's predict_test_set makes of the same test set and models: Kaggle's
    # versions of numpy, polars, timm, albumentations and the bundle's decoders must not move
    # a probability (and no patient may get the prior, there or here)
    direct = predict_test_set(
        tiny_competition, model_dir, tmp_path / "direct" / "submission.csv", workers=0,
        max_prior_share=0, progress=False,
    )  # fmt: skip
    assert_same_submission(
        working / "submission.csv", direct,
        inputs / "competitions" / paths.COMPETITION_NAME / "sample_submission.csv",
    )  # fmt: skip
    assert_no_notebook_warnings(executed)
    text = executed.read_text()
    assert "installed offline from" in text  # the set-up cell did the install
    assert "dicomsdl" in text and "NO DECODER" not in text  # the decoders came with it
    # installed into the fake image itself, not found in this environment
    assert list((tmp_path / "kaggle-image").rglob("kaggle_utils_voco2d-*.dist-info"))
