"""Extra unlabeled CT for pretraining (as the 2D-VoCo paper added FLARE23): folders of NIfTI
files and of DICOM series, turned into the same cached uint8 volumes as the competition data.

Every volume that reaches the cache must look like a competition series decoded by
`kaggle_utils.cache.dicom.load_series` from standard axial DICOMs (ImageOrientationPatient
[1,0,0,0,1,0]), or pretraining would learn one anatomy layout for the competition scans and
another for the extra ones, and VoCo's position targets would mean different things:

- axis 0: axial slices in ascending z (inferior -> superior),
- axis 1 (rows): anterior -> posterior (the spine is at the bottom of the image),
- axis 2 (columns): the patient's right -> left (the liver is on the image left).

NIfTI files come in any orientation (RAS, LPS, LAS, permuted axes); `load_nifti_series`
brings them to nibabel's closest canonical RAS+ array first, then `ras_to_axial` maps that
array to the layout above. DICOM folders go through `load_series`, which already produces it.

Cache layout under `cache_dir` (shared with `kaggle_utils.cache.preprocess`; keys start with
"nifti-" or "dicom-", so they never collide with the competition's numeric series ids):

    32x192x192/<key>.npy           uint8 (slices, H, W), or (slices, C, H, W) for C windows
    extra_records/<key>.json       what happened to the source (written last: marks it done)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kaggle_utils.cache.dicom import Series, load_series
from kaggle_utils.cache.preprocess import (
    PreprocessConfig,
    Shape,
    prepare_volumes,
    shape_name,
)
from kaggle_utils.cache.volume import AIR_HU
from kaggle_utils.common import paths
from kaggle_utils.common.io import save_npy_atomic, write_json_atomic
from kaggle_utils.common.progress import progress_bar
from kaggle_utils.common.provenance import provenance

NIFTI_SUFFIXES: tuple[str, ...] = (".nii.gz", ".nii")
EXTRA_RECORDS_DIR = "extra_records"
# A directory is a DICOM series when one of its first few files is a Part 10 file: reading
# every file of a 1,000-slice folder just to classify it would cost as much as decoding it.
DICOM_PROBE_FILES = 8
# Keys become file names (`.<key>.npy.<pid>.tmp` while written); stay well under 255 bytes.
MAX_KEY_LENGTH = 160

_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class VolumeSource:
    """One extra CT volume: a NIfTI file or a DICOM series folder.

    `key` names the volume in the cache; it is derived from the path relative to the scanned
    folder, so the same data mounted elsewhere (Kaggle input vs a local copy) keeps its key.
    """

    kind: str  # "nifti" or "dicom"
    path: Path
    key: str


@dataclass(frozen=True)
class ExtraVolume:
    """What `cache_extra_sources` did with one source: where its volumes are, or why not."""

    key: str
    kind: str
    source: Path
    volumes: dict[Shape, Path]  # configured shape -> cached .npy; empty when failed
    status: str  # "ok" or "failed"
    error: str | None
    n_slices: int
    spacing: tuple[float, float, float] | None  # (z, y, x) mm of the decoded volume


def ras_to_axial(canonical: np.ndarray) -> np.ndarray:
    """A canonical RAS+ (i, j, k) array to the DICOM display layout (slices, rows, cols).

    In RAS+ the index i grows towards the patient's right, j towards anterior, k towards
    superior. The output keeps k as the slice axis (ascending = superior), puts j reversed on
    the rows (row 0 is the most anterior: posterior at the bottom) and i reversed on the
    columns (column 0 is the patient's rightmost: the patient's left on the image right),
    exactly what `load_series` gives for ImageOrientationPatient [1,0,0,0,1,0].

    Works on any array with at least three axes (extra trailing axes are kept at the end).
    Returns a C-contiguous copy: torch and the resampler refuse negative strides.
    """
    if canonical.ndim < 3:
        raise ValueError(f"expected an (i, j, k) array, got shape {canonical.shape}")
    flipped = canonical[::-1, ::-1]
    axes = (2, 1, 0, *range(3, canonical.ndim))
    return np.ascontiguousarray(flipped.transpose(axes))


def nifti_to_axial(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI array (i, j, k) in any orientation to the `load_series` layout, with the
    affine of its closest canonical RAS+ form (what `slice_positions` takes).

    nibabel's `io_orientation` reads from the affine which array axis runs along which
    patient axis and in which direction; `apply_orientation` makes it RAS+, then
    `ras_to_axial`. Nothing is guessed from the array's shape.

    Raises:
        nibabel.orientations.OrientationError, ValueError: a singular affine.
    """
    from nibabel import orientations

    ornt = orientations.io_orientation(affine)
    canonical = orientations.apply_orientation(data, ornt)
    canonical_affine = affine @ orientations.inv_ornt_aff(ornt, data.shape)
    return ras_to_axial(canonical), canonical_affine


