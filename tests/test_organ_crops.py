"""Organ-crop caches: boxes with margins, crops against plain slicing, slice bookkeeping, and
a crop cache that fine-tuning reads like notebook 01's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from kaggle_utils.cache.preprocess import cache_settings, load_cached_volume, load_metadata
from kaggle_utils.finetune.data import series_table
from kaggle_utils.finetune.train import FinetuneConfig
from kaggle_utils.segmentation import organ_crops
from kaggle_utils.segmentation import train as seg


def test_crop_boxes_grow_by_the_margin_and_stay_inside() -> None:
    config = organ_crops.CropConfig("liver", source_shape=(10, 100, 100), crop_shape=(4, 8, 8))
    box = organ_crops.crop_box([0.2, 0.6, 0.1, 0.5, 0.0, 0.3], config)
    # z 2..6 grows by max(2, 0.1 * 4) = 2; y 10..50 by 4; x 0..30 by 3, clipped at 0
    assert box == (0, 8, 6, 54, 0, 33)
    wide = organ_crops.CropConfig("liver", (10, 100, 100), (4, 8, 8), margin=0.5)
    assert organ_crops.crop_box([0.0, 1.0, 0.0, 1.0, 0.0, 1.0], wide) == (0, 10, 0, 100, 0, 100)
    with pytest.raises(ValueError, match="organ must be one of"):
        organ_crops.CropConfig("extravasation")


def test_a_crop_of_its_own_size_is_the_slice_of_the_volume() -> None:
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, size=(12, 20, 24), dtype=np.uint8)
    box = (2, 9, 3, 17, 5, 21)
    np.testing.assert_array_equal(
        organ_crops.cut_crop(volume, box, (7, 14, 16)), volume[2:9, 3:17, 5:21]
    )
    two_windows = np.stack([volume, 255 - volume], axis=1)
    crop = organ_crops.cut_crop(two_windows, box, (7, 14, 16))
    assert crop.shape == (7, 2, 14, 16)
    np.testing.assert_array_equal(crop[:, 1], 255 - volume[2:9, 3:17, 5:21])
    halved = organ_crops.cut_crop(volume, (0, 12, 0, 20, 0, 24), (6, 10, 12))
    block = volume.reshape(6, 2, 10, 2, 12, 2).astype(np.float64).mean(axis=(1, 3, 5))
    assert np.abs(halved.astype(np.float64) - block).max() <= 0.5 + 1e-6


def test_a_crop_keeps_the_instance_numbers_of_the_slices_it_spans() -> None:
    numbers = list(range(100, 116))  # 16 original slices cached as 8
    assert organ_crops.crop_instance_numbers(numbers, (2, 4, 0, 1, 0, 1), 8) == list(
        range(104, 108)
    )
    assert organ_crops.crop_instance_numbers(numbers[:5], (3, 4, 0, 1, 0, 1), 8) == [101, 102]


def _true_organs(competition: Path, cache: Path) -> pl.DataFrame:
    """Organ rows from the generator's own masks (what a perfect notebook 06 would write)."""
    metadata = load_metadata(cache).filter(pl.col("status") == "ok")
    table = seg.segmented_series(competition, metadata)
    rows = []
    for record in table.to_dicts():
        aligned = seg.align_mask(seg.load_mask(record["mask_path"]), record)
        labels, _ = seg.labels_to_shape(aligned, record["body_bbox"], (8, 32, 32))
        rows += seg.organ_rows(labels, record["series_id"], record["patient_id"])
    return pl.DataFrame(rows, schema=seg.ORGAN_SCHEMA)


def test_a_crop_cache_is_read_by_fine_tuning_like_notebook_01s(
    segmented_competition: Path, segmented_cache: Path, tmp_path: Path
) -> None:
    organs = _true_organs(segmented_competition, segmented_cache)
    config = organ_crops.CropConfig("liver", source_shape=(8, 32, 32), crop_shape=(4, 16, 16))
    metadata = organ_crops.cache_organ_crops(
        organs, segmented_cache, tmp_path / "crops", config, progress=False
    )
    source = load_metadata(segmented_cache).filter(pl.col("status") == "ok")
    assert metadata.height == source.height
    masked = set(organs["series_id"])
    ok = set(metadata.filter(pl.col("status") == "ok")["series_id"])
    assert ok == masked  # the others have no organ row: failed, with the reason
    failed = metadata.filter(pl.col("status") == "failed")
    assert all("found no liver" in e for e in failed["error"])
    crop_dir = organ_crops.crop_cache_dir(tmp_path / "crops", "liver")
    assert cache_settings(crop_dir).shapes == ((4, 16, 16),)
    for sid in ok:
        record = json.loads((crop_dir / "records" / f"{sid}.json").read_text())
        z0, z1, y0, y1, x0, x1 = record["crop_box"]
        full = load_cached_volume(segmented_cache, (8, 32, 32), sid)
        crop = load_cached_volume(crop_dir, (4, 16, 16), sid)
        # the liver fills a larger share of its crop than of the whole volume
        liver_row = organs.filter(pl.col("series_id") == sid, pl.col("organ") == "liver").row(
            0, named=True
        )
        box_voxels = (z1 - z0) * (y1 - y0) * (x1 - x0)
        assert liver_row["voxels"] / box_voxels > liver_row["voxels"] / full.size
        assert crop.shape == (4, 16, 16) and crop.dtype == np.uint8
        assert len(record["instance_numbers"]) <= len(
            source.filter(pl.col("series_id") == sid)["instance_numbers"][0]
        )
    labels = pl.read_csv(segmented_competition / "train.csv")
    table = series_table(labels, crop_dir, (4, 16, 16))
    assert set(table["series_id"]) == ok
    again = organ_crops.cache_organ_crops(
        organs, segmented_cache, tmp_path / "crops", config, progress=False
    )  # nothing left to do: the same table
    assert again.equals(metadata)


def test_an_organ_input_trains_that_organs_head_only() -> None:
    with pytest.raises(ValueError, match="targets must be"):
        FinetuneConfig(input="liver", targets=["liver", "spleen"])
    with pytest.raises(ValueError, match="input must be"):
        FinetuneConfig(input="extravasation", targets=["extravasation"])
    assert FinetuneConfig(input="kidney", targets=["kidney"]).input == "kidney"
