"""Competition DICOM series -> cached uint8 volumes (one `.npy` per series and shape) plus a
metadata table. The step notebook 01 runs; notebook 04 reuses `prepare_volumes` on the fly.

Cache layout under `cache_dir`:

    32x192x192/<series_id>.npy    uint8 (slices, H, W), or (slices, C, H, W) for C windows
    96x256x256/<series_id>.npy
    records/<series_id>.json      what happened to the series (written last: marks it done)
    metadata.parquet              all records as one table (rebuilt at the end of every run)

Every file is written to a temporary name and renamed, so a killed run never leaves a
half-written file, and a re-run skips the series whose record and volumes are all there.

The full training set's default cache (~35 GB) is more than Kaggle keeps of a notebook's output
(~20 GB), so a run can take one shard of the series (`shard_tasks`) and check beforehand that
its output fits (`check_cache_space`); the readers accept several cache folders, or glob
patterns (`resolve_cache_dirs`), and treat them as one cache.
"""

from __future__ import annotations

import concurrent.futures as futures
import glob
import json
import math
import multiprocessing
import shutil
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import polars as pl
from tqdm.std import tqdm

from kaggle_utils.cache.dicom import Series, load_series
from kaggle_utils.cache.volume import (
    DEFAULT_WINDOWS,
    body_bbox,
    check_resample_device,
    crop_and_resample,
    window_volume,
)
from kaggle_utils.common import paths
from kaggle_utils.common.io import save_npy_atomic, write_json_atomic, write_parquet_atomic
from kaggle_utils.common.progress import progress_bar
from kaggle_utils.common.provenance import provenance

PRETRAIN_SHAPE = (32, 192, 192)
FINETUNE_SHAPE = (96, 256, 256)
RECORDS_DIR = "records"
PREPROCESS_FILE = "preprocess.json"  # in a fine-tuning run folder
METADATA_FILE = "metadata.parquet"
KAGGLE_WORKING_LIMIT_BYTES = 20 * 10**9  # what Kaggle keeps of /kaggle/working (SPEC 10)
NPY_HEADER_BYTES = 128  # np.save's header of a 3-D or 4-D uint8 array (format 1.0)
RECORD_BYTES = 16 * 1024  # a record (instance numbers of ~2,000 slices) and its metadata row

Shape = tuple[int, int, int]
# One cache folder, or several (e.g. the shards of notebook 01), each possibly a glob pattern.
CacheDirs: TypeAlias = str | Path | Sequence[str | Path]


class CacheTooLargeError(RuntimeError):
    """The cache would not fit where it is written; the message says how many shards would."""


@dataclass(frozen=True)
class SeriesTask:
    """One series folder to process."""

    patient_id: int
    series_id: int
    series_dir: Path


@dataclass(frozen=True)
class PreprocessConfig:
    """What the cache holds: shapes (slices, H, W), windows (level, width), body crop."""

    shapes: tuple[Shape, ...] = (PRETRAIN_SHAPE, FINETUNE_SHAPE)
    windows: tuple[tuple[float, float], ...] = DEFAULT_WINDOWS
    body_crop: bool = True
    # Where the crop is resampled: "cpu" (the reference) or a GPU ("cuda"). Not a setting of
    # the cache: both give the same volumes up to float rounding (tests/test_volume.py).
    resample_device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.shapes:
            raise ValueError("shapes is empty: give at least one (slices, H, W)")
        for shape in self.shapes:
            if len(shape) != 3 or min(shape) < 1:
                raise ValueError(f"each shape is three positive ints (slices, H, W), not {shape}")
        if not self.windows:
            raise ValueError("windows is empty: give at least one (level, width)")

    @classmethod
    def from_params(
        cls,
        shapes: Sequence[Sequence[int]],
        windows: Sequence[Sequence[float]],
        body_crop: bool = True,
        resample_device: str = "cpu",
    ) -> PreprocessConfig:
        """From notebook parameters (lists, as papermill passes them)."""
        return cls(
            shapes=tuple(tuple(int(v) for v in shape) for shape in shapes),  # type: ignore[misc]
            windows=tuple((float(level), float(width)) for level, width in windows),
            body_crop=body_crop,
            resample_device=resample_device,
        )


def shape_name(shape: Sequence[int]) -> str:
    return "x".join(str(int(v)) for v in shape)


