"""Competition DICOMs to Hounsfield units: one file (`read_hu`) and one series (`load_series`).

`dicomsdl` is the fast decoder and pydicom (with the pylibjpeg plugins) the fallback and the
reference. Both return *stored* values; this module turns them into HU itself, the same way for
either decoder, so the two can never disagree on the pitfalls of this data set:

- `PixelRepresentation == 1` with `BitsStored < BitsAllocated` (12, 13, 14 of 16): the stored
  value is sign-extended from `BitsStored` bits, whether the unused high bits hold the sign or
  are zero (a naive int16 read turns -1000 HU into +3096 in the latter case).
- JPEG 2000 codestreams whose signedness disagrees with the header: the header wins, as in
  pydicom (masking to `BitsStored` bits and sign-extending makes the decoder's view irrelevant).
- `RescaleSlope` / `RescaleIntercept` are always applied (missing ones mean 1 and 0).
- `MONOCHROME1`: stored values are inverted within their bit range before the rescale, so that
  denser tissue always has the larger value, as in `MONOCHROME2`.

dicomsdl crashes the whole process (segfault) on a truncated file, so it only ever sees files
whose pixel data element is complete on disk (`_dicomsdl_can_decode`); everything else goes to
pydicom, which raises a Python error that becomes a skipped slice.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import io
import re
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Literal

import numpy as np

Decoder = Literal["auto", "dicomsdl", "pydicom"]

# Transfer syntaxes on which dicomsdl's stored values were checked against pydicom's
# (tests/test_dicom.py). Anything else goes to pydicom.
DICOMSDL_SYNTAXES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
    }
)
_IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
_ENCAPSULATED_SYNTAXES = DICOMSDL_SYNTAXES - {_IMPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.1"}

_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_TRANSFER_SYNTAX_TAG = b"\x02\x00\x10\x00UI"
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


@dataclass(frozen=True)
class SkippedFile:
    """A file of a series that did not make it into the volume, and why."""

    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


@dataclass
class Series:
    """A decoded series, slices ordered by position along the scan axis (ascending z)."""

    hu: np.ndarray  # (slices, H, W) float32 Hounsfield units
    instance_numbers: np.ndarray  # (slices,) int64 InstanceNumber of each slice, -1 if missing
    spacing: tuple[float, float, float]  # (z, y, x) in mm
    path: Path
    skipped: list[SkippedFile] = field(default_factory=list)
    z_positions: np.ndarray | None = None  # (slices,) mm along the slice normal, None if unknown
    ordered_by: str = "position"  # "position", or "instance_number" when positions are missing
    decoder_counts: dict[str, int] = field(default_factory=dict)

    @property
    def decoder(self) -> str:
        """The decoder(s) that produced the slices, e.g. "dicomsdl" or "dicomsdl+pydicom"."""
        return "+".join(sorted(self.decoder_counts)) or "none"

    @property
    def n_files(self) -> int:
        return int(self.hu.shape[0]) + len(self.skipped)

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


def read_slice(path: str | Path, decoder: Decoder = "auto") -> DicomSlice:
    """Decode one DICOM file to HU plus the header fields that place it in its series.

    `decoder="auto"` uses dicomsdl where it is known to be right (`DICOMSDL_SYNTAXES`, complete
    pixel data) and pydicom otherwise or when dicomsdl fails.
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
        usable, why_not = _dicomsdl_can_decode(data)
        if usable:
            try:
                return _read_with_dicomsdl(data)
            except Exception as error:
                if decoder == "dicomsdl":
                    raise DicomReadError(f"{path}: dicomsdl failed ({error})") from error
        elif decoder == "dicomsdl":
            raise DicomReadError(f"{path}: not decoded with dicomsdl: {why_not}")
    return _read_with_pydicom(data, path)


