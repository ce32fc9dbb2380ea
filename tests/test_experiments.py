"""The experiment batch (kaggle_utils/experiments/runner.py): planning, sharing, resuming, the
paired bootstrap against a slow reference, the report; the label subsets and per-patient score terms
it rests on. Notebook 05 itself runs in tests/test_notebooks.py (slow)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from kaggle_utils.experiments.runner import (
    ExperimentConfig,
    label_efficiency_figure,
    paired_bootstrap,
    plan_experiment,
    run_experiment,
)
from kaggle_utils.finetune.calibration import apply_calibration, calibrate_cross_validation
from kaggle_utils.finetune.data import class_indices, make_folds, training_subset
from kaggle_utils.finetune.report import cross_validation_report, markdown_table
from kaggle_utils.finetune.train import FinetuneConfig
from kaggle_utils.metric import (
    LABEL_COLUMNS,
    TARGET_GROUPS,
    patient_loss_terms,
    rsna_score,
    score_from_terms,
)

N_PATIENTS = 80


def random_labels(n: int, seed: int = 0) -> pl.DataFrame:
    """train.csv-like one-hot labels with every class present."""
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {"patient_id": np.arange(100, 100 + n)}
    for columns in TARGET_GROUPS.values():
        probabilities = [0.7, 0.3] if len(columns) == 2 else [0.7, 0.2, 0.1]
        chosen = rng.choice(len(columns), size=n, p=probabilities)
        chosen[: len(columns)] = np.arange(len(columns))
        for index, column in enumerate(columns):
            data[column] = (chosen == index).astype(np.int64)
    labels = pl.DataFrame(data)
    injured = pl.max_horizontal([1 - pl.col(c[0]) for c in TARGET_GROUPS.values()])
    return labels.with_columns(injured.alias("any_injury"))


def random_predictions(patients: list[int], seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    data: dict[str, Any] = {"patient_id": patients}
    for columns in TARGET_GROUPS.values():
        values = rng.dirichlet(np.ones(len(columns)), size=len(patients))
        data |= {c: values[:, i] for i, c in enumerate(columns)}
    return pl.DataFrame(data)


def mixed(labels: pl.DataFrame, patients: list[int], skill: float, seed: int) -> pl.DataFrame:
    """skill x truth + (1 - skill) x noise, per group (a model as good as `skill`)."""
    truth = labels.filter(pl.col("patient_id").is_in(patients)).sort("patient_id")
    noise = random_predictions(truth["patient_id"].to_list(), seed)
    return noise.with_columns(
        (skill * truth[c].cast(pl.Float64) + (1 - skill) * pl.col(c)).alias(c)
        for c in LABEL_COLUMNS
    )


# --------------------------------------------------------------------------- score terms


def test_patient_loss_terms_give_the_score_of_any_resample() -> None:
    labels = random_labels(40)
    predictions = random_predictions(labels["patient_id"].to_list()[::-1], seed=1)
    ids, losses, weights = patient_loss_terms(labels, predictions)
    assert ids.tolist() == [str(p) for p in labels["patient_id"]]  # the metric keys ids as text
    assert score_from_terms(losses, weights) == pytest.approx(rsna_score(labels, predictions))
    # a resample with repeats is scored as the table of its rows under fresh ids
    rows = np.random.default_rng(2).integers(0, 40, size=40)
    resampled_labels = labels[rows].with_columns(pl.Series("patient_id", np.arange(40)))
    truth_order = labels.select("patient_id").join(predictions, on="patient_id", how="left")
    resampled_predictions = truth_order[rows].with_columns(pl.Series("patient_id", np.arange(40)))
    assert score_from_terms(losses[rows], weights[rows]) == pytest.approx(
        rsna_score(resampled_labels, resampled_predictions), rel=1e-12
    )


def slow_paired_bootstrap(
    labels: pl.DataFrame,
    setting: list[pl.DataFrame],
    baseline: list[pl.DataFrame],
    n_bootstrap: int,
    seed: int,
) -> np.ndarray:
    """The obvious definition: resample patients, score every model with rsna_score on the
    resampled tables, difference of the two sides' mean scores."""
    n = labels.height
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap)

    def mean_score(
        models: list[pl.DataFrame], truth: pl.DataFrame, rows: np.ndarray, fresh: pl.Series
    ) -> float:
        scores = []
        for model in models:
            ordered = labels.select("patient_id").join(model, on="patient_id", how="left")
            scores.append(rsna_score(truth, ordered[rows].with_columns(fresh)))
        return float(np.mean(scores))

    draws = []
    for count in counts:
        rows = np.repeat(np.arange(n), count)
        fresh = pl.Series("patient_id", np.arange(rows.size))
        truth = labels[rows].with_columns(fresh)
        with np.errstate(invalid="ignore", divide="ignore"):
            draws.append(
                mean_score(setting, truth, rows, fresh) - mean_score(baseline, truth, rows, fresh)
            )
    return np.asarray(draws)


