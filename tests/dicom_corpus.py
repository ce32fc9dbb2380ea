"""A corpus of valid CT series in the encodings and object layouts that hospital archives and
public data sets hold, generated from five slices of a real scan (tests/data/real-ct, cut to
96 px): every transfer syntax, pixel format, rescale, photometric interpretation, ordering clue
and multi-frame layout the decoding layer must turn into the right Hounsfield units.

    python tests/dicom_corpus.py OUT_DIR    # writes OUT_DIR/<case>/... and OUT_DIR/cases.json

Each case is one series folder. `cases.json` holds, per case, what a reader must produce that
the files alone do not say: the true position (mm along +z) of every image file or frame
(`z`), the files a reader must skip and a word their reason must contain (`skip`), and what the
slices can be ordered by (`ordered_by`). The reference HU are plain pydicom's
(`reference_volume`: `pixel_array`, `apply_modality_lut`, sorted by the true position).

Encoders pydicom lacks (lossless JPEG, JPEG-LS, JPEG 2000, HTJ2K) come from `imagecodecs`, a
development dependency; RLE and deflate are pydicom's own.
"""

from __future__ import annotations

import itertools
import json
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    LegacyConvertedEnhancedCTImageStorage,
    RLELossless,
    generate_uid,
)

SOURCE_SERIES = Path(__file__).resolve().parent / "data" / "real-ct" / "dicom-series-20-j2k"
SIZE = 96  # pixels per side: 480 of the source's 512, every fifth
N_SLICES = 5
SPACING_MM = (2.0, 0.9765625 * 5, 0.9765625 * 5)  # (z, row, column)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
DOSE_SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.67"


@dataclass(frozen=True)
class Encoding:
    """How a case stores HU: the pixel format, the rescale and the transfer syntax."""

    syntax: str = ExplicitVRLittleEndian
    bits_allocated: int = 16
    bits_stored: int = 16
    signed: bool = True
    slope: float = 1.0
    intercept: float = 0.0
    photometric: str = "MONOCHROME2"
    fragments: int = 1  # fragments per frame of encapsulated data

    def stored(self, hu: np.ndarray) -> np.ndarray:
        """HU to stored values in this format (rounded, clipped to the stored range)."""
        low, high = (
            (-(1 << (self.bits_stored - 1)), (1 << (self.bits_stored - 1)) - 1)
            if self.signed
            else (0, (1 << self.bits_stored) - 1)
        )
        values = np.clip(np.rint((hu - self.intercept) / self.slope), low, high)
        dtype = f"{'i' if self.signed else 'u'}{self.bits_allocated // 8}"
        return values.astype(dtype)


@dataclass
class Case:
    name: str
    description: str
    z: dict[str, float] = field(default_factory=dict)  # image file (or "file#frame") -> z, mm
    skip: dict[str, str] = field(default_factory=dict)  # file -> a word of its skip reason
    ordered_by: str = "position"


# --------------------------------------------------------------------------- source slices


def source_slices() -> tuple[np.ndarray, np.ndarray]:
    """Five real slices as HU (5, 96, 96) float64, and their z positions (ascending, mm)."""
    files = sorted(SOURCE_SERIES.iterdir())
    datasets = [pydicom.dcmread(f) for f in files]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    chosen = datasets[8 : 8 + N_SLICES]
    hu = np.stack(
        [
            d.pixel_array[16:496:5, 16:496:5] * float(d.RescaleSlope) + float(d.RescaleIntercept)
            for d in chosen
        ]
    ).astype(np.float64)
    z = np.array([float(d.ImagePositionPatient[2]) for d in chosen])
    return hu, z


# --------------------------------------------------------------------------- encoders


