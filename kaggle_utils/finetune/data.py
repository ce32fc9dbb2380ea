"""Labelled series for fine-tuning: the table that joins labels to cached volumes, patient
folds, and a dataset that turns a cached (slices, H, W) volume into an augmented slice stack.

Augmentation goes through albumentations with the slices stacked as channels of one image, so
every slice of a volume gets the same flip, affine, brightness/contrast and dropout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from sklearn.model_selection import StratifiedKFold, train_test_split
from torch.utils.data import Dataset

from kaggle_utils.cache.preprocess import CacheDirs, cache_path, load_metadata
from kaggle_utils.metric import TARGET_CLASSES, TARGET_GROUPS
from kaggle_utils.segmentation.train import area_at_depth

# Targets with slice-level labels in image_level_labels.csv, by their injury_name there.
SLICE_TARGETS: dict[str, str] = {"bowel": "Bowel", "extravasation": "Active_Extravasation"}


def label_columns(target: str) -> list[str]:
    return list(TARGET_GROUPS[target])


def series_table(
    labels: pl.DataFrame,
    cache_dir: CacheDirs,
    shape: Sequence[int],
    split_meta: pl.DataFrame | None = None,
    image_labels: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """One row per cached series of a labelled patient: patient_id, series_id, path, and the
    class index of every target (`<target>_class`) plus `any_injury`.

    With `image_labels` (image_level_labels.csv), also `slices_<target>` for bowel and
    extravasation: 0/1 per cached slice, or null where unknown (an injured patient's series
    without slice annotations). Series whose preprocessing failed are left out (and reported
    by notebook 01). `cache_dir` may name several caches (`preprocess.resolve_cache_dirs`):
    each path points into the cache that holds the series.
    """
    metadata = load_metadata(cache_dir).filter(pl.col("status") == "ok")
    if image_labels is not None:
        metadata = metadata.join(
            cached_slice_labels(metadata, labels, image_labels, shape[0]),
            on="series_id", how="left",
        )  # fmt: skip
    metadata = metadata.select("patient_id", "series_id", "cache_dir", pl.col("^slices_.*$"))
    if split_meta is not None:
        metadata = metadata.join(split_meta.select("series_id"), on="series_id", how="semi")
    table = metadata.join(class_indices(labels), on="patient_id", how="inner")
    paths = [
        str(cache_path(Path(folder), shape, series_id))
        for folder, series_id in table.select("cache_dir", "series_id").iter_rows()
    ]
    table = table.drop("cache_dir").with_columns(pl.Series("path", paths))
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} cached volumes of shape {list(shape)} missing (e.g. {missing[0]}): "
            "run notebook 01 with this shape"
        )
    return table.sort("patient_id", "series_id")


def cached_slice_labels(
    metadata: pl.DataFrame, labels: pl.DataFrame, image_labels: pl.DataFrame, n_cached: int
) -> pl.DataFrame:
    """series_id -> `slices_<target>` (list of n_cached 0/1, or null) for the SLICE_TARGETS.

    A slice annotation names a DICOM by instance number; the cache orders slices by z
    (metadata's `instance_numbers`) and resamples them to n_cached. A cached slice is positive
    when any original slice it is made of is (see `cached_slice_spans`). A patient without the
    injury has only negative slices; an injured patient's series without annotations is
    unknown (null), not negative.
    """
    injured = class_indices(labels).select(
        "patient_id", *[pl.col(f"{t}_class").alias(t) for t in SLICE_TARGETS]
    )
    injured_by_patient = {row["patient_id"]: row for row in injured.to_dicts()}
    flagged: dict[tuple[int, str], set[int]] = {}
    for row in image_labels.select("series_id", "instance_number", "injury_name").iter_rows():
        flagged.setdefault((int(row[0]), str(row[2])), set()).add(int(row[1]))
    rows: dict[str, list[Any]] = {"series_id": []} | {f"slices_{t}": [] for t in SLICE_TARGETS}
    for meta in metadata.select("patient_id", "series_id", "instance_numbers").iter_rows():
        patient_id, series_id, instance_numbers = meta
        rows["series_id"].append(series_id)
        spans = cached_slice_spans(len(instance_numbers), n_cached)
        patient = injured_by_patient.get(patient_id)
        for target, injury_name in SLICE_TARGETS.items():
            marked = flagged.get((series_id, injury_name))
            value: list[int] | None
            if patient is None or patient[target] == 0:
                value = [0] * n_cached
            elif not marked:
                value = None
            else:
                hits = np.array([n in marked for n in instance_numbers], dtype=bool)
                value = [int(hits[start:stop].any()) for start, stop in spans]
            rows[f"slices_{target}"].append(value)
    schema = {"series_id": pl.Int64} | {f"slices_{t}": pl.List(pl.Int64) for t in SLICE_TARGETS}
    return pl.DataFrame(rows, schema=schema)


# Targets whose slices can be weighted by the organ's visible area (notebook 06's boxes).
VISIBILITY_TARGETS: tuple[str, ...] = ("kidney", "liver", "spleen")


def organ_visibility_labels(
    organs: pl.DataFrame, labels: pl.DataFrame, n_cached: int
) -> pl.DataFrame:
    """series_id -> `slices_<target>` for kidney, liver and spleen: per cached slice, the
    patient's injury (0 healthy, 1 low or high grade) times the organ's area on that slice over
    its largest area in the series (1st place's soft slice labels). `organs` is notebook 06's
    table; its areas, on the segmentation's grid, are resampled to the `n_cached` slices as the
    volumes were. A series where the organ was not found has unknown (null) labels if the
    patient is injured, zeros if not.
    """
    injured = class_indices(labels).select(
        "patient_id", *[(pl.col(f"{t}_class") > 0).alias(t) for t in VISIBILITY_TARGETS]
    )
    injured_by_patient = {row["patient_id"]: row for row in injured.to_dicts()}
    found = organs.filter(pl.col("organ").is_in(VISIBILITY_TARGETS))
    areas: dict[tuple[int, str], list[float] | None] = {}
    series_patient: dict[int, int] = {}
    for row in found.select("series_id", "patient_id", "organ", "found", "area").iter_rows():
        series_id, patient_id, organ, is_found, area = row
        series_patient[int(series_id)] = int(patient_id)
        areas[(int(series_id), organ)] = list(area) if is_found and area else None
    rows: dict[str, list[Any]] = {"series_id": []} | {f"slices_{t}": [] for t in VISIBILITY_TARGETS}
    for series_id, patient_id in sorted(series_patient.items()):
        patient = injured_by_patient.get(patient_id)
        if patient is None:
            continue
        rows["series_id"].append(series_id)
        for target in VISIBILITY_TARGETS:
            area = areas.get((series_id, target))
            value: list[float] | None
            if not patient[target]:
                value = [0.0] * n_cached
            elif area is None or max(area) <= 0:
                value = None
            else:
                resampled = np.clip(area_at_depth(area, n_cached), 0.0, None)
                value = (resampled / resampled.max()).round(4).tolist()
            rows[f"slices_{target}"].append(value)
    schema = {"series_id": pl.Int64} | {
        f"slices_{t}": pl.List(pl.Float64) for t in VISIBILITY_TARGETS
    }
    return pl.DataFrame(rows, schema=schema)


def cached_slice_spans(n_original: int, n_cached: int) -> list[tuple[int, int]]:
    """For each of n_cached resampled slices, the [start, stop) range of the n_original slices
    it is made of: adaptive average pooling's windows when shrinking, the (one or two)
    neighbours trilinear interpolation reads when growing (volume.resample_volume)."""
    spans = []
    for j in range(n_cached):
        if n_original >= n_cached:
            start = (j * n_original) // n_cached
            stop = -((-(j + 1) * n_original) // n_cached)  # ceil
        else:
            centre = (j + 0.5) * n_original / n_cached - 0.5
            start = max(0, int(np.floor(centre)))
            stop = min(n_original, int(np.ceil(centre)) + 1)
        spans.append((start, max(stop, start + 1)))
    return spans


def class_indices(labels: pl.DataFrame) -> pl.DataFrame:
    """train.csv's one-hot columns -> one class index per target, plus any_injury."""
    columns = [pl.col("patient_id")]
    for target in TARGET_CLASSES:
        onehot = pl.concat_list(label_columns(target))
        columns.append(onehot.list.arg_max().cast(pl.Int64).alias(f"{target}_class"))
    any_injury = pl.max_horizontal([1 - pl.col(f"{t}_healthy") for t in TARGET_CLASSES]).cast(
        pl.Int64
    )
    return labels.select(*columns, any_injury.alias("any_injury"))


def make_folds(
    labels: pl.DataFrame, n_folds: int = 5, seed: int = 0, holdout: float = 0.0
) -> pl.DataFrame:
    """patient_id -> fold (0..n_folds-1), stratified on the injury pattern; with `holdout`
    (the paper's 20 %), that share of patients gets fold -1: a test split never trained on.
    `train_order` ranks the other patients for `training_subset` (label-efficiency runs).

    Patients are the unit, so a patient's series always share a fold.
    """
    table = class_indices(labels)
    strata = _strata(table)
    patients = table["patient_id"].to_numpy()
    folds = np.full(len(patients), -1, dtype=np.int64)
    pool = _training_pool(table, strata, seed, holdout)
    splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    pool_strata = _mergeable(strata[pool], n_folds)
    for fold, (_, valid) in enumerate(splitter.split(pool, pool_strata)):
        folds[pool[valid]] = fold
    order = np.full(len(patients), -1, dtype=np.int64)
    order[pool] = _stratified_order(pool_strata, np.random.default_rng(seed))
    return pl.DataFrame({"patient_id": patients, "fold": folds, "train_order": order})


def holdout_patients(labels: pl.DataFrame, holdout: float, seed: int) -> list[int]:
    """The patients `make_folds(labels, n_folds, seed, holdout)` holds out (fold -1), for
    any n_folds: what notebook 02 leaves out of pretraining so that the held-out test
    patients stay unseen by every initialisation compared on them."""
    if holdout <= 0:
        return []
    table = class_indices(labels)
    pool = _training_pool(table, _strata(table), seed, holdout)
    held = np.setdiff1d(np.arange(table.height), pool)
    return sorted(int(p) for p in table["patient_id"].to_numpy()[held])


def _training_pool(
    table: pl.DataFrame, strata: np.ndarray, seed: int, holdout: float
) -> np.ndarray:
    """Row indices of the patients not held out (all of them without `holdout`)."""
    pool = np.arange(table.height)
    if holdout > 0:
        pool, _ = train_test_split(
            pool,
            test_size=holdout,
            random_state=seed,
            stratify=_holdout_strata(table, strata, holdout),
        )
    return pool


def _stratified_order(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A rank 0..n-1 per patient such that every prefix of the ranking holds each stratum in
    about its share: patients are shuffled within their stratum and ranked by their quantile
    there, (position + u) / stratum size with u uniform, ties broken at random."""
    quantile = np.empty(len(strata))
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        quantile[rng.permutation(members)] = (
            np.arange(members.size) + rng.random(members.size)
        ) / members.size
    ranks = np.empty(len(strata), dtype=np.int64)
    ranks[np.argsort(quantile, kind="stable")] = np.arange(len(strata))
    return ranks


def training_subset(
    folds: pl.DataFrame, fraction: float, valid_fold: int | None = None
) -> pl.DataFrame:
    """The patients kept for training at `fraction` of the labels: of the pool (every patient
    not held out and, with `valid_fold`, not in that fold), the first round(fraction x pool)
    by `train_order`, at least one. Subsets are nested (5 % inside 10 % ...) and the same for
    every run that shares the folds, so settings compare on the same patients; validation
    and holdout patients are never dropped.

    Raises:
        ValueError: fraction outside (0, 1], or folds without `train_order` (an older run).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction must be in (0, 1], not {fraction}")
    pool = folds.filter(pl.col("fold") >= 0)
    if valid_fold is not None:
        pool = pool.filter(pl.col("fold") != valid_fold)
    if fraction == 1.0:
        return pool.select("patient_id")
    if "train_order" not in folds.columns:
        raise ValueError(
            "folds.csv has no train_order column (written before train_fraction existed): "
            "start the run in a new output_dir, or delete its folds.csv"
        )
    keep = max(1, round(fraction * pool.height))
    return pool.sort("train_order").head(keep).select("patient_id")


def _strata(table: pl.DataFrame) -> np.ndarray:
    """A coarse injury pattern per patient: any injury, and the worst organ grade."""
    worst = np.max(
        np.stack([table[f"{t}_class"].to_numpy() for t in ("kidney", "liver", "spleen")]), axis=0
    )
    extravasation = table["extravasation_class"].to_numpy()
    return np.array(
        [f"{a}{w}{e}" for a, w, e in zip(table["any_injury"], worst, extravasation, strict=True)]
    )


def _holdout_strata(table: pl.DataFrame, strata: np.ndarray, holdout: float) -> np.ndarray | None:
    """The finest stratification the held-out split can honour: the injury pattern, else
    any-injury alone, else none (a split needs at least one patient per stratum on each side)."""
    n_test = math.ceil(holdout * len(strata))
    n_train = len(strata) - n_test
    for candidate in (strata, table["any_injury"].cast(pl.Utf8).to_numpy()):
        merged = _mergeable(candidate, 2)
        if len(np.unique(merged)) <= min(n_test, n_train):
            return merged
    return None


def _mergeable(strata: np.ndarray, n_splits: int) -> np.ndarray:
    """Strata too rare to split n ways are merged into one "rare" stratum (then into the
    most common one if still too rare), so stratification never fails on small data."""
    values, counts = np.unique(strata, return_counts=True)
    rare = set(values[counts < n_splits])
    merged = np.array(["rare" if s in rare else s for s in strata])
    values, counts = np.unique(merged, return_counts=True)
    if "rare" in values and counts[list(values).index("rare")] < n_splits:
        merged[merged == "rare"] = values[np.argmax(counts)]
    return merged


@dataclass(frozen=True)
class AugmentConfig:
    """Applied identically to every slice of a volume."""

    hflip_prob: float = 0.0  # left-right flips put the liver on the spleen's side: off
    vflip_prob: float = 0.0  # front-back (the official code flips all three axes)
    zflip_prob: float = 0.0  # head-feet: the slice order reversed (slice labels with it)
    affine_prob: float = 0.5  # small shift, scale, rotation
    brightness_contrast_prob: float = 0.5
    coarse_dropout_prob: float = 0.3


def build_transform(image_size: int, train: bool, augment: AugmentConfig) -> Any:
    """The crop, and in training the augmentation, of an (H, W, slices * channels) uint8
    image: called as `transform(image=...)["image"]`, seeded with `set_random_seed`.

    Evaluation (and training with every augmentation off) is a plain crop, `SquareCrop`,
    which needs neither albumentations nor OpenCV: inference runs where they are not
    installed (a lean GPU image). Augmented training uses albumentations."""
    augmenting = train and any(
        p > 0
        for p in (
            augment.hflip_prob,
            augment.vflip_prob,
            augment.affine_prob,
            augment.brightness_contrast_prob,
            augment.coarse_dropout_prob,
        )
    )
    if not augmenting:
        return SquareCrop(image_size, random=train)
    import albumentations as A

    # a transform is only added when it can fire: each one draws from the random stream
    vflip = [A.VerticalFlip(p=augment.vflip_prob)] if augment.vflip_prob > 0 else []
    return A.Compose(
        [
            A.HorizontalFlip(p=augment.hflip_prob),
            *vflip,
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.06, 0.06),
                rotate=(-10, 10),
                p=augment.affine_prob,
            ),
            A.RandomBrightnessContrast(0.1, 0.1, p=augment.brightness_contrast_prob),
            A.CoarseDropout(
                num_holes_range=(1, 4),
                hole_height_range=(0.05, 0.15),
                hole_width_range=(0.05, 0.15),
                p=augment.coarse_dropout_prob,
            ),
            A.RandomCrop(image_size, image_size, pad_if_needed=True),
        ]
    )


class SquareCrop:
    """A `size` x `size` crop of an (H, W, C) image, padded with zeros (centred) where the
    image is smaller: the centre (albumentations' `CenterCrop(pad_if_needed=True)`, tested to
    give the same pixels), or with `random` a uniformly drawn position (its `RandomCrop`)."""

    def __init__(self, size: int, random: bool = False) -> None:
        self.size, self.random = size, random
        self.rng = np.random.default_rng(0)

    def set_random_seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, *, image: np.ndarray) -> dict[str, np.ndarray]:
        height, width = image.shape[:2]
        pad_y, pad_x = max(self.size - height, 0), max(self.size - width, 0)
        if pad_y or pad_x:
            pads = [(pad_y // 2, pad_y - pad_y // 2), (pad_x // 2, pad_x - pad_x // 2)]
            image = np.pad(image, pads + [(0, 0)] * (image.ndim - 2))
            height, width = image.shape[:2]
        if self.random:
            y0 = int(self.rng.integers(height - self.size + 1))
            x0 = int(self.rng.integers(width - self.size + 1))
        else:
            y0, x0 = (height - self.size) // 2, (width - self.size) // 2
        return {"image": image[y0 : y0 + self.size, x0 : x0 + self.size]}


def slice_indices(
    n_available: int, n_slices: int, rng: np.random.Generator | None = None
) -> np.ndarray:
    """All slices (n_slices 0), or n_slices evenly spaced over the volume, each jittered within
    its own interval when `rng` is given (training)."""
    if n_slices <= 0 or (n_slices == n_available and rng is None):
        return np.arange(n_available)
    edges = np.linspace(0, n_available, n_slices + 1)
    if rng is None:
        positions = (edges[:-1] + edges[1:]) / 2
    else:
        positions = rng.uniform(edges[:-1], edges[1:])
    return np.clip(np.floor(positions).astype(np.int64), 0, n_available - 1)


def slice_stack(volume: np.ndarray, indices: np.ndarray, neighbours: int = 0) -> np.ndarray:
    """The slices `indices` of a (slices, C, H, W) volume as (len(indices), (2k+1) C, H, W):
    with `neighbours` k > 0 (2.5D input), each slice with the k slices on either side as extra
    channels, ordered from the lowest slice up (repeating the edge slice at the volume's ends),
    each neighbour's C windows together."""
    if neighbours <= 0:
        return np.asarray(volume[indices])
    offsets = np.arange(-neighbours, neighbours + 1)
    around = np.clip(indices[:, None] + offsets[None, :], 0, volume.shape[0] - 1)
    stack = np.asarray(volume[around.ravel()])  # (S * (2k+1), C, H, W)
    return stack.reshape(len(indices), len(offsets) * volume.shape[1], *volume.shape[2:])


class SeriesDataset(Dataset):
    """Item i: {"image": uint8 (S, C, h, w), "labels": int64 (n_targets,), "any_injury": float,
    "patient_id": int, "series_id": int}, plus "slice_labels": float (S, n_slice_targets) with
    -1 where unknown when `slice_targets` are given (the table needs their `slices_<target>`
    columns). With `neighbours` k, each slice comes with k slices on either side as extra
    channels (2.5D, `slice_stack`): C becomes (2k+1) x the cache's channels. Random draws come
    from (seed, epoch, index)."""

    def __init__(
        self,
        table: pl.DataFrame,
        targets: Sequence[str],
        n_slices: int = 0,
        image_size: int = 256,
        train: bool = False,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        slice_targets: Sequence[str] = (),
        neighbours: int = 0,
    ) -> None:
        missing = [t for t in slice_targets if f"slices_{t}" not in table.columns]
        if missing:
            raise ValueError(f"slice_targets {missing} need series_table(..., image_labels=...)")
        self.rows = table.to_dicts()
        self.targets = tuple(targets)
        self.slice_targets = tuple(slice_targets)
        self.n_slices, self.image_size, self.train = n_slices, image_size, train
        self.augment = augment or AugmentConfig()
        self.transform = build_transform(image_size, train, self.augment)
        self.seed, self.epoch = seed, 0
        self.neighbours = neighbours

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = self.rows[index]
        rng = np.random.default_rng([self.seed, self.epoch, index]) if self.train else None
        volume = np.load(row["path"], mmap_mode="r")
        if volume.ndim == 3:
            volume = volume[:, None]
        n_available = volume.shape[0]
        indices = slice_indices(n_available, self.n_slices, rng)
        zflip = self.augment.zflip_prob > 0 and rng is not None
        zflip = zflip and bool(rng.random() < self.augment.zflip_prob)  # type: ignore[union-attr]
        if zflip:
            indices = indices[::-1].copy()
        volume = slice_stack(volume, indices, self.neighbours)
        n_slices, channels, height, width = volume.shape
        if zflip and self.neighbours:  # the neighbour channels run head to feet too
            blocks = 2 * self.neighbours + 1
            volume = volume.reshape(n_slices, blocks, channels // blocks, height, width)
            volume = volume[:, ::-1].reshape(n_slices, channels, height, width)
        image = volume.reshape(n_slices * channels, height, width).transpose(1, 2, 0)
        if rng is not None:
            # albumentations draws from its own generator: seed it from ours, per item
            self.transform.set_random_seed(int(rng.integers(2**31)))
        image = self.transform(image=np.ascontiguousarray(image))["image"]
        stack = image.transpose(2, 0, 1).reshape(n_slices, channels, *image.shape[:2])
        item = {
            "image": torch.from_numpy(np.ascontiguousarray(stack)),
            "labels": torch.tensor([row[f"{t}_class"] for t in self.targets], dtype=torch.long),
            "any_injury": torch.tensor(float(row["any_injury"])),
            "patient_id": int(row["patient_id"]),
            "series_id": int(row["series_id"]),
        }
        if self.slice_targets:
            columns = []
            for target in self.slice_targets:
                values = row[f"slices_{target}"]
                if values is None:
                    columns.append(np.full(n_slices, -1.0))
                elif len(values) != n_available:
                    raise ValueError(
                        f"series {row['series_id']}: {len(values)} slice labels for a cached "
                        f"volume of {n_available} slices"
                    )
                else:
                    columns.append(np.asarray(values, dtype=np.float64)[indices])
            item["slice_labels"] = torch.tensor(np.stack(columns, axis=1), dtype=torch.float32)
        return item