def test_paired_bootstrap_matches_a_loop_over_resampled_tables() -> None:
    labels = random_labels(30, seed=3)
    patients = labels["patient_id"].to_list()
    setting = [mixed(labels, patients, 0.5, seed) for seed in (10, 11)]
    baseline = [mixed(labels, patients, 0.1, seed) for seed in (12, 13)]

    def terms(models: list[pl.DataFrame]) -> list[tuple[np.ndarray, np.ndarray]]:
        return [patient_loss_terms(labels, m)[1:] for m in models]

    result = paired_bootstrap(terms(setting), terms(baseline), n_bootstrap=60, seed=5)
    reference = slow_paired_bootstrap(labels, setting, baseline, 60, seed=5)
    reference = reference[np.isfinite(reference)]
    full = np.mean([rsna_score(labels, m) for m in setting]) - np.mean(
        [rsna_score(labels, m) for m in baseline]
    )
    assert result["difference"] == pytest.approx(full, rel=1e-10)
    assert result["n_bootstrap"] == reference.size
    low, high = np.percentile(reference, [2.5, 97.5])
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((low, high), rel=1e-9)
    assert result["p_better"] == pytest.approx(np.mean(reference < 0))
    assert result["difference"] < 0 and result["ci_high"] < 0  # the skilled side is better


# --------------------------------------------------------------------------- label subsets


def test_training_subsets_are_nested_stratified_and_keep_validation() -> None:
    labels = random_labels(200, seed=4)
    folds = make_folds(labels, 5, seed=0, holdout=0.2)
    assert sorted(folds.filter(pl.col("fold") >= 0)["train_order"].to_list()) == list(range(160))
    injured = class_indices(labels).filter(pl.col("any_injury") == 1)["patient_id"]
    previous: set[int] = set()
    for fraction in (0.05, 0.1, 0.25, 0.5, 1.0):
        kept = set(training_subset(folds, fraction)["patient_id"].to_list())
        assert len(kept) == max(1, round(fraction * 160))
        assert previous <= kept  # nested
        share = len(kept & set(injured.to_list())) / len(kept)
        pool_share = np.mean(
            folds.filter(pl.col("fold") >= 0)["patient_id"].is_in(injured.to_list()).to_numpy()
        )
        assert share == pytest.approx(pool_share, abs=0.15)
        held = set(folds.filter(pl.col("fold") == -1)["patient_id"].to_list())
        assert not kept & held
        for fold in range(5):
            fold_kept = set(training_subset(folds, fraction, fold)["patient_id"].to_list())
            fold_patients = set(folds.filter(pl.col("fold") == fold)["patient_id"].to_list())
            assert fold_kept and not fold_kept & fold_patients and not fold_kept & held
            assert len(fold_kept) == max(1, round(fraction * (160 - len(fold_patients))))
        previous = kept
    # the subsets depend on the folds only, not on who trains on them
    assert folds.equals(make_folds(labels, 5, seed=0, holdout=0.2))
    with pytest.raises(ValueError, match="train_order"):
        training_subset(folds.drop("train_order"), 0.5)
    assert training_subset(folds.drop("train_order"), 1.0).height == 160
    with pytest.raises(ValueError, match="train_fraction"):
        FinetuneConfig(train_fraction=0.0)


def test_a_holdout_of_very_few_patients_still_splits() -> None:
    labels = random_labels(6, seed=5)
    folds = make_folds(labels, 2, seed=0, holdout=0.2)
    assert folds.filter(pl.col("fold") == -1).height == 2
    assert set(folds.filter(pl.col("fold") >= 0)["fold"].to_list()) == {0, 1}


# --------------------------------------------------------------------------- planning