def _encoded_frame(stored: np.ndarray, encoding: Encoding) -> bytes:
    """One frame's codestream for an encapsulated syntax (the stored bits as unsigned)."""
    import imagecodecs

    bits = encoding.bits_stored
    unsigned = (stored.view(f"u{stored.dtype.itemsize}") & ((1 << bits) - 1)).astype(
        np.uint16 if encoding.bits_allocated == 16 else np.uint8
    )
    syntax = encoding.syntax
    if syntax == JPEGLosslessSV1:
        return bytes(
            imagecodecs.jpeg8_encode(unsigned, lossless=True, predictor=1, bitspersample=bits)
        )
    if syntax == JPEGLossless:
        return bytes(
            imagecodecs.jpeg8_encode(unsigned, lossless=True, predictor=6, bitspersample=bits)
        )
    if syntax == JPEGLSLossless:
        return bytes(imagecodecs.jpegls_encode(unsigned, level=0))
    if syntax == JPEG2000Lossless:
        return bytes(
            imagecodecs.jpeg2k_encode(
                unsigned, level=0, codecformat="J2K", reversible=True, bitspersample=bits
            )
        )
    if syntax == HTJ2KLossless:
        return bytes(imagecodecs.htj2k_encode(unsigned, level=0, reversible=True))
    if syntax == RLELossless:
        from pydicom.pixels.encoders import RLELosslessEncoder

        return RLELosslessEncoder.encode(
            unsigned,
            rows=unsigned.shape[0],
            columns=unsigned.shape[1],
            samples_per_pixel=1,
            bits_allocated=encoding.bits_allocated,
            bits_stored=encoding.bits_allocated,
            pixel_representation=0,
            photometric_interpretation="MONOCHROME2",
            number_of_frames=1,
        )
    raise ValueError(f"no encoder for {syntax}")


def _fragments(codestream: bytes, n: int) -> list[bytes]:
    """A codestream cut into `n` fragments of even length (PS3.5 A.4)."""
    if len(codestream) % 2:
        codestream += b"\x00"
    cut = [2 * round(len(codestream) * k / n / 2) for k in range(n + 1)]
    return [codestream[a:b] for a, b in itertools.pairwise(cut)]


def _set_pixel_data(ds: Dataset, frames: list[np.ndarray], encoding: Encoding) -> None:
    """Pixel format fields and (7FE0,0010) for `frames` of stored values."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = encoding.photometric
    ds.Rows, ds.Columns = frames[0].shape
    ds.BitsAllocated = encoding.bits_allocated
    ds.BitsStored = encoding.bits_stored
    ds.HighBit = encoding.bits_stored - 1
    ds.PixelRepresentation = int(encoding.signed)
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    if encoding.syntax in (
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
    ):
        ds.PixelData = b"".join(f.astype(f.dtype.newbyteorder("<")).tobytes() for f in frames)
    elif encoding.syntax == ExplicitVRBigEndian:
        ds.PixelData = b"".join(f.astype(f.dtype.newbyteorder(">")).tobytes() for f in frames)
    else:
        codestreams = [_encoded_frame(f, encoding) for f in frames]
        if encoding.fragments == 1:
            ds.PixelData = encapsulate(codestreams)
        else:
            items = [_fragments(c, encoding.fragments) for c in codestreams]
            ds.PixelData = encapsulate([b"".join(i) for i in items], encoding.fragments)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB" if encoding.bits_allocated == 8 else ds["PixelData"].VR


def _base_dataset(sop_class: str, syntax: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientID = "corpus"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    return ds


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax == ExplicitVRBigEndian:
        pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=False, enforce_file_format=True)
    else:
        ds.save_as(path, enforce_file_format=True)


def write_slice(
    path: Path,
    hu: np.ndarray,
    z: float,
    instance_number: int,
    encoding: Encoding,
    *,
    position: bool = True,
    slice_location: bool = True,
    edit: Callable[[Dataset, np.ndarray], None] | None = None,
) -> None:
    """One single-frame CT Image Storage slice of `hu` at height z."""
    ds = _base_dataset(CTImageStorage, encoding.syntax)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = instance_number
    if position:
        ds.ImagePositionPatient = [-234.5, -180.0, z]
    if slice_location:
        ds.SliceLocation = z
    ds.ImageOrientationPatient = list(AXIAL)
    ds.PixelSpacing = list(SPACING_MM[1:])
    ds.SliceThickness = SPACING_MM[0]
    ds.RescaleIntercept = encoding.intercept
    ds.RescaleSlope = encoding.slope
    ds.RescaleType = "HU"
    stored = encoding.stored(hu)
    if edit is not None:
        edit(ds, stored)
    _set_pixel_data(ds, [stored], encoding)
    _save(ds, path)


# --------------------------------------------------------------------------- the cases


def _series_case(
    root: Path,
    name: str,
    description: str,
    encoding: Encoding,
    hu: np.ndarray,
    z: np.ndarray,
    *,
    names: Callable[[int], str] = lambda k: f"{k + 1}.dcm",
    position: bool = True,
    slice_location: bool = True,
    instance_head_to_feet: bool = True,
    edit: Callable[[Dataset, np.ndarray], None] | None = None,
) -> Case:
    """A folder of single-frame slices, written in a shuffled order of names."""
    case = Case(name, description)
    order = np.random.default_rng(len(name)).permutation(len(z))
    for file_index, k in enumerate(order):
        number = len(z) - k if instance_head_to_feet else k + 1
        file = names(file_index)
        write_slice(
            root / name / file, hu[k], float(z[k]), int(number), encoding,
            position=position, slice_location=slice_location, edit=edit,
        )  # fmt: skip
        case.z[file] = float(z[k])
    return case


def _pixel_padding(ds: Dataset, stored: np.ndarray) -> None:
    """Outside a circle the scanner's padding value (PixelPaddingValue), as many CTs store."""
    padding = -2000
    yy, xx = np.mgrid[: stored.shape[0], : stored.shape[1]]
    outside = (yy - stored.shape[0] / 2) ** 2 + (xx - stored.shape[1] / 2) ** 2 > (0.48 * SIZE) ** 2
    stored[outside] = padding
    ds.PixelPaddingValue = padding