def cache_path(cache_dir: Path, shape: Sequence[int], series_id: int) -> Path:
    return Path(cache_dir) / shape_name(shape) / f"{series_id}.npy"


def load_cached_volume(
    cache_dir: Path, shape: Sequence[int], series_id: int, mmap: bool = True
) -> np.ndarray:
    """A cached uint8 volume, memory-mapped by default (cheap random access in data loaders)."""
    return np.load(cache_path(cache_dir, shape, series_id), mmap_mode="r" if mmap else None)


def list_series(data_root: Path, split: str = "train") -> list[SeriesTask]:
    """Every series of a split: the folders `<split>_images/<patient>/<series>/` plus any series
    that `<split>_series_meta.csv` names but whose folder is missing (it will fail, visibly).

    Raises:
        ValueError: `split` is not "train" or "test".
        FileNotFoundError: neither the images folder nor the meta CSV exists.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    data_root = Path(data_root)
    images_dir = data_root / f"{split}_images"
    meta_csv = data_root / f"{split}_series_meta.csv"
    if not images_dir.is_dir() and not meta_csv.is_file():
        raise FileNotFoundError(f"{data_root}: neither {images_dir.name}/ nor {meta_csv.name}")
    found: dict[tuple[int, int], Path] = {}
    if images_dir.is_dir():
        for patient_dir in images_dir.iterdir():
            if not (patient_dir.is_dir() and patient_dir.name.isdigit()):
                continue
            for series_dir in patient_dir.iterdir():
                if series_dir.is_dir() and series_dir.name.isdigit():
                    found[(int(patient_dir.name), int(series_dir.name))] = series_dir
    if meta_csv.is_file():
        meta = pl.read_csv(meta_csv, columns=["patient_id", "series_id"])
        for patient_id, series_id in meta.iter_rows():
            key = (int(patient_id), int(series_id))
            found.setdefault(key, images_dir / str(patient_id) / str(series_id))
    return [SeriesTask(p, s, path) for (p, s), path in sorted(found.items())]


def shard_tasks(tasks: Sequence[SeriesTask], shard_index: int, num_shards: int) -> list[SeriesTask]:
    """The tasks of shard `shard_index` out of `num_shards`, in their listed order.

    Patients are never split (notebook 03's folds group by patient, and a patient's series
    should come from one cache), and shards are balanced by series count: patients are dealt
    the largest first, each to the shard with the fewest series so far (ties: the lower shard,
    then the lower patient id). The split depends only on the (patient, series) pairs listed,
    so every session computes the same shards; with patients of one or two series (the
    competition), no shard holds more than ceil(n / num_shards) + 1 of the n series.

    Raises:
        ValueError: num_shards < 1, or shard_index outside 0..num_shards - 1.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be at least 1, not {num_shards}")
    if not 0 <= shard_index < num_shards:
        raise ValueError(
            f"shard_index must be in 0..{num_shards - 1} for num_shards={num_shards}, "
            f"not {shard_index}"
        )
    series_per_patient = Counter(task.patient_id for task in tasks)
    loads = [0] * num_shards
    shard_of: dict[int, int] = {}
    for patient_id, count in sorted(series_per_patient.items(), key=lambda kv: (-kv[1], kv[0])):
        shard = min(range(num_shards), key=lambda k: (loads[k], k))
        shard_of[patient_id] = shard
        loads[shard] += count
    return [task for task in tasks if shard_of[task.patient_id] == shard_index]


def volume_bytes(shape: Sequence[int], channels: int = 1) -> int:
    """Size of one cached volume file: uint8 (slices, [channels,] H, W) and its .npy header."""
    return math.prod(int(v) for v in shape) * channels + NPY_HEADER_BYTES


def series_cache_bytes(config: PreprocessConfig) -> int:
    """What caching one series writes: a volume per shape, one channel per window, and its
    record (montages and the metadata table are small beside that)."""
    channels = len(config.windows)
    return sum(volume_bytes(shape, channels) for shape in config.shapes) + RECORD_BYTES


def estimate_cache_bytes(n_series: int, config: PreprocessConfig) -> int:
    """What caching `n_series` series writes (every series has the same fixed shapes)."""
    return n_series * series_cache_bytes(config)


