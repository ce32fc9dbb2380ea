"""Competition DICOMs to Hounsfield units: one file (`read_hu`) and one series (`load_series`).

`dicomsdl` is the fast decoder and pydicom (with the pylibjpeg plugins) the fallback and the
reference. Both return *stored* values; this module turns them into HU itself, the same way for
either decoder, so the two can never disagree on the pitfalls of this data set:

- `PixelRepresentation == 1` with `BitsStored < BitsAllocated` (12, 13, 14 of 16): the stored
  value is sign-extended from `BitsStored` bits, whether the unused high bits hold the sign or
  are zero (a naive int16 read turns -1000 HU into +3096 in the latter case).
- JPEG 2000 codestreams whose signedness disagrees with the header: the header wins, as in
  pydicom (masking to `BitsStored` bits and sign-extending makes the decoder's view irrelevant).
- `RescaleSlope` / `RescaleIntercept` are always applied (missing ones mean 1 and 0), to the
  stored values whatever the PhotometricInterpretation: `MONOCHROME1` only says how to *display*
  them (PS3.3 C.7.6.3.1.2), the Modality LUT gives HU from the stored values as they are.
- Enhanced (multi-frame) CT: one file, many frames, each placed by its Per-Frame Functional
  Groups; `load_series` reads it into the same volume as a folder of single-frame slices.
- Slices without ImagePositionPatient are ordered by SliceLocation, then by InstanceNumber
  (`Series.ordered_by` says which); DICOMDIRs, structured reports and localizers in a series
  folder are skipped with what they are.

dicomsdl crashes the whole process (segfault) on a truncated file, so it only ever sees files
whose pixel data element is complete on disk (`_dicomsdl_can_decode`); everything else goes to
pydicom, which raises a Python error that becomes a skipped slice.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import io
import re
import struct
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import numpy as np

Decoder = Literal["auto", "dicomsdl", "pydicom"]

# What dicomsdl may decode: the transfer syntaxes and pixel formats on which its stored values
# were checked equal to pydicom's, on every file pydicom-data ships and on the CT files of
# tests/test_dicom.py (tests/test_dicom_robustness.py). Outside them it can read past the pixel
# data or overrun the heap (1-bit SEG, 32-bit RTDOSE RLE, multi-frame RLE, RGB), so anything
# else goes to pydicom.
DICOMSDL_SYNTAXES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
    }
)
DICOMSDL_BITS_ALLOCATED = 16
DICOMSDL_BITS_STORED = range(8, 17)  # and HighBit = BitsStored - 1
DICOMSDL_PHOTOMETRIC = frozenset({"MONOCHROME1", "MONOCHROME2"})
_RLE = "1.2.840.10008.1.2.5"
_JPEG_2000 = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
# Start-of-frame markers of lossless JPEG (SOF3) and JPEG-LS (SOF55).
_JPEG_SOF = {"1.2.840.10008.1.2.4.70": b"\xff\xc3", "1.2.840.10008.1.2.4.80": b"\xff\xf7"}
_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_ENCAPSULATED_SYNTAXES = DICOMSDL_SYNTAXES - {_IMPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.1"}

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_TRANSFER_SYNTAX_TAG = b"\x02\x00\x10\x00UI"
_MEDIA_STORAGE_SOP_CLASS_TAG = b"\x02\x00\x02\x00UI"
_ITEM_TAG = b"\xfe\xff\x00\xe0"
_SEQUENCE_DELIMITER_TAG = b"\xfe\xff\xdd\xe0"
_UNDEFINED_LENGTH = 0xFFFFFFFF


class DicomReadError(ValueError):
    """A DICOM file could not be decoded; the message names the file and the reason."""


class SeriesReadError(ValueError):
    """A series folder holds no readable slice; the message names the folder and the reasons."""


@dataclass(frozen=True)
class DicomSlice:
    """One decoded slice with the header fields needed to place it in its series."""

    hu: np.ndarray  # (H, W) float32 Hounsfield units
    instance_number: int | None
    position: tuple[float, float, float] | None  # ImagePositionPatient, mm
    orientation: tuple[float, ...] | None  # ImageOrientationPatient: row and column cosines
    pixel_spacing: tuple[float, float] | None  # (row spacing = y, column spacing = x), mm
    slice_thickness: float | None
    decoder: str  # "dicomsdl" or "pydicom"
    slice_location: float | None = None  # SliceLocation, mm along the stored slice normal
    localizer: bool = False  # ImageType (or FrameType) says LOCALIZER: a scout, not a slice
    frame: int | None = None  # 1-based frame number in a multi-frame file, None otherwise


@dataclass(frozen=True)
class SkippedFile:
    """A file of a series that did not make it into the volume, and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


# Geometry limits of `load_series` (see its docstring).
MAX_TILT_DEGREES = 30.0  # slice plane against the axial plane, or stack against the normal
DUPLICATE_TOLERANCE_MM = 0.01  # slices closer than this along the normal share a position
NONUNIFORM_TOLERANCE = 0.1  # a gap this share longer or shorter than the median one
MAX_GAP_FILL = 3  # resampling the gaps may make at most this many times the slices decoded
PLANES = ("sagittal", "coronal", "axial")  # by the patient axis (x, y, z) the normal runs along


class UnsupportedGeometryError(SeriesReadError):
    """A series that is not axial, or tilted beyond `MAX_TILT_DEGREES`; the message says which."""


@dataclass(frozen=True)
class SeriesGeometry:
    """How a series' stored pixel grid was brought to the patient-based layout of `Series.hu`,
    and what is unusual about it (notebook 01's records keep all of it)."""

    orientation: tuple[float, ...] | None = None  # ImageOrientationPatient as stored
    transposed: bool = False  # stored rows ran along the patient's x: rows and columns swapped
    flipped_rows: bool = False  # stored rows ran from posterior to anterior
    flipped_columns: bool = False  # stored columns ran from the patient's left to right
    normal_to_feet: bool = False  # the stored slice normal (row x column cosines) pointed down
    tilt_degrees: float = 0.0  # the slice plane against the axial plane (a tilted gantry)
    shear_degrees: float = 0.0  # the direction the slices stack in against their normal
    n_duplicates: int = 0  # slices dropped for sharing a position with another one
    z_resampled: bool = False  # non-uniform gaps: resampled by position onto a uniform grid
    z_gap_ratio: float = 1.0  # largest gap between slices over the median gap (before that)

    @property
    def flips(self) -> str:
        """What was done to the stored pixels: e.g. "flipped_rows+flipped_columns", or "none"."""
        done = [
            name
            for name, applied in (
                ("transposed", self.transposed),
                ("flipped_rows", self.flipped_rows),
                ("flipped_columns", self.flipped_columns),
            )
            if applied
        ]
        return "+".join(done) or "none"


