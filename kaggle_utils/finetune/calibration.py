"""Post-hoc calibration of patient probabilities, fitted on out-of-fold predictions.

Two steps, both tuned to lower the RSNA score (the competition's "probability scaling"):

1. blend: per target, p <- w * p + (1 - w) * prior. A head that learned nothing useful on
   small data is noisy around the prior and costs log loss; its fitted w falls towards 0 and
   hands the prediction back to the best constant, while a head that learned keeps w near 1.
2. scale: per column, multiply by a factor, then divide each group by its sum again (the
   class balance the metric's weights want, e.g. more "injury" mass than training prevalence).

Fitted on the predictions it is scored on, a calibration flatters them. `cross_fitted`
gives the honest figure: each fold's predictions calibrated by a calibration fitted on the
other folds only (as the report's thresholds are). Notebook 03 reports both and saves the
calibration fitted on all out-of-fold predictions as `calibration.json` in the model folder;
notebook 04 applies it to the test predictions.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kaggle_utils.common.io import write_text_atomic
from kaggle_utils.common.provenance import provenance
from kaggle_utils.finetune.report import cross_validation_report, training_prior
from kaggle_utils.metric import LABEL_COLUMNS, PATIENT_ID, TARGET_GROUPS, ScoreOfVariants

CALIBRATION_FILE = "calibration.json"
# Coordinate-search grids: 11 blend weights 0, 0.1, ..., 1 and 13 log-spaced factors 0.5-2.
BLEND_GRID: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(11))
SCALING_GRID: tuple[float, ...] = tuple(float(v) for v in np.geomspace(0.5, 2.0, 13))


@dataclass
class Calibration:
    """prior: the 13 columns' constant the blend pulls towards; model_weight: w per target
    (1: the model unchanged); factors: per column (missing: 1)."""

    prior: dict[str, float]
    model_weight: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(TARGET_GROUPS, 1.0)
    )
    factors: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = sorted(set(LABEL_COLUMNS) - set(self.prior))
        if missing:
            raise ValueError(f"calibration prior lacks columns {missing}")
        bad_weights = {
            t: w for t, w in self.model_weight.items()
            if t not in TARGET_GROUPS or not (math.isfinite(w) and 0.0 <= w <= 1.0)
        }  # fmt: skip
        if bad_weights:
            raise ValueError(
                f"model_weight must map targets {tuple(TARGET_GROUPS)} to [0, 1], not {bad_weights}"
            )
        _check_factors(self.factors, "factors")

    def to_json(self, path: str | Path) -> None:
        payload = asdict(self) | {"provenance": provenance()}
        write_text_atomic(Path(path), json.dumps(payload, indent=1))

    @classmethod
    def from_json(cls, path: str | Path) -> Calibration:
        data = json.loads(Path(path).read_text())
        return cls(
            prior={str(k): float(v) for k, v in data["prior"].items()},
            model_weight={str(k): float(v) for k, v in data["model_weight"].items()},
            factors={str(k): float(v) for k, v in data["factors"].items()},
        )


def read_calibration(model_dir: str | Path) -> Calibration | None:
    """`<model_dir>/calibration.json`, checked; None when there is none."""
    path = Path(model_dir) / CALIBRATION_FILE
    return Calibration.from_json(path) if path.is_file() else None


def apply_calibration(df: pl.DataFrame, calibration: Calibration) -> pl.DataFrame:
    """Blend each target with the prior, then scale; other columns are kept as they are."""
    blended = []
    for target, columns in TARGET_GROUPS.items():
        w = float(calibration.model_weight.get(target, 1.0))
        blended += [
            (w * pl.col(c) + (1.0 - w) * float(calibration.prior[c])).alias(c) for c in columns
        ]
    return apply_probability_scaling(df.with_columns(blended), calibration.factors)


def apply_probability_scaling(df: pl.DataFrame, factors: Mapping[str, float]) -> pl.DataFrame:
    """Multiply each probability column by its factor (missing: 1), then divide each target
    group by its sum again; other columns (patient_id, fold) are kept as they are."""
    _check_factors(factors, "factors")
    scaled = df.with_columns(pl.col(c) * float(factors.get(c, 1.0)) for c in LABEL_COLUMNS)
    renormalised = []
    for columns in TARGET_GROUPS.values():
        total = pl.sum_horizontal(columns)
        renormalised += [(pl.col(c) / total).alias(c) for c in columns]
    return scaled.with_columns(renormalised)


def fit_calibration(
    labels: pl.DataFrame,
    oof_patient: pl.DataFrame,
    prior: Mapping[str, float],
    blend_grid: Sequence[float] = BLEND_GRID,
    scaling_grid: Sequence[float] = SCALING_GRID,
    rounds: int = 2,
) -> Calibration:
    """The calibration that lowers the RSNA score of these out-of-fold predictions, by
    coordinate search (each parameter in turn takes the grid value that scores best with the
    others fixed, `rounds` times; blend weights first, then factors). Starting from the
    identity and accepting only improvements, it never scores worse than the raw predictions
    on the rows it is fitted on."""
    predictions = oof_patient.drop("fold", strict=False)
    truth = labels.join(predictions.select(PATIENT_ID), on=PATIENT_ID, how="semi")
    calibration = Calibration(prior={c: float(prior[c]) for c in LABEL_COLUMNS})
    scorer = ScoreOfVariants(truth, predictions)
    best = scorer.score(scorer.values)
    searches: list[tuple[str, Sequence[str], Sequence[float]]] = [
        ("model_weight", tuple(TARGET_GROUPS), blend_grid),
        ("factors", LABEL_COLUMNS, scaling_grid),
    ]
    for attribute, keys, grid in searches:
        for _ in range(rounds):
            improved = False
            for key in keys:
                for value in grid:
                    values = getattr(calibration, attribute) | {key: float(value)}
                    trial = replace(calibration, **{attribute: values})
                    score = scorer.score(_calibrated_values(scorer.values, trial))
                    if score < best - 1e-12:
                        best, calibration, improved = score, trial, True
            if not improved:
                break
    return calibration


def _calibrated_values(
    values: Mapping[str, np.ndarray], calibration: Calibration
) -> dict[str, np.ndarray]:
    """`apply_calibration` on arrays: the same operations in the same order, so a calibration
    search scores what the calibrated table scores (to the last bits)."""
    calibrated: dict[str, np.ndarray] = {}
    for target, columns in TARGET_GROUPS.items():
        w = float(calibration.model_weight.get(target, 1.0))
        scaled = [
            (w * values[c] + (1.0 - w) * float(calibration.prior[c]))
            * float(calibration.factors.get(c, 1.0))
            for c in columns
        ]
        total = scaled[0]
        for column in scaled[1:]:
            total = total + column
        calibrated.update({c: v / total for c, v in zip(columns, scaled, strict=True)})
    return calibrated


def cross_fitted(labels: pl.DataFrame, oof_patient: pl.DataFrame) -> pl.DataFrame:
    """oof_patient with each fold calibrated by a calibration fitted on the other folds (the
    prior: the best constant of those folds' labels), so no fold is calibrated on its own
    labels. A single fold has no other folds: it is returned unchanged."""
    folds = sorted(oof_patient["fold"].unique().to_list())
    if len(folds) < 2:
        return oof_patient
    calibrated = []
    for fold in folds:
        others = oof_patient.filter(pl.col("fold") != fold)
        other_labels = labels.join(others.select(PATIENT_ID), on=PATIENT_ID, how="semi")
        calibration = fit_calibration(labels, others, training_prior(other_labels))
        calibrated.append(
            apply_calibration(oof_patient.filter(pl.col("fold") == fold), calibration)
        )
    return pl.concat(calibrated)


def _check_factors(factors: Mapping[str, float], what: str) -> None:
    unknown = sorted(set(factors) - set(LABEL_COLUMNS))
    if unknown:
        raise ValueError(f"{what}: unknown columns {unknown} (use those of {LABEL_COLUMNS})")
    bad = {c: v for c, v in factors.items() if not (math.isfinite(v) and v > 0)}
    if bad:
        raise ValueError(f"{what}: factors must be positive and finite, not {bad}")


def calibrate_cross_validation(
    labels: pl.DataFrame,
    oof_patient: pl.DataFrame,
    folds: pl.DataFrame,
    holdout_folds: pl.DataFrame | None = None,
) -> tuple[Calibration, dict[str, Any]]:
    """Notebook 03's calibration step: the calibration fitted on every out-of-fold prediction
    (prior: the best constant of all training-fold labels), and the cross-validation report
    of the calibrated predictions, each fold calibrated by the other folds (`cross_fitted`).

    The calibration is fitted on single models' predictions, so it is applied to single
    models' predictions: to each fold model's held-out prediction, before the ensemble
    averages them (notebook 04 does the same with the test predictions)."""
    trained = folds.filter(pl.col("fold") >= 0).select(PATIENT_ID)
    prior = training_prior(labels.join(trained, on=PATIENT_ID, how="semi"))
    calibration = fit_calibration(labels, oof_patient, prior)
    holdout = None
    if holdout_folds is not None and holdout_folds.height:
        holdout = apply_calibration(holdout_folds, calibration)
    report = cross_validation_report(labels, cross_fitted(labels, oof_patient), folds, holdout)
    return calibration, report
