"""The closing summary of `make demo`: what each step produced and how long it took.

python -m kaggle_utils.demo.summary outputs/demo inputs/demo-rsna
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import polars as pl
import torch

from kaggle_utils.common.io import write_json_atomic, write_text_atomic
from kaggle_utils.submission.inference import ensemble_prior, load_fold_models, score_against_labels

NOTEBOOKS = ("01_dicom_preprocess", "02_voco2d_pretrain", "03_finetune_bilstm", "04_submission")


def notebook_minutes(notebook_dir: Path) -> dict[str, float | None]:
    """Run time of each executed notebook, from the duration papermill records in it."""
    minutes: dict[str, float | None] = {}
    for name in NOTEBOOKS:
        path = notebook_dir / f"{name}.ipynb"
        if not path.is_file():
            minutes[name] = None
            continue
        duration = json.loads(path.read_text())["metadata"].get("papermill", {}).get("duration")
        minutes[name] = None if duration is None else round(duration / 60, 2)
    return minutes


def demo_summary(demo_out: Path, data_root: Path) -> dict[str, Any]:
    """Probe accuracy, CV RSNA score against the prior, demo test score against the prior,
    minutes per step."""
    summary: dict[str, Any] = {"minutes": notebook_minutes(demo_out / "notebooks")}
    pretrain = demo_out / "pretrain" / "summary.json"
    if pretrain.is_file():
        summary["pretrain"] = json.loads(pretrain.read_text())
    report_file = demo_out / "finetune" / "report.json"
    if report_file.is_file():
        report = json.loads(report_file.read_text())
        summary["cv"] = {
            "model": report["summary"]["rsna_score"],
            "prior": report["prior_summary"]["rsna_score"],
        }
        if "calibrated" in report:
            summary["cv"]["calibrated"] = report["calibrated"]["summary"]["rsna_score"]
        summary["cv"]["auc"] = {
            key.removeprefix("auc_"): round(stat["mean"], 3)
            for key, stat in report["summary"].items()
            if key.startswith("auc_")
        }
    submission = demo_out / "submission.csv"
    labels = data_root / "test_labels.csv"
    if submission.is_file() and labels.is_file():
        prior = ensemble_prior(load_fold_models(demo_out / "finetune", torch.device("cpu")))
        scores = score_against_labels(pl.read_csv(submission), labels, prior)
        summary["test"] = {
            "n_patients": scores["n_patients"],
            "model": scores["submission"]["rsna_score"],
            "prior": scores["prior"]["rsna_score"],
        }
    return summary


def markdown(summary: dict[str, Any]) -> str:
    lines = ["# Demo run", ""]
    if "pretrain" in summary:
        p = summary["pretrain"]
        lines.append(
            f"- 2D-VoCo position probe (held-out volumes, chance {p['chance']:.2f}): same volume "
            f"{_number(p['probe_before']['same'])} -> {_number(p['probe_after']['same'])}, "
            f"cross volume {_number(p['probe_before']['cross'])} -> "
            f"{_number(p['probe_after']['cross'])}"
        )
    if "cv" in summary:
        m, q = summary["cv"]["model"], summary["cv"]["prior"]
        line = f"- CV RSNA score (lower is better): model {m['mean']:.4f} ± {m['std']:.4f}"
        if "calibrated" in summary["cv"]:
            c = summary["cv"]["calibrated"]
            line += f", model calibrated on the other folds {c['mean']:.4f} ± {c['std']:.4f}"
        lines.append(line + f", best-constant prior {q['mean']:.4f} ± {q['std']:.4f}")
        if summary["cv"].get("auc"):
            aucs = ", ".join(f"{t} {_number(v)}" for t, v in summary["cv"]["auc"].items())
            lines.append(f"- CV injury-vs-healthy AUC per target (mean over folds): {aucs}")
    if "test" in summary:
        t = summary["test"]
        lines.append(
            f"- demo test split ({t['n_patients']} patients): model (calibrated when "
            f"notebook 03 saved a calibration) {t['model']:.4f}, prior {t['prior']:.4f}"
        )
    minutes = ", ".join(
        f"{name.split('_', 1)[0]}: {value} min" for name, value in summary["minutes"].items()
    )
    lines.append(f"- minutes per notebook: {minutes}")
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description="summarise a `make demo` run")
    parser.add_argument("demo_out", type=Path)
    parser.add_argument("data_root", type=Path)
    args = parser.parse_args()
    summary = demo_summary(args.demo_out, args.data_root)
    text = markdown(summary)
    write_text_atomic(args.demo_out / "report.md", text)
    write_json_atomic(args.demo_out / "summary.json", summary)
    print(text)


if __name__ == "__main__":
    main()
