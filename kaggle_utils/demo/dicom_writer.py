"""DICOM writing for the demo: HU -> stored pixels (several encodings and transfer syntaxes,
as the competition's scanners use), one file per slice, a patient's series and its
segmentation NIfTI."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from kaggle_utils.demo.anatomy import (
    FIELD_OF_VIEW_MM,
    SEGMENTATIONS_DIR,
    Z_SPACINGS_MM,
    _series_views,
    _u,
    sample_anatomy,
)
from kaggle_utils.demo.labels import INJURY_NAMES, PatientLabels, SyntheticConfig
from kaggle_utils.demo.render import is_incomplete, render_phantom, segmentation_label_map

SERIES_UID_ROOT = "1.2.123.12345.1.2.3."


_UID_PREFIX = "1.2.826.0.1.3680043.8.498."


@dataclass(frozen=True)
class PixelEncoding:
    """How HU become stored values; `name` says it in the README."""

    name: str
    pixel_representation: int
    bits_stored: int
    rescale_intercept: int


ENCODINGS: tuple[PixelEncoding, ...] = (
    PixelEncoding("unsigned 12-bit, intercept -1024", 0, 12, -1024),
    PixelEncoding("signed 16-bit, intercept 0", 1, 16, 0),
    PixelEncoding("signed 12-bit, high bits zero, intercept 0", 1, 12, 0),
    PixelEncoding("unsigned 16-bit, intercept -1024", 0, 16, -1024),
)


def encode_hu(hu: np.ndarray, encoding: PixelEncoding) -> np.ndarray:
    """Stored values for `encoding` as they go into PixelData (uint16, or int16 for signed
    16-bit). The signed 12-bit encoding keeps only the low 12 bits of the two's complement,
    like the scanners whose files break a naive int16 read (-1000 HU -> +3096)."""
    rounded = np.round(hu)
    if encoding.pixel_representation == 0:
        top = 2**encoding.bits_stored - 1
        return np.clip(rounded - encoding.rescale_intercept, 0, top).astype(np.uint16)
    if encoding.bits_stored == 16:
        return np.clip(rounded, -32768, 32767).astype(np.int16)
    low, high = -(2 ** (encoding.bits_stored - 1)), 2 ** (encoding.bits_stored - 1) - 1
    signed = np.clip(rounded, low, high).astype(np.int16)
    return signed.view(np.uint16) & np.uint16(2**encoding.bits_stored - 1)


SYNTAX_NAMES: dict[str, str] = {
    ExplicitVRLittleEndian: "Explicit VR Little Endian",
    RLELossless: "RLE Lossless",
    JPEG2000Lossless: "JPEG 2000 Lossless",
}


# Cycles over a split's series (length 5, coprime with the 4 encodings, so the combinations
# spread): train ~40/40/20 %, test mostly RLE like the visible RSNA test files.
TRAIN_SYNTAX_CYCLE = (
    ExplicitVRLittleEndian,
    RLELossless,
    ExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
)


TEST_SYNTAX_CYCLE = (
    RLELossless,
    ExplicitVRLittleEndian,
    RLELossless,
    RLELossless,
    JPEG2000Lossless,
)


@functools.cache
def j2k_encoder_works(image_size: int) -> bool:
    """Whether JPEG 2000 Lossless can be written at this size (needs pylibjpeg-openjpeg,
    which also refuses tiny images)."""
    ds = _image_dataset(
        np.zeros((image_size, image_size), dtype=np.uint16), ENCODINGS[0], "1.2.3", "1.2.3.4"
    )
    try:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    except Exception:  # any failure means: do not use this syntax
        return False
    return True


def _image_dataset(
    stored: np.ndarray, encoding: PixelEncoding, sop_uid: str, series_uid: str
) -> Dataset:
    """The minimal image pixel module of an uncompressed CT slice."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = encoding.bits_stored
    ds.HighBit = encoding.bits_stored - 1
    ds.PixelRepresentation = int(stored.dtype == np.int16)
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _compress(ds: Dataset, syntax: str, encoding: PixelEncoding) -> None:
    """Compress in place; the signed 12-bit encoding is handed to the encoder as unsigned
    (its high bits are zero, which a signed encoder refuses) and flagged signed afterwards:
    RLE keeps the bytes, and JPEG 2000 then disagrees with the header about signedness,
    just like some of the real files."""
    if syntax != ExplicitVRLittleEndian:
        plugin = "pylibjpeg" if syntax == JPEG2000Lossless else "pydicom"
        ds.compress(syntax, encoding_plugin=plugin, generate_instance_uid=False)
    ds.PixelRepresentation = encoding.pixel_representation


