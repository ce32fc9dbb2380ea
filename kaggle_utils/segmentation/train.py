"""Organ segmentation: the competition's `segmentations/<series_id>.nii` aligned to the cached
volumes, a small 3D U-Net (MONAI) trained on them, and every cached series' organ boxes and
per-slice organ areas. Notebook 06 calls `run_segmentation(config)`.

Alignment never guesses axes. A mask is brought to the layout of `dicom.load_series` (slices
in ascending z, rows anterior to posterior, columns from the patient's right to left) through
its NIfTI affine (`sources.nifti_to_axial`); it is then checked against the series' record
(notebook 01's metadata: the decoded grid's size and spacing, the slice positions) and matched
to the decoded slices by position along the slice normal, so a series whose files were
reordered, flipped or transposed by `load_series`, or whose duplicates were dropped, still
gets its own mask. Cut and resampled with the body box of the record, exactly as the volumes
were (`labels_to_shape`), the mask lines up with every cache shape.

What a run writes to `output_dir`:
    config.json          the settings
    prepared/<id>.npz    each segmented series' image and labels at `input_shape` (reused)
    checkpoint.pt        model, optimizer, scaler, scheduler, epoch, RNG states (every epoch)
    log.csv              one row per epoch: loss, held-out Dice per organ, seconds
    model.pt             the final model's state dict; model.json its settings
    dice.json            held-out Dice per organ (the final model)
    organs/<id>.json     one predicted series: its organ rows (written last: marks it done)
    organs.parquet       every series and organ: box, voxels, area per slice
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn

from kaggle_utils.cache.preprocess import CacheDirs, load_cached_volume, load_metadata, shape_name
from kaggle_utils.cache.volume import crop_to_box, resample_volume
from kaggle_utils.common import paths, runtime
from kaggle_utils.common.config import JsonConfig
from kaggle_utils.common.engine import (
    OptimizerStep,
    load_checkpoint,
    parameter_groups,
    save_checkpoint,
)
from kaggle_utils.common.io import (
    append_csv,
    atomic_path,
    save_torch_atomic,
    truncate_csv,
    write_parquet_atomic,
    write_text_atomic,
)
from kaggle_utils.common.progress import progress_bar

# The competition's label values (SPEC sec. 2); 0 is background.
ORGAN_LABELS: dict[str, int] = {
    "liver": 1,
    "spleen": 2,
    "kidney_left": 3,
    "kidney_right": 4,
    "bowel": 5,
}
N_CLASSES = len(ORGAN_LABELS) + 1
# The organ of each fine-tuning target whose crop it sees (both kidneys: one box around them).
TARGET_ORGANS: dict[str, tuple[str, ...]] = {
    "liver": ("liver",),
    "spleen": ("spleen",),
    "kidney": ("kidney_left", "kidney_right"),
    "bowel": ("bowel",),
}
SEGMENTATIONS_DIR = "segmentations"
LOG_COLUMNS = ("epoch", "loss", *(f"dice_{o}" for o in ORGAN_LABELS), "seconds")
Box = tuple[int, int, int, int, int, int]  # z0, z1, y0, y1, x0, x1 (end exclusive)


class MaskAlignmentError(ValueError):
    """A mask that does not fit its series (other grid, spacing or z range); says which."""


# --------------------------------------------------------------------------- masks


@dataclass(frozen=True)
class OrganMask:
    """A segmentation file in the `load_series` layout."""

    labels: np.ndarray  # (slices, H, W) uint8 label values
    z_positions: np.ndarray  # (slices,) mm along the slice normal, ascending
    spacing: tuple[float, float, float]  # (z, y, x) mm
    path: Path


# TotalSegmentator's (v2) ids of the same organs, e.g. for public masks or
# tests/data/real-ct: 1 spleen, 2 right kidney, 3 left kidney, 5 liver, 18-20 small bowel,
# duodenum and colon.
TOTALSEGMENTATOR_TO_COMPETITION: dict[int, int] = {5: 1, 1: 2, 3: 3, 2: 4, 18: 5, 19: 5, 20: 5}


def load_mask(path: str | Path, label_map: Mapping[int, int] | None = None) -> OrganMask:
    """Read a segmentation NIfTI and orient it through its affine (`sources.nifti_to_axial`).

    `label_map` maps another label set's values to the competition's (unlisted values become
    background), e.g. `TOTALSEGMENTATOR_TO_COMPETITION`.

    Raises:
        FileNotFoundError: no such file.
        MaskAlignmentError: unreadable, not 3D, or values that are not the competition's
            labels (0-5).
    """
    import nibabel as nib

    from kaggle_utils.cache.sources import nifti_to_axial, slice_positions

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: segmentation file not found")
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj)
    except Exception as error:  # nibabel and gzip raise many types for a broken file
        raise MaskAlignmentError(f"{path}: not a readable NIfTI file ({error})") from error
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MaskAlignmentError(f"{path}: expected a 3D label map, got shape {data.shape}")
    if label_map is not None:
        lookup = np.zeros(int(data.max()) + 1, dtype=np.uint8)
        for source, target in label_map.items():
            if source < lookup.size:
                lookup[source] = target
        data = lookup[np.rint(data).astype(np.int64).clip(0)]
    values = np.unique(data)
    if values.min() < 0 or values.max() >= N_CLASSES or not np.all(values == np.round(values)):
        raise MaskAlignmentError(
            f"{path}: label values {values[:10].tolist()} are not the competition's 0-5"
        )
    labels, canonical_affine = nifti_to_axial(data.astype(np.uint8), image.affine)
    zooms = np.sqrt((canonical_affine[:3, :3] ** 2).sum(axis=0))
    return OrganMask(
        labels=labels,
        z_positions=slice_positions(canonical_affine, labels.shape[0]),
        spacing=(float(zooms[2]), float(zooms[1]), float(zooms[0])),
        path=path,
    )


def align_mask(mask: OrganMask, record: Mapping[str, Any]) -> np.ndarray:
    """The mask on the decoded series' grid (`record`: its notebook 01 metadata row).

    In plane the mask must be drawn on the series' own pixel grid (same size and spacing once
    both are in the `load_series` layout). Along z every decoded slice takes the mask slice
    at its position (nearest within half a slice; none: background), so dropped duplicates or
    resampled gaps do not shift the organs. Without positions the slice counts must agree.

    Raises:
        MaskAlignmentError: another grid, spacing or z range than the series'.
    """
    n, height, width = int(record["n_slices"]), int(record["height"]), int(record["width"])
    name = f"{mask.path.name} (series {record.get('series_id')})"
    if mask.labels.shape[1:] != (height, width):
        raise MaskAlignmentError(
            f"{name}: the mask's slices are {mask.labels.shape[1:]} in the patient-based "
            f"layout, the series' {(height, width)}: not drawn on this series' pixel grid"
        )
    for axis, key in ((1, "spacing_y"), (2, "spacing_x")):
        expected = record.get(key)
        if expected and abs(mask.spacing[axis] - expected) > 0.01 * expected:
            raise MaskAlignmentError(
                f"{name}: pixel spacing {mask.spacing[axis]:.4f} mm against the series' "
                f"{expected:.4f} mm ({key})"
            )
    z_first, z_last = record.get("z_first"), record.get("z_last")
    if z_first is None or z_last is None or n < 2:
        if mask.labels.shape[0] != n:
            raise MaskAlignmentError(
                f"{name}: {mask.labels.shape[0]} mask slices for {n} decoded slices, and the "
                "series has no slice positions to match them by"
            )
        return mask.labels
    series_z = np.linspace(float(z_first), float(z_last), n)
    nearest = np.abs(series_z[:, None] - mask.z_positions[None, :]).argmin(axis=1)
    distance = np.abs(mask.z_positions[nearest] - series_z)
    tolerance = 0.5 * max(mask.spacing[0], float(record.get("spacing_z") or 0.0)) + 1e-3
    inside = distance <= tolerance
    if not inside.any():
        raise MaskAlignmentError(
            f"{name}: the mask spans z {mask.z_positions[0]:.1f}..{mask.z_positions[-1]:.1f} "
            f"mm, the series {z_first:.1f}..{z_last:.1f} mm: they do not overlap"
        )
    aligned = mask.labels[nearest]
    aligned[~inside] = 0
    return aligned


def labels_to_shape(
    labels: np.ndarray, body_bbox: Sequence[int], shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Labels on the decoded series' grid to a cache shape, as notebook 01 made the volumes:
    the squared body box cut (padded with background), then each label's indicator resampled
    like the image (area averaging, linear interpolation; `volume.resample_volume`).

    Returns the labels (the class with the largest share of each cached voxel) and the share
    of every class, (N_CLASSES, *shape) float32: what soft targets and organ areas use.
    """
    box = tuple(int(v) for v in body_bbox) if len(body_bbox) == 4 else None
    height, width = labels.shape[1:]
    region = crop_to_box(labels, box or (0, height, 0, width), square=box is not None, fill=0)
    shares = np.stack(
        [resample_volume((region == value).astype(np.float32), shape) for value in range(N_CLASSES)]
    )
    return shares.argmax(axis=0).astype(np.uint8), shares