def test_plan_shares_pretraining_and_runs_and_skips_what_cannot_run(tmp_path: Path) -> None:
    config = ExperimentConfig(seeds=[0, 1], fractions=[0.1, 1.0])
    plan = plan_experiment(config)
    assert {r.setting for r in plan.runs} == {"random", "voco"}
    assert any("ImageNet + 2D-VoCo" in s for s in plan.skipped)
    assert any("extra" in s for s in plan.skipped)
    # table1: 2 settings x 2 seeds; curve: 2 settings x 2 fractions x 2 seeds
    assert len(plan.runs) == 4 + 8
    # the curve's 100 % runs are table1's runs: 8 distinct fine-tunings, one pretraining
    assert len(plan.unique_runs()) == 8
    assert len(plan.unique_pretrainings()) == 1
    seeds = {(r.seed, r.run_key) for r in plan.runs if r.setting == "voco" and r.fraction == 1}
    assert len(seeds) == 2  # seeds are separate runs...
    splits = {(r.finetune["fold_seed"], r.finetune["holdout"]) for r in plan.runs}
    assert splits == {(0, 0.2)}  # ... on the same folds and held-out patients
    # pretraining leaves out the same held-out patients, from random weights, in the recipe
    pretrain = next(iter(plan.unique_pretrainings().values()))
    assert (pretrain["holdout"], pretrain["fold_seed"], pretrain["init"]) == (0.2, 0, "random")
    assert {r.recipe for r in plan.runs} == {"official"}
    assert {r.finetune["recipe"] for r in plan.runs} == {pretrain["recipe"]} == {"official"}

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    full = ExperimentConfig(
        presets=["table1"], weights_file=str(weights), extra_dirs=["flare"],
        backbones=["a", "b"], seeds=[0],
    )  # fmt: skip
    plan = plan_experiment(full)
    # the paper's four rows (ImageNet, ImageNet + 2D-VoCo, both without ImageNet) + extra
    assert len(plan.runs) == 10 and not plan.skipped
    assert [r.label for r in plan.runs[:5]] == [
        "from scratch", "ImageNet", "2D-VoCo", "ImageNet + 2D-VoCo", "2D-VoCo + extra unlabeled",
    ]  # fmt: skip
    # per backbone: from random weights, from ImageNet, with extra data
    assert len(plan.unique_pretrainings()) == 6
    imagenet = next(r for r in plan.runs if r.setting == "imagenet")
    assert imagenet.finetune["init"] == "imagenet"
    assert imagenet.finetune["weights_file"] == str(weights)
    both = next(r for r in plan.runs if r.setting == "imagenet_voco")
    assert both.finetune["init"] == "voco" and both.pretrain is not None
    assert (both.pretrain["init"], both.pretrain["weights_file"]) == ("imagenet", str(weights))
    scratch_voco = next(r for r in plan.runs if r.setting == "voco")
    assert scratch_voco.pretrain is not None
    assert (scratch_voco.pretrain["init"], scratch_voco.pretrain["weights_file"]) == ("random", "")
    extra = next(r for r in plan.runs if r.setting == "voco_extra")
    assert extra.pretrain is not None and extra.pretrain["extra_dirs"] == ["flare"]
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        plan_experiment(ExperimentConfig(weights_file=str(tmp_path / "missing.pth")))


def test_both_recipes_are_separate_rows_with_their_own_baselines() -> None:
    plan = plan_experiment(
        ExperimentConfig(presets=["table1"], seeds=[0], recipes=["official", "project"])
    )
    assert [r.label for r in plan.runs] == [
        "from scratch [official]", "2D-VoCo [official]",
        "from scratch [project]", "2D-VoCo [project]",
    ]  # fmt: skip
    assert len(plan.unique_pretrainings()) == 2 and len(plan.unique_runs()) == 4
    assert [r.finetune["recipe"] for r in plan.runs] == ["official"] * 2 + ["project"] * 2
    with pytest.raises(ValueError, match="recipes"):
        ExperimentConfig(recipes=["paper"])


