"""Organ-crop caches: each series' box around one organ (notebook 06's `organs.parquet`), with a
margin, cut from a cache of enough resolution and resampled to a fixed shape. The 2D-VoCo
paper's single-organ setting (Table 2) and the organ crops of the top RSNA 2023 solutions
train on these. `cache_organ_crops` is the one entry point.

A crop cache is laid out as notebook 01's cache (`preprocess`), so fine-tuning reads it
unchanged (`cache_dir` = the crop cache, `shape` = the crop shape):

    <output_dir>/<organ>/<crop shape>/<series_id>.npy   uint8, as the source cache's volumes
    <output_dir>/<organ>/records/<series_id>.json       the source record + the crop (last)
    <output_dir>/<organ>/metadata.parquet

A record keeps the source series' fields, with `instance_numbers` narrowed to the original
slices the crop spans (so slice labels map onto the crop's slices) and `status` "failed" where
the segmentation found no such organ (fine-tuning then leaves the series out, as it does a
series that could not be decoded; notebook 04 falls back to the whole scan).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from kaggle_utils.cache.preprocess import (
    RECORDS_DIR,
    CacheDirs,
    cache_path,
    cache_settings,
    load_cached_volume,
    load_metadata,
    write_metadata,
)
from kaggle_utils.cache.volume import resample_volume
from kaggle_utils.common import paths
from kaggle_utils.common.io import copy_file_atomic, save_npy_atomic, write_text_atomic
from kaggle_utils.common.progress import progress_bar
from kaggle_utils.segmentation.train import (
    TARGET_ORGANS,
    Box,
    SegmentationConfig,
    box_in_shape,
    load_model,
    organ_rows,
    organ_table,
    predict_volume,
)

CROP_SETTINGS = "crop.json"


@dataclass(frozen=True)
class CropConfig:
    """One organ's crops: from which cache shape, to which shape, with how much margin."""

    organ: str  # a fine-tuning target with an organ: liver, spleen, kidney (both) or bowel
    source_shape: tuple[int, int, int] = (96, 256, 256)
    crop_shape: tuple[int, int, int] = (32, 128, 128)
    margin: float = 0.1  # added on each side, as a share of the box's size on that axis
    min_margin_voxels: int = 2  # at least this many source voxels on each side

    def __post_init__(self) -> None:
        if self.organ not in TARGET_ORGANS:
            raise ValueError(f"organ must be one of {tuple(TARGET_ORGANS)}, not {self.organ!r}")
        if self.margin < 0 or self.min_margin_voxels < 0:
            raise ValueError("margin and min_margin_voxels must be >= 0")
        for name in ("source_shape", "crop_shape"):
            value = getattr(self, name)
            if len(value) != 3 or min(value) < 1:
                raise ValueError(f"{name} must be three positive ints, not {value}")

    @classmethod
    def from_settings(cls, saved: Mapping[str, Any]) -> CropConfig:
        """The inverse of `settings` (a crop.json)."""
        return cls(
            saved["organ"],
            tuple(saved["source_shape"]),  # type: ignore[arg-type]
            tuple(saved["crop_shape"]),  # type: ignore[arg-type]
            float(saved["margin"]),
            int(saved["min_margin_voxels"]),
        )

    def settings(self) -> dict[str, Any]:
        return {
            "organ": self.organ,
            "source_shape": list(self.source_shape),
            "crop_shape": list(self.crop_shape),
            "margin": self.margin,
            "min_margin_voxels": self.min_margin_voxels,
        }


def crop_box(box_fraction: Sequence[float], config: CropConfig) -> Box:
    """The organ's fractional box in the source cache's voxels, grown by the margin on every
    side and clipped to the volume."""
    box = list(box_in_shape(box_fraction, config.source_shape))
    for axis, size in enumerate(config.source_shape):
        low, high = box[2 * axis], box[2 * axis + 1]
        grow = max(config.min_margin_voxels, math.ceil(config.margin * (high - low)))
        box[2 * axis], box[2 * axis + 1] = max(0, low - grow), min(size, high + grow)
    return tuple(box)  # type: ignore[return-value]