def slice_positions(canonical_affine: np.ndarray, n_slices: int) -> np.ndarray:
    """Position (mm) of each slice k of a canonical volume along the slice normal.

    Like `load_series`'s z (ImagePositionPatient projected on the normal): the normal is
    perpendicular to the i and j axes of the affine, oriented along +k, so the positions
    ascend with k. For an axis-aligned RAS affine this is the world z of each slice.
    """
    affine = np.asarray(canonical_affine, dtype=np.float64)
    normal = np.cross(affine[:3, 0], affine[:3, 1])
    norm = float(np.linalg.norm(normal))
    if norm == 0.0:
        raise ValueError(f"degenerate affine (i and j axes are parallel):\n{affine}")
    normal /= norm
    if float(np.dot(normal, affine[:3, 2])) < 0:
        normal = -normal
    k = np.arange(n_slices, dtype=np.float64)
    origins = affine[:3, 3][None, :] + k[:, None] * affine[:3, 2][None, :]
    return origins @ normal


def load_nifti_series(path: str | Path) -> Series:
    """Read a NIfTI CT volume (Hounsfield units) as a `Series`, laid out like `load_series`.

    The reorientation is nibabel's `as_closest_canonical` (`io_orientation` of the affine,
    then `apply_orientation`), done here on the float32 data: `as_closest_canonical` loads
    scaled data as float64, twice the memory of a large scan. The NIfTI scaling
    (scl_slope/scl_inter) is applied; non-finite voxels become air (-1024 HU) so they cannot
    poison the resampling averages.

    NIfTI has no InstanceNumber: `instance_numbers` is 0..n-1 in the output slice order, so
    slice labels keyed by instance number do not exist for these volumes.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: not a readable NIfTI file, or not a 3D volume (a 4D file with one volume
            is accepted).
    """
    import nibabel as nib
    from nibabel import orientations

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: NIfTI file not found")
    try:
        image = nib.load(path)
    except Exception as error:  # nibabel, gzip and zlib raise many types for a broken file
        raise ValueError(
            f"{path}: not a readable NIfTI file ({type(error).__name__}: {error})"
        ) from error
    shape = tuple(int(v) for v in image.shape)
    if getattr(image, "affine", None) is None:
        raise ValueError(f"{path}: the image has no affine, so its orientation is unknown")
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise ValueError(
            f"{path}: expected a 3D CT volume, got shape {shape}; split 4D files into one 3D "
            "file per volume"
        )
    try:
        data = image.get_fdata(dtype=np.float32)
    except Exception as error:  # truncated or corrupt data after a valid header
        raise ValueError(
            f"{path}: cannot read the voxel data ({type(error).__name__}: {error})"
        ) from error
    if data.ndim == 4:
        data = data[..., 0]

    try:
        hu, canonical_affine = nifti_to_axial(data, image.affine)
    except (orientations.OrientationError, ValueError) as error:  # a singular affine
        raise ValueError(f"{path}: cannot orient the volume from its affine ({error})") from error
    del data
    if not np.isfinite(hu).all():
        np.nan_to_num(hu, copy=False, nan=AIR_HU, posinf=AIR_HU, neginf=AIR_HU)

    zooms = np.sqrt((canonical_affine[:3, :3] ** 2).sum(axis=0))  # mm along i, j, k
    n_slices = int(hu.shape[0])
    return Series(
        hu=hu,
        instance_numbers=np.arange(n_slices, dtype=np.int64),
        spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])),
        path=path,
        z_positions=slice_positions(canonical_affine, n_slices),
        ordered_by="nifti affine",
        decoder_counts={"nibabel": n_slices},
    )


