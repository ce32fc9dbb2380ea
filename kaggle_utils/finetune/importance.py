"""Which slices drove each prediction: per-slice importance for every target of a fine-tuned
CNN-BiLSTM (the 2D-VoCo paper names interpretability as its next step; a radiologist reading
a prediction first asks where). `slice_importance` is the one entry point; notebook 03 shows
it for a few validation patients, notebook 04 for any test patient.

Two methods, both normalised to sum to 1 over a volume's slices:
- "attention": the pooling's softmax weight of every slice (attention pooling only; one
  curve shared by every target, since the heads share the pooled feature);
- "gradient": for each target, |gradient x input| of its injury log-odds
  (log(1 - p_healthy) - log p_healthy) with respect to each slice's backbone feature, summed
  over the feature: how much the slice's own content moved that target's prediction. Works
  with any pooling (with max pooling only the slices that win some feature get any).
"auto" is attention where the model pools by attention, else gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import torch
from torch import Tensor

from kaggle_utils.finetune.model import CNNBiLSTM

METHODS = ("auto", "attention", "gradient")


def injury_log_odds(logits: Tensor) -> Tensor:
    """(B, n_classes) logits -> (B,) log(1 - p_healthy) - log(p_healthy); class 0 is healthy."""
    return torch.logsumexp(logits[:, 1:], dim=1) - logits[:, 0]


def slice_importance(
    model: CNNBiLSTM, volumes: Tensor, method: str = "auto"
) -> dict[str, np.ndarray]:
    """{target: (B, S) importance of every slice}, each row summing to 1.

    `volumes` are the model's normalised input (B, S, C, H, W). The model is put in eval mode.

    Raises:
        ValueError: an unknown method, or "attention" for a model that pools otherwise.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, not {method!r}")
    if method == "auto":
        method = "attention" if model.pooling == "attention" else "gradient"
    if method == "attention" and model.pooling != "attention":
        raise ValueError(f"the model pools by {model.pooling}: use method 'gradient'")
    model.eval()
    if method == "attention":
        with torch.no_grad():
            sequence = model.lstm(model.slice_features(volumes))[0]
            weights = model.pool(sequence)[1]
        assert weights is not None
        values = weights.float().cpu().numpy()
        return {target: values.copy() for target in model.targets}
    with torch.no_grad():
        features = model.slice_features(volumes)
    features = features.detach().requires_grad_(True)
    with torch.enable_grad():
        logits = model.heads_of(model.pool(model.lstm(features)[0])[0])
        out = {}
        for index, target in enumerate(model.targets):
            score = injury_log_odds(logits[target]).sum()
            last = index == len(model.targets) - 1
            (grad,) = torch.autograd.grad(score, features, retain_graph=not last)
            attribution = (grad * features).sum(dim=-1).abs().float()
            out[target] = _normalised(attribution.detach().cpu().numpy())
    return out


def _normalised(values: np.ndarray) -> np.ndarray:
    total = values.sum(axis=1, keepdims=True)
    uniform = np.full_like(values, 1.0 / values.shape[1])
    return np.where(total > 0, values / np.where(total > 0, total, 1.0), uniform)


def ranking_auc(importance: Sequence[float], positive: Sequence[bool]) -> float | None:
    """The chance that a marked slice (e.g. one that holds a drawn injury) has a higher
    importance than an unmarked one (ties count half); None without both kinds."""
    values = np.asarray(importance, dtype=np.float64)
    marked = np.asarray(positive, dtype=bool)
    pos, neg = values[marked], values[~marked]
    if pos.size == 0 or neg.size == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


@dataclass
class SeriesExplanation:
    """One series as the model saw it, with every target's slice importance."""

    patient_id: int
    series_id: int
    slices: np.ndarray  # (S,) indices of the slices seen, into the cached volume
    images: np.ndarray  # (S, h, w) uint8, the first window as the model saw it
    importance: dict[str, np.ndarray]  # {target: (S,)}, summing to 1
    probabilities: dict[str, np.ndarray]  # {target: (n_classes,)}
    marked: dict[str, np.ndarray]  # {slice target: (S,) bool}: slices image_level_labels marks


