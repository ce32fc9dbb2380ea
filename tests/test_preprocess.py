from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

from kaggle_utils.cache import preprocess
from kaggle_utils.cache.preprocess import (
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
        assert row["n_decoded"] + row["n_skipped"] == len(files)
        assert len(row["instance_numbers"]) == row["n_slices"]
        # A skipped file inside the series leaves a gap, resampled by position: the slice in it
        # takes its nearest neighbour's InstanceNumber.
        assert row["n_slices"] == row["n_decoded"] + (1 if row["z_resampled"] else 0)
        assert sorted(set(row["instance_numbers"])) == sorted(
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
    # The generator writes standard axial series: only a gap left by the truncated file can
    # make one unusual.
    unusual = preprocess.geometry_report(metadata)
    assert set(unusual["series_id"]) == set(metadata.filter(pl.col("z_resampled"))["series_id"])
    assert set(metadata["flips"]) == {"none"} and metadata["n_duplicates"].sum() == 0


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


# --------------------------------------------------------------------------------------------
# Shards and cache size (Kaggle keeps ~20 GB of a notebook's output)


def competition_like_tasks(n_patients: int, seed: int) -> list[SeriesTask]:
    """Patients with one or two series (as in the competition), listed in sorted order."""
    rng = np.random.default_rng(seed)
    tasks = []
    for patient_id in range(1000, 1000 + n_patients):
        for k in range(int(rng.integers(1, 3))):
            tasks.append(SeriesTask(patient_id, patient_id * 10 + k, Path(f"{patient_id}/{k}")))
    return tasks


@pytest.mark.parametrize("num_shards", [1, 2, 3, 7])
def test_shards_are_disjoint_complete_balanced_and_keep_patients_together(
    num_shards: int,
) -> None:
    tasks = competition_like_tasks(301, seed=num_shards)
    shards = [preprocess.shard_tasks(tasks, k, num_shards) for k in range(num_shards)]
    ids = [[t.series_id for t in shard] for shard in shards]
    assert sorted(i for shard in ids for i in shard) == sorted(t.series_id for t in tasks)
    patients = [{t.patient_id for t in shard} for shard in shards]
    assert sum(len(p) for p in patients) == len({t.patient_id for t in tasks})  # never split
    sizes = [len(shard) for shard in shards]
    assert max(sizes) <= math.ceil(len(tasks) / num_shards) + 1  # what shards_needed assumes
    assert max(sizes) - min(sizes) <= 2
    assert all(shard == sorted(shard, key=tasks.index) for shard in shards)  # listed order kept
    shuffled = [tasks[i] for i in np.random.default_rng(0).permutation(len(tasks))]
    again = [{t.series_id for t in preprocess.shard_tasks(shuffled, k, num_shards)}
             for k in range(num_shards)]  # fmt: skip
    assert again == [set(shard) for shard in ids]  # the listing order does not matter


def test_shard_arguments_are_checked() -> None:
    tasks = competition_like_tasks(5, seed=0)
    with pytest.raises(ValueError, match="num_shards must be at least 1"):
        preprocess.shard_tasks(tasks, 0, 0)
    for index in (-1, 2):
        with pytest.raises(ValueError, match=r"shard_index must be in 0\.\.1"):
            preprocess.shard_tasks(tasks, index, 2)


def test_size_estimate_is_the_hand_arithmetic_and_the_files_written(
    cached: tuple[Path, pl.DataFrame],
) -> None:
    defaults = PreprocessConfig()  # notebook 01's: 32x192x192 and 96x256x256, one window
    per_series = (32 * 192 * 192 + 128) + (96 * 256 * 256 + 128) + 16 * 1024
    assert preprocess.series_cache_bytes(defaults) == per_series == 7_487_744
    total = preprocess.estimate_cache_bytes(4711, defaults)  # the full training set
    assert total == 4711 * 7_487_744 == 35_274_761_984  # SPEC: "~35 GB"
    three = PreprocessConfig(windows=((50, 400), (40, 1000), (400, 1800)))
    assert (
        preprocess.series_cache_bytes(three)
        == 3 * (32 * 192 * 192 + 96 * 256 * 256) + 2 * 128 + 16384
    )
    cache_dir, metadata = cached  # one window, or two for the series a test re-cached
    for series_id in metadata["series_id"]:
        for shape in CONFIG.shapes:
            path = cache_path(cache_dir, shape, series_id)
            volume = np.load(path, mmap_mode="r")
            channels = 1 if volume.ndim == 3 else volume.shape[1]
            assert path.stat().st_size == preprocess.volume_bytes(shape, channels)  # + header
        record = cache_dir / preprocess.RECORDS_DIR / f"{series_id}.json"
        assert record.stat().st_size < preprocess.RECORD_BYTES


def test_shards_needed() -> None:
    assert preprocess.shards_needed(10, 100, 1000) == 1
    assert preprocess.shards_needed(10, 100, 999) == 2  # 5 + 1 series of 100 bytes fit
    assert preprocess.shards_needed(10, 100, 599) == 3  # 6 do not; ceil(10 / 3) + 1 = 5 do
    assert preprocess.shards_needed(4711, 7_487_744, preprocess.KAGGLE_WORKING_LIMIT_BYTES) == 2
    with pytest.raises(ValueError, match="not even one series"):
        preprocess.shards_needed(10, 100, 150)


def test_cache_space_is_checked_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults = PreprocessConfig()
    free = {"bytes": 10**12}
    monkeypatch.setattr(
        preprocess.shutil, "disk_usage", lambda path: SimpleNamespace(free=free["bytes"])
    )
    line = preprocess.check_cache_space(4711, 4711, 4711, defaults, tmp_path)
    assert "35.27 GB" in line and "4,711 series" in line and "1000.00 GB free" in line
    with pytest.raises(
        preprocess.CacheTooLargeError, match=r"Kaggle keeps 20\.00 GB.*num_shards=2"
    ):
        preprocess.check_cache_space(4711, 4711, 4711, defaults, tmp_path, kaggle=True)
    shard = math.ceil(4711 / 2) + 1
    line = preprocess.check_cache_space(shard, shard, 4711, defaults, tmp_path, kaggle=True)
    assert "Kaggle keeps 20.00 GB" in line
    free["bytes"] = 12 * 10**9  # a small disk: three shards of ~11.8 GB would fit
    with pytest.raises(preprocess.CacheTooLargeError, match=r"not enough space.*num_shards=3"):
        preprocess.check_cache_space(4711, 4711, 4711, defaults, tmp_path)
    # what is already cached takes no new space
    preprocess.check_cache_space(1000, 4711, 4711, defaults, tmp_path)


# --------------------------------------------------------------------------------------------
# Several caches (notebook 01's shards) read as one


@pytest.fixture(scope="module")
def shard_caches(tiny_competition: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny training set cached in two shards, `voco2d-cache-0/` and `voco2d-cache-1/`."""
    root = tmp_path_factory.mktemp("shards")
    tasks = list_series(tiny_competition, "train")
    for index in range(2):
        shard = preprocess.shard_tasks(tasks, index, 2)
        config = PreprocessConfig(shapes=((8, 32, 32),))
        preprocess_dataset(shard, root / f"voco2d-cache-{index}", config, workers=0, progress=False)
    return root


def test_several_caches_give_one_metadata_table_pointing_at_each_volume(
    tiny_competition: Path, shard_caches: Path
) -> None:
    folders = [shard_caches / "voco2d-cache-0", shard_caches / "voco2d-cache-1"]
    assert preprocess.resolve_cache_dirs(str(shard_caches / "voco2d-cache-*")) == folders
    metadata = preprocess.load_metadata([str(f) for f in folders])
    tasks = list_series(tiny_competition, "train")
    assert metadata["series_id"].to_list() == [t.series_id for t in tasks]  # sorted, each once
    for row in metadata.iter_rows(named=True):
        own = pl.read_parquet(Path(row["cache_dir"]) / preprocess.METADATA_FILE)
        assert row["series_id"] in own["series_id"].to_list()  # the folder that holds it
        assert cache_path(Path(row["cache_dir"]), (8, 32, 32), row["series_id"]).is_file()
    assert preprocess.load_metadata(str(shard_caches / "voco2d-cache-*")).equals(metadata)
    single = preprocess.load_metadata(folders[0])  # one folder, as before
    assert set(single["cache_dir"]) == {str(folders[0])}
    assert preprocess.cache_settings(folders) == PreprocessConfig(shapes=((8, 32, 32),))


def test_a_series_in_two_caches_is_kept_once_with_a_warning(
    shard_caches: Path, tmp_path: Path
) -> None:
    first = shard_caches / "voco2d-cache-0"
    copy = Path(shutil.copytree(first, tmp_path / "copy"))
    table = pl.read_parquet(first / preprocess.METADATA_FILE)
    broken_id = table["series_id"][0]
    # the first cache has that series as failed: the copy's good one is used
    table.with_columns(
        pl.when(pl.col("series_id") == broken_id).then(pl.lit("failed")).otherwise("status")
        .alias("status")
    ).write_parquet(tmp_path / "broken.parquet")  # fmt: skip
    broken = Path(shutil.copytree(first, tmp_path / "broken"))
    shutil.move(tmp_path / "broken.parquet", broken / preprocess.METADATA_FILE)
    with pytest.warns(UserWarning, match=f"{table.height} series are in more than one cache"):
        metadata = preprocess.load_metadata([broken, copy])
    assert metadata.height == table.height
    assert metadata.filter(pl.col("series_id") == broken_id)["cache_dir"].to_list() == [str(copy)]
    assert set(metadata.filter(pl.col("series_id") != broken_id)["cache_dir"]) == {str(broken)}


def test_caches_made_differently_are_refused(shard_caches: Path, tmp_path: Path) -> None:
    other = Path(shutil.copytree(shard_caches / "voco2d-cache-1", tmp_path / "other"))
    for record_file in (other / preprocess.RECORDS_DIR).glob("*.json"):
        record = json.loads(record_file.read_text())
        record["settings"]["windows"] = [[40.0, 1000.0]]
        record_file.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"made differently.*\[\[40\.0, 1000\.0\]\]"):
        preprocess.cache_settings([shard_caches / "voco2d-cache-0", other])


def test_cache_folders_that_do_not_exist_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="matches no folder"):
        preprocess.resolve_cache_dirs(str(tmp_path / "voco2d-cache-*"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        preprocess.resolve_cache_dirs([tmp_path, tmp_path / "missing"])
    for empty in ("", [], [""]):
        with pytest.raises(ValueError, match="is empty"):
            preprocess.resolve_cache_dirs(empty)
    assert preprocess.resolve_cache_dirs([tmp_path, str(tmp_path)]) == [tmp_path]  # once each
    with pytest.raises(FileNotFoundError, match="run notebook 01"):
        preprocess.load_metadata(tmp_path)