def dice_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    """Dice of each organ between two label maps; None where the organ is in neither."""
    scores: dict[str, float | None] = {}
    for organ, value in ORGAN_LABELS.items():
        p, t = predicted == value, truth == value
        total = int(p.sum()) + int(t.sum())
        scores[organ] = None if total == 0 else 2.0 * int((p & t).sum()) / total
    return scores


# --------------------------------------------------------------------------- organ boxes


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a boolean mask (stray voxels would stretch a
    box across the abdomen)."""
    from scipy import ndimage

    components, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == int(sizes.argmax()) + 1


def bounding_box(mask: np.ndarray) -> Box | None:
    """(z0, z1, y0, y1, x0, x1) of a boolean (slices, H, W) mask, ends exclusive; None if empty."""
    if not mask.any():
        return None
    box: list[int] = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box += [int(hits[0]), int(hits[-1]) + 1]
    return tuple(box)  # type: ignore[return-value]


def organ_rows(labels: np.ndarray, series_id: int, patient_id: int) -> list[dict[str, Any]]:
    """One row per organ (the five labels and `kidney`, both kidneys) of a predicted label map:
    the box of its largest component (per kidney) in the map's voxels and as fractions of each
    axis (the same for every cache shape: they share the body box), its voxels, and its area
    on every slice as a fraction of the slice."""
    depth, height, width = labels.shape
    kept = {organ: largest_component(labels == value) for organ, value in ORGAN_LABELS.items()}
    kept["kidney"] = kept["kidney_left"] | kept["kidney_right"]
    rows = []
    for organ in (*ORGAN_LABELS, "kidney"):
        mask = kept[organ]
        box = bounding_box(mask)
        scale = (depth, depth, height, height, width, width)
        rows.append(
            {
                "series_id": int(series_id),
                "patient_id": int(patient_id),
                "organ": organ,
                "found": box is not None,
                "voxels": int(mask.sum()),
                "box": list(box) if box else None,
                "box_fraction": [v / s for v, s in zip(box, scale, strict=True)] if box else None,
                "area": (mask.sum(axis=(1, 2)) / float(height * width)).round(5).tolist(),
                "grid": [depth, height, width],
            }
        )
    return rows


def box_in_shape(box_fraction: Sequence[float], shape: Sequence[int]) -> Box:
    """A fractional box in the voxels of a cache shape (outwards: nothing of the organ lost)."""
    out = []
    for index, size in enumerate((shape[0], shape[0], shape[1], shape[1], shape[2], shape[2])):
        value = box_fraction[index] * size
        out.append(int(np.floor(value + 1e-6)) if index % 2 == 0 else int(np.ceil(value - 1e-6)))
    return tuple(out)  # type: ignore[return-value]


def area_at_depth(area: Sequence[float], depth: int) -> np.ndarray:
    """Per-slice organ areas at another number of slices (the fine-tuning cache's), averaged
    or interpolated as the volumes were resampled."""
    values = np.asarray(area, dtype=np.float32)[:, None, None]
    return resample_volume(values, (depth, 1, 1))[:, 0, 0]


# --------------------------------------------------------------------------- the model


@dataclass
class SegmentationConfig(JsonConfig):
    """A 3D U-Net on the segmented series, then boxes for every cached series. Defaults are
    the real data's: notebook 01's 96 x 256 x 256 cache seen at 96 x 128 x 128 (the top
    solutions segmented at about 128^3)."""

    data_root: str = ""  # the competition folder (its segmentations/)
    cache_dir: CacheDirs = "outputs/cache"  # notebook 01's cache(s): train and test series
    output_dir: str = "outputs/segmentation"
    shape: list[int] = field(default_factory=lambda: [96, 256, 256])  # the cache read
    input_shape: list[int] = field(default_factory=lambda: [96, 128, 128])  # what the model sees
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])  # U-Net widths
    num_res_units: int = 1
    epochs: int = 100
    batch_size: int = 2
    lr: float = 1e-3
    weight_decay: float = 1e-5
    # True: norm scales and shifts and biases are decayed too (every loop here did, before);
    # default: weights only, as timm's param_groups_weight_decay
    decay_norm_and_bias: bool = False
    holdout: float = 0.2  # share of segmented patients held out for Dice
    intensity: float = 0.1  # random brightness/contrast scale (augmentation)
    precision: str = "auto"
    seed: int = 0
    resume: bool = True
    predict: bool = True  # boxes for every cached series after training
    limit: int = 0  # segmented series used, 0 = all (tests)

    def __post_init__(self) -> None:
        for name in ("shape", "input_shape"):
            value = getattr(self, name)
            if len(value) != 3 or min(value) < 1:
                raise ValueError(f"{name} must be three positive ints, not {value}")
        if not 0.0 < self.holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1), not {self.holdout}")
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        # U-Net halves every axis once per level below the top
        factor = 2 ** (len(self.channels) - 1)
        if any(s % factor for s in self.input_shape):
            raise ValueError(
                f"input_shape {self.input_shape} must be divisible by {factor} on every axis "
                f"for {len(self.channels)} U-Net levels"
            )


def build_model(config: SegmentationConfig, in_channels: int) -> nn.Module:
    """MONAI's 3D U-Net (residual units, instance norm), one output per class."""
    from monai.networks.nets import UNet

    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=N_CLASSES,
        channels=tuple(config.channels),
        strides=(2,) * (len(config.channels) - 1),
        num_res_units=config.num_res_units,
        norm="instance",
    )