def test_imagenet_weights_are_found_among_kaggle_inputs_by_backbone_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No weights_file: the table1 preset looks for each backbone's timm weights among the
    attached inputs and runs the ImageNet rows for the backbone that has them."""
    import timm
    from timm.models import save_for_hf

    found = tmp_path / "kaggle" / "input" / "tiny-weights" / "pytorch" / "default" / "1"
    found.mkdir(parents=True)
    save_for_hf(timm.create_model("test_efficientnet", pretrained=False), found)
    monkeypatch.setenv("KAGGLE_UTILS_FAKE_ROOT", str(tmp_path))
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    plan = plan_experiment(
        ExperimentConfig(
            presets=["table1"], seeds=[0], backbones=["test_efficientnet", "resnet10t"]
        )
    )
    settings = {(r.backbone, r.setting) for r in plan.runs}
    assert ("test_efficientnet", "imagenet") in settings
    assert ("test_efficientnet", "imagenet_voco") in settings
    assert ("resnet10t", "imagenet") not in settings
    assert [s for s in plan.skipped if "ImageNet" in s] == [
        "ImageNet and ImageNet + 2D-VoCo for resnet10t: no ImageNet weights (pass "
        "weights_file, or attach timm's resnet10t weights; nothing is downloaded)"
    ]
    imagenet = next(r for r in plan.runs if r.setting == "imagenet")
    assert Path(imagenet.finetune["weights_file"]) == found


def test_a_grid_varies_any_parameter_of_either_notebook() -> None:
    config = ExperimentConfig(
        presets=["grid"], seeds=[0], grid={"pooling": ["max", "mean"], "pretrain.steps": [5, 9]}
    )
    plan = plan_experiment(config)
    assert len(plan.runs) == 4 and len(plan.unique_pretrainings()) == 2
    points = {(r.finetune["pooling"], r.pretrain["steps"]) for r in plan.runs if r.pretrain}
    assert points == {("max", 5), ("max", 9), ("mean", 5), ("mean", 9)}
    assert plan.runs[0].label == "pooling=max, pretrain.steps=5"
    random = plan_experiment(
        ExperimentConfig(presets=["grid"], seeds=[0], grid={"init": ["random"], "lr": [1, 2]})
    )
    assert not random.unique_pretrainings()
    with pytest.raises(ValueError, match="grid"):
        ExperimentConfig(presets=["grid"])
    with pytest.raises(ValueError, match="set by the experiment"):
        ExperimentConfig(finetune_params={"output_dir": "x"})


# --------------------------------------------------------------------------- running


class FakeNotebooks:
    """Stands in for papermill: writes what notebooks 02 and 03 write when they finish, with
    held-out predictions as good as the initialisation's `skill`."""

    def __init__(self, labels: pl.DataFrame, fail: str = "") -> None:
        self.skill = {"random": 0.1, "voco": 0.4}
        self.labels = labels
        self.fail = fail
        self.calls: list[str] = []

    def __call__(self, notebook: Path, output: Path, params: dict[str, Any]) -> None:
        self.calls.append(output.parent.name)
        run = Path(params["output_dir"])
        if self.fail and self.fail in run.name:
            raise RuntimeError("boom")
        if notebook.name.startswith("02"):
            meta = {"steps": 3, "settings": {"steps": 3}, "probe": {}, "initial_probe": {},
                    "chance": 0.1}  # fmt: skip
            (run / "encoder.json").write_text(json.dumps(meta))
            return
        config = FinetuneConfig(
            data_root=params["data_root"], output_dir=str(run), n_folds=params["n_folds"],
            holdout=params["holdout"], seed=params["seed"], fold_seed=params["fold_seed"],
            init=params["init"], train_fraction=params["train_fraction"],
        )  # fmt: skip
        config.to_json(run / "config.json")
        folds = make_folds(self.labels, config.n_folds, config.fold_seed, config.holdout)
        folds.write_csv(run / "folds.csv")
        skill = self.skill[config.init] * config.train_fraction
        seed = 1000 * config.seed
        oof, held = [], []
        holdout = folds.filter(pl.col("fold") == -1)["patient_id"].to_list()
        for fold in range(config.n_folds):
            patients = folds.filter(pl.col("fold") == fold)["patient_id"].to_list()
            fold_oof = mixed(self.labels, patients, skill, seed + fold).with_columns(
                pl.lit(fold).alias("fold")
            )
            (run / f"fold{fold}").mkdir()
            series = fold_oof.with_columns(pl.col("patient_id").alias("series_id"))
            series.write_parquet(run / f"fold{fold}" / "oof_series.parquet")
            (run / f"fold{fold}" / "done.json").write_text(json.dumps({"best_score": 1.0}))
            oof.append(fold_oof.select("fold", "patient_id", *LABEL_COLUMNS))
            held.append(
                mixed(self.labels, holdout, skill, seed + 100 + fold)
                .with_columns(pl.lit(fold).alias("fold"))
                .select("fold", "patient_id", *LABEL_COLUMNS)
            )
        holdout_folds = pl.concat(held)
        holdout_folds.write_parquet(run / "holdout_folds_patient.parquet")
        report = cross_validation_report(self.labels, pl.concat(oof), folds, holdout_folds)
        (run / "report.json").write_text(json.dumps(report))