@dataclass
class Series:
    """A decoded series in the patient-based layout (see `load_series`): axis 0 ascending patient
    z (feet to head), rows anterior to posterior, columns from the patient's right to left."""

    hu: np.ndarray  # (slices, H, W) float32 Hounsfield units
    instance_numbers: np.ndarray  # (slices,) int64 InstanceNumber of each slice, -1 if missing
    spacing: tuple[float, float, float]  # (z, y, x) in mm
    path: Path
    skipped: list[SkippedFile] = field(default_factory=list)
    z_positions: np.ndarray | None = None  # (slices,) mm along the slice normal, None if unknown
    # "position" (ImagePositionPatient), "slice_location" (SliceLocation, when positions are
    # missing), or "instance_number" (neither: InstanceNumber, or the frame order)
    ordered_by: str = "position"
    decoder_counts: dict[str, int] = field(default_factory=dict)
    geometry: SeriesGeometry = field(default_factory=SeriesGeometry)
    n_decoded: int | None = None  # slices decoded into the volume (None: hu.shape[0])

    @property
    def decoder(self) -> str:
        """The decoder(s) that produced the slices, e.g. "dicomsdl" or "dicomsdl+pydicom"."""
        return "+".join(sorted(self.decoder_counts)) or "none"

    @property
    def n_files(self) -> int:
        """The images read (each frame of a multi-frame file counts) and the files skipped."""
        decoded = int(self.hu.shape[0]) if self.n_decoded is None else self.n_decoded
        return decoded + len(self.skipped)

    def z_index_of_instance(self, instance_number: int) -> int:
        """Index along the ordered z axis of the slice with this InstanceNumber (file name)."""
        hits = np.flatnonzero(self.instance_numbers == instance_number)
        if hits.size == 0:
            raise KeyError(f"{self.path}: no slice with InstanceNumber {instance_number}")
        return int(hits[0])


def read_hu(path: str | Path, decoder: Decoder = "auto") -> np.ndarray:
    """Decode one DICOM file to a float32 (H, W) array of Hounsfield units.

    Raises:
        DicomReadError: the file is missing, truncated, not DICOM, or its pixels cannot be
            decoded by any available decoder.
    """
    return read_slice(path, decoder).hu


def read_slice(
    path: str | Path, decoder: Decoder = "auto", out: np.ndarray | None = None
) -> DicomSlice:
    """Decode one single-frame DICOM file to HU plus the header fields that place it in its
    series (a multi-frame file raises `DicomReadError`: `read_frames` reads it).

    `decoder="auto"` uses dicomsdl where it is known to be right (`_dicomsdl_can_decode`: a
    verified transfer syntax and pixel format, complete pixel data) and pydicom otherwise or
    when dicomsdl fails. `out`, a float32 (H, W) array, receives the HU when the slice has
    that size (`load_series` decodes straight into its volume); otherwise a new array does.
    """
    frames = read_frames(path, decoder, out)
    if len(frames) != 1:
        raise DicomReadError(
            f"{path}: {len(frames)} frames (an enhanced multi-frame image): read it with "
            "read_frames, or its folder with load_series"
        )
    return frames[0]


def read_frames(
    path: str | Path, decoder: Decoder = "auto", out: np.ndarray | None = None
) -> list[DicomSlice]:
    """Decode one DICOM file to its frames: one `DicomSlice` for a single-frame file, one per
    frame (in the order stored, each with its own position, orientation, spacing and rescale
    from the functional groups) for an enhanced multi-frame image. `decoder` and `out` as in
    `read_slice`; `out` is only used for a single frame.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise DicomReadError(f"{path}: cannot read the file ({error.strerror or error})") from error
    if decoder not in ("auto", "dicomsdl", "pydicom"):
        raise ValueError(f"decoder must be 'auto', 'dicomsdl' or 'pydicom', not {decoder!r}")
    if decoder == "auto" and not dicomsdl_available():
        decoder = "pydicom"
    if decoder != "pydicom":
        try:
            usable, why_not = _dicomsdl_can_decode(data)
            if usable:
                return [_read_with_dicomsdl(data, out)]
        except _NotVerifiedForDicomsdl as error:
            why_not = str(error)
        except Exception as error:
            if decoder == "dicomsdl":
                raise DicomReadError(f"{path}: dicomsdl failed ({error})") from error
        finally:
            _thread_local.pixel_element = None  # the checks' memo: let go of the file's bytes
        if decoder == "dicomsdl" and why_not:
            raise DicomReadError(f"{path}: not decoded with dicomsdl: {why_not}")
    return _read_with_pydicom(data, path, out)


def stored_to_hu(
    stored: np.ndarray,
    bits_stored: int,
    signed: bool,
    slope: float = 1.0,
    intercept: float = 0.0,
    in_place: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Stored pixel values to float32 HU, whatever the decoder did with the unused high bits.

    Keeps the low `bits_stored` bits, sign-extends them when `signed` (PixelRepresentation 1),
    then applies the rescale (for MONOCHROME1 too: see the module's docstring). `in_place`
    lets it overwrite `stored` (a scratch buffer) instead of copying it; `out` (float32, the
    shape of `stored`) receives the HU instead of a new array (a slot of the series volume).
    """
    if not stored.dtype.isnative:  # big endian files, via pydicom
        stored = stored.astype(stored.dtype.newbyteorder("="))
    itemsize = stored.dtype.itemsize
    container_bits = itemsize * 8
    if not 1 <= bits_stored <= container_bits:
        raise DicomReadError(f"BitsStored {bits_stored} does not fit in {container_bits} bits")
    # Reinterpret the bits with the header's signedness (the decoder's may differ), then shift
    # the stored field up and back down: the arithmetic right shift of a signed type
    # sign-extends, the logical one of an unsigned type clears the unused high bits.
    values = stored.view(np.dtype(f"i{itemsize}") if signed else np.dtype(f"u{itemsize}"))
    if bits_stored < container_bits:
        shift = container_bits - bits_stored
        if in_place and stored.dtype.isnative:
            values <<= shift
        else:
            values = values << shift
        values >>= shift
    if out is None:
        hu = values.astype(np.float32)
    else:
        if out.shape != values.shape or out.dtype != np.float32:
            raise ValueError(f"out is {out.dtype} {out.shape}, expected float32 {values.shape}")
        hu = out
        np.copyto(hu, values, casting="unsafe")
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    return hu