def shards_needed(n_series: int, bytes_per_series: int, budget_bytes: int) -> int:
    """The fewest shards whose largest one fits in `budget_bytes`. Shards keep patients
    whole, so the largest may hold one series more than an even split (see `shard_tasks`).

    Raises:
        ValueError: not even one series fits in the budget.
    """
    if n_series * bytes_per_series <= budget_bytes:
        return 1
    for num_shards in range(2, n_series + 1):
        largest = min(n_series, math.ceil(n_series / num_shards) + 1)
        if largest * bytes_per_series <= budget_bytes:
            return num_shards
    raise ValueError(
        f"not even one series ({_size(bytes_per_series)}) fits in {_size(budget_bytes)}"
    )


def check_cache_space(
    n_to_write: int,
    n_in_shard: int,
    n_listed: int,
    config: PreprocessConfig,
    cache_dir: Path,
    kaggle: bool = False,
) -> str:
    """Before hours of decoding: what this run writes beside the free space of `cache_dir` and,
    on Kaggle, beside the ~20 GB Kaggle keeps of /kaggle/working. Returns that as a line to
    print.

    n_to_write: series this run still has to cache; n_in_shard: every series of this shard
    (all of them are in the output at the end); n_listed: every series of the split, before
    sharding (to say how many shards would fit).

    Raises:
        CacheTooLargeError: it does not fit; the message says how many shards would.
    """
    per_series = series_cache_bytes(config)
    to_write = n_to_write * per_series
    free = shutil.disk_usage(cache_dir).free
    parts = ", ".join(
        f"{shape_name(s)}: {_size(volume_bytes(s, len(config.windows)))}" for s in config.shapes
    )
    line = (
        f"this run writes about {_size(to_write)}: {n_to_write:,} series to cache x "
        f"{_size(per_series)} ({parts}, {len(config.windows)} channel(s) of uint8, a record); "
        f"{_size(free)} free in {cache_dir}"
    )
    if to_write > free:
        raise CacheTooLargeError(
            f"{line}: not enough space. Free some, choose another output_dir, or split the "
            f"series: {_shard_advice(n_listed, per_series, free, config)}, each run where it "
            "has room (on Kaggle: in its own session, each output becoming one dataset)"
        )
    if kaggle:
        in_shard = n_in_shard * per_series
        line += f"; Kaggle keeps {_size(KAGGLE_WORKING_LIMIT_BYTES)} of /kaggle/working"
        if in_shard > KAGGLE_WORKING_LIMIT_BYTES:
            advice = _shard_advice(n_listed, per_series, KAGGLE_WORKING_LIMIT_BYTES, config)
            raise CacheTooLargeError(
                f"{line}, and this shard's cache is about {_size(in_shard)} ({n_in_shard:,} "
                f"series): use {advice}, one kernel each (make kaggle-bundle --shards N writes "
                "them); give notebooks 02-04 every shard's output (a list, or a glob such as "
                "voco2d-cache-*/cache, found in either mount layout)"
            )
    return line


def _shard_advice(n_listed: int, per_series: int, budget: int, config: PreprocessConfig) -> str:
    """ "num_shards=N (about X each) and shard_index=0..N-1" for a byte budget per shard."""
    num_shards = shards_needed(n_listed, per_series, budget)
    each = _size(estimate_cache_bytes(math.ceil(n_listed / num_shards), config))
    return f"num_shards={num_shards} (about {each} each) and shard_index=0..{num_shards - 1}"