def stored_to_hu(
    stored: np.ndarray,
    bits_stored: int,
    signed: bool,
    slope: float = 1.0,
    intercept: float = 0.0,
    monochrome1: bool = False,
    in_place: bool = False,
) -> np.ndarray:
    """Stored pixel values to float32 HU, whatever the decoder did with the unused high bits.

    Keeps the low `bits_stored` bits, sign-extends them when `signed` (PixelRepresentation 1),
    inverts them within their range for MONOCHROME1, then applies the rescale. `in_place`
    lets it overwrite `stored` (a scratch buffer) instead of copying it.
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
    if monochrome1:
        values = ~values if signed else ((1 << bits_stored) - 1) - values
    hu = values.astype(np.float32)
    if slope != 1.0:
        hu *= np.float32(slope)
    if intercept != 0.0:
        hu += np.float32(intercept)
    return hu


def load_series(series_dir: str | Path, decoder: Decoder = "auto") -> Series:
    """Decode every slice of a series folder into one volume ordered by ascending z.

    Slices are ordered by ImagePositionPatient projected on the slice normal (never by file
    name or InstanceNumber). Unreadable or truncated files, and slices whose size or
    orientation differs from the majority of the series, are skipped and listed in
    `Series.skipped`.

    Raises:
        FileNotFoundError: the folder does not exist.
        SeriesReadError: the folder holds no readable slice.
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

    slices: list[tuple[str, DicomSlice]] = []
    skipped: list[SkippedFile] = []
    for file in files:
        try:
            dicom_slice = read_slice(file, decoder)
        except DicomReadError as error:
            reason = str(error).removeprefix(f"{file}: ")
            skipped.append(SkippedFile(file.name, reason))
            continue
        slices.append((file.name, dicom_slice))
    if not slices:
        reasons = Counter(s.reason.split(" (")[0] for s in skipped)
        summary = ", ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
        raise SeriesReadError(
            f"{series_dir}: no readable DICOM slices ({len(files)} files: {summary})"
        )

    slices, off_geometry = _keep_majority_geometry(slices)
    skipped.extend(off_geometry)
    order, z_positions, ordered_by = _slice_order([s for _, s in slices])
    ordered = [slices[i][1] for i in order]

    hu = np.stack([s.hu for s in ordered])
    instance_numbers = np.array(
        [s.instance_number if s.instance_number is not None else -1 for s in ordered],
        dtype=np.int64,
    )
    return Series(
        hu=hu,
        instance_numbers=instance_numbers,
        spacing=_spacing(ordered, z_positions),
        path=series_dir,
        skipped=skipped,
        z_positions=z_positions,
        ordered_by=ordered_by,
        decoder_counts=dict(Counter(s.decoder for s in ordered)),
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
    "1.2.840.10008.1.2.4.70": "JPEG Lossless",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
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


def series_transfer_syntax(series_dir: str | Path) -> str | None:
    """The transfer syntax of a series, read from the header of its first file (cheap: one
    small read), or None for an empty folder or a file without a Part 10 header."""
    files = sorted(Path(series_dir).glob("*.dcm"), key=_natural_key)
    if not files:
        return None
    try:
        with open(files[0], "rb") as handle:
            head = handle.read(132 + 4096)
    except OSError:
        return None
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    return _transfer_syntax(head)


def _pydicom_version() -> str:
    import pydicom

    return str(pydicom.__version__)


def _dicomsdl_can_decode(data: bytes) -> tuple[bool, str]:
    """Whether dicomsdl may see these bytes: a Part 10 file in a verified transfer syntax
    whose pixel data element is complete (dicomsdl segfaults on truncated files)."""
    if len(data) < 132 or data[128:132] != b"DICM":
        return False, "no DICOM Part 10 header"
    syntax = _transfer_syntax(data)
    if syntax not in DICOMSDL_SYNTAXES:
        return False, f"transfer syntax {syntax or 'missing'} not verified for dicomsdl"
    if not _pixel_data_complete(data, syntax):
        return False, "pixel data incomplete (truncated file?)"
    return True, ""


def _transfer_syntax(data: bytes) -> str | None:
    """The TransferSyntaxUID of the file meta group (always explicit VR little endian)."""
    pos = data.find(_TRANSFER_SYNTAX_TAG, 132, 132 + 4096)
    if pos < 0:
        return None
    length = int.from_bytes(data[pos + 6 : pos + 8], "little")
    return data[pos + 8 : pos + 8 + length].rstrip(b"\x00 ").decode("ascii", errors="replace")


def _pixel_data_complete(data: bytes, syntax: str) -> bool:
    """Whether the (7FE0,0010) element lies entirely inside the file.

    Native data: its declared length fits. Encapsulated data: every item fits and the sequence
    delimiter is there. A false match of the tag bytes only sends the file to pydicom.
    """
    explicit_vr = syntax != _IMPLICIT_VR_LITTLE_ENDIAN
    pos = data.find(_PIXEL_DATA_TAG, 132)
    # The first hit is almost always the element (it ends the header); skip hits inside other
    # values whose VR bytes do not fit.
    while explicit_vr and pos >= 0 and data[pos + 4 : pos + 6] not in (b"OB", b"OW"):
        pos = data.find(_PIXEL_DATA_TAG, pos + 1)
    if pos < 0:
        return False
    if explicit_vr:
        length, start = int.from_bytes(data[pos + 8 : pos + 12], "little"), pos + 12
    else:
        length, start = int.from_bytes(data[pos + 4 : pos + 8], "little"), pos + 8
    if length != _UNDEFINED_LENGTH:
        return syntax not in _ENCAPSULATED_SYNTAXES and 0 < length and start + length <= len(data)
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


_thread_local = threading.local()


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


def _read_with_dicomsdl(data: bytes) -> DicomSlice:
    # copy_data=False: `data` outlives `dataset` here, and copying 0.5 MB per slice is slow.
    dataset = _dicomsdl().open_memory(data, copy_data=False)
    info = dataset.getPixelDataInfo()
    _check_single_grayscale_frame(info["SamplesPerPixel"], info["NumberOfFrames"])
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
        monochrome1=str(info["PhotometricInterpretation"]).strip() == "MONOCHROME1",
        in_place=True,
    )
    return DicomSlice(
        hu=hu,
        instance_number=_int_or_none(dataset.InstanceNumber),
        position=_floats(dataset.ImagePositionPatient, 3),
        orientation=_floats(dataset.ImageOrientationPatient, 6),
        pixel_spacing=_floats(dataset.PixelSpacing, 2),
        slice_thickness=_float_or(dataset.SliceThickness, None),
        decoder="dicomsdl",
    )