def image_tensor(volume: np.ndarray, input_shape: Sequence[int]) -> np.ndarray:
    """A cached uint8 volume, (slices, H, W) or (slices, C, H, W), as float32 (C, *input_shape)
    in [0, 1], resampled as notebook 01 resamples."""
    stack = volume[:, None] if volume.ndim == 3 else volume
    channels = [
        resample_volume(np.asarray(stack[:, c], dtype=np.float32), input_shape)
        for c in range(stack.shape[1])
    ]
    return np.stack(channels) / np.float32(255.0)


@dataclass(frozen=True)
class Example:
    series_id: int
    patient_id: int
    image: np.ndarray  # (C, *input_shape) float32
    labels: np.ndarray  # input_shape uint8


def segmented_series(data_root: str | Path, metadata: pl.DataFrame) -> pl.DataFrame:
    """The cached, decoded series that have a file in `segmentations/`, with its path."""
    folder = Path(data_root) / SEGMENTATIONS_DIR
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder} not found: the competition folder (data_root) holds segmentations/ "
            "with the organ masks of about 206 training series"
        )
    paths = {int(p.name.split(".")[0]): str(p) for p in folder.glob("*.nii*")}
    table = metadata.filter(pl.col("status") == "ok", pl.col("series_id").is_in(list(paths)))
    return table.with_columns(
        pl.col("series_id").replace_strict(paths, return_dtype=pl.String).alias("mask_path")
    )