def _icon(ds: Dataset, stored: np.ndarray) -> None:
    """An Icon Image Sequence (a 16 x 16 8-bit thumbnail with its own (7FE0,0010)) before the
    image's pixel data, the sequence and its item of undefined length (as most writers do);
    in an RLE file the icon is RLE too, encapsulated (PS3.5 8.2)."""
    icon = Dataset()
    icon.SamplesPerPixel = 1
    icon.PhotometricInterpretation = "MONOCHROME2"
    icon.Rows = icon.Columns = 16
    icon.BitsAllocated = icon.BitsStored = 8
    icon.HighBit = 7
    icon.PixelRepresentation = 0
    thumbnail = np.clip(stored[::6, ::6].astype(np.int32) // 16 + 64, 0, 255).astype(np.uint8)
    if ds.file_meta.TransferSyntaxUID == RLELossless:
        _set_pixel_data(icon, [thumbnail], Encoding(RLELossless, 8, 8, False))
        icon.PhotometricInterpretation = "MONOCHROME2"
    else:
        icon.PixelData = thumbnail.tobytes()
        icon["PixelData"].VR = "OB"
    icon.is_undefined_length_sequence_item = True
    ds.IconImageSequence = Sequence([icon])
    ds["IconImageSequence"].is_undefined_length = True


def _enhanced_case(
    root: Path,
    name: str,
    description: str,
    hu: np.ndarray,
    z: np.ndarray,
    encoding: Encoding,
    frame_order: np.ndarray,
    per_frame_rescale: bool,
    sop_class: str = EnhancedCTImageStorage,
) -> Case:
    """One enhanced (multi-frame) CT file holding every slice, frames in `frame_order`."""
    ds = _base_dataset(sop_class, encoding.syntax)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = list(SPACING_MM[1:])
    measures.SliceThickness = SPACING_MM[0]
    shared.PixelMeasuresSequence = Sequence([measures])
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(AXIAL)
    shared.PlaneOrientationSequence = Sequence([orientation])
    frames, per_frame = [], []
    for index, k in enumerate(frame_order):
        rescale = Dataset()
        rescale.RescaleIntercept = encoding.intercept - (
            24 * (index % 2) if per_frame_rescale else 0
        )
        rescale.RescaleSlope = encoding.slope
        rescale.RescaleType = "HU"
        frame_encoding = Encoding(
            **{**encoding.__dict__, "intercept": float(rescale.RescaleIntercept)}
        )
        frames.append(frame_encoding.stored(hu[k]))
        group = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [-234.5, -180.0, float(z[k])]
        group.PlanePositionSequence = Sequence([position])
        content = Dataset()
        content.InStackPositionNumber = int(k) + 1
        content.StackID = "1"
        group.FrameContentSequence = Sequence([content])
        frame_type = Dataset()
        frame_type.FrameType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
        group.CTImageFrameTypeSequence = Sequence([frame_type])
        if per_frame_rescale:
            group.PixelValueTransformationSequence = Sequence([rescale])
        elif index == 0:
            shared.PixelValueTransformationSequence = Sequence([rescale])
        per_frame.append(group)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    _set_pixel_data(ds, frames, encoding)
    _save(ds, root / name / "enhanced.dcm")
    case = Case(name, description)
    for index, k in enumerate(frame_order):
        case.z[f"enhanced.dcm#{index + 1}"] = float(z[k])
    return case


def _archive_case(root: Path, hu: np.ndarray, z: np.ndarray) -> Case:
    """A folder as a CD or PACS export leaves it: IM000001-style names without `.dcm`, a
    DICOMDIR, a radiation dose report and a coronal localizer among the slices."""
    name = "archive_folder_with_non_images"
    case = _series_case(
        root, name, "IM00000n names, a DICOMDIR, a dose SR and a localizer in the folder",
        Encoding(RLELossless, 16, 12, False, intercept=-1024.0), hu, z,
        names=lambda k: f"IM{k + 1:06d}",
    )  # fmt: skip
    folder = root / name
    dicomdir = Dataset()
    dicomdir.file_meta = FileMetaDataset()
    dicomdir.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dicomdir.file_meta.MediaStorageSOPClassUID = DICOMDIR_CLASS
    dicomdir.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dicomdir.FileSetID = "CORPUS"
    dicomdir.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    dicomdir.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    dicomdir.FileSetConsistencyFlag = 0
    dicomdir.DirectoryRecordSequence = Sequence([])
    dicomdir.save_as(folder / "DICOMDIR", enforce_file_format=True)
    case.skip["DICOMDIR"] = "DICOMDIR"

    report = _base_dataset(DOSE_SR_CLASS, ExplicitVRLittleEndian)
    report.Modality = "SR"
    report.ValueType = "CONTAINER"
    report.ContinuityOfContent = "SEPARATE"
    report.ContentSequence = Sequence([])
    _save(report, folder / "IM000900")
    case.skip["IM000900"] = "Dose SR"

    scout = Encoding(ExplicitVRLittleEndian, 16, 12, False, intercept=-1024.0)

    def coronal(ds: Dataset, _: np.ndarray) -> None:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]

    write_slice(folder / "IM000901", hu[2].T[:, :80], 0.0, 901, scout, edit=coronal)
    case.skip["IM000901"] = "localizer"
    return case


