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

from kaggle_utils.classifier import PAPER_TARGETS
from kaggle_utils.metric import (
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


def cross_validation_report(
    labels: pl.DataFrame,
    oof_patient: pl.DataFrame,
    folds: pl.DataFrame,
    holdout_patient: pl.DataFrame | None = None,
    organs: Sequence[str] = PAPER_TARGETS,
) -> dict[str, Any]:
    """Metrics per fold, their mean and std, the prior beside them, and the holdout split.

    oof_patient: fold, patient_id, 13 probability columns (notebook 03's oof_patient.parquet).
    folds: patient_id, fold (-1 for the holdout patients).
    """
    report: dict[str, Any] = {"folds": {}, "prior_folds": {}}
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
    if holdout_patient is not None and holdout_patient.height:
        holdout = holdout_patient.select(prediction_columns)
        thresholds = _thresholds(labels, oof_patient.select(prediction_columns), organs)
        report["holdout"] = fold_metrics(labels, holdout, thresholds, organs)
        train_patients = folds.filter(pl.col("fold") >= 0)
        prior = training_prior(
            labels.join(train_patients.select("patient_id"), on="patient_id", how="semi")
        )
        prior_submission = constant_submission(holdout["patient_id"].to_list(), prior)
        report["holdout_prior"] = fold_metrics(labels, prior_submission, None, organs)
    return report


def markdown_table(report: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """Model and prior side by side, mean +- std over folds (and the holdout when present)."""
    keys = list(keys or report["summary"].keys())
    has_holdout = "holdout" in report
    header = "| metric | model (CV) | best-constant prior (CV) |"
    header += " model (holdout) | prior (holdout) |" if has_holdout else ""
    lines = [header, "|---" * (5 if has_holdout else 3) + "|"]
    for key in keys:
        model, prior = report["summary"][key], report["prior_summary"][key]
        row = f"| {key} | {_fmt(model)} | {_fmt(prior)} |"
        if has_holdout:
            row += f" {report['holdout'][key]:.4f} | {report['holdout_prior'][key]:.4f} |"
        lines.append(row)
    return "\n".join(lines)


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