def prepare_examples(
    table: pl.DataFrame, config: SegmentationConfig, progress: bool = True
) -> tuple[list[Example], list[str]]:
    """Each segmented series' image and aligned labels at `input_shape`, reusing
    `prepared/<id>.npz`. A mask that does not fit its series is skipped and reported."""
    folder = Path(config.output_dir) / "prepared"
    folder.mkdir(parents=True, exist_ok=True)
    examples, problems = [], []
    for record in progress_bar(table.to_dicts(), desc="masks", unit="series", disable=not progress):
        sid = int(record["series_id"])
        path = folder / f"{sid}.npz"
        if not path.is_file():
            try:
                mask = align_mask(load_mask(record["mask_path"]), record)
            except (MaskAlignmentError, FileNotFoundError) as error:
                problems.append(str(error))
                continue
            labels, _ = labels_to_shape(mask, record["body_bbox"], config.input_shape)
            volume = load_cached_volume(Path(record["cache_dir"]), config.shape, sid)
            image = image_tensor(volume, config.input_shape)
            with atomic_path(path) as tmp, open(tmp, "wb") as handle:
                np.savez(handle, image=image.astype(np.float16), labels=labels)
        with np.load(path) as data:
            image, labels = data["image"].astype(np.float32), data["labels"]
        examples.append(Example(sid, int(record["patient_id"]), image, labels))
    return examples, problems