def find_volume_sources(folders: Sequence[str | Path]) -> list[VolumeSource]:
    """Every extra CT volume under `folders`, sorted by key (deterministic across runs).

    Each `*.nii` / `*.nii.gz` file is one NIfTI source; each directory that directly holds a
    DICOM Part 10 file (bytes 128:132 == b"DICM", among its first `DICOM_PROBE_FILES` files)
    is one DICOM series source. Hidden files and folders are ignored, as are files named
    DICOMDIR (an index, not a slice). A path in `folders` may also be a NIfTI file. A file
    reached through two overlapping folders is listed once.

    Keys are `nifti-<relative path>` (suffix dropped) and `dicom-<relative folder>`, with path
    separators as "__" and other unsafe characters as "_"; keys that would collide (same
    relative path under two folders, `a.nii` next to `a.nii.gz`, ...) all get a short hash of
    the source's absolute path appended, so every key is unique.

    Raises:
        FileNotFoundError: a folder does not exist.
    """
    found: list[tuple[str, Path, str]] = []  # (kind, path, base key)
    seen: set[Path] = set()
    for root in [p for folder in folders for p in paths.find_inputs(folder) or [Path(folder)]]:
        if root.is_file() and _is_nifti_name(root.name):
            candidates = [("nifti", root, _key("nifti", Path(_strip_nifti_suffix(root.name))))]
        elif root.is_dir():
            candidates = _scan_folder(root)
        else:
            raise FileNotFoundError(
                f"{root}: extra CT folder not found; give existing folders of NIfTI files "
                "(.nii, .nii.gz) and/or DICOM series, or leave the list empty"
            )
        for kind, path, key in candidates:
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                found.append((kind, path, key))

    counts = Counter(key for _, _, key in found)
    sources = []
    for kind, path, key in found:
        if counts[key] > 1:
            digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]
            key = f"{key}-{digest}"
        sources.append(VolumeSource(kind=kind, path=path, key=key))
    return sorted(sources, key=lambda s: (s.key, str(s.path)))


def load_source(source: VolumeSource) -> Series:
    """Decode one source to HU in the shared layout (see the module docstring)."""
    if source.kind == "nifti":
        return load_nifti_series(source.path)
    if source.kind == "dicom":
        return load_series(source.path)
    raise ValueError(f"{source.path}: unknown source kind {source.kind!r} (nifti or dicom)")


