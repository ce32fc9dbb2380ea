from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from kaggle_utils import preprocess
from kaggle_utils.preprocess import (
    PreprocessConfig,
    SeriesTask,
    cache_path,
    list_series,
    preprocess_dataset,
)

CONFIG = PreprocessConfig(shapes=((8, 32, 32), (12, 48, 48)))


def test_list_series_finds_folders_and_meta_rows(tiny_competition: Path) -> None:
    tasks = list_series(tiny_competition, "train")
    meta = pl.read_csv(tiny_competition / "train_series_meta.csv")
    assert {(t.patient_id, t.series_id) for t in tasks} == set(
        zip(meta["patient_id"], meta["series_id"], strict=True)
    )
    assert all(t.series_dir.is_dir() for t in tasks)
    with pytest.raises(ValueError, match="split"):
        list_series(tiny_competition, "valid")


def test_list_series_keeps_meta_rows_without_folder(tmp_path: Path) -> None:
    (tmp_path / "test_images" / "1" / "10").mkdir(parents=True)
    (tmp_path / "test_series_meta.csv").write_text(
        "patient_id,series_id,aortic_hu\n1,10,200\n2,20,150\n"
    )
    tasks = list_series(tmp_path, "test")
    assert [(t.patient_id, t.series_id) for t in tasks] == [(1, 10), (2, 20)]
    assert not tasks[1].series_dir.exists()


@pytest.fixture(scope="module")
def cached(
    tiny_competition: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, pl.DataFrame]:
    cache_dir = tmp_path_factory.mktemp("cache")
    tasks = list_series(tiny_competition, "train")
    metadata = preprocess_dataset(tasks, cache_dir, CONFIG, workers=2, progress=False)
    return cache_dir, metadata


def test_every_series_cached_with_the_right_shapes(
    tiny_competition: Path, cached: tuple[Path, pl.DataFrame]
) -> None:
    cache_dir, metadata = cached
    tasks = list_series(tiny_competition, "train")
    assert metadata.height == len(tasks)
    assert metadata["status"].to_list() == ["ok"] * len(tasks)
    for task in tasks:
        for shape in CONFIG.shapes:
            volume = preprocess.load_cached_volume(cache_dir, shape, task.series_id)
            assert volume.shape == shape and volume.dtype == np.uint8
            assert volume.max() > 100 and volume.min() == 0  # body and air both present
    assert (cache_dir / preprocess.METADATA_FILE).is_file()
    assert not list(cache_dir.rglob("*.tmp"))


def test_metadata_records_ordering_spacing_and_the_truncated_file(
    tiny_competition: Path, cached: tuple[Path, pl.DataFrame]
) -> None:
    _, metadata = cached
    for row in metadata.iter_rows(named=True):
        files = list(Path(row["source_dir"]).glob("*.dcm"))
        assert row["n_files"] == len(files)
        assert row["n_slices"] + row["n_skipped"] == len(files)
        assert len(row["instance_numbers"]) == row["n_slices"]
        assert sorted(row["instance_numbers"]) == sorted(
            int(f.stem)
            for f in files
            if f.stem not in {s.split(".")[0] for s in row["skipped_files"]}
        )
        assert row["spacing_z"] > 0 and row["z_last"] > row["z_first"]
        assert row["decoder"] in {"dicomsdl", "pydicom", "dicomsdl+pydicom"}
    skipped = metadata.filter(pl.col("n_skipped") > 0)
    assert skipped.height == 1  # the generator truncates exactly one train file
    assert "truncated" in skipped["skipped_files"][0][0]
    failed, skipped_files = preprocess.problems_report(metadata)
    assert failed.height == 0 and skipped_files.height == 1


def test_rerun_skips_done_series_and_redoes_on_overwrite_or_new_settings(
    tiny_competition: Path, cached: tuple[Path, pl.DataFrame]
) -> None:
    cache_dir, _ = cached
    tasks = list_series(tiny_competition, "train")[:2]
    target = cache_path(cache_dir, CONFIG.shapes[0], tasks[0].series_id)
    before = target.stat().st_mtime_ns
    preprocess_dataset(tasks, cache_dir, CONFIG, workers=0, progress=False)
    assert target.stat().st_mtime_ns == before
    preprocess_dataset(tasks, cache_dir, CONFIG, workers=0, overwrite=True, progress=False)
    assert target.stat().st_mtime_ns != before
    after_overwrite = target.stat().st_mtime_ns
    two_windows = PreprocessConfig(shapes=CONFIG.shapes, windows=((50, 400), (400, 1800)))
    metadata = preprocess_dataset(tasks, cache_dir, two_windows, workers=0, progress=False)
    assert target.stat().st_mtime_ns != after_overwrite
    assert np.load(target).shape == (8, 2, 32, 32)
    assert metadata.height == len(list_series(tiny_competition, "train"))  # all records kept


def test_failed_series_is_recorded_not_raised(tmp_path: Path) -> None:
    broken = tmp_path / "train_images" / "5" / "50"
    broken.mkdir(parents=True)
    (broken / "1.dcm").write_bytes(b"garbage")
    (tmp_path / "train_images" / "6" / "60").mkdir(parents=True)  # empty series folder
    cache_dir = tmp_path / "cache"
    metadata = preprocess_dataset(
        list_series(tmp_path, "train"), cache_dir, CONFIG, workers=0, progress=False
    )
    assert metadata["status"].to_list() == ["failed", "failed"]
    errors = metadata["error"].to_list()
    assert "no readable DICOM slices" in errors[0] and "50" in errors[0]
    assert "no files" in errors[1]
    # Failed series are retried on the next run (they may have been fixed).
    assert not preprocess.is_cached(SeriesTask(5, 50, broken), cache_dir, CONFIG)


def test_stale_temporaries_of_a_killed_run_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / "cache" / "8x32x32" / ".123.npy.999.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a file")
    preprocess_dataset([], tmp_path / "cache", CONFIG, workers=0, progress=False)
    assert not stale.exists()


def crash_on_series_13(task: SeriesTask, cache_dir: Path, config: PreprocessConfig) -> dict:
    """Stands in for a native decoder crash: kills its worker process outright."""
    if task.series_id == 13:
        os._exit(1)
    return preprocess.process_series(task, cache_dir, config)


def test_a_dying_worker_costs_only_its_series(
    tiny_competition: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = list_series(tiny_competition, "train")[:3]
    tasks = [*real[:1], SeriesTask(999, 13, real[0].series_dir), *real[1:]]
    monkeypatch.setattr(preprocess, "process_series", crash_on_series_13)
    metadata = preprocess_dataset(tasks, tmp_path, CONFIG, workers=2, progress=False)
    status = dict(zip(metadata["series_id"], metadata["status"], strict=True))
    assert status.pop(13) == "failed"
    assert set(status.values()) == {"ok"} and len(status) == 3
    record = json.loads((tmp_path / "records" / "13.json").read_text())
    assert "worker process died" in record["error"]