def cut_crop(volume: np.ndarray, box: Box, crop_shape: Sequence[int]) -> np.ndarray:
    """`volume` (slices, H, W) or (slices, C, H, W) uint8, cut to `box` and resampled to
    `crop_shape` as notebook 01 resamples (area averaging, linear interpolation), uint8."""
    z0, z1, y0, y1, x0, x1 = box
    region = np.asarray(volume[z0:z1, ..., y0:y1, x0:x1], dtype=np.float32)
    if region.ndim == 3:
        out = resample_volume(region, crop_shape)
    else:
        channels = [resample_volume(region[:, c], crop_shape) for c in range(region.shape[1])]
        out = np.stack(channels, axis=1)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def crop_instance_numbers(
    instance_numbers: Sequence[int], box: Box, source_depth: int
) -> list[int]:
    """The original slices (by InstanceNumber, in z order) a crop's cached slices z0..z1 of
    `source_depth` are made of."""
    n = len(instance_numbers)
    start = (box[0] * n) // source_depth
    stop = max(start + 1, -((-box[1] * n) // source_depth))
    return [int(v) for v in instance_numbers[start:stop]]


def _crop_record(
    record: Mapping[str, Any], row: Mapping[str, Any] | None, config: CropConfig, settings: dict
) -> tuple[dict[str, Any], Box | None]:
    out = {k: v for k, v in record.items() if k != "cache_dir"}
    out["settings"] = settings
    out["source_cache"] = str(record["cache_dir"])
    out["crop"] = config.settings()
    if row is None or not row["found"]:
        out.update(status="failed", error=f"the segmentation found no {config.organ}")
        out["crop_box"] = None
        return out, None
    box = crop_box(row["box_fraction"], config)
    out["crop_box"] = list(box)
    out["instance_numbers"] = crop_instance_numbers(
        record["instance_numbers"] or [], box, config.source_shape[0]
    )
    out["n_slices"] = len(out["instance_numbers"])
    return out, box


def cache_organ_crops(
    organs: pl.DataFrame,
    source_cache: CacheDirs,
    output_dir: str | Path,
    config: CropConfig,
    progress: bool = True,
) -> pl.DataFrame:
    """Cut one organ's crop from every decoded series of `source_cache` (its
    `config.source_shape` volumes) and cache it under `output_dir/<organ>`; return the crop
    cache's metadata. A series already cropped with the same settings is skipped.

    Raises:
        ValueError: `organs` has no row for the organ (not notebook 06's table).
    """
    target = Path(output_dir) / config.organ
    target.mkdir(parents=True, exist_ok=True)
    rows = {
        int(r["series_id"]): r for r in organs.filter(pl.col("organ") == config.organ).to_dicts()
    }
    if not rows:
        raise ValueError(f"organs table has no {config.organ!r} rows: run notebook 06 first")
    metadata = load_metadata(source_cache).filter(pl.col("status") == "ok")
    source = cache_settings(source_cache)  # the crops keep the source's windows
    settings = {
        "shapes": [list(config.crop_shape)],
        "windows": [list(w) for w in source.windows],
        "body_crop": source.body_crop,
    }
    write_text_atomic(target / CROP_SETTINGS, json.dumps(config.settings(), indent=1))
    todo = [r for r in metadata.to_dicts() if not _is_cropped(target, r["series_id"], config)]
    for record in progress_bar(
        todo, desc=f"{config.organ} crops", unit="series", disable=not progress
    ):
        sid = int(record["series_id"])
        crop, box = _crop_record(record, rows.get(sid), config, settings)
        if box is not None:
            volume = load_cached_volume(Path(record["cache_dir"]), config.source_shape, sid)
            save_npy_atomic(
                cache_path(target, config.crop_shape, sid), cut_crop(volume, box, config.crop_shape)
            )
        write_text_atomic(target / RECORDS_DIR / f"{sid}.json", json.dumps(crop))
    return write_metadata(target)


def _is_cropped(target: Path, series_id: int, config: CropConfig) -> bool:
    path = target / RECORDS_DIR / f"{series_id}.json"
    if not path.is_file():
        return False
    record = json.loads(path.read_text())
    if record.get("crop") != config.settings():
        return False
    return record["status"] != "ok" or cache_path(target, config.crop_shape, series_id).is_file()


# Inside a crop model's run folder: what notebook 04 needs to cut the same crops from a test
# scan (the segmentation model and the crop settings travel with the fold models).
RUN_SEGMENTATION_DIR = "segmentation"
SEGMENTATION_FILES = ("model.pt", "model.json")


def bundle_segmentation(
    run_dir: str | Path, crop_cache: str | Path, segmentation_dir: str | Path | None
) -> bool:
    """Copy a crop cache's settings (`crop.json`) and notebook 06's model (where there is one)
    into a fine-tuning run folder, so that notebook 04 finds them beside the fold models.
    Returns whether the model was copied.

    Raises:
        FileNotFoundError: the crop cache has no crop.json.
    """
    run_dir, crop_cache = Path(run_dir), Path(crop_cache)
    settings = crop_cache / CROP_SETTINGS
    if not settings.is_file():
        raise FileNotFoundError(
            f"{settings} not found: an organ-crop run trains on a crop cache "
            "(organ_crops.cache_organ_crops)"
        )
    write_text_atomic(run_dir / CROP_SETTINGS, settings.read_text())
    if segmentation_dir:
        segmentation_dir = paths.find_input_holding(segmentation_dir, SEGMENTATION_FILES[0])
    sources = [Path(segmentation_dir or "") / name for name in SEGMENTATION_FILES]
    if not segmentation_dir or not all(p.is_file() for p in sources):
        return False
    target = run_dir / RUN_SEGMENTATION_DIR
    target.mkdir(parents=True, exist_ok=True)
    for source in sources:
        copy_file_atomic(source, target / source.name)
    return True


def read_crop_config(run_dir: str | Path) -> CropConfig:
    """A crop model's crop settings (its run folder's crop.json).

    Raises:
        FileNotFoundError: the folder has no crop.json (not an organ-crop run).
    """
    path = Path(run_dir) / CROP_SETTINGS
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: notebook 03 writes it (with segmentation/) into an organ-crop "
            "run; copy the whole run folder"
        )
    return CropConfig.from_settings(json.loads(path.read_text()))


class OrganLocator:
    """Notebook 06's model as notebook 04 uses it: a scan (its cache shape) -> organ rows."""

    def __init__(self, folder: str | Path, device: str | torch.device = "cpu") -> None:
        folder = Path(folder)
        missing = [f for f in SEGMENTATION_FILES if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder}: {', '.join(missing)} missing: an organ-crop run folder holds "
                "notebook 06's model in segmentation/ (notebook 03 copies it there)"
            )
        settings = json.loads((folder / "model.json").read_text())
        self.config = SegmentationConfig(**settings["config"])
        self.model = load_model(folder, device)
        # the same model in several runs' folders is run once per series
        self.key = hashlib.sha1((folder / "model.pt").read_bytes()).hexdigest()

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.config.shape)  # type: ignore[return-value]

    def locate(self, volume: np.ndarray, series_id: int, patient_id: int) -> list[dict[str, Any]]:
        """`segmentation.organ_rows` of a volume of `shape`."""
        _, labels = predict_volume(self.model, volume, self.config)
        return organ_rows(labels, series_id, patient_id)


