"""paths: Kaggle, Colab and local told apart by their environment variables, and every
default folder resolvable under a fake root."""

from __future__ import annotations

import os
import sys
import types
from pathlib import Path

import pytest

from kaggle_utils.common import paths
from kaggle_utils.submission.inference import resolve_model_dir, resolve_output_csv

PLATFORM_VARIABLES = ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG", paths.FAKE_ROOT_ENV)


@pytest.fixture
def fake_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder standing in for `/`, with no platform variable set."""
    for name in PLATFORM_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(paths.FAKE_ROOT_ENV, str(tmp_path))
    monkeypatch.chdir(tmp_path)  # not inside the project checkout
    return tmp_path


def test_the_platform_comes_from_the_environment_not_from_folders(
    fake_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (fake_root / "kaggle" / "working").mkdir(parents=True)  # a folder alone proves nothing
    assert paths.environment() == "local"
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-20260514")
    assert paths.environment() == "colab"
    # Kaggle's image is built on Colab's and keeps COLAB_RELEASE_TAG: Kaggle wins
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    assert paths.environment() == "kaggle" and paths.on_kaggle() and not paths.on_colab()


@pytest.mark.parametrize(
    "layout",
    [paths.COMPETITION_NAME, f"competitions/{paths.COMPETITION_NAME}"],
    ids=["classic", "competitions"],
)
def test_kaggle_finds_the_competition_in_either_mount_layout(
    fake_root: Path, monkeypatch: pytest.MonkeyPatch, layout: str
) -> None:
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    data = fake_root / "kaggle" / "input" / layout
    data.mkdir(parents=True)
    assert paths.resolve_data_root() == data
    assert paths.resolve_output_dir("", "cache") == fake_root / "kaggle" / "working" / "cache"
    assert resolve_output_csv() == fake_root / "kaggle" / "working" / "submission.csv"


def test_colab_writes_to_drive_when_it_is_mounted(
    fake_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab")
    (fake_root / "content" / paths.COMPETITION_NAME).mkdir(parents=True)
    assert paths.resolve_data_root() == fake_root / "content" / paths.COMPETITION_NAME
    assert paths.resolve_output_dir("", "pretrain") == fake_root / "content/outputs/pretrain"
    (fake_root / "content" / "drive" / "MyDrive").mkdir(parents=True)
    expected = fake_root / "content/drive/MyDrive" / paths.DRIVE_FOLDER / "pretrain"
    assert paths.resolve_output_dir("", "pretrain") == expected


def test_missing_data_says_what_to_do_on_each_platform(
    fake_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(FileNotFoundError, match="put the data in inputs/"):
        paths.resolve_data_root()
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    with pytest.raises(FileNotFoundError, match="attach the competition data"):
        paths.resolve_data_root()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        paths.resolve_data_root(fake_root / "nowhere")


def fake_model_folder(folder: Path, n_folds: int = 2) -> Path:
    for fold in range(n_folds):
        (folder / f"fold{fold}").mkdir(parents=True)
        (folder / f"fold{fold}" / "best.pt").write_bytes(b"")
        (folder / f"fold{fold}" / "model.json").write_text("{}")
        (folder / f"fold{fold}" / "done.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    "where",
    ["voco2d-models", "voco2d-models/finetune", "datasets/someone/voco2d-models/finetune"],
    ids=["classic", "classic-subfolder", "datasets-owner"],
)
def test_kaggle_finds_the_model_dataset_wherever_it_is_mounted(
    fake_root: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    inputs = fake_root / "kaggle" / "input"
    (inputs / paths.COMPETITION_NAME / "test_images").mkdir(parents=True)
    (inputs / "voco2d-bundle" / "wheels").mkdir(parents=True)
    models = fake_model_folder(inputs / where)
    assert resolve_model_dir() == models
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")  # locally /kaggle/input is not searched
    with pytest.raises(FileNotFoundError, match="no fine-tuned models found"):
        resolve_model_dir()


# --------------------------------------------------------------------------- every path parameter


def make_input(kind: str, folder: Path) -> str:
    """What one path parameter points at, made under `folder`; returns its part below the
    dataset (or kernel output) folder."""
    import nibabel as nib
    import numpy as np
    import polars as pl
    import torch

    from kaggle_utils.common.backbone import build_backbone

    from conftest import save_encoder

    if kind == "data_root":
        (folder / paths.COMPETITION_NAME).mkdir(parents=True)
        return paths.COMPETITION_NAME
    if kind == "cache_dir":
        (folder / "cache" / "records").mkdir(parents=True)
        return "cache"
    if kind == "encoder_file":
        (folder / "pretrain").mkdir(parents=True)
        save_encoder(folder / "pretrain", "encoder", 1)
        return "pretrain/encoder.pt"
    if kind == "weights_file":
        folder.mkdir(parents=True)
        torch.save(build_backbone("test_efficientnet", 3).state_dict(), folder / "weights.pth")
        return "weights.pth"
    if kind in ("model_dir", "resume_from"):
        fake_model_folder(folder / "finetune")
        (folder / "finetune" / "fold0" / "last.pt").write_bytes(b"")
        return "finetune"
    if kind == "segmentation_dir":
        (folder / "segmentation").mkdir(parents=True)
        pl.DataFrame({"series_id": [1], "organ": ["liver"]}).write_parquet(
            folder / "segmentation" / "organs.parquet"
        )
        return "segmentation"
    if kind == "extra_dirs":
        (folder / "flare").mkdir(parents=True)
        volume = nib.Nifti1Image(np.zeros((4, 4, 3), dtype=np.int16), np.eye(4))
        nib.save(volume, folder / "flare" / "case_0001.nii.gz")
        return "flare"
    raise ValueError(kind)


def consume(kind: str, value: str, tmp: Path) -> object:
    """The function that reads each path parameter, called as the notebooks call it."""
    from kaggle_utils.cache import preprocess, sources
    from kaggle_utils.common import backbone, runtime
    from kaggle_utils.finetune import model as classifier
    from kaggle_utils.segmentation import train as segmentation

    if kind == "data_root":
        return paths.resolve_data_root(value)
    if kind == "cache_dir":
        return preprocess.resolve_cache_dirs([value])
    if kind == "encoder_file":
        return classifier.build_classifier("test_efficientnet", 1, "voco", encoder_file=value)
    if kind == "weights_file":
        return backbone.build_backbone("test_efficientnet", 1, weights_file=value)
    if kind == "model_dir":
        return resolve_model_dir(value)
    if kind == "resume_from":
        return runtime.copy_previous_run(value, tmp / "resumed")
    if kind == "segmentation_dir":
        return segmentation.organ_table(value)
    if kind == "extra_dirs":
        found = sources.find_volume_sources([value])
        assert len(found) == 1, found
        return found
    raise ValueError(kind)


PATH_PARAMETERS = (
    "data_root", "cache_dir", "encoder_file", "weights_file", "model_dir", "resume_from",
    "segmentation_dir", "extra_dirs",
)  # fmt: skip
LAYOUTS = {  # where Kaggle mounts an input called "voco2d-run"
    "classic": "voco2d-run",
    "dataset": "datasets/someone/voco2d-run",
    "kernel-output": "notebooks/someone/voco2d-run",
}


@pytest.mark.parametrize("mounted", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("kind", PATH_PARAMETERS)
@pytest.mark.parametrize("written", ["classic", "new", "relative"])
def test_every_path_parameter_finds_its_input_in_either_mount_layout(
    fake_root: Path, monkeypatch: pytest.MonkeyPatch, kind: str, mounted: str, written: str
) -> None:
    """A path written for one layout (or relative to the inputs) works in the other: a recipe
    made in an older session keeps working in a newer one."""
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    inputs = fake_root / "kaggle" / "input"
    below = make_input(kind, inputs / LAYOUTS[mounted])
    value = {
        "classic": f"/kaggle/input/voco2d-run/{below}",
        "new": f"/kaggle/input/datasets/someone/voco2d-run/{below}",
        "relative": f"voco2d-run/{below}",
    }[written]
    assert consume(kind, value, fake_root) is not None
    if kind == "cache_dir":  # a glob over the mounted inputs, as the kernels pass it
        assert preprocess_dirs("voco2d-*/cache") == [inputs / LAYOUTS[mounted] / "cache"]


def preprocess_dirs(pattern: str) -> list[Path]:
    from kaggle_utils.cache import preprocess

    return preprocess.resolve_cache_dirs([pattern])


def test_a_path_found_nowhere_says_where_it_looked(
    fake_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Batch")
    (fake_root / "kaggle/input/datasets/someone/other").mkdir(parents=True)
    with pytest.raises(
        FileNotFoundError, match=r"voco2d-cache-\*/cache matches no folder.*datasets/someone"
    ):
        preprocess_dirs("voco2d-cache-*/cache")
    with pytest.raises(FileNotFoundError, match=r"encoder_file=x/encoder.pt does not exist"):
        paths.find_input("x/encoder.pt", "encoder_file", "file")
    # outside Kaggle nothing is looked up under /kaggle/input
    monkeypatch.delenv("KAGGLE_KERNEL_RUN_TYPE")
    (fake_root / "kaggle/input/voco2d-run/cache").mkdir(parents=True)
    assert paths.find_inputs("voco2d-run/cache") == []


# --------------------------------------------------------------------------- Colab's CSVs

FAKE_KAGGLE_CLI = """#!/bin/sh
# kaggle competitions download <competition> -f <file> -p <folder>: logs, then writes the file
# (train.csv zipped, as the real CLI delivers large files)
echo "$* token=$KAGGLE_API_TOKEN" >> "$FAKE_KAGGLE_LOG"
[ -n "$FAKE_KAGGLE_FAIL" ] && { echo "403 - Forbidden: you must accept the rules" >&2; exit 1; }
file=$5; folder=$7
if [ "$file" = train.csv ]; then
    printf 'patient_id\\n1\\n' > "$folder/$file"
    (cd "$folder" && python3 -m zipfile -c "$file.zip" "$file") && rm "$folder/$file"