def _size(n_bytes: float) -> str:
    """Decimal units, as disk and Kaggle quotas are given."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit}"
    return f"{int(n_bytes)} B"


def prepare_volumes(
    series: Series, config: PreprocessConfig
) -> tuple[dict[Shape, np.ndarray], tuple[int, int, int, int]]:
    """A decoded series to the windowed uint8 volumes of every configured shape.

    The body box, squared, is cut from every slice and resampled to each shape
    (`volume.crop_and_resample`: z first, without copying the series), then windowed. Returns
    the volumes by shape and the in-plane body box used (y0, y1, x0, x1).
    """
    hu = series.hu
    height, width = hu.shape[1:]
    box = body_bbox(hu) if config.body_crop else (0, height, 0, width)
    resampled = crop_and_resample(hu, box, config.shapes, device=config.resample_device)
    volumes = {shape: window_volume(resampled[shape], config.windows) for shape in config.shapes}
    return volumes, box


def process_series(task: SeriesTask, cache_dir: Path, config: PreprocessConfig) -> dict[str, Any]:
    """Decode, crop, resample, window and cache one series; return its metadata record.

    Never raises for bad data: a series that cannot be read gets status "failed" and the
    error in its record, so one broken series never stops a run.
    """
    start = time.perf_counter()
    record: dict[str, Any] = _empty_record(task, config)
    try:
        series = load_series(task.series_dir, reuse_memory=True)  # only the record outlives it
        volumes, box = prepare_volumes(series, config)
        for shape, volume in volumes.items():
            save_npy_atomic(cache_path(cache_dir, shape, task.series_id), volume)
        record.update(
            status="ok",
            n_files=series.n_files,
            n_slices=int(series.hu.shape[0]),
            height=int(series.hu.shape[1]),
            width=int(series.hu.shape[2]),
            spacing_z=series.spacing[0],
            spacing_y=series.spacing[1],
            spacing_x=series.spacing[2],
            z_first=None if series.z_positions is None else float(series.z_positions[0]),
            z_last=None if series.z_positions is None else float(series.z_positions[-1]),
            ordered_by=series.ordered_by,
            n_decoded=series.n_files - len(series.skipped),
            **geometry_record(series),
            instance_numbers=[int(v) for v in series.instance_numbers],
            skipped_files=[str(s) for s in series.skipped],
            n_skipped=len(series.skipped),
            decoder=series.decoder,
            body_bbox=[int(v) for v in box],
        )
    except Exception as error:  # recorded, not raised: see docstring
        record.update(status="failed", error=f"{type(error).__name__}: {error}")
    record["seconds"] = round(time.perf_counter() - start, 4)
    write_json_atomic(Path(cache_dir) / RECORDS_DIR / f"{task.series_id}.json", record)
    return record


# How each series was brought to the patient-based layout (`dicom.SeriesGeometry`), as
# metadata columns: a series stored in an unusual orientation, tilted, with duplicates or gaps
# can be found (and looked at) after the run.
GEOMETRY_FIELDS: dict[str, Any] = {
    "orientation": pl.List(pl.Float64),  # ImageOrientationPatient as stored
    "flips": pl.String,  # "none", or e.g. "flipped_rows+flipped_columns", "transposed"
    "normal_to_feet": pl.Boolean,
    "tilt_degrees": pl.Float64,
    "shear_degrees": pl.Float64,
    "n_duplicates": pl.Int64,
    "z_resampled": pl.Boolean,  # non-uniform gaps: resampled by position
    "z_gap_ratio": pl.Float64,  # largest gap over the median gap
}


def geometry_record(series: Series) -> dict[str, Any]:
    """The `GEOMETRY_FIELDS` of a decoded series."""
    record = {name: getattr(series.geometry, name) for name in GEOMETRY_FIELDS}
    if record["orientation"] is not None:
        record["orientation"] = list(record["orientation"])
    return record


def is_cached(task: SeriesTask, cache_dir: Path, config: PreprocessConfig) -> bool:
    """Done already: an "ok" record made with the same settings and every volume on disk."""
    record_file = Path(cache_dir) / RECORDS_DIR / f"{task.series_id}.json"
    if not record_file.is_file():
        return False
    try:
        record = json.loads(record_file.read_text())
    except json.JSONDecodeError:
        return False
    return (
        record.get("status") == "ok"
        and record.get("settings") == _settings(config)
        and all(cache_path(cache_dir, s, task.series_id).is_file() for s in config.shapes)
    )


def pending_tasks(
    tasks: Sequence[SeriesTask], cache_dir: Path, config: PreprocessConfig, overwrite: bool = False
) -> list[SeriesTask]:
    """The tasks a run still has to do: all with `overwrite`, else those not cached yet."""
    return [t for t in tasks if overwrite or not is_cached(t, cache_dir, config)]


def preprocess_dataset(
    tasks: Sequence[SeriesTask],
    cache_dir: Path,
    config: PreprocessConfig,
    workers: int = 2,
    overwrite: bool = False,
    progress: bool = True,
) -> pl.DataFrame:
    """Process every task not cached yet (all with `overwrite`), in `workers` processes
    (0: in this process), with a progress bar; return and write the metadata table.

    A worker that dies (e.g. a decoder crash in native code) costs only the series it was
    working on: the others are retried in a fresh pool, the culprit is recorded as failed.
    """
    check_resample_device(config.resample_device)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(cache_dir)
    todo = pending_tasks(tasks, cache_dir, config, overwrite)
    bar = progress_bar(total=len(todo), desc="series", unit="series", disable=not progress)
    if workers <= 0:
        for task in todo:
            process_series(task, cache_dir, config)
            bar.update()
    else:
        _run_in_pool(todo, cache_dir, config, workers, bar)
    bar.close()
    return write_metadata(cache_dir)


def write_metadata(cache_dir: Path) -> pl.DataFrame:
    """Rebuild `metadata.parquet` from every record in the cache (all runs, all splits)."""
    cache_dir = Path(cache_dir)
    records = [json.loads(p.read_text()) for p in sorted((cache_dir / RECORDS_DIR).glob("*.json"))]
    table = _records_to_frame(records)
    write_parquet_atomic(table, cache_dir / METADATA_FILE)
    return table


def resolve_cache_dirs(cache_dirs: CacheDirs) -> list[Path]:
    """One cache folder or several, each possibly a glob pattern (the shards of notebook 01
    attached on Kaggle: `voco2d-cache-*/cache`, found in either mount layout by
    `paths.find_inputs`), as existing folders: in the order given, a pattern's matches sorted,
    each folder once.

    Raises:
        ValueError: nothing given (an empty string or list).
        FileNotFoundError: a folder does not exist, or a pattern matches no folder.
    """
    values = [cache_dirs] if isinstance(cache_dirs, str | Path) else list(cache_dirs)
    if not values or any(not str(v) for v in values):
        raise ValueError(
            f"cache_dir {cache_dirs!r} is empty: give notebook 01's cache folder, a list of "
            "them, or a glob pattern such as voco2d-cache-*/cache (on Kaggle: found under any "
            "input mount)"
        )
    folders: list[Path] = []
    for value in values:
        matches = [p for p in paths.find_inputs(value) if p.is_dir()]
        if not matches:
            what = "matches no folder" if glob.has_magic(str(value)) else "does not exist"
            looked = paths.where_kaggle_looked()
            raise FileNotFoundError(
                f"cache_dir {value} {what}{looked}: run notebook 01 (on Kaggle, attach its "
                "kernel's output or a dataset of it)"
            )
        known = {f.resolve() for f in folders}
        folders += [m for m in matches if m.resolve() not in known]
    return folders


def load_metadata(cache_dir: CacheDirs) -> pl.DataFrame:
    """The metadata table of one cache or several (`resolve_cache_dirs`), concatenated, with
    `cache_dir`: the folder that holds each series' volumes.

    A series in more than one cache (shards made with different num_shards, or a full cache
    beside a shard) is kept once, from the first cache where it is "ok", with a warning.

    Raises:
        FileNotFoundError: a folder has no metadata table (not a notebook 01 cache).
    """
    frames = []
    for folder in resolve_cache_dirs(cache_dir):
        path = folder / METADATA_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run notebook 01 (preprocessing) first")
        frames.append(pl.read_parquet(path).with_columns(pl.lit(str(folder)).alias("cache_dir")))
    table = pl.concat(frames, how="diagonal_relaxed").with_row_index("order")
    table = table.sort(pl.col("status") != "ok", "order")  # ok first, then in folder order
    copies = (
        table.group_by("series_id", maintain_order=True)
        .agg("cache_dir")
        .filter(pl.col("cache_dir").list.len() > 1)
    )
    if copies.height:
        series_id, folders = copies.row(0)
        warnings.warn(
            f"{copies.height} series are in more than one cache (e.g. series {series_id} in "
            f"{', '.join(folders)}): each is used once, from the first cache where it is ok",
            stacklevel=2,
        )
    return table.unique("series_id", keep="first").drop("order").sort("patient_id", "series_id")


def _settings(config: PreprocessConfig) -> dict[str, Any]:
    return {
        "shapes": [list(s) for s in config.shapes],
        "windows": [list(w) for w in config.windows],
        "body_crop": config.body_crop,
    }


def _empty_record(task: SeriesTask, config: PreprocessConfig) -> dict[str, Any]:
    return {
        "patient_id": task.patient_id,
        "series_id": task.series_id,
        "status": "failed",
        "error": None,
        "n_files": 0,
        "n_slices": 0,
        "height": None,
        "width": None,
        "spacing_z": None,
        "spacing_y": None,
        "spacing_x": None,
        "z_first": None,
        "z_last": None,
        "ordered_by": None,
        "n_decoded": 0,
        **dict.fromkeys(GEOMETRY_FIELDS),
        "instance_numbers": [],
        "skipped_files": [],
        "n_skipped": 0,
        "decoder": None,
        "body_bbox": [],
        "seconds": 0.0,
        "source_dir": str(task.series_dir),
        "settings": _settings(config),
        "provenance": provenance(),
    }


_SCHEMA = {
    "patient_id": pl.Int64,
    "series_id": pl.Int64,
    "status": pl.String,
    "error": pl.String,
    "n_files": pl.Int64,
    "n_slices": pl.Int64,
    "height": pl.Int64,
    "width": pl.Int64,
    "spacing_z": pl.Float64,
    "spacing_y": pl.Float64,
    "spacing_x": pl.Float64,
    "z_first": pl.Float64,
    "z_last": pl.Float64,
    "ordered_by": pl.String,
    "n_decoded": pl.Int64,
    **GEOMETRY_FIELDS,
    "instance_numbers": pl.List(pl.Int64),
    "skipped_files": pl.List(pl.String),
    "n_skipped": pl.Int64,
    "decoder": pl.String,
    "body_bbox": pl.List(pl.Int64),
    "seconds": pl.Float64,
    "source_dir": pl.String,
}


def _records_to_frame(records: Iterable[dict[str, Any]]) -> pl.DataFrame:
    rows = [{key: record.get(key) for key in _SCHEMA} for record in records]
    return pl.DataFrame(rows, schema=_SCHEMA).sort("patient_id", "series_id")


def _remove_stale_temporaries(cache_dir: Path) -> None:
    """Temporary files of a run that was killed mid-write."""
    for tmp in cache_dir.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _init_worker() -> None:
    """One thread per worker: the pool already uses every core it was given."""
    import torch

    torch.set_num_threads(1)


def _run_in_pool(
    tasks: list[SeriesTask],
    cache_dir: Path,
    config: PreprocessConfig,
    workers: int,
    bar: tqdm,
) -> None:
    pending = list(tasks)
    while pending:
        unfinished = _run_batch(pending, cache_dir, config, workers, bar)
        # The pool broke: rerun its unfinished tasks alone until one breaks it again (the
        # culprit, recorded as failed); the rest go back to the parallel pool.
        pending = []
        while unfinished:
            task = unfinished.pop(0)
            if _run_batch([task], cache_dir, config, 1, bar):
                _record_crash(task, cache_dir, config)
                bar.update()
                pending = unfinished
                break


def _run_batch(
    tasks: list[SeriesTask],
    cache_dir: Path,
    config: PreprocessConfig,
    workers: int,
    bar: tqdm,
) -> list[SeriesTask]:
    """Run tasks in a fresh process pool; return those left unfinished by a dead worker."""
    unfinished: list[SeriesTask] = []
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
        submitted = {pool.submit(process_series, t, cache_dir, config): t for t in tasks}
        for future in futures.as_completed(submitted):
            try:
                future.result()
                bar.update()
            except futures.process.BrokenProcessPool:
                unfinished.append(submitted[future])
    return [t for t in tasks if t in unfinished]


def _record_crash(task: SeriesTask, cache_dir: Path, config: PreprocessConfig) -> None:
    record = _empty_record(task, config)
    record["error"] = (
        "the worker process died while decoding this series (a crash in native code, out of "
        'memory, or a script that calls this without an `if __name__ == "__main__":` guard)'
    )
    write_json_atomic(Path(cache_dir) / RECORDS_DIR / f"{task.series_id}.json", record)


def problems_report(metadata: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The failed series (patient, series, error) and the skipped files (one row per file)."""
    failed = metadata.filter(pl.col("status") != "ok").select("patient_id", "series_id", "error")
    skipped = (
        metadata.filter(pl.col("n_skipped") > 0)
        .select("patient_id", "series_id", pl.col("skipped_files").alias("skipped_file"))
        .explode("skipped_file")
    )
    return failed, skipped