def write_corpus(root: Path) -> dict[str, Case]:
    """Write every case under `root` (one folder each) and `root/cases.json`."""
    hu, z = source_slices()
    u12 = {"bits_stored": 12, "signed": False, "intercept": -1024.0}
    series: list[tuple[str, str, Encoding, dict[str, Any]]] = [
        ("explicit_le_signed_16", "Explicit VR Little Endian, signed 16-bit HU",
         Encoding(), {}),
        ("implicit_le_unsigned_12", "Implicit VR Little Endian, unsigned 12 bits, intercept -1024",
         Encoding(ImplicitVRLittleEndian, **u12), {}),
        ("explicit_big_endian", "Explicit VR Big Endian (retired, still in archives)",
         Encoding(ExplicitVRBigEndian), {}),
        ("deflated_explicit_le", "Deflated Explicit VR Little Endian",
         Encoding(DeflatedExplicitVRLittleEndian, **u12), {}),
        ("rle_lossless", "RLE Lossless (the competition's syntax)",
         Encoding(RLELossless, **u12), {}),
        ("jpeg_lossless_sv1", "JPEG Lossless, first-order prediction (SV1), signed 16-bit",
         Encoding(JPEGLosslessSV1), {}),
        ("jpeg_lossless_process14", "JPEG Lossless process 14, predictor 6, unsigned 12 bits",
         Encoding(JPEGLossless, **u12), {}),
        ("jpeg_ls_lossless", "JPEG-LS Lossless, unsigned 12 bits",
         Encoding(JPEGLSLossless, **u12), {}),
        ("jpeg_ls_fragmented", "JPEG-LS Lossless, each frame in three fragments",
         Encoding(JPEGLSLossless, fragments=3, **u12), {}),
        ("jpeg_2000_lossless", "JPEG 2000 Lossless, unsigned 12 bits",
         Encoding(JPEG2000Lossless, **u12), {}),
        ("htj2k_lossless", "High-Throughput JPEG 2000 Lossless, unsigned 12 bits",
         Encoding(HTJ2KLossless, **u12), {}),
        ("eight_bit_unsigned", "8 bits allocated and stored, slope 8, intercept -1024",
         Encoding(bits_allocated=8, bits_stored=8, signed=False, slope=8.0, intercept=-1024.0), {}),
        ("sixteen_bit_unsigned", "unsigned 16-bit, intercept -32768",
         Encoding(signed=False, intercept=-32768.0), {}),
        ("signed_12_bit", "signed, 12 of 16 bits stored",
         Encoding(bits_stored=12), {}),
        ("slope_and_fractional_intercept", "slope 0.5, intercept -1024.5",
         Encoding(signed=False, slope=0.5, intercept=-1024.5), {}),
        ("pixel_padding_value", "PixelPaddingValue -2000 outside the scan circle",
         Encoding(), {"edit": _pixel_padding}),
        ("monochrome1", "MONOCHROME1: displayed inverted, rescaled as stored",
         Encoding(photometric="MONOCHROME1", **u12), {}),
        ("icon_image_sequence", "an Icon Image Sequence before the pixel data",
         Encoding(), {"edit": _icon}),
        ("icon_image_sequence_rle", "an RLE icon in an Icon Image Sequence, RLE image",
         Encoding(RLELossless, **u12), {"edit": _icon}),
        ("no_position_slice_location", "no ImagePositionPatient: SliceLocation, "
         "InstanceNumber head to feet", Encoding(), {"position": False}),
        ("no_position_no_location", "neither ImagePositionPatient nor SliceLocation: "
         "InstanceNumber feet to head", Encoding(),
         {"position": False, "slice_location": False, "instance_head_to_feet": False}),
    ]  # fmt: skip
    cases: dict[str, Case] = {}
    for name, description, encoding, options in series:
        cases[name] = _series_case(root, name, description, encoding, hu, z, **options)
    cases["no_position_slice_location"].ordered_by = "slice_location"
    cases["no_position_no_location"].ordered_by = "instance_number"
    ascending, descending = np.arange(len(z)), np.arange(len(z))[::-1]
    cases["enhanced_ct_frames_ascending"] = _enhanced_case(
        root, "enhanced_ct_frames_ascending", "Enhanced CT, one file, frames feet to head",
        hu, z, Encoding(), ascending, per_frame_rescale=False,
    )  # fmt: skip
    cases["legacy_enhanced_ct_frames_descending"] = _enhanced_case(
        root, "legacy_enhanced_ct_frames_descending",
        "Legacy Converted Enhanced CT in RLE, frames head to feet, a rescale per frame",
        hu, z, Encoding(RLELossless, **u12), descending, per_frame_rescale=True,
        sop_class=LegacyConvertedEnhancedCTImageStorage,
    )  # fmt: skip
    cases["archive_folder_with_non_images"] = _archive_case(root, hu, z)
    (root / "cases.json").write_text(
        json.dumps({name: case.__dict__ for name, case in cases.items()}, indent=1)
    )
    return cases