else
    printf 'patient_id\\n' > "$folder/$file"
fi
"""


@pytest.fixture
def fake_kaggle_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kaggle").write_text(FAKE_KAGGLE_CLI)
    (bin_dir / "kaggle").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    log = tmp_path / "kaggle.log"
    monkeypatch.setenv("FAKE_KAGGLE_LOG", str(log))
    for name in paths.KAGGLE_CREDENTIALS:
        monkeypatch.delenv(name, raising=False)
    return log


def test_colab_fetches_the_competition_csvs_with_the_kaggle_cli_and_colab_secrets(
    fake_root: Path, fake_kaggle_cli: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On Colab the competition folder is made from its CSVs (the DICOMs stay on Kaggle), with
    the token from Colab's secrets when the environment has none."""
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-20260819")
    secrets = types.SimpleNamespace(get=lambda name: {"KAGGLE_API_TOKEN": "KGAT_abc"}[name])
    colab = types.ModuleType("google.colab")
    colab.userdata = secrets  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "google", types.ModuleType("google"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    root = paths.resolve_data_root()
    assert root == fake_root / "content" / paths.COMPETITION_NAME
    assert sorted(p.name for p in root.iterdir()) == sorted(paths.COMPETITION_CSVS)
    assert (root / "train.csv").read_text() == "patient_id\n1\n"  # unzipped
    calls = fake_kaggle_cli.read_text().splitlines()
    assert len(calls) == len(paths.COMPETITION_CSVS)
    assert all(c.startswith(f"competitions download {paths.COMPETITION_NAME} -f ") for c in calls)
    assert all(c.endswith("token=KGAT_abc") for c in calls)
    assert paths.fetch_competition_csvs(root) == []  # all there: nothing fetched again


def test_colab_without_access_says_how_to_get_it(
    fake_root: Path, fake_kaggle_cli: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab-20260819")
    monkeypatch.setenv("FAKE_KAGGLE_FAIL", "1")
    with pytest.raises(FileNotFoundError, match=r"403.*KAGGLE_API_TOKEN.*accept the competition"):
        paths.resolve_data_root()
