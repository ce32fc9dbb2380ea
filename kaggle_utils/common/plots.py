"""Figures the notebooks show: what a person would rather look at than read."""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from kaggle_utils.common.io import save_figure_atomic


def first_channel(volume: np.ndarray) -> np.ndarray:
    """(slices, H, W) or (slices, C, H, W) uint8 -> (slices, H, W): the first window."""
    return volume[:, 0] if volume.ndim == 4 else volume


def volume_montage(
    volumes: Mapping[str, np.ndarray],
    axial_fractions: Sequence[float] = (0.25, 0.5, 0.75),
    coronal_aspects: Mapping[str, float] | None = None,
) -> Figure:
    """One row per volume: axial slices at the given fractions of the z range, then the
    coronal slice through the middle (superior at the top).

    `coronal_aspects[name]` is the height/width of one coronal pixel (mm per slice over mm per
    column), so the coronal view is not squashed when 300 slices were resampled to 32.
    """
    if not volumes:
        raise ValueError("no volumes to show")
    n_cols = len(axial_fractions) + 1
    fig, axes = plt.subplots(
        len(volumes), n_cols, figsize=(2.6 * n_cols, 2.6 * len(volumes)), squeeze=False
    )
    for row, (name, volume) in enumerate(volumes.items()):
        stack = first_channel(np.asarray(volume))
        n_slices, height, _ = stack.shape
        for col, fraction in enumerate(axial_fractions):
            index = min(n_slices - 1, round(fraction * (n_slices - 1)))
            axes[row, col].imshow(stack[index], cmap="gray", vmin=0, vmax=255)
            axes[row, col].set_title(f"{name} z={index}/{n_slices}", fontsize=8)
        coronal = stack[::-1, height // 2, :]  # ascending z: flip so superior is up
        aspect = (coronal_aspects or {}).get(name, 1.0)
        axes[row, -1].imshow(coronal, cmap="gray", vmin=0, vmax=255, aspect=aspect)
        axes[row, -1].set_title(f"{name} coronal", fontsize=8)
        for ax in axes[row]:
            ax.set_axis_off()
    fig.tight_layout()
    return fig


def crop_layout(
    image: np.ndarray,
    base_boxes: np.ndarray,
    random_boxes: np.ndarray,
    labels: np.ndarray,
) -> Figure:
    """One slice with the VoCo base grid (numbered) and each random crop with its position
    labels: what the pretext task asks the encoder to predict."""
    fig, axes = plt.subplots(1, 1 + len(random_boxes), figsize=(3.2 * (1 + len(random_boxes)), 3.4))
    axes = np.atleast_1d(axes)
    axes[0].imshow(image, cmap="gray", vmin=0, vmax=255)
    for index, (y0, x0, y1, x1) in enumerate(base_boxes):
        axes[0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="tab:blue"))
        axes[0].text(x0 + 3, y0 + 12, str(index), color="tab:blue", fontsize=8)
    colors = plt.cm.autumn(np.linspace(0, 1, max(1, len(random_boxes))))
    for n, ((y0, x0, y1, x1), color) in enumerate(zip(random_boxes, colors, strict=True)):
        axes[0].add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=color, lw=2))
        grid = math.isqrt(labels.shape[1])
        axes[n + 1].imshow(labels[n].reshape(grid, grid), cmap="viridis", vmin=0, vmax=1)
        for k, value in enumerate(labels[n]):
            axes[n + 1].text(
                k % grid, k // grid, f"{value:.2f}", ha="center", va="center", color="w"
            )
        axes[n + 1].set_title(f"random crop {n}: labels", fontsize=9, color=color)
    axes[0].set_title("base grid and random crops", fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def pretraining_curves(log_csv: str | Path, chance: float | None = None) -> Figure:
    """Loss and its parts per step, and the position probes (same and cross volume) with
    the chance level, from a pretraining log.csv."""
    import polars as pl

    log = pl.read_csv(log_csv, infer_schema_length=None)
    steps = log.filter(pl.col("step") > 0)
    fig, (loss_ax, probe_ax) = plt.subplots(1, 2, figsize=(11, 3.8))
    for column, style in (("loss", "-"), ("intra", "--"), ("inter", "--"), ("reg", ":")):
        values = steps[column].cast(pl.Float64, strict=False)
        loss_ax.plot(steps["step"], values, style, label=column, alpha=0.9)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss")
    loss_ax.legend(fontsize=8)
    loss_ax.set_title("2D-VoCo loss")
    for column, label in (
        ("probe_accuracy", "same volume"),
        ("cross_probe_accuracy", "cross volume"),
    ):
        probed = log.with_columns(pl.col(column).cast(pl.Float64, strict=False)).drop_nulls(column)
        probe_ax.plot(probed["step"], probed[column], "o-", label=label)
    if chance is not None:
        probe_ax.axhline(chance, color="gray", ls=":", label=f"chance {chance:.2f}")
    probe_ax.set_ylim(0, 1)
    probe_ax.set_xlabel("step")
    probe_ax.set_ylabel("position accuracy")
    probe_ax.legend(fontsize=8)
    probe_ax.set_title("held-out position probe")
    fig.tight_layout()
    return fig


def _aligned(labels: object, predictions: object, target: str) -> tuple[np.ndarray, np.ndarray]:
    """(true class index, probabilities) of one target, rows matched by patient_id."""
    import polars as pl

    from kaggle_utils.metric import TARGET_GROUPS

    columns = list(TARGET_GROUPS[target])
    joined = (
        pl.DataFrame(predictions)
        .select("patient_id", *columns)
        .join(pl.DataFrame(labels).select("patient_id", *columns), on="patient_id", suffix="_true")
    )
    truth = joined.select([f"{c}_true" for c in columns]).to_numpy().argmax(axis=1)
    return truth, joined.select(columns).to_numpy()


def confusion_matrices(labels: object, predictions: object) -> Figure:
    """Per target, counts of true class (rows) against the most probable class (columns)."""
    from kaggle_utils.metric import TARGET_CLASSES

    fig, axes = plt.subplots(1, len(TARGET_CLASSES), figsize=(3.1 * len(TARGET_CLASSES), 3.2))
    for ax, target in zip(axes, TARGET_CLASSES, strict=True):
        truth, probabilities = _aligned(labels, predictions, target)
        n = probabilities.shape[1]
        matrix = np.zeros((n, n), dtype=int)
        np.add.at(matrix, (truth, probabilities.argmax(axis=1)), 1)
        ax.imshow(matrix, cmap="Blues")
        for (i, j), count in np.ndenumerate(matrix):
            ax.text(j, i, str(count), ha="center", va="center", fontsize=9)
        names = TARGET_CLASSES[target]
        ax.set_xticks(range(n), names, fontsize=7)
        ax.set_yticks(range(n), names, fontsize=7)
        ax.set_title(target, fontsize=9)
        ax.set_xlabel("predicted (argmax)", fontsize=7)
    axes[0].set_ylabel("true", fontsize=8)
    fig.tight_layout()
    return fig


def precision_recall_curves(labels: object, predictions: object) -> Figure:
    """Per target, one precision-recall curve for each injury class (one-vs-rest), with its
    average precision and the class prevalence (the curve of a useless model)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    from kaggle_utils.metric import TARGET_CLASSES

    fig, axes = plt.subplots(1, len(TARGET_CLASSES), figsize=(3.1 * len(TARGET_CLASSES), 3.2))
    for ax, target in zip(axes, TARGET_CLASSES, strict=True):
        truth, probabilities = _aligned(labels, predictions, target)
        for index, name in enumerate(TARGET_CLASSES[target][1:], start=1):
            positive = truth == index
            if not positive.any():
                continue
            precision, recall, _ = precision_recall_curve(positive, probabilities[:, index])
            ap = average_precision_score(positive, probabilities[:, index])
            line = ax.plot(recall, precision, label=f"{name} AP {ap:.2f}")[0]
            ax.axhline(positive.mean(), color=line.get_color(), ls=":", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.set_title(target, fontsize=9)
        ax.set_xlabel("recall", fontsize=7)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("precision", fontsize=8)
    fig.tight_layout()
    return fig


# Organ colours of the segmentation figures (label value -> RGB), background transparent.
ORGAN_COLOURS: dict[int, tuple[float, float, float]] = {
    1: (0.85, 0.45, 0.2),  # liver
    2: (0.6, 0.3, 0.8),  # spleen
    3: (0.2, 0.7, 0.3),  # left kidney
    4: (0.2, 0.5, 0.9),  # right kidney
    5: (0.9, 0.8, 0.2),  # bowel
}


def _label_overlay(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W, 4) RGBA, organs coloured at 45 % opacity."""
    rgba = np.zeros((*labels.shape, 4), dtype=np.float32)
    for value, colour in ORGAN_COLOURS.items():
        hit = labels == value
        rgba[hit, :3] = colour
        rgba[hit, 3] = 0.45
    return rgba


def segmentation_montage(
    volumes: Mapping[str, tuple[np.ndarray, np.ndarray]],
    axial_fractions: Sequence[float] = (0.35, 0.55, 0.75),
) -> Figure:
    """One row per volume (image in [0, 1] and labels, both (slices, H, W), ascending z):
    axial slices at the given fractions of the z range and the coronal slice through the
    middle, with the organs coloured (liver orange, spleen purple, kidneys green/blue, bowel
    yellow)."""
    if not volumes:
        raise ValueError("no volumes to show")
    n_cols = len(axial_fractions) + 1
    fig, axes = plt.subplots(
        len(volumes), n_cols, figsize=(2.6 * n_cols, 2.6 * len(volumes)), squeeze=False
    )
    for row, (name, (image, labels)) in enumerate(volumes.items()):
        n_slices, height, _ = image.shape
        for col, fraction in enumerate(axial_fractions):
            index = min(n_slices - 1, round(fraction * (n_slices - 1)))
            axes[row, col].imshow(image[index], cmap="gray", vmin=0, vmax=1)
            axes[row, col].imshow(_label_overlay(labels[index]))
            axes[row, col].set_title(f"{name} z={index}/{n_slices}", fontsize=8)
        coronal = (image[::-1, height // 2, :], labels[::-1, height // 2, :])
        aspect = (image.shape[2] / n_slices) * 0.5
        axes[row, -1].imshow(coronal[0], cmap="gray", vmin=0, vmax=1, aspect=aspect)
        axes[row, -1].imshow(_label_overlay(coronal[1]), aspect=aspect)
        axes[row, -1].set_title(f"{name} coronal", fontsize=8)
        for ax in axes[row]:
            ax.set_axis_off()
    fig.tight_layout()
    return fig


def segmentation_curves(log_csv: str | Path) -> Figure:
    """Training loss and held-out Dice per organ over the epochs of notebook 06."""
    import csv

    with open(log_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    epochs = [int(r["epoch"]) for r in rows]
    fig, (loss_ax, dice_ax) = plt.subplots(1, 2, figsize=(9, 3.2))
    loss_ax.plot(epochs, [float(r["loss"]) for r in rows])
    loss_ax.set(xlabel="epoch", ylabel="Dice + CE loss", title="training loss")
    for key in [k for k in (rows[0] if rows else {}) if k.startswith("dice_")]:
        values = [float(r[key]) if r[key] not in ("", "None") else np.nan for r in rows]
        dice_ax.plot(epochs, values, label=key.removeprefix("dice_"))
    dice_ax.set(xlabel="epoch", ylabel="Dice", title="held-out Dice", ylim=(0, 1))
    dice_ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def true_class(labels: object, patient_id: int, target: str) -> str | None:
    """The patient's class for `target` ("healthy", "injury", "low", "high") in a labels table
    with train.csv's columns (train.csv, the demo's test_labels.csv), or None if the patient is
    not in it."""
    import polars as pl

    from kaggle_utils.metric import TARGET_CLASSES, TARGET_GROUPS

    columns = list(TARGET_GROUPS[target])
    row = pl.DataFrame(labels).filter(pl.col("patient_id") == patient_id).select(columns)
    if row.height == 0:
        return None
    return TARGET_CLASSES[target][int(np.argmax(row.row(0)))]


def importance_strip(
    explanation: Any, target: str, n_top: int = 6, labels: object | None = None
) -> Figure:
    """The `n_top` slices that mattered most for `target` (an `importance.SeriesExplanation`),
    in scan order, above the importance curve over the whole scan; slices image_level_labels
    marks for the target are shaded. With `labels` (a table with train.csv's columns: notebook
    03's training labels, or test labels where the data has them) the title also gives the
    patient's true class for the target."""
    weights = explanation.importance[target]
    top = np.sort(np.argsort(-weights, kind="stable")[: min(n_top, len(weights))])
    fig = plt.figure(figsize=(1.8 * len(top), 3.8))
    grid = fig.add_gridspec(2, len(top), height_ratios=(1.2, 1.0))
    for col, index in enumerate(top):
        ax = fig.add_subplot(grid[0, col])
        ax.imshow(explanation.images[index], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"slice {explanation.slices[index]}: {weights[index]:.2f}", fontsize=7)
        ax.set_axis_off()
    curve = fig.add_subplot(grid[1, :])
    curve.plot(explanation.slices, weights, marker=".")
    marked = explanation.marked.get(target)
    if marked is not None:
        for index in np.flatnonzero(marked):
            at = explanation.slices[index]
            curve.axvspan(at - 0.5, at + 0.5, color="tab:red", alpha=0.2, lw=0)
    p_injury = 1.0 - float(explanation.probabilities[target][0])
    title = f"patient {explanation.patient_id}, {target}: p(injury) {p_injury:.2f}"
    if labels is not None:
        truth = true_class(labels, explanation.patient_id, target)
        title += f", true: {truth or 'not labelled'}"
    curve.set(xlabel="cached slice (feet -> head)", ylabel="importance", title=title)
    fig.tight_layout()
    return fig


FOLD_LOG = re.compile(r"fold(\d+)$")


def _log_values(rows: Sequence[Mapping[str, str]], column: str) -> np.ndarray:
    return np.array(
        [float(r[column]) if r.get(column) not in (None, "", "None") else np.nan for r in rows]
    )


def cross_validation_curves(run_dir: str | Path, folds: Sequence[int] | None = None) -> Figure:
    """Per fold of a fine-tuning run (`<run_dir>/fold<k>/log.csv`, one row per epoch): the
    training and validation loss and the validation RSNA score against the epoch, with the
    epoch the fold kept (lowest validation RSNA score) marked."""
    import csv

    run_dir = Path(run_dir)
    if folds is None:
        found = (FOLD_LOG.match(p.parent.name) for p in run_dir.glob("fold*/log.csv"))
        folds = sorted(int(m.group(1)) for m in found if m)
    if not folds:
        raise ValueError(f"no fold<k>/log.csv in {run_dir}")
    n_cols = min(len(folds), 3)
    n_rows = math.ceil(len(folds) / n_cols)
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(3.8 * n_cols, 3.0 * n_rows), squeeze=False, sharey=True
    )
    for ax in axes.flat[len(folds) :]:
        fig.delaxes(ax)
    for ax, fold in zip(axes.flat, folds, strict=False):
        with open(run_dir / f"fold{fold}" / "log.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        epochs = _log_values(rows, "epoch")
        ax.plot(epochs, _log_values(rows, "train_loss"), ".-", label="train loss")
        ax.plot(epochs, _log_values(rows, "valid_loss"), ".--", label="valid loss")
        rsna = _log_values(rows, "valid_rsna")
        ax.plot(epochs, rsna, "o-", ms=3, label="valid RSNA")
        title = f"fold {fold}"
        if np.isfinite(rsna).any():
            best = int(np.nanargmin(rsna))
            ax.axvline(epochs[best], color="gray", ls=":", label="best epoch")
            ax.plot(epochs[best], rsna[best], "*", color="tab:red", ms=10)
            title += f": best epoch {epochs[best]:g}, RSNA {rsna[best]:.3f}"
        ax.set(xlabel="epoch", title=title)
        ax.title.set_fontsize(9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        if len(epochs):
            ax.set_xlim(epochs.min() - 0.5, epochs.max() + 0.5)
    axes[0, 0].set_ylabel("loss / RSNA score (lower is better)")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


INLINE_DPI = 60
INLINE_JPEG_QUALITY = 70


def show_figure(fig: Figure, path: str | Path | None = None) -> None:
    """Save `fig` as a PNG file (atomically) when `path` is given, show it in the notebook, close
    it. An executed notebook keeps every figure as base64 text: a CT montage or an importance
    strip is about 130 KB as the inline PNG and a fifth of that as the smaller JPEG shown
    here, so the inline copy is a JPEG and the file beside the run keeps the full PNG. Outside
    a notebook kernel nothing is shown."""
    if path is not None:
        save_figure_atomic(fig, path)
    if _in_notebook():
        from IPython.display import Image, display

        buffer = io.BytesIO()
        fig.savefig(
            buffer, format="jpeg", dpi=INLINE_DPI, bbox_inches="tight",
            pil_kwargs={"quality": INLINE_JPEG_QUALITY},
        )  # fmt: skip
        display(Image(data=buffer.getvalue(), format="jpeg"))
    plt.close(fig)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})