def load_series(
    series_dir: str | Path,
    decoder: Decoder = "auto",
    max_tilt_degrees: float = MAX_TILT_DEGREES,
    reuse_memory: bool = False,
) -> Series:
    """Decode every slice of a series folder into one volume in the patient-based layout.

    Whatever ImageOrientationPatient the files carry, the volume comes out as an axial stack in
    ascending patient z (feet to head), rows from anterior to posterior and columns from the
    patient's right to left: what [1,0,0,0,1,0] stores, and what `sources.load_nifti_series`
    gives for NIfTI. Slices are ordered by ImagePositionPatient projected on the slice normal
    (never by file name or InstanceNumber; when positions are missing by SliceLocation, taken
    as the position along the stored normal, and by InstanceNumber only when that is missing
    too: `Series.ordered_by` says which), transposed and flipped in plane as the orientation
    requires (`Series.geometry` records it). An enhanced multi-frame file gives one slice per
    frame, placed by its functional groups. Localizers (ImageType LOCALIZER) are skipped.
    Two slices at one position keep the first (by InstanceNumber); the other is skipped as a
    duplicate. Non-uniform gaps (a missing slice) are resampled by position onto a uniform grid
    at the median gap, each resampled slice keeping the InstanceNumber of its nearest source.

    Unreadable or truncated files, and slices whose size or orientation differs from the
    majority of the series, are skipped and listed in `Series.skipped`.

    `reuse_memory` decodes into this thread's reusable buffer instead of a fresh array, so
    that the next call with `reuse_memory` overwrites the returned `hu`: for workers that
    process one series at a time and keep only what they derive from it (notebooks 01 and
    04). It saves the first touch of a fresh 0.3 to 2 GB array per series, which on a
    virtual machine can cost more than decoding the series.

    Raises:
        FileNotFoundError: the folder does not exist.
        SeriesReadError: the folder holds no readable slice.
        UnsupportedGeometryError: a sagittal or coronal series, or a slice plane or stack
            tilted more than `max_tilt_degrees` from axial (smaller tilts are kept as they are,
            on the nearest axial grid, and recorded).
    """
    series_dir = Path(series_dir)
    if not series_dir.is_dir():
        raise FileNotFoundError(f"{series_dir}: series folder not found")
    files = sorted(
        (p for p in series_dir.iterdir() if p.is_file() and not p.name.startswith(".")),
        key=_natural_key,
    )
    if not files:
        raise SeriesReadError(f"{series_dir}: no files in the series folder")

    # Decode straight into one (files, H, W) volume (H, W of the first slice), then reorder it
    # in place: a list of slices stacked at the end would hold every slice twice.
    volume: np.ndarray | None = None
    slots_used = 0  # single-frame slices decoded into `volume` (at most one per file)
    slices: list[tuple[str, DicomSlice, int | None]] = []  # name, slice, index in `volume`
    skipped: list[SkippedFile] = []
    for file in files:
        slot = None if volume is None else volume[slots_used]
        try:
            frames = read_frames(file, decoder, out=slot)
        except DicomReadError as error:
            reason = str(error).removeprefix(f"{file}: ")
            skipped.append(SkippedFile(file.name, reason))
            continue
        if len(frames) > 1:  # an enhanced multi-frame image: its frames keep their own arrays
            slices.extend((f"{file.name}#{s.frame}", s, None) for s in frames)
            continue
        dicom_slice = frames[0]
        if volume is None:
            shape = (len(files), *dicom_slice.hu.shape)
            volume = _reusable_volume(shape) if reuse_memory else np.empty(shape, np.float32)
            slot = volume[0]
            slot[...] = dicom_slice.hu
            dicom_slice = dataclasses.replace(dicom_slice, hu=slot)
        if dicom_slice.hu is slot:
            slices.append((file.name, dicom_slice, slots_used))
            slots_used += 1
        else:  # another size than the first slice's: its own array
            slices.append((file.name, dicom_slice, None))
    if not slices:
        reasons = Counter(s.reason.split(" (")[0] for s in skipped)
        summary = ", ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
        raise SeriesReadError(
            f"{series_dir}: no readable DICOM slices ({len(files)} files: {summary})"
        )

    slices, localizers = _drop_localizers(slices)
    skipped.extend(localizers)
    slices, off_geometry = _keep_majority_geometry(slices)
    skipped.extend(off_geometry)
    orientation = slices[0][1].orientation
    layout = _axial_layout(orientation, max_tilt_degrees, series_dir)
    order, z_positions, ordered_by = _slice_order([s for _, s, _ in slices], layout)
    order, duplicates = _drop_duplicates(order, z_positions, [name for name, _, _ in slices])
    skipped.extend(duplicates)
    if z_positions is not None:
        z_positions = z_positions[order]
    ordered = [slices[i] for i in order]
    positions = [s.position for _, s, _ in ordered if s.position is not None]
    shear_degrees = _shear_degrees(positions, layout.normal)
    if shear_degrees > max_tilt_degrees:  # before any pixel is moved
        raise UnsupportedGeometryError(
            f"{series_dir}: the slices stack {shear_degrees:.1f} degrees off their normal "
            f"(more than max_tilt_degrees={max_tilt_degrees:g})"
        )

    if volume is not None and all(index is not None for _, _, index in ordered):
        hu = _gather_in_place(volume, [index for _, _, index in ordered])  # type: ignore[misc]
    else:  # enhanced frames, or the majority's size is not the first slice's: the simple way
        hu = np.stack([s.hu for _, s, _ in ordered])
    del volume
    hu = _to_patient_layout(hu, layout)
    instance_numbers = np.array(
        [s.instance_number if s.instance_number is not None else -1 for _, s, _ in ordered],
        dtype=np.int64,
    )
    pixel_spacing = ordered[0][1].pixel_spacing or (1.0, 1.0)
    if layout.transposed:
        pixel_spacing = pixel_spacing[::-1]
    z_spacing, gap_ratio = _z_spacing(z_positions, ordered[0][1].slice_thickness)
    n_decoded = int(hu.shape[0])
    resampled = z_positions is not None and _non_uniform(z_positions, z_spacing)
    if resampled:
        assert z_positions is not None
        span = float(z_positions[-1] - z_positions[0])
        if span / z_spacing + 1 > MAX_GAP_FILL * n_decoded:
            raise UnsupportedGeometryError(
                f"{series_dir}: {n_decoded} slices span {span:.1f} mm at a median gap of "
                f"{z_spacing:.2f} mm: filling the gaps would make more than {MAX_GAP_FILL}x as "
                "many slices (more than one scan in the folder?)"
            )
        hu, instance_numbers, z_positions = _resample_by_position(
            hu, instance_numbers, z_positions, z_spacing
        )
    geometry = SeriesGeometry(
        orientation=orientation,
        transposed=layout.transposed,
        flipped_rows=layout.flipped_rows,
        flipped_columns=layout.flipped_columns,
        normal_to_feet=layout.normal_to_feet,
        tilt_degrees=layout.tilt_degrees,
        shear_degrees=shear_degrees,
        n_duplicates=len(duplicates),
        z_resampled=resampled,
        z_gap_ratio=gap_ratio,
    )
    return Series(
        hu=hu,
        instance_numbers=instance_numbers,
        spacing=(float(z_spacing), float(pixel_spacing[0]), float(pixel_spacing[1])),
        path=series_dir,
        skipped=skipped,
        z_positions=z_positions,
        ordered_by=ordered_by,
        decoder_counts=dict(Counter(s.decoder for _, s, _ in ordered)),
        geometry=geometry,
        n_decoded=n_decoded,
    )


# --------------------------------------------------------------------------- decoders

# The packages that decode pixel data, and what each one is for here.
DECODER_PACKAGES: dict[str, str] = {
    "dicomsdl": "the fast path, for the syntaxes in DICOMSDL_SYNTAXES",
    "pylibjpeg": "pydicom's plugin host for the three below",
    "pylibjpeg-libjpeg": "JPEG (lossless, baseline, extended) and JPEG-LS, for pydicom",
    "pylibjpeg-openjpeg": "JPEG 2000, for pydicom",
    "pylibjpeg-rle": "fast RLE Lossless for pydicom (its own RLE decoder is about 7x slower)",
    "python-gdcm": "another pydicom backend (optional)",
}
OPTIONAL_DECODERS = frozenset({"python-gdcm"})
NO_DECODER = "NO DECODER"  # what `SyntaxSupport.readers` says when nothing here reads it
# Transfer syntaxes reported at the start of notebooks 01 and 04: the competition's (RLE
# Lossless), uncompressed, and the compressed ones of other exports and extra data.
REPORTED_SYNTAXES: dict[str, str] = {
    "1.2.840.10008.1.2.5": "RLE Lossless (every competition file)",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian (uncompressed)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless (SV1)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless (process 14)",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.201": "HTJ2K Lossless",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (8 bit)",
}


