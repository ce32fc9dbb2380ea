"""A fine-tuned CNN-BiLSTM's probabilities: per series, per patient, prior-filled to the
submission's 13 columns; fold models read back with weights_only=True."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kaggle_utils.common import runtime
from kaggle_utils.common.backbone import input_normalisation
from kaggle_utils.finetune.data import (
    SeriesDataset,
    label_columns,
)
from kaggle_utils.finetune.model import CNNBiLSTM, build_classifier
from kaggle_utils.metric import ALL_TARGETS, CLASS_WEIGHTS, LABEL_COLUMNS

if TYPE_CHECKING:  # train.py imports this module
    from kaggle_utils.finetune.train import FinetuneConfig

PROBABILITY_COLUMNS: tuple[str, ...] = LABEL_COLUMNS  # the submission's 13 columns


@torch.no_grad()
def predict_series(
    model: CNNBiLSTM,
    rows: pl.DataFrame,
    config: FinetuneConfig,
    device: torch.device,
    fold: int,
    prior: dict[str, float],
) -> pl.DataFrame:
    """Probabilities per series (softmax per target); targets the model was not trained on
    get the training folds' best-constant prior, so the table is always a full submission."""
    model.eval()
    dataset = SeriesDataset(
        rows, config.targets, config.n_slices, config.image_size, False,
        neighbours=config.neighbour_slices,
    )  # fmt: skip
    loader = DataLoader(
        dataset, batch_size=max(1, config.batch_size), num_workers=config.num_workers
    )
    mean, std = input_normalisation(model.backbone, device)
    precision = runtime.resolve_precision(config.precision, device)
    frames = []
    for batch in loader:
        probabilities = volume_probabilities(model, batch["image"], mean, std, precision)
        frame = {
            "patient_id": batch["patient_id"].tolist(),
            "series_id": batch["series_id"].tolist(),
        }
        frame |= probability_columns(probabilities, len(batch["series_id"]), prior)
        frames.append(pl.DataFrame(frame))
    return (
        pl.concat(frames)
        .with_columns(pl.lit(fold).alias("fold"))
        .select("fold", "patient_id", "series_id", *PROBABILITY_COLUMNS)
    )


def volume_probabilities(
    model: CNNBiLSTM,
    images: Tensor,
    mean: Tensor,
    std: Tensor,
    precision: runtime.Precision | None = None,
) -> dict[str, np.ndarray]:
    """uint8 volumes (B, S, C, H, W) -> {target: (B, n_classes) probabilities}; fp32 unless
    a `precision` (`runtime.resolve_precision`) says otherwise."""
    logits = _logits(model, images, mean, std, precision)
    return {t: torch.softmax(v.float(), dim=1).cpu().numpy() for t, v in logits.items()}


def probability_columns(
    probabilities: dict[str, np.ndarray], n_rows: int, prior: dict[str, float]
) -> dict[str, list[float]]:
    """Per-target probabilities as the 13 submission columns, prior-filled where missing."""
    columns: dict[str, list[float]] = {}
    for target in ALL_TARGETS:
        for index, column in enumerate(label_columns(target)):
            if target in probabilities:
                columns[column] = probabilities[target][:, index].astype(float).tolist()
            else:
                columns[column] = [prior[column]] * n_rows
    return columns


def aggregate_patients(
    series: pl.DataFrame, how: str = "mean", by_fold: bool = False
) -> pl.DataFrame:
    """Series probabilities -> one row per patient (mean or max over its series), each group
    renormalised to sum to 1."""
    keys = ["fold", "patient_id"] if by_fold and "fold" in series.columns else ["patient_id"]
    agg = [getattr(pl.col(c), how)().alias(c) for c in PROBABILITY_COLUMNS]
    patients = series.group_by(keys, maintain_order=True).agg(agg)
    renormalised = []
    for target in ALL_TARGETS:
        cols = label_columns(target)
        total = pl.sum_horizontal(cols)
        renormalised += [(pl.col(c) / total).alias(c) for c in cols]
    return patients.with_columns(renormalised).sort(keys)


def load_fold_model(
    fold_dir: Path, device: torch.device | str = "cpu"
) -> tuple[CNNBiLSTM, dict[str, Any]]:
    """A fold's best model, rebuilt from its model.json (no pretrained weights needed: the
    checkpoint holds them all) and loaded with weights_only=True."""
    meta = json.loads((Path(fold_dir) / "model.json").read_text())
    model = build_classifier(
        meta["backbone"], meta["in_chans"], "random", targets=meta["targets"],
        hidden_size=meta["hidden_size"], num_layers=meta["num_layers"], dropout=meta["dropout"],
        pooling=meta["pooling"], global_pool=meta.get("global_pool", "avg"),
        slice_targets=meta.get("slice_targets", ()),
    )  # fmt: skip
    state = torch.load(Path(fold_dir) / "best.pt", map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def predict_holdout(
    config: FinetuneConfig, rows: pl.DataFrame, fold_ids: Sequence[int]
) -> pl.DataFrame:
    """Every fold model's patient probabilities on the held-out patients, `fold` naming the
    model (the kind of prediction the out-of-fold ones are: one model each)."""
    device = runtime.device_for(False)
    predictions = []
    for fold in fold_ids:
        model, meta = load_fold_model(Path(config.output_dir) / f"fold{fold}", device)
        series = predict_series(model, rows, config, device, fold, meta["prior"])
        predictions.append(aggregate_patients(series, config.aggregation, by_fold=True))
    return pl.concat(predictions)


def _logits(
    model: nn.Module,
    images: Tensor,
    mean: Tensor,
    std: Tensor,
    precision: runtime.Precision | None = None,
) -> dict[str, Tensor]:
    precision = precision or runtime.Precision("fp32", mean.device.type)
    with precision.autocast():
        return model(normalised_input(images, mean, std))


def normalised_input(images: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 volumes -> the backbone's normalised float input, on mean's device."""
    return (images.to(mean.device, non_blocking=True).float() / 255.0 - mean) / std


def series_log_loss(
    rows: pl.DataFrame, series_probs: pl.DataFrame, targets: Sequence[str]
) -> float:
    """The training objective on validation series (per series, not per patient)."""
    joined = rows.join(series_probs, on=["patient_id", "series_id"])
    losses = []
    for target in targets:
        probs = joined.select(label_columns(target)).to_numpy()
        truth = joined[f"{target}_class"].to_numpy()
        weights = np.asarray(CLASS_WEIGHTS[target])[truth]
        picked = np.clip(probs[np.arange(len(truth)), truth], 1e-15, 1.0)
        losses.append(float((weights * -np.log(picked)).sum() / weights.sum()))
    return float(np.mean(losses))