def _read_with_pydicom(data: bytes, path: Path) -> DicomSlice:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(io.BytesIO(data))
            if "PixelData" not in dataset:
                raise DicomReadError(f"{path}: no pixel data element (truncated file?)")
            _check_single_grayscale_frame(
                int(dataset.get("SamplesPerPixel", 1)), int(dataset.get("NumberOfFrames", 1) or 1)
            )
            stored = dataset.pixel_array
    except DicomReadError:
        raise
    except InvalidDicomError as error:
        raise DicomReadError(f"{path}: not a DICOM file ({error})") from error
    except Exception as error:
        reason = "truncated or corrupt" if _looks_truncated(error) else "cannot decode pixels"
        raise DicomReadError(f"{path}: {reason} ({type(error).__name__}: {error})") from error
    hu = stored_to_hu(
        stored,
        bits_stored=int(dataset.get("BitsStored", stored.dtype.itemsize * 8)),
        signed=int(dataset.get("PixelRepresentation", 0)) == 1,
        slope=_float_or(dataset.get("RescaleSlope"), 1.0),
        intercept=_float_or(dataset.get("RescaleIntercept"), 0.0),
        monochrome1=str(dataset.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1",
    )
    return DicomSlice(
        hu=hu,
        instance_number=_int_or_none(dataset.get("InstanceNumber")),
        position=_floats(dataset.get("ImagePositionPatient"), 3),
        orientation=_floats(dataset.get("ImageOrientationPatient"), 6),
        pixel_spacing=_floats(dataset.get("PixelSpacing"), 2),
        slice_thickness=_float_or(dataset.get("SliceThickness"), None),
        decoder="pydicom",
    )


def _check_single_grayscale_frame(samples_per_pixel: int, frames: int) -> None:
    if samples_per_pixel != 1:
        raise DicomReadError(f"{samples_per_pixel} samples per pixel; CT slices have 1")
    if frames != 1:
        raise DicomReadError(f"{frames} frames; only single-frame CT slices are supported")


def _looks_truncated(error: Exception) -> bool:
    text = str(error).lower()
    return any(word in text for word in ("truncat", "less than expected", "end of file", "eof"))


def _keep_majority_geometry(
    slices: list[tuple[str, DicomSlice]],
) -> tuple[list[tuple[str, DicomSlice]], list[SkippedFile]]:
    """Keep the slices sharing the most common (size, orientation); report the others."""

    def geometry(s: DicomSlice) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
        orientation = None if s.orientation is None else tuple(np.round(s.orientation, 3))
        return s.hu.shape, orientation

    counts = Counter(geometry(s) for _, s in slices)
    (major_shape, major_orientation), _ = counts.most_common(1)[0]
    kept: list[tuple[str, DicomSlice]] = []
    skipped: list[SkippedFile] = []
    for name, s in slices:
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
            kept.append((name, s))
    return kept, skipped


def _slice_order(slices: list[DicomSlice]) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Indices that sort the slices by ascending position along the slice normal.

    Falls back to InstanceNumber when any slice lacks ImagePositionPatient or
    ImageOrientationPatient; ties are broken by InstanceNumber.
    """
    instance = np.array(
        [s.instance_number if s.instance_number is not None else 0 for s in slices], dtype=float
    )
    orientation = slices[0].orientation
    if orientation is None or any(s.position is None for s in slices):
        return np.lexsort((np.arange(len(slices)), instance)), None, "instance_number"
    normal = np.cross(np.array(orientation[:3]), np.array(orientation[3:]))
    z = np.array([np.dot(s.position, normal) for s in slices])
    order = np.lexsort((instance, z))
    return order, z[order], "position"


def _spacing(
    slices: list[DicomSlice], z_positions: np.ndarray | None
) -> tuple[float, float, float]:
    """(z, y, x) spacing in mm: median gap between slice positions, else SliceThickness."""
    z_spacing = None
    if z_positions is not None and len(z_positions) > 1:
        gaps = np.diff(z_positions)
        gaps = gaps[gaps > 1e-3]
        if gaps.size:
            z_spacing = float(np.median(gaps))
    if z_spacing is None:
        z_spacing = slices[0].slice_thickness or 1.0
    y_spacing, x_spacing = slices[0].pixel_spacing or (1.0, 1.0)
    return float(z_spacing), float(y_spacing), float(x_spacing)


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
