"""One fine-tuning recipe trial on the demo data: CV injury-vs-healthy AUC per target.

    python benchmarks/demo_recipe.py NAME '{epochs: 30, slice_loss_weight: 0.3}' \
        [--data-root inputs/demo-rsna] [--cache-dir outputs/demo/cache] [--threads 1] \
        [--output-root outputs/recipe-trials]

How the demo's fine-tuning recipe (the Makefile's `DEMO_FINETUNE_PARAMS`) was chosen (issue 11:
every target's CV AUC >= 0.7). Starts from the demo's recipe before issue 11's change (20
epochs, batch 8, lr 0.001, max pooling, 16 of 32 slices at 96 px, `test_efficientnet`, random
init, 3 folds), applies the YAML overrides (any `FinetuneConfig` field), runs
`run_cross_validation` into `<output-root>/<NAME>/` (resumable like notebook 03) and appends
one JSON line to `<output-root>/results.jsonl`: the overrides, the minutes, the fold scores and
the per-target AUC averaged over the folds, as `make demo`'s summary reports it. Needs notebook
01's `32x96x96` cache of the data root. The README's trials ran two at a time at
`--threads 1`, so their minutes are those of a shared machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import polars as pl
import torch
import yaml

from kaggle_utils.finetune.train import FinetuneConfig, read_labels, run_cross_validation
from kaggle_utils.metric import group_auc

BEFORE_ISSUE_11 = {
    "shape": [32, 96, 96],
    "hidden_size": 64,
    "num_layers": 1,
    "pooling": "max",
    "n_slices": 16,
    "image_size": 96,
    "epochs": 20,
    "batch_size": 8,
    "lr": 0.001,
    "affine_prob": 0.5,
    "brightness_contrast_prob": 0.0,
    "coarse_dropout_prob": 0.0,
    "num_workers": 0,
    "backbone": "test_efficientnet",
    "init": "random",
    "n_folds": 3,
}


def fold_mean_auc(oof_patient: pl.DataFrame, labels: pl.DataFrame) -> dict[str, float]:
    """Per-target AUC on each fold's validation patients, averaged over the folds."""
    per_fold = []
    for fold in sorted(oof_patient["fold"].unique().to_list()):
        predictions = oof_patient.filter(pl.col("fold") == fold).drop("fold")
        truth = labels.join(predictions.select("patient_id"), on="patient_id", how="semi")
        per_fold.append(group_auc(truth, predictions))
    return {k: round(sum(f[k] for f in per_fold) / len(per_fold), 3) for k in per_fold[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("overrides", nargs="?", default="{}", help="YAML mapping")
    parser.add_argument("--data-root", default="inputs/demo-rsna")
    parser.add_argument("--cache-dir", default="outputs/demo/cache")
    parser.add_argument("--output-root", type=Path, default=Path("outputs/recipe-trials"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    overrides = yaml.safe_load(args.overrides) or {}
    torch.set_num_threads(args.threads)
    config = FinetuneConfig(
        data_root=args.data_root,
        cache_dir=args.cache_dir,
        output_dir=str(args.output_root / args.name),
        **(BEFORE_ISSUE_11 | overrides),
    )
    start = time.monotonic()
    result = run_cross_validation(config, progress=False)
    line = {
        "name": args.name,
        "overrides": overrides,
        "minutes": round((time.monotonic() - start) / 60, 2),
        "fold_scores": {str(k): round(v, 4) for k, v in result.fold_scores.items()},
        "auc": fold_mean_auc(result.oof_patient, read_labels(config.data_root)),
    }
    print(json.dumps(line))
    with (args.output_root / "results.jsonl").open("a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