@functools.cache
def dicomsdl_available() -> bool:
    """Whether dicomsdl can be imported (without it, every file goes to pydicom)."""
    if importlib.util.find_spec("dicomsdl") is None:
        return False
    try:
        _dicomsdl()
    except Exception:  # a broken install (missing shared library) counts as missing
        return False
    return True


def decoder_versions() -> dict[str, str | None]:
    """{package: installed version, or None} for every package of `DECODER_PACKAGES`."""
    versions: dict[str, str | None] = {}
    for package in DECODER_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    if versions["dicomsdl"] is not None and not dicomsdl_available():
        versions["dicomsdl"] = None
    return versions


@dataclass(frozen=True)
class SyntaxSupport:
    """Which decoders here can read a transfer syntax."""

    uid: str
    name: str
    dicomsdl: bool  # dicomsdl installed and verified for this syntax
    pydicom: bool  # pydicom has a working decoder for it (native or a plugin)
    pydicom_plugins: tuple[str, ...]  # the plugins that provide it ("" for pydicom's own)

    @property
    def decodable(self) -> bool:
        return self.dicomsdl or self.pydicom

    @property
    def readers(self) -> str:
        """What reads it, in the order tried: "dicomsdl then pydicom (pylibjpeg)", or
        "NO DECODER"."""
        names = (["dicomsdl"] if self.dicomsdl else []) + (
            [f"pydicom ({', '.join(self.pydicom_plugins) or 'its own'})"] if self.pydicom else []
        )
        return " then ".join(names) or NO_DECODER


def syntax_support(uid: str, name: str = "") -> SyntaxSupport:
    """What can decode files of transfer syntax `uid` on this machine, right now."""
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(uid)
        pydicom_ok, plugins = bool(decoder.is_available), tuple(decoder.available_plugins)
    except NotImplementedError:  # a syntax pydicom has no decoder for at all
        pydicom_ok, plugins = False, ()
    return SyntaxSupport(
        uid, name or uid, dicomsdl_available() and uid in DICOMSDL_SYNTAXES, pydicom_ok, plugins
    )


def decoder_report(syntaxes: dict[str, str] | None = None) -> tuple[str, list[str]]:
    """A few lines on the installed decoders and what each reported syntax is read with, and
    the warnings: a missing decoder package (slower, or some syntax unreadable) or a syntax
    nothing here can decode. Notebooks 01 and 04 print both at their start."""
    versions = decoder_versions()
    found = ", ".join(f"{p} {v}" for p, v in versions.items() if v)
    lines = [f"DICOM decoders: {found or 'none'}; pydicom {_pydicom_version()}"]
    warnings_: list[str] = []
    for package, version in versions.items():
        if version is None and package not in OPTIONAL_DECODERS:
            warnings_.append(f"{package} is not installed: {DECODER_PACKAGES[package]}")
    for uid, name in (syntaxes or REPORTED_SYNTAXES).items():
        support = syntax_support(uid, name)
        lines.append(f"  {name}: {support.readers}")
        if not support.decodable:
            warnings_.append(f"no installed decoder reads {name} ({uid}): such series fail")
    return "\n".join(lines), warnings_


def series_transfer_syntax(series_dir: str | Path, max_files: int = 16) -> str | None:
    """The transfer syntax of a series, from the header of its first image file (cheap: one
    small read per file tried), or None when none of its first `max_files` files is a Part 10
    image (a missing or empty folder, or only DICOMDIRs and reports).

    Files of any name count (`IM000001` beside a DICOMDIR, as many archives write them);
    files whose MediaStorageSOPClassUID is not an image (DICOMDIR, structured reports) do not.
    """
    if not Path(series_dir).is_dir():  # a series the meta CSV names but the disk lacks
        return None
    files = sorted(
        (p for p in Path(series_dir).iterdir() if p.is_file() and not p.name.startswith(".")),
        key=_natural_key,
    )
    for file in files[:max_files]:
        try:
            with open(file, "rb") as handle:
                head = handle.read(132 + 4096)
        except OSError:
            continue
        if len(head) < 132 or head[128:132] != b"DICM":
            continue
        sop_class = _meta_value(head, _MEDIA_STORAGE_SOP_CLASS_TAG)
        if sop_class and not _is_image_class(sop_class):
            continue
        return _transfer_syntax(head)
    return None


def _pydicom_version() -> str:
    import pydicom

    return str(pydicom.__version__)