def test_run_experiment_runs_each_run_once_resumes_and_reports(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    labels = random_labels(N_PATIENTS, seed=6)
    labels.write_csv(data / "train.csv")
    config = ExperimentConfig(
        experiment_dir=str(tmp_path / "exp"), data_root=str(data), seeds=[0, 1],
        fractions=[0.25, 1.0], n_folds=3, n_bootstrap=300, notebooks_dir=str(tmp_path),
    )  # fmt: skip
    notebooks = FakeNotebooks(labels, fail="random-efficientnetv2_rw_t-official-f0.25-s1")
    result = run_experiment(config, executor=notebooks, progress=False)
    # one pretraining, 8 fine-tunings (table1's are the curve's 100 % runs), one failed
    assert len(notebooks.calls) == 1 + 8 and len(result.ran) == 8
    failed = "random-efficientnetv2_rw_t-official-f0.25-s1"
    assert [Path(run).name.rsplit("-", 1)[0] for run in result.failures] == [failed]
    params = json.loads(next((tmp_path / "exp" / "runs").glob("voco-*/params.json")).read_text())
    assert params["init"] == "voco" and params["encoder_file"].endswith("encoder.pt")
    assert params["holdout"] == 0.2 and params["fold_seed"] == 0

    table1 = result.report["presets"]["table1"]["rows"]
    voco = next(r for r in table1 if r["label"] == "2D-VoCo")
    scratch = next(r for r in table1 if r["label"] == "from scratch")
    assert scratch["baseline"] and voco["n_models"] == 2 * 3 and voco["seeds"] == [0, 1]
    assert voco["holdout"]["rsna_score"]["mean"] < scratch["holdout"]["rsna_score"]["mean"]
    paired = voco["vs_baseline"]
    assert paired["difference"] == pytest.approx(
        voco["holdout"]["rsna_score"]["mean"] - scratch["holdout"]["rsna_score"]["mean"]
    )
    assert paired["ci_low"] < paired["difference"] < paired["ci_high"] < 0
    curve = result.report["presets"]["label_efficiency"]["rows"]
    quarter = [r for r in curve if r["fraction"] == 0.25]
    assert {r["label"]: r["seeds"] for r in quarter} == {"from scratch": [0], "2D-VoCo": [0, 1]}
    markdown = (tmp_path / "exp" / "report.md").read_text()
    assert "optimistic" in markdown and "Failed runs" in markdown and "boom" in markdown
    assert (tmp_path / "exp" / "label_efficiency.png").stat().st_size > 1000
    figure = label_efficiency_figure(result.report)
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["25", "100"]
    assert json.loads((tmp_path / "exp" / "report.json").read_text())["skipped"]
    minutes = result.report["minutes"]
    assert len(minutes["pretrain"]) == 1 and len(minutes["runs"]) == 8
    assert all(m is not None and m >= 0 for m in minutes["runs"].values())

    # a second call runs only what failed
    notebooks = FakeNotebooks(labels)
    again = run_experiment(config, executor=notebooks, progress=False)
    assert len(notebooks.calls) == 1 and not again.failures
    quarter = [r for r in again.report["presets"]["label_efficiency"]["rows"]
               if r["fraction"] == 0.25]  # fmt: skip
    assert all(r["seeds"] == [0, 1] for r in quarter)


# --------------------------------------------------------------------------- the held-out report


def by_hand_ensemble(per_model: pl.DataFrame) -> pl.DataFrame:
    mean = per_model.group_by("patient_id").agg(pl.col(c).mean() for c in LABEL_COLUMNS)
    for columns in TARGET_GROUPS.values():
        total = sum(mean[c] for c in columns)
        mean = mean.with_columns(*(mean[c] / total for c in columns))
    return mean.sort("patient_id")


def test_the_held_out_split_is_scored_per_fold_model_and_as_their_ensemble() -> None:
    labels = random_labels(N_PATIENTS, seed=8)
    folds = make_folds(labels, 3, seed=0, holdout=0.2)
    held = folds.filter(pl.col("fold") == -1)["patient_id"].to_list()
    oof = pl.concat(
        mixed(labels, folds.filter(pl.col("fold") == k)["patient_id"].to_list(), 0.3, k)
        .with_columns(pl.lit(k).alias("fold"))
        .select("fold", "patient_id", *LABEL_COLUMNS)
        for k in range(3)
    )
    holdout_folds = pl.concat(
        mixed(labels, held, 0.3, 10 + k)
        .with_columns(pl.lit(k).alias("fold"))
        .select("fold", "patient_id", *LABEL_COLUMNS)
        for k in range(3)
    )
    report = cross_validation_report(labels, oof, folds, holdout_folds)
    truth = labels.filter(pl.col("patient_id").is_in(held))
    singles = [
        rsna_score(truth, holdout_folds.filter(pl.col("fold") == k).drop("fold")) for k in range(3)
    ]
    assert report["holdout_summary"]["rsna_score"]["mean"] == pytest.approx(np.mean(singles))
    assert report["holdout_summary"]["rsna_score"]["n"] == 3
    ensemble = rsna_score(truth, by_hand_ensemble(holdout_folds))
    assert report["holdout"]["rsna_score"] == pytest.approx(ensemble)
    assert ensemble < np.mean(singles)  # averaging noisy models helps: the two are not one figure
    table = markdown_table(report, ["rsna_score"])
    assert "fold models (held-out)" in table and "fold ensemble (held-out)" in table
    assert "optimistic" in table

    # the calibration, fitted on single models' out-of-fold predictions, is applied to each
    # fold model's held-out prediction and only then averaged
    calibration, calibrated = calibrate_cross_validation(labels, oof, folds, holdout_folds)
    per_model = apply_calibration(holdout_folds, calibration)
    expected = rsna_score(truth, by_hand_ensemble(per_model))
    assert calibrated["holdout"]["rsna_score"] == pytest.approx(expected)
    other_order = rsna_score(truth, apply_calibration(by_hand_ensemble(holdout_folds), calibration))
    assert other_order != pytest.approx(expected, abs=1e-6)


def test_table2_plans_multi_and_single_organ_runs_and_reports_each_organ(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    labels = random_labels(N_PATIENTS, seed=8)
    labels.write_csv(data / "train.csv")
    with pytest.raises(ValueError, match="segmentation_dir"):
        ExperimentConfig(presets=["table2"])
    config = ExperimentConfig(
        experiment_dir=str(tmp_path / "exp"), data_root=str(data), seeds=[0], n_folds=3,
        presets=["table1", "table2"], segmentation_dir="seg", organs=["liver", "kidney"],
        finetune_params={"shape": [32, 96, 96]}, crop_params={"shape": [16, 64, 64]},
        n_bootstrap=100, notebooks_dir=str(tmp_path),
    )  # fmt: skip
    plan = plan_experiment(config)
    table2 = [r for r in plan.runs if r.preset == "table2"]
    assert len(table2) == 2 * (1 + 2)  # scratch and 2D-VoCo: one multi-organ, two organs
    # the multi-organ runs are table1's runs: 2 + 4 distinct fine-tunings
    assert len(plan.unique_runs()) == 6
    liver = next(r for r in table2 if r.organ == "liver" and r.setting == "voco")
    assert liver.finetune["input"] == "liver" and liver.finetune["targets"] == ["liver"]
    assert liver.finetune["shape"] == [16, 64, 64]
    assert liver.finetune["crop_source_shape"] == [32, 96, 96]
    assert liver.finetune["segmentation_dir"] == "seg"

    result = run_experiment(config, executor=FakeNotebooks(labels), progress=False)
    assert not result.failures
    params = json.loads((tmp_path / "exp" / "runs" / liver.run_key / "params.json").read_text())
    assert params["crops_dir"] == str(tmp_path / "exp" / "crops")
    rows = {r["label"]: r for r in result.report["presets"]["table2"]["rows"]}
    assert set(rows) == {
        "multi-organ, from scratch", "multi-organ, 2D-VoCo",
        "single-organ, from scratch", "single-organ, 2D-VoCo",
    }  # fmt: skip
    single = rows["single-organ, 2D-VoCo"]["organs"]
    report = json.loads((tmp_path / "exp" / "runs" / liver.run_key / "report.json").read_text())
    aucs = [m["auc_liver"] for m in report["holdout_folds"].values()]
    assert single["liver"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert single["liver"]["n_models"] == 3 and rows["multi-organ, 2D-VoCo"]["organs"]["kidney"]
    markdown = (tmp_path / "exp" / "report.md").read_text()
    assert "## table2" in markdown and "liver AUC" in markdown and "single-organ" in markdown
