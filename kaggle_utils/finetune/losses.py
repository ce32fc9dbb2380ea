"""The competition loss fine-tuning minimises: class-weighted cross-entropy per target like
the RSNA metric, its any-injury term, and the optional per-slice loss."""

from __future__ import annotations

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from kaggle_utils.metric import ALL_TARGETS, ANY_INJURY, CLASS_WEIGHTS

LOSS_NORMALISATIONS = ("expected", "batch")


def expected_weights(rows: pl.DataFrame) -> dict[str, float]:
    """The mean metric weight of the true class over these training rows, per target and for
    any_injury (`<target>_class` and `any_injury` columns, as `series_table` gives them): the
    constant that makes `weighted_loss` the metric in expectation over random batches."""
    weights = {
        target: float(np.asarray(CLASS_WEIGHTS[target])[rows[f"{target}_class"].to_numpy()].mean())
        for target in ALL_TARGETS
    }
    injured = rows["any_injury"].to_numpy() > 0
    weights[ANY_INJURY] = float(np.where(injured, CLASS_WEIGHTS[ANY_INJURY][1], 1.0).mean())
    return weights


def weighted_loss(
    logits: dict[str, Tensor],
    labels: Tensor,
    any_injury: Tensor,
    class_weights: dict[str, Tensor],
    any_injury_weight: float = 1.0,
    normalisers: dict[str, float] | None = None,
) -> Tensor:
    """Cross-entropy per target weighted like the metric (healthy 1, injury 2 or 6, low 2,
    high 4), plus, when every target is trained, the metric's any_injury term: weighted BCE
    (1 healthy, 6 injured) on max over targets of 1 - p_healthy. The mean of the terms.

    Each term is sum(w * CE) over the batch divided by a constant: B * `normalisers[target]`
    (the training rows' mean weight, `expected_weights`), so that its expectation over random
    batches is the metric's sum(w * CE) / sum(w) over the training set, whose best constant
    it shares. Without `normalisers` it is divided by the batch's own sum(w) (torch's
    `weight=` with mean reduction): exact on one batch, but its minimiser depends on the
    batch size (at 2, the best constant extravasation probability is pulled far below the
    metric's).

    logits: {target: (B, n_classes)}; labels: (B, n_targets) in `logits`' order.
    """
    batch = labels.shape[0]
    terms = []
    for index, (target, target_logits) in enumerate(logits.items()):
        weight = class_weights[target].float()
        per_row = F.cross_entropy(target_logits.float(), labels[:, index], reduction="none")
        row_weights = weight[labels[:, index]]
        scale = row_weights.sum() if normalisers is None else batch * normalisers[target]
        terms.append((row_weights * per_row).sum() / scale)
    if any_injury_weight > 0 and len(logits) == len(ALL_TARGETS):
        injured = torch.stack(
            [1 - torch.softmax(v.float(), dim=1)[:, 0] for v in logits.values()], dim=1
        ).amax(dim=1)
        weights = torch.where(any_injury > 0.5, CLASS_WEIGHTS[ANY_INJURY][1], 1.0)
        bce = F.binary_cross_entropy(injured.clamp(1e-7, 1 - 1e-7), any_injury, reduction="none")
        scale = weights.sum() if normalisers is None else batch * normalisers[ANY_INJURY]
        terms.append(any_injury_weight * (weights * bce).sum() / scale)
    return torch.stack(terms).mean()


def slice_loss(slice_logits: Tensor, slice_labels: Tensor) -> Tensor:
    """Binary cross-entropy per slice and target, averaged over the known labels (-1: unknown,
    ignored); 0 when nothing in the batch is known. Each target is averaged on its own, then
    the targets, so a target's weight does not depend on how many of its series are known.

    slice_logits, slice_labels: (B, S, n_slice_targets).
    """
    known = slice_labels >= 0
    bce = F.binary_cross_entropy_with_logits(
        slice_logits.float(), slice_labels.clamp_min(0), reduction="none"
    )
    per_target = [
        bce[..., k][known[..., k]].mean() for k in range(bce.shape[-1]) if known[..., k].any()
    ]
    if not per_target:
        return slice_logits.sum() * 0.0  # keeps the graph (DDP needs every parameter used)
    return torch.stack(per_target).mean()
