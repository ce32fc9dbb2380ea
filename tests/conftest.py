"""Shared fixtures: real CT data (committed under tests/data) and a builder of DICOM files
with exactly the header a test needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

REAL_CT = Path(__file__).resolve().parent / "data" / "real-ct"


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    """Real CT scans committed with the tests (see its README): never skipped."""
    assert REAL_CT.is_dir(), f"{REAL_CT} is missing: it is part of the repository"
    return REAL_CT


@pytest.fixture(scope="session")
def real_dicom_series(real_ct_dir: Path) -> Path:
    return real_ct_dir / "dicom-series-20-j2k"


def pydicom_test_file(name: str) -> Path:
    """A real file shipped by the pydicom-data package (offline)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not installed")
    return Path(path)


def write_ct_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    bits_stored: int = 16,
    pixel_representation: int = 1,
    intercept: float | None = 0.0,
    slope: float | None = 1.0,
    photometric: str = "MONOCHROME2",
    transfer_syntax: str = ExplicitVRLittleEndian,
    instance_number: int | None = 1,
    position: tuple[float, float, float] | None = (0.0, 0.0, 0.0),
    orientation: tuple[float, ...] | None = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    pixel_spacing: tuple[float, float] = (0.8, 0.8),
    slice_thickness: float = 2.5,
) -> Path:
    """Write a single-frame CT slice whose pixel bytes are exactly `stored` (uint16 or int16).

    The stored bytes are written as given, so a test can put anything in the unused high bits
    (pydicom's encoders would refuse); compressed syntaxes encode the same bytes.
    """
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelSpacing = list(pixel_spacing)
    ds.SliceThickness = slice_thickness
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if slope is not None:
        ds.RescaleSlope = slope
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    if position is not None:
        ds.ImagePositionPatient = list(position)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    raw = np.ascontiguousarray(stored).view(np.uint16)
    if transfer_syntax == ExplicitVRLittleEndian:
        ds.PixelRepresentation = pixel_representation
        ds.PixelData = raw.tobytes()
    else:
        # Encode the raw bytes as unsigned data (the encoders check value ranges; a JPEG 2000
        # codestream is then unsigned, whatever the header says), then restore the header
        # under test.
        encode_bits = bits_stored if int(raw.max()) < (1 << bits_stored) else 16
        ds.PixelRepresentation = 0
        ds.BitsStored = encode_bits
        ds.HighBit = encode_bits - 1
        ds.PixelData = raw.tobytes()
        ds.compress(transfer_syntax, raw)
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = pixel_representation
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def pydicom_reference_hu(path: Path | str) -> np.ndarray:
    """Plain pydicom, none of this project's code: `pixel_array` through its own Modality LUT
    (the rescale, or a Modality LUT Sequence). The reference `read_hu` must agree with."""
    import warnings

    from pydicom.pixels import apply_modality_lut

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dataset = pydicom.dcmread(path)
        return np.asarray(apply_modality_lut(dataset.pixel_array, dataset), dtype=np.float64)


@pytest.fixture(scope="session")
def tiny_competition(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic competition folder (SPEC section 2 layout), generated once per run."""
    from kaggle_utils.demo.generator import generate_dataset
    from kaggle_utils.demo.labels import SyntheticConfig

    root = tmp_path_factory.mktemp("competition") / "demo-rsna"
    config = SyntheticConfig(
        train_patients=6, test_patients=3, image_size=64, min_slices=12, max_slices=16, seed=7
    )
    return generate_dataset(root, config)


# The tiny notebook 03 run that notebook 04's tests predict with.
TINY_MODEL_SHAPE = (8, 32, 32)
TINY_MODEL_SLICES, TINY_MODEL_IMAGE_SIZE = 6, 28  # a sampled slice subset and a real centre crop


@pytest.fixture(scope="session")
def train_cache(tiny_competition: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Notebook 01's cache of the tiny training set at TINY_MODEL_SHAPE."""
    from kaggle_utils.cache.preprocess import PreprocessConfig, list_series, preprocess_dataset

    cache = tmp_path_factory.mktemp("sub_cache")
    preprocess_dataset(
        list_series(tiny_competition, "train"), cache,
        PreprocessConfig(shapes=(TINY_MODEL_SHAPE,)), workers=0, progress=False,
    )  # fmt: skip
    return cache


@pytest.fixture(scope="session")
def model_dir(
    tiny_competition: Path, train_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A two-fold, one-epoch notebook 03 run on the tiny dataset."""
    from kaggle_utils.finetune.train import FinetuneConfig, run_cross_validation

    output = tmp_path_factory.mktemp("sub_finetune")
    config = FinetuneConfig(
        data_root=str(tiny_competition), cache_dir=str(train_cache), output_dir=str(output),
        shape=list(TINY_MODEL_SHAPE), backbone="test_efficientnet", init="random",
        hidden_size=8, num_layers=1, n_slices=TINY_MODEL_SLICES,
        image_size=TINY_MODEL_IMAGE_SIZE, epochs=1, batch_size=2, lr=1e-3, n_folds=2,
        num_workers=0,
    )  # fmt: skip
    run_cross_validation(config, progress=False)
    return output


def run_torchrun_on_cpu(module: str, config_file: Path, nproc: int = 2) -> None:
    """`torchrun --standalone -m <module> --config <config_file>` with `nproc` CPU processes
    (gloo), one thread each; fails the test with torchrun's stderr when it exits non-zero."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(nproc), "-m", module, "--config", str(config_file)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="session")
def segmented_competition(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic competition in which every train patient's first series has an organ
    mask in segmentations/."""
    from kaggle_utils.demo.generator import generate_dataset
    from kaggle_utils.demo.labels import SyntheticConfig

    root = tmp_path_factory.mktemp("segmented") / "demo-rsna"
    config = SyntheticConfig(
        train_patients=6, test_patients=2, image_size=64, min_slices=12, max_slices=16, seed=11,
        segmented_share=1.0,
    )  # fmt: skip
    return generate_dataset(root, config)


@pytest.fixture(scope="session")
def segmented_cache(segmented_competition: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Notebook 01's cache (8x32x32) of `segmented_competition`'s train and test series."""
    from kaggle_utils.cache.preprocess import PreprocessConfig, list_series, preprocess_dataset

    cache = tmp_path_factory.mktemp("segmented-cache")
    config = PreprocessConfig(shapes=((8, 32, 32),))
    for split in ("train", "test"):
        tasks = list_series(segmented_competition, split)
        preprocess_dataset(tasks, cache, config, workers=0, progress=False)
    return cache


def save_encoder(folder: Path, name: str, in_chans: int, backbone: str = "test_efficientnet"):
    """A notebook 02 encoder file (`<name>.pt` and its `<name>.json`) with random weights;
    returns the backbone and the .pt path."""
    import json

    import torch

    from kaggle_utils.common.backbone import build_backbone

    encoder = build_backbone(backbone, in_chans)
    torch.save(encoder.state_dict(), folder / f"{name}.pt")
    (folder / f"{name}.json").write_text(json.dumps({"backbone": backbone, "in_chans": in_chans}))
    return encoder, folder / f"{name}.pt"