def split_holdout(
    examples: Sequence[Example], holdout: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Train and held-out examples, split by patient (at least one of each when possible)."""
    patients = sorted({e.patient_id for e in examples})
    order = np.random.default_rng(seed).permutation(len(patients))
    n_held = min(max(1, round(holdout * len(patients))), len(patients) - 1)
    held = {patients[i] for i in order[:n_held]} if len(patients) > 1 else set()
    return [e for e in examples if e.patient_id not in held], [
        e for e in examples if e.patient_id in held
    ]


def _batch(examples: Sequence[Example], rng: np.random.Generator, intensity: float) -> tuple:
    images = np.stack([e.image for e in examples])
    if intensity > 0:  # brightness and contrast per volume
        scale = 1.0 + rng.uniform(-intensity, intensity, (len(examples), 1, 1, 1, 1))
        shift = rng.uniform(-intensity, intensity, (len(examples), 1, 1, 1, 1))
        images = np.clip(images * scale + shift, 0.0, 1.0)
    labels = np.stack([e.labels for e in examples]).astype(np.int64)
    return torch.from_numpy(images.astype(np.float32)), torch.from_numpy(labels)[:, None]


@torch.no_grad()
def predict_labels(model: nn.Module, images: Tensor, precision: runtime.Precision) -> np.ndarray:
    """(B, C, D, H, W) images -> (B, D, H, W) uint8 labels (argmax of the classes)."""
    model.eval()
    with precision.autocast():
        logits = model(images)
    return logits.argmax(dim=1).to(torch.uint8).cpu().numpy()


def predict_volume(
    model: nn.Module, volume: np.ndarray, config: SegmentationConfig
) -> tuple[np.ndarray, np.ndarray]:
    """A cached volume at `input_shape` (first window, float in [0, 1]) and its predicted
    labels (uint8), on the model's device."""
    device = next(model.parameters()).device
    precision = runtime.resolve_precision(config.precision, device)
    image = image_tensor(volume, config.input_shape)
    labels = predict_labels(model, torch.from_numpy(image[None]).to(device), precision)[0]
    return image[0], labels


def evaluate(
    model: nn.Module, examples: Sequence[Example], device: torch.device, precision: Any
) -> dict[str, float | None]:
    """Mean Dice per organ over the examples (series where an organ is in neither map skip)."""
    per_organ: dict[str, list[float]] = {organ: [] for organ in ORGAN_LABELS}
    for example in examples:
        image = torch.from_numpy(example.image[None]).to(device)
        predicted = predict_labels(model, image, precision)[0]
        for organ, score in dice_scores(predicted, example.labels).items():
            if score is not None:
                per_organ[organ].append(score)
    return {o: (float(np.mean(v)) if v else None) for o, v in per_organ.items()}


@dataclass
class SegmentationResult:
    output_dir: Path
    epochs_done: int
    dice: dict[str, float | None]  # held-out Dice per organ, final model
    n_train: int
    n_holdout: int
    problems: list[str]  # masks that did not fit their series
    organs: pl.DataFrame | None  # organs.parquet (None without `predict`)


def train(
    config: SegmentationConfig,
    train_set: Sequence[Example],
    holdout_set: Sequence[Example],
    progress: bool = True,
) -> tuple[nn.Module, int]:
    """Train (or resume from `checkpoint.pt`) for `config.epochs`; return the model and the
    epochs done. Loss: Dice + cross-entropy (MONAI's DiceCELoss), AdamW, cosine schedule."""
    from monai.losses import DiceCELoss

    out = Path(config.output_dir)
    device = runtime.device_for(distributed=False)
    precision = runtime.resolve_precision(config.precision, device)
    runtime.seed_everything(config.seed)
    model = build_model(config, train_set[0].image.shape[0]).to(device)
    groups = parameter_groups(
        model.named_parameters(), config.weight_decay, config.decay_norm_and_bias
    )
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    steps_per_epoch = -(-len(train_set) // config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, config.epochs * steps_per_epoch)
    )
    step = OptimizerStep(optimizer, scheduler, precision)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    rng = np.random.default_rng(config.seed)
    start = 0
    checkpoint = out / "checkpoint.pt"
    if config.resume and checkpoint.is_file():
        state = load_checkpoint(checkpoint, {"model": model}, step, device, numpy_rng=rng)
        start = int(state["epoch"])
        truncate_csv(out / "log.csv", start, LOG_COLUMNS, key="epoch")
    bar = progress_bar(
        range(start, config.epochs), desc="segmentation", unit="epoch", disable=not progress
    )
    for epoch in bar:
        began = time.perf_counter()
        model.train()
        losses = []
        order = rng.permutation(len(train_set))
        for first in range(0, len(order), config.batch_size):
            chosen = [train_set[i] for i in order[first : first + config.batch_size]]
            images, labels = _batch(chosen, rng, config.intensity)
            images, labels = images.to(device), labels.to(device)
            with precision.autocast():
                loss = loss_fn(model(images), labels)
            step.backward(loss)
            step.step()
            losses.append(float(loss.detach()))
        dice = evaluate(model, holdout_set, device, precision) if holdout_set else {}
        row = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "seconds": 0.0}
        row |= {f"dice_{o}": dice.get(o) for o in ORGAN_LABELS}
        row["seconds"] = round(time.perf_counter() - began, 2)
        append_csv(out / "log.csv", row, LOG_COLUMNS)
        save_checkpoint(checkpoint, {"model": model}, step, {"epoch": epoch + 1}, numpy_rng=rng)
        scores = [v for v in dice.values() if v is not None]
        dice_text = f"{np.mean(scores):.3f}" if scores else "-"
        bar.set_postfix(loss=f"{row['loss']:.3f}", dice=dice_text, refresh=False)
    bar.close()
    return model, max(start, config.epochs)


