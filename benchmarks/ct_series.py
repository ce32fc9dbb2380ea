"""Realistic CT series for the benchmarks: real anatomy written as competition-like DICOM files.

Shared by `decode.py` and `preprocess.py` (both put this folder first on `sys.path` by being
run as scripts). The anatomy is the real series in `tests/data/real-ct` (20 slices of
512x512), repeated along z to the length asked for, or a synthetic phantom where that is absent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

REAL_SERIES = Path(__file__).resolve().parents[1] / "tests/data/real-ct/dicom-series-20-j2k"
SYNTAXES = {"uncompressed": ExplicitVRLittleEndian, "rle": RLELossless}


def source_slices() -> tuple[np.ndarray, str]:
    """(n, 512, 512) HU of real anatomy, or a synthetic phantom where the real data is absent."""
    from kaggle_utils.cache.dicom import load_series

    if REAL_SERIES.is_dir():
        return load_series(REAL_SERIES).hu, f"real CT ({REAL_SERIES.name})"
    from kaggle_utils.demo.labels import PatientLabels
    from kaggle_utils.demo.render import make_phantom

    phantom = make_phantom(np.random.default_rng(0), PatientLabels(), 20, 512)
    return phantom.hu, "synthetic phantom"


def stored_values(hu: np.ndarray, signed: bool) -> np.ndarray:
    """HU to the stored values of the two kinds of competition file, both 12 bits stored in a
    16-bit container with RescaleIntercept -1024: unsigned (PixelRepresentation 0, 0..4095) or
    signed (PixelRepresentation 1, -2048..2047, so HU above 1023 are clipped)."""
    low, high, dtype = (-2048, 2047, np.int16) if signed else (0, 4095, np.uint16)
    return np.clip(np.rint(hu) + 1024, low, high).astype(dtype)


def write_series(
    folder: Path, hu: np.ndarray, n_slices: int, syntax: str, signed: bool = False
) -> list[Path]:
    """RSNA-like slices of `hu` (repeated along z to `n_slices`): 12-bit stored values,
    intercept -1024, unsigned or `signed` (PixelRepresentation 1), in transfer syntax `syntax`.

    Each distinct source slice is encoded once and its pixel data reused for its repeats (RLE
    encoding in pydicom costs several ms a slice; the files are identical either way).
    """
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    encoded: dict[int, object] = {}  # source index -> compressed PixelData element
    paths = []
    for index in range(n_slices):
        source = index % len(hu)
        stored = stored_values(hu[source], signed)
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality = "CT"
        ds.InstanceNumber = n_slices - index
        ds.ImagePositionPatient = [-250.0, -250.0, 2.0 * index]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 2.0
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = int(signed)
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = stored.tobytes()
        if syntax != ExplicitVRLittleEndian:
            if source in encoded:
                ds.file_meta.TransferSyntaxUID = syntax
                ds["PixelData"] = encoded[source]
            else:
                ds.compress(syntax, stored, generate_instance_uid=False)
                encoded[source] = ds["PixelData"]
        path = folder / f"{ds.InstanceNumber}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
