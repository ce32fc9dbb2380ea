"""The cross-validation report: per fold and mean +- std, the RSNA score and its six parts,
the paper's mAP / macro precision / macro recall (thresholds fitted on the other folds'
out-of-fold predictions, never on the fold scored), per-group AUC, and the best-constant prior
scored on the same folds (from the training folds' labels, see `training_prior`); as a dict
for JSON and as a markdown table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from kaggle_utils.metric import (
    PAPER_TARGETS,
    TARGET_GROUPS,
    best_constant_prediction,
    constant_submission,
    fit_thresholds,
    group_auc,
    organ_metrics,
    rsna_score_parts,
)

HEADLINE = ("rsna_score", "mAP", "macro_precision", "macro_recall")


def training_prior(labels: pl.DataFrame, floor: float = 1e-3) -> dict[str, float]:
    """The best-constant prediction of these labels, each class floored at `floor` and each
    group renormalised: a class absent from a few training folds (small data) would otherwise
    get probability 0 and an unbounded loss on the fold that has it."""
    prior = best_constant_prediction(labels)
    floored = {}
    for target in TARGET_GROUPS:
        columns = TARGET_GROUPS[target]
        values = np.maximum([prior[c] for c in columns], floor)
        floored |= dict(zip(columns, (values / values.sum()).tolist(), strict=True))
    return floored


def fold_metrics(
    labels: pl.DataFrame,
    predictions: pl.DataFrame,
    thresholds: dict[str, tuple[float, float]] | None,
    organs: Sequence[str] = PAPER_TARGETS,
) -> dict[str, float]:
    """Every metric of one set of patients (predictions: patient_id + the 13 columns)."""
    truth = labels.join(predictions.select("patient_id"), on="patient_id", how="semi")
    parts = rsna_score_parts(truth, predictions)
    organ = organ_metrics(truth, predictions, thresholds, organs)
    metrics: dict[str, float] = {"rsna_score": float(np.mean(list(parts.values())))}
    metrics |= {f"loss_{k}": float(v) for k, v in parts.items()}
    metrics |= {k: float(organ[k]) for k in ("mAP", "macro_precision", "macro_recall")}
    metrics |= {f"auc_{k}": float(v) for k, v in group_auc(truth, predictions).items()}
    return metrics


# Said beside every CV figure: each fold keeps its best epoch by that fold's own score.
CV_OPTIMISM_NOTE = (
    "CV figures are optimistic: each fold's best epoch is chosen on the very patients it is "
    "scored on. The held-out figures (patients no model trained on or was selected on) are "
    "the ones comparisons should rest on."
)
HOLDOUT_NOTE = (
    "Held-out: 'fold models' scores each fold model alone (mean ± std over models: the kind "
    "of prediction the out-of-fold ones are, and the paper's convention); 'fold ensemble' "
    "scores their mean. Thresholds for precision/recall are fitted on the out-of-fold "
    "predictions of single models; the ensemble row applies them to an average of such "
    "models, a mild mismatch."
)


def ensemble_patients(per_model: pl.DataFrame) -> pl.DataFrame:
    """Patient probabilities of several models (a `fold` column naming the model) -> their
    mean per patient, each group renormalised. Calibrate each model's predictions before
    this, since calibrations are fitted on single models' out-of-fold predictions."""
    columns = [c for columns in TARGET_GROUPS.values() for c in columns]
    means = per_model.group_by("patient_id").agg(pl.col(c).mean() for c in columns)
    renormalised = []
    for group in TARGET_GROUPS.values():
        total = pl.sum_horizontal(group)
        renormalised += [(pl.col(c) / total).alias(c) for c in group]
    return means.with_columns(renormalised).sort("patient_id")


