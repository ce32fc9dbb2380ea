"""Slice importance: the attention weights as the model pools with them, the gradient score
against finite differences, the ranking measure against scikit-learn's AUC, and explanations
of cached series with their marked slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import roc_auc_score

from kaggle_utils.common.plots import importance_strip
from kaggle_utils.finetune import importance
from kaggle_utils.finetune.data import series_table
from kaggle_utils.finetune.model import build_classifier
from tests.conftest import TINY_MODEL_SHAPE


def _model(pooling: str, targets: tuple[str, ...] = ("bowel", "liver")) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_classifier(
        "test_efficientnet", 1, "random", targets=targets, hidden_size=6, num_layers=1,
        pooling=pooling,  # type: ignore[arg-type]
    )  # fmt: skip
    return model.eval()


def test_attention_importance_is_the_pooling_weight() -> None:
    model = _model("attention")
    volumes = torch.randn(2, 5, 1, 32, 32)
    weights = importance.slice_importance(model, volumes)
    with torch.no_grad():
        sequence = model.lstm(model.slice_features(volumes))[0]
        expected = torch.softmax(model.attention(sequence)[..., 0], dim=1).numpy()
    for target in ("bowel", "liver"):
        np.testing.assert_allclose(weights[target], expected, rtol=1e-5)
        np.testing.assert_allclose(weights[target].sum(axis=1), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="use method 'gradient'"):
        importance.slice_importance(_model("max"), volumes, "attention")


@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_gradient_importance_matches_finite_differences(pooling: str) -> None:
    """|d score / d eps| of scaling one slice's feature by (1 + eps), slice by slice: the
    directional derivative that gradient x input is."""
    model = _model(pooling).double()
    volumes = torch.randn(1, 4, 1, 32, 32, dtype=torch.float64)
    scores = importance.slice_importance(model, volumes, "gradient")
    with torch.no_grad():
        features = model.slice_features(volumes)

        def score(f: torch.Tensor, target: str) -> float:
            logits = model.heads_of(model.pool(model.lstm(f)[0])[0])
            return float(importance.injury_log_odds(logits[target]).sum())

        for target in ("bowel", "liver"):
            reference = []
            for s in range(4):
                step = torch.zeros_like(features)
                step[:, s] = features[:, s] * 1e-6
                up, down = score(features + step, target), score(features - step, target)
                reference.append(abs(up - down) / 2e-6)
            reference_arr = np.array(reference) / sum(reference)
            np.testing.assert_allclose(scores[target][0], reference_arr, rtol=1e-4, atol=1e-7)


def test_ranking_auc_is_the_roc_auc_of_importance_against_the_marks() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        values = rng.integers(0, 4, size=12).astype(float)  # with ties
        marks = rng.random(12) < 0.3
        if marks.all() or not marks.any():
            continue
        assert importance.ranking_auc(values, marks) == pytest.approx(roc_auc_score(marks, values))
    assert importance.ranking_auc([0.2, 0.8], [False, False]) is None


def test_explanations_of_cached_series_carry_their_marked_slices(
    tiny_competition: Path, train_cache: Path
) -> None:
    labels = pl.read_csv(tiny_competition / "train.csv")
    image_labels = pl.read_csv(tiny_competition / "image_level_labels.csv")
    rows = series_table(labels, train_cache, TINY_MODEL_SHAPE, image_labels=image_labels).head(3)
    model = _model("max", targets=("bowel", "extravasation", "liver"))
    explanations = importance.explain_series(model, rows, n_slices=6, image_size=28)
    assert len(explanations) == 3
    first = explanations[0]
    assert first.images.shape == (6, 28, 28) and len(first.slices) == 6
    for target in ("bowel", "extravasation", "liver"):
        assert first.importance[target].shape == (6,)
        assert first.importance[target].sum() == pytest.approx(1.0)
    known = [e for e in explanations if "bowel" in e.marked]
    assert known and all(e.marked["bowel"].shape == (6,) for e in known)
    ranking = importance.marked_slice_ranking(explanations, "bowel")
    assert set(ranking) == {"n_series", "auc", "mean_rank"}
    shown = importance.pick_examples(explanations, {first.patient_id}, 2)
    assert shown[0][0] is first and len(shown) == 2
    figure = importance_strip(first, "liver", n_top=3)
    assert len(figure.axes) == 4