def predict_cache(
    model: nn.Module,
    metadata: pl.DataFrame,
    config: SegmentationConfig,
    progress: bool = True,
) -> pl.DataFrame:
    """Organ rows for every decoded series in `metadata` (`organs/<id>.json` per series: a
    rerun skips what is done), gathered into `organs.parquet`."""
    out = Path(config.output_dir)
    folder = out / "organs"
    folder.mkdir(parents=True, exist_ok=True)
    todo = [
        r
        for r in metadata.filter(pl.col("status") == "ok").to_dicts()
        if not (folder / f"{int(r['series_id'])}.json").is_file()
    ]
    for record in progress_bar(todo, desc="organ boxes", unit="series", disable=not progress):
        sid = int(record["series_id"])
        volume = load_cached_volume(Path(record["cache_dir"]), config.shape, sid)
        _, labels = predict_volume(model, volume, config)
        rows = organ_rows(labels, sid, int(record["patient_id"]))
        write_text_atomic(folder / f"{sid}.json", json.dumps(rows))
    return write_organ_table(out)


ORGAN_SCHEMA = {
    "series_id": pl.Int64,
    "patient_id": pl.Int64,
    "organ": pl.String,
    "found": pl.Boolean,
    "voxels": pl.Int64,
    "box": pl.List(pl.Int64),
    "box_fraction": pl.List(pl.Float64),
    "area": pl.List(pl.Float64),
    "grid": pl.List(pl.Int64),
}