def cross_validation_report(
    labels: pl.DataFrame,
    oof_patient: pl.DataFrame,
    folds: pl.DataFrame,
    holdout_folds: pl.DataFrame | None = None,
    organs: Sequence[str] = PAPER_TARGETS,
) -> dict[str, Any]:
    """Metrics per fold, their mean and std, the prior beside them, and the held-out split
    scored for every fold model and for their ensemble.

    oof_patient: fold, patient_id, 13 probability columns (notebook 03's oof_patient.parquet).
    folds: patient_id, fold (-1 for the holdout patients).
    holdout_folds: fold (the model), patient_id, 13 columns: every fold model's prediction of
        the held-out patients (notebook 03's holdout_folds_patient.parquet).
    """
    report: dict[str, Any] = {"folds": {}, "prior_folds": {}, "notes": [CV_OPTIMISM_NOTE]}
    prediction_columns = [c for c in oof_patient.columns if c != "fold"]
    for fold in sorted(oof_patient["fold"].unique().to_list()):
        valid = oof_patient.filter(pl.col("fold") == fold).select(prediction_columns)
        others = oof_patient.filter(pl.col("fold") != fold).select(prediction_columns)
        thresholds = _thresholds(labels, others, organs)
        report["folds"][int(fold)] = fold_metrics(labels, valid, thresholds, organs)
        train_patients = folds.filter((pl.col("fold") != fold) & (pl.col("fold") >= 0))
        prior = training_prior(
            labels.join(train_patients.select("patient_id"), on="patient_id", how="semi")
        )
        prior_submission = constant_submission(valid["patient_id"].to_list(), prior)
        report["prior_folds"][int(fold)] = fold_metrics(labels, prior_submission, None, organs)
    report["summary"] = _mean_std(report["folds"])
    report["prior_summary"] = _mean_std(report["prior_folds"])
    if holdout_folds is not None and holdout_folds.height:
        thresholds = _thresholds(labels, oof_patient.select(prediction_columns), organs)
        report["holdout_folds"] = {
            int(fold): fold_metrics(
                labels,
                holdout_folds.filter(pl.col("fold") == fold).select(prediction_columns),
                thresholds,
                organs,
            )
            for fold in sorted(holdout_folds["fold"].unique().to_list())
        }
        report["holdout_summary"] = _mean_std(report["holdout_folds"])
        ensemble = ensemble_patients(holdout_folds)
        report["holdout"] = fold_metrics(labels, ensemble, thresholds, organs)
        train_patients = folds.filter(pl.col("fold") >= 0)
        prior = training_prior(
            labels.join(train_patients.select("patient_id"), on="patient_id", how="semi")
        )
        prior_submission = constant_submission(ensemble["patient_id"].to_list(), prior)
        report["holdout_prior"] = fold_metrics(labels, prior_submission, None, organs)
        report["notes"].append(HOLDOUT_NOTE)
    return report


def markdown_table(report: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """Model and prior side by side, mean +- std over folds (and the held-out split when
    present: fold models mean +- std, their ensemble, the prior), then the report's notes."""
    keys = list(keys or report["summary"].keys())
    has_holdout = "holdout" in report
    header = "| metric | model (CV, optimistic) | best-constant prior (CV) |"
    if has_holdout:
        header += " fold models (held-out) | fold ensemble (held-out) | prior (held-out) |"
    lines = [header, "|---" * (6 if has_holdout else 3) + "|"]
    for key in keys:
        model, prior = report["summary"][key], report["prior_summary"][key]
        row = f"| {key} | {_fmt(model)} | {_fmt(prior)} |"
        if has_holdout:
            row += (
                f" {_fmt(report['holdout_summary'][key])} | {report['holdout'][key]:.4f} |"
                f" {report['holdout_prior'][key]:.4f} |"
            )
        lines.append(row)
    notes = report.get("notes", [CV_OPTIMISM_NOTE])
    return "\n".join(lines + [""] + [f"*{note}*" for note in notes])


def _thresholds(
    labels: pl.DataFrame, predictions: pl.DataFrame, organs: Sequence[str]
) -> dict[str, tuple[float, float]] | None:
    """Thresholds fitted on out-of-fold predictions of other folds; argmax when none."""
    if predictions.height == 0:
        return None
    truth = labels.join(predictions.select("patient_id"), on="patient_id", how="semi")
    return fit_thresholds(truth, predictions, organs)


def _mean_std(per_fold: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    keys = next(iter(per_fold.values())).keys()
    summary = {}
    for key in keys:
        values = np.array([m[key] for m in per_fold.values()], dtype=float)
        finite = values[np.isfinite(values)]
        summary[key] = {
            "mean": float(finite.mean()) if finite.size else math.nan,
            "std": float(finite.std()) if finite.size else math.nan,
            "n": int(finite.size),
        }
    return summary


def _fmt(stat: dict[str, float]) -> str:
    return f"{stat['mean']:.4f} ± {stat['std']:.4f}"