def read_cases(root: Path) -> dict[str, Case]:
    return {
        name: Case(**fields)
        for name, fields in json.loads((root / "cases.json").read_text()).items()
    }


# --------------------------------------------------------------------------- the reference


def reference_volume(folder: Path, case: Case) -> np.ndarray:
    """The case's HU volume by plain pydicom: every image file (or frame) the case lists,
    `pixel_array` through `apply_modality_lut` (with an enhanced frame's own rescale), sorted
    by the true position from feet to head."""
    from pydicom.pixels import apply_modality_lut

    slices: list[tuple[float, np.ndarray]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for key, z in case.z.items():
            file, _, frame = key.partition("#")
            ds = pydicom.dcmread(folder / file)
            pixels = ds.pixel_array
            if not frame:
                slices.append((z, apply_modality_lut(pixels, ds)))
                continue
            index = int(frame) - 1
            groups = [
                ds.PerFrameFunctionalGroupsSequence[index],
                ds.SharedFunctionalGroupsSequence[0],
            ]
            rescale = next(
                g.PixelValueTransformationSequence[0]
                for g in groups
                if "PixelValueTransformationSequence" in g
            )
            flat = Dataset()
            flat.RescaleSlope, flat.RescaleIntercept = (
                rescale.RescaleSlope,
                rescale.RescaleIntercept,
            )
            slices.append((z, apply_modality_lut(pixels[index], flat)))
    slices.sort(key=lambda item: item[0])
    return np.stack([np.asarray(hu, dtype=np.float64) for _, hu in slices])


if __name__ == "__main__":
    out = Path(sys.argv[1])
    written = write_corpus(out)
    for case in written.values():
        print(f"{case.name:34s} {case.description}")