def _uid(*parts: object) -> str:
    """A deterministic UID from the parts (SHA-512 under pydicom's root)."""
    return generate_uid(_UID_PREFIX, [str(p) for p in parts])


@dataclass(frozen=True)
class SeriesPlan:
    """Everything about one series that the dataset plan fixes before any rendering."""

    split: str
    patient_id: int
    series_id: int
    series_number: int
    encoding: PixelEncoding
    syntax: str
    instance_up_with_z: bool


@dataclass(frozen=True)
class PatientPlan:
    split: str
    index: int
    patient_id: int
    labels: PatientLabels
    series: tuple[SeriesPlan, ...]


@dataclass(frozen=True)
class SeriesRecord:
    """What was written for one series (for the CSVs and the README)."""

    plan: SeriesPlan
    n_slices: int
    z_spacing: float
    aortic_hu: float
    incomplete_organ: int
    instance_numbers: tuple[int, ...]  # in z order from the top (slice 0 = most superior)
    flagged: dict[str, tuple[int, ...]]
    patient_position: str
    segmented: bool = False  # has a segmentations/<series_id>.nii


def _slice_dataset(
    stored: np.ndarray,
    plan: SeriesPlan,
    *,
    seed: int,
    instance_number: int,
    position: tuple[float, float, float],
    pixel_spacing: float,
    z_spacing: float,
    patient_position: str,
    kvp: int,
) -> Dataset:
    """One CT Image Storage slice with the headers a CT reader relies on."""
    sop_uid = _uid(seed, "sop", plan.series_id, instance_number)
    series_uid = f"{SERIES_UID_ROOT}{plan.series_id}"
    ds = _image_dataset(stored, plan.encoding, sop_uid, series_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.PatientID = str(plan.patient_id)
    ds.StudyInstanceUID = _uid(seed, "study", plan.patient_id)
    ds.FrameOfReferenceUID = _uid(seed, "frame", plan.patient_id)
    ds.SeriesNumber = plan.series_number
    ds.InstanceNumber = instance_number
    ds.PatientPosition = patient_position
    ds.KVP = kvp
    ds.SliceThickness = z_spacing
    ds.ImagePositionPatient = [round(v, 3) for v in position]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = round(position[2], 3)
    ds.PixelSpacing = [round(pixel_spacing, 6), round(pixel_spacing, 6)]
    ds.RescaleIntercept = plan.encoding.rescale_intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 50
    ds.WindowWidth = 400
    _compress(ds, plan.syntax, plan.encoding)
    return ds


def segmentation_affine(
    shape: tuple[int, int, int],
    origin: tuple[float, float, float],
    pixel_spacing: float,
    z_spacing: float,
) -> np.ndarray:
    """The RAS+ affine of a mask stored as the competition stores it, for a series of
    `shape` (slices, H, W) whose lowest slice's first pixel sits at `origin` (DICOM patient
    coordinates, LPS mm) with ImageOrientationPatient [1,0,0,0,1,0].

    The stored array is (columns, rows from the bottom, slices from the feet): public
    solutions read it with `nib.load(path).get_fdata().transpose(1, 0, 2)[::-1]` to get the
    (rows, columns, slices) of the DICOM grid with the slices in ascending
    ImagePositionPatient z. Voxel (i, j, k) is column i, row H-1-j, k-th slice from the
    bottom; LPS (x, y, z) becomes RAS (-x, -y, z)."""
    _, height, _ = shape
    x0, y0, z0 = origin
    return np.array(
        [
            [-pixel_spacing, 0.0, 0.0, -x0],
            [0.0, pixel_spacing, 0.0, -(y0 + (height - 1) * pixel_spacing)],
            [0.0, 0.0, z_spacing, z0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def write_segmentation(path: Path, labels: np.ndarray, affine: np.ndarray) -> None:
    """`labels` (slices from the top, rows, columns; the phantom's layout) as an
    uncompressed NIfTI in the competition's storage order (`segmentation_affine`)."""
    import nibabel as nib

    stored = np.ascontiguousarray(labels[::-1, ::-1, :].transpose(2, 1, 0))  # (i, j, k)
    image = nib.Nifti1Image(stored, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def is_segmented(config: SyntheticConfig, plan: PatientPlan) -> bool:
    """Whether the patient's first series gets a mask (train patients only, about
    `segmented_share` of them), from a generator of its own so that no other draw moves."""
    if plan.split != "train":
        return False
    return bool(
        np.random.default_rng([config.seed, plan.index, 1]).random() < config.segmented_share
    )


def write_patient(plan: PatientPlan, config: SyntheticConfig, root: Path) -> list[SeriesRecord]:
    """Render and write all series of one patient from its own generator."""
    rng = np.random.default_rng([config.seed, plan.index])
    segmented = is_segmented(config, plan)
    anatomy = sample_anatomy(rng, plan.labels)
    views = _series_views(rng, anatomy, len(plan.series))
    pixel_spacing = FIELD_OF_VIEW_MM / config.image_size * _u(rng, 0.92, 1.08)
    table_z = _u(rng, -150.0, 150.0)
    records = []
    for series, view in zip(plan.series, views, strict=True):
        n_slices = int(rng.integers(config.min_slices, config.max_slices + 1))
        z_spacing = float(rng.choice(Z_SPACINGS_MM))
        phantom = render_phantom(rng, anatomy, n_slices, config.image_size, view)
        start = int(rng.integers(1, 201))
        ks = np.arange(n_slices)
        numbers = start + (n_slices - 1 - ks if series.instance_up_with_z else ks)
        z_top = table_z + _u(rng, -10.0, 10.0)
        position = "HFS" if rng.random() < 0.5 else "FFS"
        kvp = int(rng.choice([100, 120]))
        x0 = -pixel_spacing * config.image_size / 2 + _u(rng, -5.0, 5.0)
        y0 = -pixel_spacing * config.image_size / 2 + _u(rng, -5.0, 5.0)
        folder = root / f"{plan.split}_images" / str(plan.patient_id) / str(series.series_id)
        folder.mkdir(parents=True)
        stored = encode_hu(phantom.hu, series.encoding)
        for k in range(n_slices):
            ds = _slice_dataset(
                stored[k],
                series,
                seed=config.seed,
                instance_number=int(numbers[k]),
                position=(x0, y0, z_top - k * z_spacing),
                pixel_spacing=pixel_spacing,
                z_spacing=z_spacing,
                patient_position=position,
                kvp=kvp,
            )
            ds.save_as(folder / f"{int(numbers[k])}.dcm", enforce_file_format=True)
        flagged = {
            name: tuple(sorted(int(n) for n in numbers[phantom.slice_flags[name]]))
            for name in INJURY_NAMES
        }
        mask_written = segmented and series is plan.series[0]
        if mask_written:
            bottom = (x0, y0, z_top - (n_slices - 1) * z_spacing)
            write_segmentation(
                root / SEGMENTATIONS_DIR / f"{series.series_id}.nii",
                segmentation_label_map(phantom),
                segmentation_affine(phantom.hu.shape, bottom, pixel_spacing, z_spacing),
            )
        records.append(
            SeriesRecord(
                plan=series,
                n_slices=n_slices,
                z_spacing=z_spacing,
                aortic_hu=round(view.aortic_hu, 1),
                incomplete_organ=int(is_incomplete(anatomy, view)),
                instance_numbers=tuple(int(n) for n in numbers),
                flagged=flagged,
                patient_position=position,
                segmented=mask_written,
            )
        )
    return records