def geometry_report(metadata: pl.DataFrame) -> pl.DataFrame:
    """The cached series whose geometry was not a plain uniform axial stack: reoriented
    (`flips`), tilted or sheared, with duplicates, resampled for non-uniform gaps, or ordered
    without ImagePositionPatient (`ordered_by`: by SliceLocation, or by InstanceNumber, which
    is upside down when the scanner numbered head to feet)."""
    if "flips" not in metadata.columns:  # a cache made before these columns existed
        return metadata.head(0).select("patient_id", "series_id")
    columns = ["patient_id", "series_id", "ordered_by", *GEOMETRY_FIELDS]
    return metadata.filter(
        (pl.col("status") == "ok")
        & (
            (pl.col("ordered_by") != "position")
            | (pl.col("flips") != "none")
            | (pl.col("tilt_degrees") > 0)
            | (pl.col("shear_degrees") > 0.5)
            | (pl.col("n_duplicates") > 0)
            | pl.col("z_resampled")
        )
    ).select(columns)


def coronal_aspect(record: dict[str, Any], shape: Sequence[int]) -> float:
    """Height/width of one coronal pixel of a cached volume, from its record: the mm one
    resampled slice spans over the mm one resampled column spans."""
    y0, y1, x0, x1 = record["body_bbox"]
    side_mm = max(y1 - y0, x1 - x0) * record["spacing_x"]
    depth_mm = record["n_slices"] * record["spacing_z"]
    return (depth_mm / shape[0]) / (side_mm / shape[2])