def explain_input(
    model: CNNBiLSTM,
    images: Tensor,
    patient_id: int,
    series_id: int,
    slices: np.ndarray,
    neighbours: int = 0,
    method: str = "auto",
) -> SeriesExplanation:
    """`slice_importance` and the prediction for one series' model input: uint8 (S, C, h, w)
    as `finetune_data.SeriesDataset` evaluates it (`slices`: which cached slices those are;
    `neighbours`: the 2.5D neighbours per side in its channels). No marked slices."""
    from kaggle_utils.common.backbone import input_normalisation

    device = next(model.parameters()).device
    mean, std = input_normalisation(model.backbone, device)
    normalised = (images[None].to(device).float() / 255.0 - mean) / std
    importance = slice_importance(model, normalised, method)
    with torch.no_grad():
        logits = model(normalised)
    window_channels = images.shape[1] // (2 * neighbours + 1)
    return SeriesExplanation(
        patient_id=int(patient_id),
        series_id=int(series_id),
        slices=np.asarray(slices),
        images=images[:, neighbours * window_channels].cpu().numpy(),  # the slice itself
        importance={t: v[0] for t, v in importance.items()},
        probabilities={
            t: torch.softmax(v.float(), dim=1)[0].cpu().numpy() for t, v in logits.items()
        },
        marked={},
    )


def explain_series(
    model: CNNBiLSTM,
    rows: pl.DataFrame,
    n_slices: int,
    image_size: int,
    method: str = "auto",
    device: torch.device | str = "cpu",
    neighbours: int = 0,
) -> list[SeriesExplanation]:
    """`slice_importance` of every row of a `finetune_data.series_table` (one at a time), with
    what the model predicted and, where the table has `slices_<target>`, the marked slices
    (`slices_<target>` > 0.5: the image-level marks, or with organ visibility the slices
    showing over half the organ's largest area)."""
    from kaggle_utils.finetune.data import SeriesDataset, slice_indices

    model = model.to(torch.device(device))
    dataset = SeriesDataset(
        rows, model.targets, n_slices, image_size, train=False, neighbours=neighbours
    )
    explanations = []
    for index, row in enumerate(rows.to_dicts()):
        n_available = int(np.load(row["path"], mmap_mode="r").shape[0])
        seen = slice_indices(n_available, n_slices)
        explanation = explain_input(
            model, dataset[index]["image"], row["patient_id"], row["series_id"], seen,
            neighbours, method,
        )  # fmt: skip
        explanation.marked = {
            column.removeprefix("slices_"): np.asarray(row[column], dtype=float)[seen] > 0.5
            for column in rows.columns
            if column.startswith("slices_") and row[column] is not None
        }
        explanations.append(explanation)
    return explanations


def marked_slice_ranking(
    explanations: Sequence[SeriesExplanation], target: str
) -> dict[str, float | int | None]:
    """How much more important the marked slices (image_level_labels: a drawn bowel injury or
    extravasation) are than the others, for `target`'s importance: the mean over series of
    `ranking_auc` (0.5: no better than chance) and of the marked slices' mean rank as a share
    of the slices (0: the most important), over the series with marked and unmarked slices."""
    aucs, ranks = [], []
    for explanation in explanations:
        marked = explanation.marked.get(target)
        if marked is None or target not in explanation.importance:
            continue
        auc = ranking_auc(explanation.importance[target], marked)
        if auc is None:
            continue
        aucs.append(auc)
        order = np.argsort(-explanation.importance[target], kind="stable")
        rank = np.empty(len(order))
        rank[order] = np.arange(len(order)) / max(1, len(order) - 1)
        ranks.append(float(rank[marked].mean()))
    return {
        "n_series": len(aucs),
        "auc": float(np.mean(aucs)) if aucs else None,
        "mean_rank": float(np.mean(ranks)) if ranks else None,
    }


def pick_examples(
    explanations: Sequence[SeriesExplanation], injured: set[int], n_patients: int
) -> list[tuple[SeriesExplanation, str]]:
    """Up to `n_patients` explanations to show, half of injured patients and half of healthy
    ones, each with the target to show: one with marked slices, else the one the model
    thought most likely injured."""
    picks = [e for e in explanations if e.patient_id in injured][: (n_patients + 1) // 2]
    picks += [e for e in explanations if e.patient_id not in injured][: n_patients // 2]
    shown = []
    for explanation in picks:
        marked = [t for t, m in explanation.marked.items() if m.any()]
        shown.append((explanation, marked[0] if marked else most_likely_injury(explanation)))
    return shown


def most_likely_injury(explanation: SeriesExplanation) -> str:
    """The target the model thought most likely injured (lowest healthy probability)."""
    return max(explanation.probabilities, key=lambda t: 1 - explanation.probabilities[t][0])