def crop_from_rows(
    volume: np.ndarray, rows: Sequence[Mapping[str, Any]], config: CropConfig
) -> tuple[np.ndarray, str | None]:
    """A source-shape scan cut to the organ's crop, as `cache_organ_crops` cuts it; where the
    segmentation found no such organ, the whole scan resampled to the crop shape, with why."""
    row = next((r for r in rows if r["organ"] == config.organ), None)
    if row is not None and row["found"]:
        return cut_crop(volume, crop_box(row["box_fraction"], config), config.crop_shape), None
    depth, height, width = volume.shape[0], volume.shape[-2], volume.shape[-1]
    whole = (0, depth, 0, height, 0, width)
    reason = f"the segmentation found no {config.organ}: the whole scan"
    return cut_crop(volume, whole, config.crop_shape), reason


def crop_cache_dir(output_dir: str | Path, organ: str) -> Path:
    """Where `cache_organ_crops` put an organ's crops (fine-tuning's `cache_dir`)."""
    return Path(output_dir) / organ


def organ_crop_cache(
    organ: str,
    segmentation_dir: str | Path,
    source_cache: CacheDirs,
    crops_dir: str | Path,
    source_shape: Sequence[int],
    crop_shape: Sequence[int],
    margin: float = 0.1,
    progress: bool = True,
) -> Path:
    """Notebook 03 with `input` an organ: its crop cache from notebook 06's boxes, made (or
    completed) now; returns the folder to fine-tune on."""
    config = CropConfig(
        organ,
        tuple(int(v) for v in source_shape),  # type: ignore[arg-type]
        tuple(int(v) for v in crop_shape),  # type: ignore[arg-type]
        margin,
    )
    cache_organ_crops(organ_table(segmentation_dir), source_cache, crops_dir, config, progress)
    return crop_cache_dir(crops_dir, organ)