def cache_settings(cache_dir: CacheDirs) -> PreprocessConfig:
    """The windows and body crop a cache was made with (from its records), so that volumes
    added later (extra pretraining data, test series) are preprocessed the same way. Several
    caches (`resolve_cache_dirs`) must agree; their shapes are those every one of them holds.

    Raises:
        FileNotFoundError: a cache holds no successful record yet.
        ValueError: the caches were made with different windows or body crop, or share no shape.
    """
    settings = {folder: _folder_settings(folder) for folder in resolve_cache_dirs(cache_dir)}
    (first_dir, first), *others = settings.items()
    for folder, config in others:
        if (config.windows, config.body_crop) != (first.windows, first.body_crop):
            raise ValueError(
                f"the caches were made differently: {first_dir} with windows "
                f"{[list(w) for w in first.windows]} and body_crop={first.body_crop}, {folder} "
                f"with {[list(w) for w in config.windows]} and body_crop={config.body_crop}; "
                "re-run notebook 01 for one of them with the other's windows and body_crop"
            )
    shapes = tuple(s for s in first.shapes if all(s in c.shapes for c in settings.values()))
    if not shapes:
        held = "; ".join(f"{f}: {[shape_name(s) for s in c.shapes]}" for f, c in settings.items())
        raise ValueError(f"no volume shape is in every cache ({held}): use caches of one shape")
    return PreprocessConfig(shapes, first.windows, first.body_crop)