def write_organ_table(output_dir: Path) -> pl.DataFrame:
    """Rebuild `organs.parquet` from every `organs/<id>.json`."""
    rows = [
        row
        for path in sorted((Path(output_dir) / "organs").glob("*.json"))
        for row in json.loads(path.read_text())
    ]
    table = pl.DataFrame(rows, schema=ORGAN_SCHEMA).sort("series_id", "organ")
    write_parquet_atomic(table, Path(output_dir) / "organs.parquet")
    return table


def load_model(output_dir: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The trained model of a segmentation run (model.pt and model.json)."""
    output_dir = Path(output_dir)
    settings = json.loads((output_dir / "model.json").read_text())
    config = SegmentationConfig(**settings["config"])
    model = build_model(config, int(settings["in_channels"]))
    state = torch.load(output_dir / "model.pt", map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


def run_segmentation(config: SegmentationConfig, progress: bool = True) -> SegmentationResult:
    """Prepare the segmented series, train (resuming), score the held-out series, predict
    every cached series' organs. The notebook's one call."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    config.to_json(out / "config.json")
    metadata = load_metadata(config.cache_dir)
    table = segmented_series(config.data_root, metadata)
    if config.limit:
        table = table.head(config.limit)
    examples, problems = prepare_examples(table, config, progress)
    if len(examples) < 2:
        raise ValueError(
            f"{len(examples)} usable segmented series in the cache (need at least 2): run "
            f"notebook 01 on the training series with shape {shape_name(config.shape)}"
            + (f"; problems: {problems[:3]}" if problems else "")
        )
    train_set, holdout_set = split_holdout(examples, config.holdout, config.seed)
    model, epochs_done = train(config, train_set, holdout_set, progress)
    device = next(model.parameters()).device
    precision = runtime.resolve_precision(config.precision, device)
    dice = evaluate(model, holdout_set, device, precision)
    save_torch_atomic(model.state_dict(), out / "model.pt")
    settings = {"config": asdict(config), "in_channels": int(train_set[0].image.shape[0])}
    write_text_atomic(out / "model.json", json.dumps(settings, indent=1))
    summary = {
        "dice": dice,
        "holdout_series": [e.series_id for e in holdout_set],
        "n_train": len(train_set),
        "epochs": epochs_done,
    }
    write_text_atomic(out / "dice.json", json.dumps(summary, indent=1))
    organs = predict_cache(model, metadata, config, progress) if config.predict else None
    return SegmentationResult(
        out, epochs_done, dice, len(train_set), len(holdout_set), problems, organs
    )


def organ_table(output_dir: str | Path) -> pl.DataFrame:
    """A finished run's `organs.parquet` (the run folder found in either Kaggle mount layout)."""
    path = (paths.find_input_holding(output_dir, "organs.parquet") or Path(output_dir)) / (
        "organs.parquet"
    )
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run notebook 06 (organ segmentation) first")
    return pl.read_parquet(path)