def extra_record_path(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / EXTRA_RECORDS_DIR / f"{key}.json"


def extra_volume_path(cache_dir: Path, shape: Sequence[int], key: str) -> Path:
    return Path(cache_dir) / shape_name(shape) / f"{key}.npy"


def cache_extra_sources(
    sources: Sequence[VolumeSource],
    cache_dir: Path,
    config: PreprocessConfig,
    progress: bool = True,
) -> list[ExtraVolume]:
    """Cache every source as the competition volumes are cached (same body crop, resampling
    and windowing, via `prepare_volumes`); return one entry per source, in order.

    Resumable: a source whose record says "ok" with the same settings and source path, and
    whose volumes are all on disk, is not decoded again. Never raises for bad data: a source
    that fails is recorded as failed with the error (and retried on the next call), and the
    others go on. Sequential: extra data sets are small next to the competition's.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    results: list[ExtraVolume] = []
    bar = progress_bar(
        total=len(sources), desc="extra volumes", unit="volume", disable=not progress
    )
    for source in sources:
        record = _cached_record(source, cache_dir, config)
        if record is None:
            record = _process_source(source, cache_dir, config)
        results.append(_to_extra_volume(record, source, cache_dir, config))
        bar.update()
    bar.close()
    return results


def _process_source(
    source: VolumeSource, cache_dir: Path, config: PreprocessConfig
) -> dict[str, Any]:
    """Decode, prepare and cache one source; write and return its record."""
    start = time.perf_counter()
    record: dict[str, Any] = {
        "key": source.key,
        "kind": source.kind,
        "source": _source_id(source),
        "status": "failed",
        "error": None,
        "n_slices": 0,
        "height": None,
        "width": None,
        "spacing": None,
        "z_first": None,
        "z_last": None,
        "ordered_by": None,
        "decoder": None,
        "n_skipped": 0,
        "skipped_files": [],
        "body_bbox": [],
        "settings": _settings(config),
        "provenance": provenance(),
    }
    try:
        series = load_source(source)
        volumes, box = prepare_volumes(series, config)
        for shape, volume in volumes.items():
            save_npy_atomic(extra_volume_path(cache_dir, shape, source.key), volume)
        record.update(
            status="ok",
            n_slices=int(series.hu.shape[0]),
            height=int(series.hu.shape[1]),
            width=int(series.hu.shape[2]),
            spacing=[float(v) for v in series.spacing],
            z_first=None if series.z_positions is None else float(series.z_positions[0]),
            z_last=None if series.z_positions is None else float(series.z_positions[-1]),
            ordered_by=series.ordered_by,
            decoder=series.decoder,
            n_skipped=len(series.skipped),
            skipped_files=[str(s) for s in series.skipped],
            body_bbox=[int(v) for v in box],
        )
    except Exception as error:  # recorded, not raised: see cache_extra_sources
        record["error"] = f"{type(error).__name__}: {error}"
    record["seconds"] = round(time.perf_counter() - start, 4)
    write_json_atomic(extra_record_path(cache_dir, source.key), record)
    return record


def _cached_record(
    source: VolumeSource, cache_dir: Path, config: PreprocessConfig
) -> dict[str, Any] | None:
    """The record of a source already cached with these settings, else None."""
    record_file = extra_record_path(cache_dir, source.key)
    if not record_file.is_file():
        return None
    try:
        record = json.loads(record_file.read_text())
    except (json.JSONDecodeError, OSError):
        return None
    done = (
        record.get("status") == "ok"
        and record.get("settings") == _settings(config)
        and record.get("source") == _source_id(source)
        and all(extra_volume_path(cache_dir, s, source.key).is_file() for s in config.shapes)
    )
    return record if done else None


def _to_extra_volume(
    record: dict[str, Any], source: VolumeSource, cache_dir: Path, config: PreprocessConfig
) -> ExtraVolume:
    ok = record["status"] == "ok"
    spacing = record.get("spacing")
    return ExtraVolume(
        key=source.key,
        kind=source.kind,
        source=source.path,
        volumes=(
            {s: extra_volume_path(cache_dir, s, source.key) for s in config.shapes} if ok else {}
        ),
        status="ok" if ok else "failed",
        error=record.get("error"),
        n_slices=int(record.get("n_slices") or 0),
        spacing=None
        if spacing is None
        else (float(spacing[0]), float(spacing[1]), float(spacing[2])),
    )


def _settings(config: PreprocessConfig) -> dict[str, Any]:
    """Every field of the config as JSON would give it back (new fields count automatically)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _source_id(source: VolumeSource) -> str:
    """Which file a cached volume came from: a key reused for other data must not hit."""
    return str(Path(source.path).resolve())


def _scan_folder(root: Path) -> list[tuple[str, Path, str]]:
    """(kind, path, base key) of every NIfTI file and DICOM series folder under `root`."""
    found: list[tuple[str, Path, str]] = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        here = Path(directory)
        relative = here.relative_to(root)
        regular = sorted(f for f in files if not f.startswith("."))
        for name in regular:
            if _is_nifti_name(name):
                found.append(
                    ("nifti", here / name, _key("nifti", relative / _strip_nifti_suffix(name)))
                )
        probes = [f for f in regular if not _is_nifti_name(f) and f.upper() != "DICOMDIR"]
        if any(_is_dicom_file(here / f) for f in probes[:DICOM_PROBE_FILES]):
            found.append(
                (
                    "dicom",
                    here,
                    _key("dicom", relative if relative.parts else Path(root.resolve().name)),
                )
            )
    return found


def _is_nifti_name(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def _strip_nifti_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in NIFTI_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: 128-byte preamble, then "DICM"."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _key(kind: str, relative: Path) -> str:
    """A file-name-safe cache key from a relative path; long ones are shortened with a hash."""
    text = "__".join(_UNSAFE_KEY_CHARS.sub("_", part) for part in relative.parts) or "root"
    key = f"{kind}-{text}"
    if len(key) > MAX_KEY_LENGTH:
        digest = hashlib.sha1(key.encode()).hexdigest()[:8]
        key = f"{key[: MAX_KEY_LENGTH - 9]}-{digest}"
    return key