def _folder_settings(cache_dir: Path) -> PreprocessConfig:
    """The settings of one cache's first successful record."""
    settings = _first_ok_record(cache_dir)["settings"]
    return PreprocessConfig.from_params(
        settings["shapes"], settings["windows"], settings["body_crop"]
    )


def write_model_preprocessing(
    model_dir: Path, config: PreprocessConfig, cache_made_by: dict[str, str] | None
) -> Path:
    """`<model_dir>/preprocess.json`: the windows and body crop a model was trained on, what
    made its training cache (`cache_made_by`, `cache_provenance`) and what wrote this file, so
    that they travel with the model folder (notebook 04 on Kaggle has the models, not the
    training cache)."""
    payload = {
        "windows": [list(w) for w in config.windows],
        "body_crop": config.body_crop,
        "cache_made_by": cache_made_by,
        "provenance": provenance(),
    }
    path = Path(model_dir) / PREPROCESS_FILE
    write_json_atomic(path, payload)
    return path


def cache_provenance(cache_dir: CacheDirs) -> dict[str, str] | None:
    """What made a cache (`provenance.provenance()` of notebook 01's run, from its first
    successful record); None for a cache made before records carried it."""
    return _first_ok_record(resolve_cache_dirs(cache_dir)[0]).get("provenance")


def _first_ok_record(cache_dir: Path) -> dict[str, Any]:
    for record_file in sorted((Path(cache_dir) / RECORDS_DIR).glob("*.json")):
        record = json.loads(record_file.read_text())
        if record.get("status") == "ok":
            return record
    raise FileNotFoundError(f"{cache_dir}: no cached series yet: run notebook 01 first")
