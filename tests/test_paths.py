"""paths: Kaggle, Colab and local told apart by their environment variables, and every
default folder resolvable under a fake root."""

from __future__ import annotations

from pathlib import Path

import pytest

from kaggle_utils import paths
from kaggle_utils.submission import resolve_model_dir, resolve_output_csv

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
