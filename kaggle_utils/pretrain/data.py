"""Unlabeled volumes for 2D-VoCo: cached uint8 arrays -> augmented volumes -> base and random
crops with their position labels.

Every random draw of a sample (augmentation, crop positions) comes from a generator seeded by
(seed, epoch, index), and the order of an epoch from (seed, epoch): a run gives the same
batches whatever the number of loader workers, and a resumed run continues exactly where the
checkpoint left off.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch.utils.data import Dataset

from kaggle_utils.cache.preprocess import METADATA_FILE
from kaggle_utils.pretrain.crops import LabelMode, cut_crops, sample_voco_crops


@dataclass(frozen=True)
class AugmentConfig:
    """Volume-level augmentation, the same for every slice of a volume.

    Flips and rot90 move organs away from their usual place, which is the very prior VoCo
    learns, so they are off by default; intensity jitter is on.
    """

    flip_prob: float = 0.0  # per axis (left-right, up-down)
    rot90_prob: float = 0.0  # rotate by 90, 180 or 270 degrees
    intensity: float = 0.1  # scale in [1 - a, 1 + a] and shift in [-a, a] (of the 0..1 range)


def volume_files(folders: Sequence[Path]) -> list[Path]:
    """Every `.npy` volume in the given cache folders, sorted (stable across runs). A name is
    a series (or extra source), so one found in two folders (overlapping caches) is the same
    volume cached twice: it is used once, from the first folder, with a warning."""
    files: dict[str, Path] = {}
    repeated: list[str] = []
    for folder in folders:
        for path in sorted(Path(folder).glob("*.npy")):
            if path.name in files:
                repeated.append(path.name)
            else:
                files[path.name] = path
    if repeated:
        warnings.warn(
            f"{len(repeated)} volumes are in more than one folder (e.g. {repeated[0]}): each "
            "is used once, from the first folder",
            stacklevel=2,
        )
    return list(files.values())


def volume_table(files: Sequence[Path]) -> pl.DataFrame:
    """One row per volume file: `volume` (its name), `series_id` and `patient_id` from the
    metadata of the notebook-01 cache it lies in (`<cache>/<shape>/<series_id>.npy`), null
    for a volume of no such cache (extra unlabeled CT)."""
    known: dict[tuple[Path, str], tuple[int, int]] = {}
    for cache in sorted({Path(f).parent.parent for f in files}):
        if (cache / METADATA_FILE).is_file():
            metadata = pl.read_parquet(cache / METADATA_FILE, columns=["series_id", "patient_id"])
            for series_id, patient_id in metadata.iter_rows():
                known[(cache, str(series_id))] = (int(series_id), int(patient_id))
    rows = [known.get((Path(f).parent.parent, Path(f).stem), (None, None)) for f in files]
    return pl.DataFrame(
        {
            "volume": [Path(f).name for f in files],
            "series_id": [r[0] for r in rows],
            "patient_id": [r[1] for r in rows],
        },
        schema={"volume": pl.String, "series_id": pl.Int64, "patient_id": pl.Int64},
    )


def exclude_patient_volumes(
    files: Sequence[Path], patients: Sequence[int]
) -> tuple[list[Path], pl.DataFrame]:
    """`files` without the volumes of `patients` (held-out test patients), and the table of
    the volumes kept (`volume_table`).

    Raises:
        ValueError: patients to leave out, but no volume could be traced to a patient (no
            notebook-01 metadata beside the volumes): nothing could be left out safely.
    """
    table = volume_table(files)
    if not patients:
        return list(files), table
    if table["patient_id"].is_null().all():
        raise ValueError(
            f"{len(patients)} patients are to be left out of pretraining, but none of the "
            f"{len(files)} volumes could be traced to a patient (no {METADATA_FILE} in the "
            "folder above each volume folder): pretrain on notebook 01's cache"
        )
    keep = ~table["patient_id"].is_in(list(patients)).fill_null(False)
    kept = [f for f, k in zip(files, keep, strict=True) if k]
    return kept, table.filter(keep)


def split_probe_volumes(
    files: Sequence[Path], n_probe: int, seed: int
) -> tuple[list[Path], list[Path]]:
    """Hold out `n_probe` volumes (at most a fifth, at least one training volume left) for
    the position probe; the rest train. Deterministic for a seed."""
    files = sorted(files)
    if not files:
        raise ValueError("no volumes to pretrain on: run notebook 01 first (or check cache_dir)")
    n_probe = max(0, min(n_probe, len(files) // 5))
    order = np.random.default_rng(seed).permutation(len(files))
    probe = sorted(files[i] for i in order[:n_probe])
    train = sorted(files[i] for i in order[n_probe:])
    return train, probe


def load_volume(path: Path) -> np.ndarray:
    """A cached volume as (slices, channels, H, W) uint8."""
    volume = np.load(path)
    if volume.ndim == 3:
        volume = volume[:, None]
    if volume.ndim != 4 or volume.dtype != np.uint8:
        raise ValueError(f"{path}: expected uint8 (S, H, W) or (S, C, H, W), got {volume.shape}")
    return volume


def augment_volume(
    volume: np.ndarray, config: AugmentConfig, rng: np.random.Generator
) -> np.ndarray:
    """Flip/rotate the in-plane axes and jitter intensity of a (S, C, H, W) uint8 volume."""
    if config.flip_prob and rng.random() < config.flip_prob:
        volume = volume[..., ::-1]
    if config.flip_prob and rng.random() < config.flip_prob:
        volume = volume[..., ::-1, :]
    if config.rot90_prob and rng.random() < config.rot90_prob:
        volume = np.rot90(volume, k=int(rng.integers(1, 4)), axes=(-2, -1))
    if config.intensity:
        scale = 1.0 + rng.uniform(-config.intensity, config.intensity)
        shift = 255.0 * rng.uniform(-config.intensity, config.intensity)
        jittered = volume.astype(np.float32) * scale + shift
        volume = np.clip(np.rint(jittered), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(volume)


class VoCoCropDataset(Dataset):
    """Sample i: the crops of volume i for the current epoch.

    Returns a dict: "random" (R, S, C, h, w) uint8, "base" (K, S, C, h, w) uint8,
    "labels" (R, K) float32, "index" (int).
    """

    def __init__(
        self,
        files: Sequence[Path],
        grid: int = 3,
        n_random: int = 2,
        crop_size: int | None = 64,
        label: LabelMode = "area",
        augment: AugmentConfig | None = None,
        seed: int = 0,
    ) -> None:
        if not files:
            raise ValueError("VoCoCropDataset needs at least one volume file")
        self.files = list(files)
        self.grid, self.n_random, self.crop_size, self.label = grid, n_random, crop_size, label
        self.augment = augment or AugmentConfig()
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | int]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        volume = augment_volume(load_volume(self.files[index]), self.augment, rng)
        crops = sample_voco_crops(
            volume.shape[-2:], self.grid, self.n_random, rng, self.label, self.crop_size
        )
        images = torch.from_numpy(volume)
        return {
            "random": cut_crops(images, crops.random_boxes),
            "base": cut_crops(images, crops.base_boxes),
            "labels": torch.from_numpy(crops.labels.astype(np.float32)),
            "index": index,
        }