def _dicomsdl_can_decode(data: bytes) -> tuple[bool, str]:
    """Whether dicomsdl may see these bytes: a Part 10 file in a verified transfer syntax
    whose pixel data element is complete (dicomsdl segfaults on truncated files)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return False, "no DICOM Part 10 header"
    if not _is_image_class(_meta_value(data, _MEDIA_STORAGE_SOP_CLASS_TAG) or ""):
        return False, "not an image storage class"
    syntax = _transfer_syntax(data)
    if syntax not in DICOMSDL_SYNTAXES:
        return False, f"transfer syntax {syntax or 'missing'} not verified for dicomsdl"
    if not _pixel_data_complete(data, syntax):
        return False, "pixel data incomplete (truncated file?)"
    return True, ""


def _transfer_syntax(data: bytes) -> str | None:
    """The TransferSyntaxUID of the file meta group (always explicit VR little endian)."""
    return _meta_value(data, _TRANSFER_SYNTAX_TAG)


def _meta_value(data: bytes, tag_and_vr: bytes) -> str | None:
    """A UI value of the file meta group (explicit VR little endian, in the first 4 KB)."""
    pos = data.find(tag_and_vr, 132, 132 + 4096)
    if pos < 0:
        return None
    length = int.from_bytes(data[pos + 6 : pos + 8], "little")
    return data[pos + 8 : pos + 8 + length].rstrip(b"\x00 ").decode("ascii", errors="replace")


def _pixel_element(data: bytes, syntax: str) -> tuple[int, int] | None:
    """(declared length, offset of the value) of the top-level (7FE0,0010) element, or None.

    Found by walking the data set's top-level elements, stepping over sequences, so that the
    pixel data of an Icon Image Sequence (or any nested item) before it is never taken for the
    image's. None also for a header this walk cannot follow: that only sends the file to pydicom.
    """
    last = getattr(_thread_local, "pixel_element", None)
    if last is not None and last[0] is data and last[1] == syntax:  # the checks ask twice
        return last[2]
    start = _dataset_start(data)
    found = None
    if start is not None:
        found = _walk_to_pixel_data(data, start, syntax != _IMPLICIT_VR_LITTLE_ENDIAN)
    _thread_local.pixel_element = (data, syntax, found)
    return found


# Explicit VRs whose length is a 4-byte field after two reserved bytes (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
# Tags as one little-endian 32-bit number: group | element << 16.
_PIXEL_DATA = 0x00107FE0
_ITEM, _ITEM_DELIMITER, _SEQUENCE_DELIMITER = 0xE000FFFE, 0xE00DFFFE, 0xE0DDFFFE
_TAG_AND_LENGTH = struct.Struct("<II")
_TAG_VR_SHORT_LENGTH = struct.Struct("<I2sH")


def _dataset_start(data: bytes) -> int | None:
    """Offset of the first element after the file meta group (explicit VR little endian)."""
    pos = 132
    while pos + 8 <= len(data) and data[pos : pos + 2] == b"\x02\x00":
        if data[pos + 4 : pos + 6] in _LONG_VRS:
            pos += 12 + int.from_bytes(data[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(data[pos + 6 : pos + 8], "little")
    return pos if pos <= len(data) else None


def _element_header(data: bytes, pos: int, explicit_vr: bool) -> tuple[int, bytes, int, int]:
    """(tag, VR or b"", value length, value offset) of the element at `pos`."""
    tag, length = _TAG_AND_LENGTH.unpack_from(data, pos)
    if not explicit_vr or tag & 0xFFFF == 0xFFFE:  # item and delimiter tags carry no VR
        return tag, b"", length, pos + 8
    tag, vr, short_length = _TAG_VR_SHORT_LENGTH.unpack_from(data, pos)
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            return tag, vr, _UNDEFINED_LENGTH, len(data)
        return tag, vr, int.from_bytes(data[pos + 8 : pos + 12], "little"), pos + 12
    return tag, vr, short_length, pos + 8


def _walk_to_pixel_data(data: bytes, pos: int, explicit_vr: bool) -> tuple[int, int] | None:
    while pos + 8 <= len(data):
        tag, vr, length, value = _element_header(data, pos, explicit_vr)
        if tag == _PIXEL_DATA:
            return length, value
        if length != _UNDEFINED_LENGTH:
            pos = value + length
            continue
        # A sequence of undefined length (UN's contents are implicit VR, PS3.5 6.2.2).
        end = _skip_items(data, value, explicit_vr and vr != b"UN")
        if end is None:
            return None
        pos = end
    return None


def _skip_items(data: bytes, pos: int, explicit_vr: bool, depth: int = 0) -> int | None:
    """Offset after the delimiter of the undefined-length sequence whose items start at `pos`."""
    if depth > 16:
        return None
    while pos + 8 <= len(data):
        tag, length = _TAG_AND_LENGTH.unpack_from(data, pos)
        if tag == _SEQUENCE_DELIMITER:
            return pos + 8
        if tag != _ITEM:
            return None
        if length != _UNDEFINED_LENGTH:
            pos += 8 + length
            continue
        pos += 8
        while pos + 8 <= len(data):  # the item's elements, up to its delimiter
            tag, vr, length, value = _element_header(data, pos, explicit_vr)
            if tag == _ITEM_DELIMITER:
                pos += 8
                break
            if length != _UNDEFINED_LENGTH:
                pos = value + length
                continue
            end = _skip_items(data, value, explicit_vr and vr != b"UN", depth + 1)
            if end is None:
                return None
            pos = end
        else:
            return None
    return None


def _pixel_data_complete(data: bytes, syntax: str) -> bool:
    """Whether the (7FE0,0010) element lies entirely inside the file.

    Native data: its declared length fits. Encapsulated data: every item fits and the sequence
    delimiter is there.
    """
    element = _pixel_element(data, syntax)
    if element is None:
        return False
    length, start = element
    if length != _UNDEFINED_LENGTH:
        return syntax not in _ENCAPSULATED_SYNTAXES and 0 < length and start + length <= len(data)
    if syntax not in _ENCAPSULATED_SYNTAXES:  # native pixel data always has a defined length
        return False
    offset = start
    while offset + 8 <= len(data):
        tag = data[offset : offset + 4]
        item_length = int.from_bytes(data[offset + 4 : offset + 8], "little")
        if tag == _SEQUENCE_DELIMITER_TAG:
            return True
        if tag != _ITEM_TAG or offset + 8 + item_length > len(data):
            return False
        offset += 8 + item_length
    return False


class _NotVerifiedForDicomsdl(Exception):
    """The file's pixel format is outside what dicomsdl was verified on (goes to pydicom)."""


def _check_dicomsdl_verified(info: dict[str, Any], high_bit: object, data: bytes) -> None:
    """Raise `_NotVerifiedForDicomsdl` unless the header is a verified pixel format and the
    pixel data agrees with it (dicomsdl trusts the header: with more rows than the data holds,
    or 8 bits declared for 16-bit data, it reads past the buffer or overruns the heap).

    Checked before any pixel is decoded; dicomsdl has only parsed the header by then.
    """
    rows, columns = int(info["Rows"]), int(info["Cols"])
    bits_stored = int(info["BitsStored"])
    checks = (
        (int(info["SamplesPerPixel"]) == 1, f"{info['SamplesPerPixel']} samples per pixel"),
        (int(info["NumberOfFrames"]) == 1, f"{info['NumberOfFrames']} frames"),
        (
            int(info["BitsAllocated"]) == DICOMSDL_BITS_ALLOCATED,
            f"BitsAllocated {info['BitsAllocated']}",
        ),
        (bits_stored in DICOMSDL_BITS_STORED, f"BitsStored {bits_stored}"),
        (
            _int_or_none(high_bit) == bits_stored - 1,
            f"HighBit {high_bit} with BitsStored {bits_stored}",
        ),
        (
            str(info["PhotometricInterpretation"]).strip() in DICOMSDL_PHOTOMETRIC,
            f"PhotometricInterpretation {info['PhotometricInterpretation']}",
        ),
        (rows > 0 and columns > 0, f"{rows}x{columns} pixels"),
    )
    for ok, what in checks:
        if not ok:
            raise _NotVerifiedForDicomsdl(f"{what} not verified for dicomsdl")
    mismatch = _codestream_mismatch(data, _transfer_syntax(data) or "", rows, columns)
    if mismatch:
        raise _NotVerifiedForDicomsdl(f"pixel data disagrees with the header ({mismatch})")


def _codestream_mismatch(data: bytes, syntax: str, rows: int, columns: int) -> str:
    """Why the pixel data cannot be a 16-bit rows x columns single-sample frame, or "".

    Native: at least rows x columns x 2 bytes. RLE: two segments (the two bytes of 16-bit
    samples). JPEG 2000: the SIZ marker's size and one component of at most 16 bits. Lossless
    JPEG and JPEG-LS: the start-of-frame's size, one component, 9 to 16 bits.
    """
    element = _pixel_element(data, syntax)
    if element is None:
        return "no pixel data element"
    length, start = element
    if syntax not in _ENCAPSULATED_SYNTAXES:
        expected = rows * columns * 2
        return "" if length >= expected else f"{length} bytes for {expected}"
    fragment = _first_fragment(data, start)
    if syntax == _RLE:
        segments = int.from_bytes(fragment[:4], "little") if len(fragment) >= 64 else -1
        return "" if segments == 2 else f"RLE with {segments} segments"
    if syntax in _JPEG_2000:
        at = fragment.find(b"\xff\x4f\xff\x51")  # SOC then SIZ
        siz = fragment[at + 4 : at + 43] if at >= 0 else b""
        if len(siz) < 39:
            return "no JPEG 2000 SIZ marker"
        width, height, x_offset, y_offset = struct.unpack(">IIII", siz[4:20])
        components, precision = struct.unpack(">H", siz[36:38])[0], (siz[38] & 0x7F) + 1
        size = (height - y_offset, width - x_offset)
        if size != (rows, columns) or components != 1 or precision > 16:
            return f"JPEG 2000 of {size[0]}x{size[1]}, {components} components, {precision} bits"
        return ""
    marker = _JPEG_SOF.get(syntax)
    at = fragment.find(marker) if marker else -1
    if at < 0 or len(fragment) < at + 10:
        return "no JPEG start-of-frame marker"
    precision, height, width, components = struct.unpack(">BHHB", fragment[at + 4 : at + 10])
    if (height, width) != (rows, columns) or components != 1 or not 8 < precision <= 16:
        return f"JPEG of {height}x{width}, {components} components, {precision} bits"
    return ""


def _first_fragment(data: bytes, start: int) -> bytes:
    """The first fragment of encapsulated pixel data (the item after the offset table)."""
    offset, items = start, []
    while len(items) < 2 and data[offset : offset + 4] == _ITEM_TAG:
        length = int.from_bytes(data[offset + 4 : offset + 8], "little")
        items.append(data[offset + 8 : offset + 8 + length])
        offset += 8 + length
    return items[1] if len(items) == 2 else b""


_thread_local = threading.local()


def _reusable_volume(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array of `shape` in this thread's buffer, grown when needed, never shrunk."""
    size = int(np.prod(shape))
    buffer = getattr(_thread_local, "volume", None)
    if buffer is None or buffer.size < size:
        _thread_local.volume = None  # free the old one before the new one is touched
        buffer = _thread_local.volume = np.empty(size, dtype=np.float32)
    return buffer[:size].reshape(shape)


def _frame_buffer(shape: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """A per-thread scratch array for one decoded frame, reallocated only when needed."""
    buffer = getattr(_thread_local, "frame", None)
    if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
        buffer = _thread_local.frame = np.empty(shape, dtype=dtype)
    return buffer


@functools.cache
def _dicomsdl() -> ModuleType:
    import dicomsdl

    # Its C++ logger writes to stderr for every fallback case; failures surface as exceptions.
    dicomsdl.set_loglevel(dicomsdl.LogLevel.DISABLE)
    return dicomsdl


def _read_with_dicomsdl(data: bytes, out: np.ndarray | None = None) -> DicomSlice:
    # copy_data=False: `data` outlives `dataset` here, and copying 0.5 MB per slice is slow.
    dataset = _dicomsdl().open_memory(data, copy_data=False)
    info = dataset.getPixelDataInfo()
    _check_dicomsdl_verified(info, dataset.HighBit, data)
    if dataset.PerFrameFunctionalGroupsSequence is not None:
        raise _NotVerifiedForDicomsdl("an enhanced image (functional groups) goes to pydicom")
    if dataset.ModalityLUTSequence is not None:
        raise _NotVerifiedForDicomsdl("a Modality LUT Sequence goes to pydicom")
    # Decode into a reused buffer and convert it in place: fresh 0.5 MB arrays per slice
    # cost more in page faults than the decode itself.
    stored = _frame_buffer((info["Rows"], info["Cols"]), np.dtype(info["dtype"]))
    dataset.copyFrameData(0, stored)
    hu = stored_to_hu(
        stored,
        bits_stored=int(info["BitsStored"]),
        signed=bool(info["PixelRepresentation"]),
        slope=_float_or(info["RescaleSlope"], 1.0),
        intercept=_float_or(info["RescaleIntercept"], 0.0),
        in_place=True,
        out=_fitting(out, stored.shape),
    )
    return DicomSlice(
        hu=hu,
        instance_number=_int_or_none(dataset.InstanceNumber),
        position=_floats(dataset.ImagePositionPatient, 3),
        orientation=_floats(dataset.ImageOrientationPatient, 6),
        pixel_spacing=_floats(dataset.PixelSpacing, 2),
        slice_thickness=_float_or(dataset.SliceThickness, None),
        decoder="dicomsdl",
        slice_location=_float_or(dataset.SliceLocation, None),
        localizer=_is_localizer(dataset.ImageType),
    )


def _read_with_pydicom(data: bytes, path: Path, out: np.ndarray | None = None) -> list[DicomSlice]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(io.BytesIO(data))
            if "PixelData" not in dataset or not _is_image_class(_sop_class(dataset)):
                raise DicomReadError(f"{path}: {_why_not_an_image(dataset)}")
            samples_per_pixel = int(dataset.get("SamplesPerPixel", 1))
            if samples_per_pixel != 1:
                raise DicomReadError(
                    f"{path}: {samples_per_pixel} samples per pixel; CT slices have 1"
                )
            n_frames = int(dataset.get("NumberOfFrames", 1) or 1)
            enhanced = "PerFrameFunctionalGroupsSequence" in dataset
            if n_frames > 1 and not enhanced:
                raise DicomReadError(
                    f"{path}: {n_frames} frames without Per-Frame Functional Groups to place "
                    "them (not an enhanced CT image)"
                )
            stored = dataset.pixel_array
            if stored.ndim != (3 if n_frames > 1 else 2):  # pydicom infers frames from length
                raise DicomReadError(
                    f"{path}: pixels of shape {stored.shape} for {n_frames} frame(s)"
                )
    except DicomReadError:
        raise
    except InvalidDicomError as error:
        raise DicomReadError(
            f"{path}: not a DICOM Part 10 file (no 'DICM' after the 128-byte preamble; {error})"
        ) from error
    except Exception as error:
        reason = "truncated or corrupt" if _looks_truncated(error) else "cannot decode pixels"
        raise DicomReadError(f"{path}: {reason} ({type(error).__name__}: {error})") from error
    bits_stored = int(dataset.get("BitsStored", stored.dtype.itemsize * 8))
    signed = int(dataset.get("PixelRepresentation", 0)) == 1
    if enhanced:
        return [
            _enhanced_frame(dataset, k, stored[k] if n_frames > 1 else stored, bits_stored, signed)
            for k in range(n_frames)
        ]
    if "ModalityLUTSequence" in dataset:  # a lookup table instead of the rescale (not CT's)
        from pydicom.pixels import apply_modality_lut

        hu = np.asarray(apply_modality_lut(stored, dataset), dtype=np.float32)
    else:
        hu = stored_to_hu(
            stored,
            bits_stored=bits_stored,
            signed=signed,
            slope=_float_or(dataset.get("RescaleSlope"), 1.0),
            intercept=_float_or(dataset.get("RescaleIntercept"), 0.0),
            out=_fitting(out, stored.shape),
        )
    return [
        DicomSlice(
            hu=hu,
            instance_number=_int_or_none(dataset.get("InstanceNumber")),
            position=_floats(dataset.get("ImagePositionPatient"), 3),
            orientation=_floats(dataset.get("ImageOrientationPatient"), 6),
            pixel_spacing=_floats(dataset.get("PixelSpacing"), 2),
            slice_thickness=_float_or(dataset.get("SliceThickness"), None),
            decoder="pydicom",
            slice_location=_float_or(dataset.get("SliceLocation"), None),
            localizer=_is_localizer(dataset.get("ImageType")),
        )
    ]


def _enhanced_frame(
    dataset: Any, index: int, stored: np.ndarray, bits_stored: int, signed: bool
) -> DicomSlice:
    """Frame `index` (0-based) of an enhanced multi-frame image, placed and rescaled by its
    Per-Frame Functional Groups, else the Shared ones, else the top-level attributes."""

    def value(sequence: str, keyword: str) -> Any:
        per_frame = dataset.PerFrameFunctionalGroupsSequence
        groups = [per_frame[index]] if index < len(per_frame) else []
        groups += list(dataset.get("SharedFunctionalGroupsSequence") or [])[:1]
        for group in groups:
            items = group.get(sequence)
            if items and keyword in items[0]:
                return items[0].get(keyword)
        return dataset.get(keyword)

    return DicomSlice(
        hu=stored_to_hu(
            stored,
            bits_stored=bits_stored,
            signed=signed,
            slope=_float_or(value("PixelValueTransformationSequence", "RescaleSlope"), 1.0),
            intercept=_float_or(value("PixelValueTransformationSequence", "RescaleIntercept"), 0.0),
        ),
        # a single-frame enhanced file is one slice among others: its own InstanceNumber
        instance_number=(
            _int_or_none(dataset.get("InstanceNumber"))
            if len(dataset.PerFrameFunctionalGroupsSequence) == 1
            else index + 1
        ),
        position=_floats(value("PlanePositionSequence", "ImagePositionPatient"), 3),
        orientation=_floats(value("PlaneOrientationSequence", "ImageOrientationPatient"), 6),
        pixel_spacing=_floats(value("PixelMeasuresSequence", "PixelSpacing"), 2),
        slice_thickness=_float_or(value("PixelMeasuresSequence", "SliceThickness"), None),
        decoder="pydicom",
        localizer=_is_localizer(
            value("CTImageFrameTypeSequence", "FrameType") or dataset.get("ImageType")
        ),
        frame=index + 1,
    )


def _sop_class(dataset: Any) -> str:
    """SOPClassUID, else the file meta's MediaStorageSOPClassUID (a DICOMDIR has only that)."""
    meta = getattr(dataset, "file_meta", None)
    return str(dataset.get("SOPClassUID") or (meta or {}).get("MediaStorageSOPClassUID") or "")


def _why_not_an_image(dataset: Any) -> str:
    """The skip reason of a file that is not an image to decode: what it is when its SOP class
    is not an image (a DICOMDIR, a dose report, a segmentation), else a truncated image."""
    from pydicom.uid import UID

    sop_class = _sop_class(dataset)
    name = UID(sop_class).name if sop_class else ""
    if not _is_image_class(sop_class):
        kind = " (a DICOMDIR)" if sop_class == MEDIA_STORAGE_DIRECTORY else ""
        return f"not an image: {name}{kind}"
    if sop_class and name == sop_class:  # a private or unknown class: which, we cannot say
        return f"no pixel data element (SOP class {sop_class}: not an image, or truncated?)"
    return "no pixel data element (truncated file?)"


MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR


_SEGMENTATION_CLASSES = "1.2.840.10008.5.1.4.1.1.66"  # Segmentation, Label Map, Heightmap...


@functools.lru_cache(maxsize=64)
def _is_image_class(sop_class: str) -> bool:
    """Whether a SOP class UID stores images: a standard class named "... Image Storage", or
    a missing or private one (which only the pixel data can tell). Segmentations (also those
    newer than this pydicom), dose grids, reports and directories do not."""
    from pydicom.uid import UID

    if not sop_class:
        return True
    if sop_class.startswith(_SEGMENTATION_CLASSES):
        return False
    with warnings.catch_warnings():  # a malformed UID warns
        warnings.simplefilter("ignore")
        name = UID(sop_class).name
    return name == sop_class or "Image Storage" in name


def _is_localizer(image_type: object) -> bool:
    """Whether ImageType / FrameType (a multi-valued CS) marks a localizer (scout)."""
    if image_type is None:
        return False
    values = image_type.split("\\") if isinstance(image_type, str) else list(image_type)  # type: ignore[call-overload]
    return any(str(v).strip().upper() == "LOCALIZER" for v in values)


def _fitting(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """`out` when a decoded frame of `shape` fits it, else None (decode into a new array)."""
    return out if out is not None and out.shape == shape else None


def _looks_truncated(error: Exception) -> bool:
    text = str(error).lower()
    return any(word in text for word in ("truncat", "less than expected", "end of file", "eof"))


def _keep_majority_geometry(
    slices: list[tuple[str, DicomSlice, int | None]],
) -> tuple[list[tuple[str, DicomSlice, int | None]], list[SkippedFile]]:
    """Keep the slices sharing the most common (size, orientation); report the others."""

    def geometry(s: DicomSlice) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
        orientation = None if s.orientation is None else tuple(np.round(s.orientation, 3))
        return s.hu.shape, orientation

    counts = Counter(geometry(s) for _, s, _ in slices)
    (major_shape, major_orientation), _ = counts.most_common(1)[0]
    kept: list[tuple[str, DicomSlice, int | None]] = []
    skipped: list[SkippedFile] = []
    for name, s, index in slices:
        shape, orientation = geometry(s)
        if shape != major_shape:
            reason = (
                f"size {shape[0]}x{shape[1]} differs from the series' "
                f"{major_shape[0]}x{major_shape[1]}"
            )
            skipped.append(SkippedFile(name, reason))
        elif orientation != major_orientation:
            reason = f"orientation {orientation} differs from the series' {major_orientation}"
            skipped.append(SkippedFile(name, reason))
        else:
            kept.append((name, s, index))
    return kept, skipped


@dataclass(frozen=True)
class _AxialLayout:
    """What brings stored pixels to the patient-based layout (see `_axial_layout`)."""

    transposed: bool = False
    flipped_rows: bool = False
    flipped_columns: bool = False
    normal_to_feet: bool = False
    tilt_degrees: float = 0.0
    normal: np.ndarray | None = None  # unit slice normal pointing to the head (+z)


def _axial_layout(
    orientation: tuple[float, ...] | None, max_tilt_degrees: float, series_dir: Path
) -> _AxialLayout:
    """From ImageOrientationPatient (row cosine: where the column index grows; column cosine:
    where the row index grows; patient axes LPS: +x left, +y posterior, +z head), the
    transposition and flips that make columns grow along +x and rows along +y.

    Raises:
        UnsupportedGeometryError: a degenerate orientation, a sagittal or coronal plane, or an
            axial one tilted more than `max_tilt_degrees`.
    """
    if orientation is None:
        return _AxialLayout()
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, column)
    norms = [float(np.linalg.norm(v)) for v in (row, column, normal)]
    if min(norms) < 0.5:
        raise UnsupportedGeometryError(
            f"{series_dir}: ImageOrientationPatient {list(orientation)} is degenerate"
        )
    row, column, normal = row / norms[0], column / norms[1], normal / norms[2]
    plane = PLANES[int(np.argmax(np.abs(normal)))]
    tilt = float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))
    if plane != "axial":
        raise UnsupportedGeometryError(
            f"{series_dir}: a {plane} series (ImageOrientationPatient {list(orientation)}); "
            "only axial series are supported"
        )
    if tilt > max_tilt_degrees:
        raise UnsupportedGeometryError(
            f"{series_dir}: the slice plane is tilted {tilt:.1f} degrees from axial (more than "
            f"max_tilt_degrees={max_tilt_degrees:g})"
        )
    transposed = abs(float(row[1])) > abs(float(row[0]))
    along_columns, along_rows = (column, row) if transposed else (row, column)
    normal_to_feet = bool(normal[2] < 0)
    return _AxialLayout(
        transposed=transposed,
        flipped_rows=bool(along_rows[1] < 0),
        flipped_columns=bool(along_columns[0] < 0),
        normal_to_feet=normal_to_feet,
        tilt_degrees=round(tilt, 3),
        normal=-normal if normal_to_feet else normal,
    )


def _slice_order(
    slices: list[DicomSlice], layout: _AxialLayout
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Indices that sort the slices from feet to head, the sorted positions along the
    head-pointing normal (mm, None when unknown), and what they were ordered by.

    ImagePositionPatient projected on the normal (z without an orientation) when every slice
    has it; else SliceLocation when every slice has a distinct one (constant or coarsely
    rounded values would merge slices as duplicates), taken as the position along the stored
    normal (row x column cosines: negated when that points to the feet; taken as z without an
    orientation). The standard leaves SliceLocation's reference and direction to the
    implementation (PS3.3 C.7.6.2.1.2); for the usual orientations this reading is patient z,
    as vendors write it. Else InstanceNumber. Ties are broken by InstanceNumber.
    """
    instance = np.array(
        [s.instance_number if s.instance_number is not None else 0 for s in slices], dtype=float
    )
    if all(s.position is not None for s in slices):
        normal = np.array([0.0, 0.0, 1.0]) if layout.normal is None else layout.normal
        z = np.array([np.dot(s.position, normal) for s in slices])  # type: ignore[arg-type]
        return np.lexsort((instance, z)), z, "position"
    locations = [s.slice_location for s in slices]
    if None not in locations and len(np.unique(np.round(locations, 2))) == len(slices):
        sign = -1.0 if layout.normal_to_feet else 1.0
        z = sign * np.array(locations, dtype=float)
        return np.lexsort((instance, z)), z, "slice_location"
    return np.lexsort((np.arange(len(slices)), instance)), None, "instance_number"


def _drop_localizers(
    slices: list[tuple[str, DicomSlice, int | None]],
) -> tuple[list[tuple[str, DicomSlice, int | None]], list[SkippedFile]]:
    """The slices without the localizers (scouts) among them, and those as skipped; a folder
    of nothing but localizers keeps them (the geometry checks then say what is wrong)."""
    kept = [entry for entry in slices if not entry[1].localizer]
    if not kept:
        return slices, []
    dropped = [
        SkippedFile(name, "a localizer (ImageType LOCALIZER), not a slice of the series")
        for name, s, _ in slices
        if s.localizer
    ]
    return kept, dropped


def _drop_duplicates(
    order: np.ndarray, z: np.ndarray | None, names: list[str]
) -> tuple[np.ndarray, list[SkippedFile]]:
    """`order` without the slices at the position of the one before them, and those as skipped."""
    if z is None or len(order) < 2:
        return order, []
    sorted_z = z[order]
    duplicate = np.concatenate([[False], np.diff(sorted_z) < DUPLICATE_TOLERANCE_MM])
    skipped = []
    kept_index = order[0]
    for index, is_duplicate in zip(order, duplicate, strict=True):
        if is_duplicate:
            reason = f"duplicate position z={z[index]:.3f} mm, the same as {names[kept_index]}"
            skipped.append(SkippedFile(names[index], reason))
        else:
            kept_index = index
    return order[~duplicate], skipped


def _gather_in_place(volume: np.ndarray, order: list[int]) -> np.ndarray:
    """`volume[order]` without a second volume in memory: the slices are moved along the cycles
    of the permutation through one spare slice; returns the first len(order) slices."""
    n = len(volume)
    rest = sorted(set(range(n)) - set(order))
    permutation = list(order) + rest  # new[k] = old[permutation[k]]
    done = [False] * n
    spare = np.empty_like(volume[0])
    for start in range(n):
        if done[start]:
            continue
        done[start] = True
        if permutation[start] == start:
            continue
        spare[...] = volume[start]
        k = start
        while permutation[k] != start:
            volume[k] = volume[permutation[k]]
            k = permutation[k]
            done[k] = True
        volume[k] = spare
    return volume[: len(order)]


def _to_patient_layout(hu: np.ndarray, layout: _AxialLayout) -> np.ndarray:
    """Transpose and flip every slice as `layout` says, in place where the shape allows."""
    if not (layout.transposed or layout.flipped_rows or layout.flipped_columns):
        return hu
    if layout.transposed and hu.shape[1] != hu.shape[2]:
        hu = np.ascontiguousarray(hu.transpose(0, 2, 1))
        transpose = False
    else:
        transpose = layout.transposed
    rows = slice(None, None, -1) if layout.flipped_rows else slice(None)
    columns = slice(None, None, -1) if layout.flipped_columns else slice(None)
    for k in range(len(hu)):  # one slice at a time: numpy buffers the overlap of each
        image = hu[k].T if transpose else hu[k]
        hu[k] = image[rows, columns]
    return hu


def _z_spacing(
    z_positions: np.ndarray | None, slice_thickness: float | None
) -> tuple[float, float]:
    """The slice spacing (mm: the median gap between positions, else SliceThickness, else 1)
    and the largest gap over it."""
    if z_positions is not None and len(z_positions) > 1:
        gaps = np.diff(z_positions)
        median = float(np.median(gaps))
        if median > 0:
            return median, round(float(gaps.max()) / median, 4)
    return float(slice_thickness or 1.0), 1.0


def _non_uniform(z_positions: np.ndarray, spacing: float) -> bool:
    gaps = np.diff(z_positions)
    return bool(gaps.size and np.abs(gaps - spacing).max() > NONUNIFORM_TOLERANCE * spacing)


def _resample_by_position(
    hu: np.ndarray, instance_numbers: np.ndarray, z: np.ndarray, spacing: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation along z from slices at positions `z` (ascending) onto a uniform
    grid of `spacing` from z[0]; each new slice takes the InstanceNumber of its nearest source."""
    n = int(np.floor((z[-1] - z[0]) / spacing + 0.5)) + 1
    grid = np.minimum(z[0] + spacing * np.arange(n), z[-1])
    upper = np.clip(np.searchsorted(z, grid, side="right"), 1, len(z) - 1)
    lower = upper - 1
    weight = ((grid - z[lower]) / (z[upper] - z[lower])).astype(np.float32)
    out = np.empty((n, *hu.shape[1:]), dtype=np.float32)
    for k in range(n):
        np.multiply(hu[lower[k]], 1 - weight[k], out=out[k])
        out[k] += weight[k] * hu[upper[k]]
    nearest = np.where(weight < 0.5, lower, upper)
    return out, instance_numbers[nearest], grid


def _shear_degrees(positions: list[tuple[float, ...]], normal: np.ndarray | None) -> float:
    """The angle between the line through the first and last slice positions and the normal
    (a gantry tilt stored with an axial orientation shows here)."""
    if normal is None or len(positions) < 2:
        return 0.0
    step = np.array(positions[-1]) - np.array(positions[0])
    length = float(np.linalg.norm(step))
    if length == 0.0:
        return 0.0
    cosine = min(1.0, abs(float(np.dot(step, normal))) / length)
    return round(float(np.degrees(np.arccos(cosine))), 3)


def _natural_key(path: Path) -> list[int | str]:
    """Sort key that puts 2.dcm before 10.dcm (only used for stable listings)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _float_or(value: object, default: float | None) -> float | None:
    if value is None or value == "":
        return default
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _int_or_none(value: object) -> int | None:
    if value is None or value == "":
        return None
    try:
        return int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    """A multi-valued numeric header field as n floats, or None when missing or malformed."""
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == n else None
