"""Submission (notebook 04): a valid file from the tiny dataset and a tiny trained run, the same
predictions as notebook 01's cache + notebook 03's predictor, fallbacks for every kind of broken
input, validation before writing, calibration, scoring, and the notebook itself."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import papermill
import polars as pl
import pytest
import torch

from kaggle_utils.cache.preprocess import PreprocessConfig, list_series, preprocess_dataset
from kaggle_utils.finetune.calibration import (
    CALIBRATION_FILE,
    Calibration,
    apply_calibration,
    apply_probability_scaling,
    cross_fitted,
    fit_calibration,
    read_calibration,
)
from kaggle_utils.finetune.data import AugmentConfig, SeriesDataset, build_transform, series_table
from kaggle_utils.finetune.predict import aggregate_patients, load_fold_model, predict_series
from kaggle_utils.finetune.report import ensemble_patients, training_prior
from kaggle_utils.finetune.train import FinetuneConfig, read_labels
from kaggle_utils.metric import (
    LABEL_COLUMNS,
    TARGET_GROUPS,
    constant_submission,
    rsna_score,
    validate_submission,
)
from kaggle_utils.submission import inference as submission_module
from kaggle_utils.submission.inference import (
    EnsemblePredictor,
    SubmissionResult,
    load_fold_models,
    model_input,
    predict_test_set,
    preprocess_settings,
    resolve_model_dir,
    save_preprocess_settings,
    score_against_labels,
    score_table,
    write_submission,
)

from conftest import TINY_MODEL_IMAGE_SIZE, TINY_MODEL_SHAPE, TINY_MODEL_SLICES
from submission_checks import (
    assert_no_notebook_warnings,
    assert_same_submission,
    differs_from_the_prior,
)

ROOT = Path(__file__).resolve().parents[1]
SHAPE, N_SLICES, IMAGE_SIZE = TINY_MODEL_SHAPE, TINY_MODEL_SLICES, TINY_MODEL_IMAGE_SIZE


@pytest.fixture(scope="module")
def clean(
    tiny_competition: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> SubmissionResult:
    """The submission of the untouched tiny test set, decoded in this thread; a patient that
    gets the prior fails it (`max_prior_share=0`)."""
    output = tmp_path_factory.mktemp("sub_clean") / "submission.csv"
    return predict_test_set(
        tiny_competition, model_dir, output, workers=0, max_prior_share=0, progress=False
    )


def copy_model_dir(model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def group_sums(frame: pl.DataFrame) -> np.ndarray:
    return np.stack([frame.select(c).sum_horizontal().to_numpy() for c in TARGET_GROUPS.values()])


def test_the_csv_follows_the_sample_and_is_valid(
    tiny_competition: Path, clean: SubmissionResult
) -> None:
    sample = pl.read_csv(tiny_competition / "sample_submission.csv")
    written = pl.read_csv(clean.csv_path)
    assert written.columns == sample.columns
    assert written["patient_id"].to_list() == sample["patient_id"].to_list()
    values = written.select(LABEL_COLUMNS).to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all() and (values <= 1).all()
    np.testing.assert_allclose(group_sums(written), 1.0, atol=1e-9)
    validate_submission(written, sample)
    np.testing.assert_allclose(values, clean.submission.select(LABEL_COLUMNS).to_numpy())
    assert clean.problems.height == 0
    # every patient from the models: no row is the prior (a join that lost the patients would
    # fill them all with it without recording a problem)
    assert differs_from_the_prior(written, clean.prior) == sample["patient_id"].to_list()
    assert clean.timings.height == len(list_series(tiny_competition, "test"))
    assert clean.timings["status"].to_list() == ["ok"] * clean.timings.height
    assert (clean.timings["decode_s"] > 0).all() and (clean.timings["model_s"] > 0).all()
    summary = clean.summary()
    assert summary["what"].to_list() == ["decode", "preprocess", "model", "total", "wall clock"]
    total = summary.filter(pl.col("what") == "total")
    assert total["per_study_s"][0] == pytest.approx(total["sum_s"][0] / sample.height)
    assert clean.settings["preprocessing_from"].endswith("preprocess.json")
    assert clean.settings["precision"] == "fp32" and clean.settings["folds"] == [0, 1]
    assert not list(clean.csv_path.parent.glob(".*.tmp"))


def test_on_the_fly_preprocessing_matches_the_cache_and_notebook_03(
    tiny_competition: Path, model_dir: Path, clean: SubmissionResult, tmp_path: Path
) -> None:
    """Decoding on the fly must give the model what notebook 01's cache and notebook 03's
    `predict_series` give it: same volumes, slices and crop, so the same probabilities."""
    cache = tmp_path / "test_cache"
    preprocess_dataset(
        list_series(tiny_competition, "test"), cache, PreprocessConfig(shapes=(SHAPE,)),
        workers=0, progress=False,
    )  # fmt: skip
    table = series_table(pl.read_csv(tiny_competition / "test_labels.csv"), cache, SHAPE)
    config = FinetuneConfig.from_json(model_dir / "config.json")
    folds = []
    for fold in (0, 1):
        model, meta = load_fold_model(model_dir / f"fold{fold}")
        folds.append(predict_series(model, table, config, torch.device("cpu"), fold, meta["prior"]))
    reference = (
        pl.concat(folds)
        .group_by("patient_id", "series_id")
        .agg(pl.col(LABEL_COLUMNS).mean())
        .sort("patient_id", "series_id")
    )
    ours = clean.series.sort("patient_id", "series_id")
    assert ours.select("patient_id", "series_id").equals(
        reference.select("patient_id", "series_id")
    )
    np.testing.assert_allclose(
        ours.select(LABEL_COLUMNS).to_numpy(), reference.select(LABEL_COLUMNS).to_numpy(), atol=1e-5
    )
    dataset = SeriesDataset(table, ["liver"], N_SLICES, IMAGE_SIZE, train=False)
    volume = np.load(table["path"][0])
    transform = build_transform(IMAGE_SIZE, False, AugmentConfig())
    np.testing.assert_array_equal(
        model_input(volume, N_SLICES, transform), dataset[0]["image"].numpy()
    )


def test_without_worker_processes_a_thread_decodes_and_gives_the_same_file(
    tiny_competition: Path,
    model_dir: Path,
    clean: SubmissionResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Processes that cannot start (a script without a main guard): one background thread
    decodes instead, with a warning that a decoder crash would then end the run."""
    submitted: list[int] = []

    class CountingPool(submission_module.ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
            submitted.append(args[0].series_id)
            return super().submit(fn, *args, **kwargs)

    class PoolThatCannotStart:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def submit(self, *args: object, **kwargs: object) -> None:
            raise submission_module.BrokenProcessPool("a worker could not start")

        def shutdown(self, *args: object, **kwargs: object) -> None:
            pass

    monkeypatch.setattr(submission_module, "ThreadPoolExecutor", CountingPool)
    monkeypatch.setattr(submission_module, "ProcessPoolExecutor", PoolThatCannotStart)
    with caplog.at_level(logging.WARNING, logger="kaggle_utils.submission.inference"):
        result = predict_test_set(
            tiny_competition, model_dir, tmp_path / "sub.csv", workers=1, batch_size=2,
            max_prior_share=0, progress=False,
        )  # fmt: skip
    assert any("would end the run" in m for m in caplog.messages)
    assert submitted == [t.series_id for t in list_series(tiny_competition, "test")]
    assert result.submission["patient_id"].equals(clean.submission["patient_id"])
    np.testing.assert_allclose(
        result.submission.select(LABEL_COLUMNS).to_numpy(),
        clean.submission.select(LABEL_COLUMNS).to_numpy(),
        atol=1e-6,
    )


def test_tta_averages_the_flip_and_max_aggregation_takes_the_worst_series(
    tiny_competition: Path, model_dir: Path, tmp_path: Path
) -> None:
    folds = load_fold_models(model_dir, torch.device("cpu"))
    volume = np.random.default_rng(0).integers(0, 256, SHAPE, dtype=np.uint8)
    plain = EnsemblePredictor(folds).predict([volume, volume[..., ::-1]])
    both = EnsemblePredictor(folds, tta=True).predict([volume])
    for column in LABEL_COLUMNS:
        assert both[column][0] == pytest.approx(np.mean(plain[column]), abs=1e-6)
    assert plain["liver_low"][0] != pytest.approx(plain["liver_low"][1], abs=1e-9)

    result = predict_test_set(
        tiny_competition, model_dir, tmp_path / "sub.csv", aggregation="max", workers=0,
        progress=False,
    )  # fmt: skip
    assert result.settings["aggregation"] == "max"
    # each fold model takes its worst series; the models are then averaged
    patient = result.series_by_model.filter(pl.col("patient_id") == 13084)
    worst = patient.group_by("fold").agg(pl.col(c).max() for c in LABEL_COLUMNS)
    expected = apply_probability_scaling(
        apply_probability_scaling(worst, {}).select(LABEL_COLUMNS).mean(), {}
    )
    row = result.submission.filter(pl.col("patient_id") == 13084).select(LABEL_COLUMNS)
    np.testing.assert_allclose(row.to_numpy(), expected.to_numpy(), atol=1e-12)


def corrupt_copy(tiny_competition: Path, tmp_path: Path) -> Path:
    """A copy of the tiny competition folder to break (the fixture is shared)."""
    return Path(shutil.copytree(tiny_competition, tmp_path / "data"))


def file_listing(folder: Path) -> set[tuple[str, int]]:
    return {(str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*")}


def test_broken_series_fall_back_to_other_series_or_the_prior(
    tiny_competition: Path,
    model_dir: Path,
    clean: SubmissionResult,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """(a) every file of 13084/23900 garbage, (b) patient 47992's folder deleted (its row in
    test_series_meta.csv stays), (c) 56295/89229 an empty folder."""
    data = corrupt_copy(tiny_competition, tmp_path)
    images = data / "test_images"
    for index, dicom in enumerate(sorted((images / "13084" / "23900").iterdir())):
        data_bytes = dicom.read_bytes()
        dicom.write_bytes(b"not a DICOM file" if index % 2 else data_bytes[: len(data_bytes) // 2])
    shutil.rmtree(images / "47992")
    for dicom in (images / "56295" / "89229").iterdir():
        dicom.unlink()
    before = file_listing(data)
    with caplog.at_level(logging.WARNING, logger="kaggle_utils.submission.inference"):
        result = predict_test_set(
            data, model_dir, tmp_path / "out" / "submission.csv", workers=1, progress=False
        )
    assert file_listing(data) == before  # nothing written to the input folder
    validate_submission(pl.read_csv(result.csv_path), pl.read_csv(data / "sample_submission.csv"))

    problems = {(r["patient_id"], r["series_id"]): r for r in result.problems.to_dicts()}
    assert set(problems) == {(13084, 23900), (47992, 34083), (56295, 89229)}
    assert problems[(13084, 23900)]["fallback"] == "other series"
    assert "no readable DICOM slices" in problems[(13084, 23900)]["reason"]
    assert problems[(47992, 34083)]["fallback"] == "prior"
    assert "not found" in problems[(47992, 34083)]["reason"]
    assert problems[(56295, 89229)]["fallback"] == "other series"
    assert "no files" in problems[(56295, 89229)]["reason"]
    assert {r["stage"] for r in problems.values()} == {"decode"}
    for patient, series in problems:
        assert any(f"patient {patient} series {series}" in m for m in caplog.messages)
    assert any("patient 47992: no usable series" in m for m in caplog.messages)

    rows = {r["patient_id"]: r for r in result.submission.to_dicts()}
    assert [rows[47992][c] for c in LABEL_COLUMNS] == pytest.approx(
        [result.prior[c] for c in LABEL_COLUMNS]
    )
    good = {13084: 84698, 56295: 69728}  # the series left: the patient's prediction is theirs
    for patient, series in good.items():
        expected = clean.series.filter(pl.col("series_id") == series).row(0, named=True)
        assert [rows[patient][c] for c in LABEL_COLUMNS] == pytest.approx(
            [expected[c] for c in LABEL_COLUMNS], abs=1e-6
        )
    assert result.timings.filter(pl.col("status") == "ok").height == 2


def test_patients_without_any_usable_series_get_the_prior(
    tiny_competition: Path, model_dir: Path, tmp_path: Path
) -> None:
    """47992 has no folder and no meta row at all; both series of 56295 are broken; a
    test series of a patient the sample does not list is ignored."""
    data = corrupt_copy(tiny_competition, tmp_path)
    images = data / "test_images"
    shutil.rmtree(images / "47992")
    meta = pl.read_csv(data / "test_series_meta.csv")
    meta.filter(pl.col("patient_id") != 47992).write_csv(data / "test_series_meta.csv")
    shutil.rmtree(images / "56295" / "69728")
    (images / "56295" / "69728").mkdir()
    for dicom in (images / "56295" / "89229").iterdir():
        dicom.write_bytes(dicom.read_bytes()[:100])
    shutil.copytree(images / "13084" / "84698", images / "99999" / "1")
    result = predict_test_set(data, model_dir, tmp_path / "submission.csv", progress=False)
    validate_submission(pl.read_csv(result.csv_path), pl.read_csv(data / "sample_submission.csv"))
    table = result.problems.sort("patient_id", "series_id", nulls_last=True)
    assert table.select("patient_id", "series_id", "stage", "fallback").rows() == [
        (47992, None, "missing", "prior"),
        (56295, 69728, "decode", "prior"),
        (56295, 89229, "decode", "prior"),
        (99999, 1, "ignored", "not predicted"),
    ]
    prior = [result.prior[c] for c in LABEL_COLUMNS]
    for patient in (47992, 56295):
        row = result.submission.filter(pl.col("patient_id") == patient).select(LABEL_COLUMNS)
        assert list(row.row(0)) == pytest.approx(prior)
    assert 99999 not in result.submission["patient_id"].to_list()
    assert result.prior_patients == [47992, 56295]
    assert result.prior_share == pytest.approx(2 / result.submission.height)

    # the same run with a limit below that share: the valid file is written, then it fails
    limited_csv = tmp_path / "limited" / "submission.csv"
    with pytest.raises(submission_module.PriorShareError, match=r"2 of \d+ patients"):
        predict_test_set(
            data, model_dir, limited_csv, max_prior_share=0.1, workers=0, progress=False
        )
    validate_submission(pl.read_csv(limited_csv), pl.read_csv(data / "sample_submission.csv"))
    allowed = predict_test_set(
        data, model_dir, limited_csv, max_prior_share=result.prior_share, workers=0,
        progress=False,
    )  # fmt: skip
    assert allowed.prior_share == result.prior_share


def test_preflight_names_each_syntax_and_what_reads_it(
    tiny_competition: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = submission_module.decoding_preflight(tiny_competition)
    n_series = len(list_series(tiny_competition, "test"))
    assert table["n_series"].sum() == n_series
    assert "1.2.840.10008.1.2.5" in table["transfer_syntax"].to_list()  # RLE, as the competition
    assert "NO DECODER" not in table["readers"].to_list()
    assert all(r.startswith("dicomsdl") for r in table["readers"].to_list())

    # an install without any decoder for RLE Lossless: the preflight says so
    from kaggle_utils.cache.dicom import SyntaxSupport

    def nothing_reads_rle(uid: str, name: str = "") -> SyntaxSupport:
        readable = uid != "1.2.840.10008.1.2.5"
        return SyntaxSupport(uid, name or uid, readable, readable, ())

    monkeypatch.setattr(submission_module, "syntax_support", nothing_reads_rle)
    broken = submission_module.decoding_preflight(tiny_competition)
    rle = broken.filter(pl.col("transfer_syntax") == "1.2.840.10008.1.2.5")
    assert rle["readers"].to_list() == ["NO DECODER"]


def test_the_preflight_names_missing_series_folders_as_a_data_problem(
    tiny_competition: Path, tmp_path: Path
) -> None:
    """A series the meta CSV lists but the disk lacks, and one whose folder holds only a
    DICOMDIR: the preflight runs on (no exception) and says to check the data, not the install."""
    data = corrupt_copy(tiny_competition, tmp_path)
    tasks = list_series(data, "test")
    shutil.rmtree(tasks[0].series_dir)
    for file in tasks[1].series_dir.iterdir():
        file.unlink()
    (tasks[1].series_dir / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    text, problems = submission_module.startup_report(data)
    assert "no image file: 2 series" in text
    assert len(problems) == 1 and "Check the data folder" in problems[0]
    assert "Fix the install" not in problems[0]


def test_a_series_the_model_fails_on_costs_only_itself(
    tiny_competition: Path,
    model_dir: Path,
    clean: SubmissionResult,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_prepare = submission_module.prepare_series

    def one_unusable_volume(task, config):  # type: ignore[no-untyped-def]
        prepared = real_prepare(task, config)
        if task.series_id == 69728:
            prepared.volume = np.zeros((4, 4), np.uint8)  # no slice axis: the model step raises
        return prepared

    monkeypatch.setattr(submission_module, "prepare_series", one_unusable_volume)
    result = predict_test_set(
        tiny_competition, model_dir, tmp_path / "sub.csv", batch_size=2, workers=0,
        progress=False,
    )  # fmt: skip
    assert result.problems.select("patient_id", "series_id", "stage", "fallback").rows() == [
        (56295, 69728, "predict", "other series")
    ]
    assert set(result.series["series_id"]) == set(clean.series["series_id"]) - {69728}
    assert result.timings.filter(pl.col("status") == "ok").height == clean.series.height - 1


def test_a_bad_submission_is_refused_before_anything_is_written(
    tiny_competition: Path, model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample = pl.read_csv(tiny_competition / "sample_submission.csv")
    good = constant_submission(sample["patient_id"], dict.fromkeys(LABEL_COLUMNS, 0.5))
    target = tmp_path / "submission.csv"
    with pytest.raises(ValueError, match="missing from the submission"):
        write_submission(good.head(2), sample, target)
    assert not target.exists()
    write_submission(good, sample, target)
    before = target.read_bytes()
    with pytest.raises(ValueError, match="columns out of order"):
        write_submission(good.select(reversed(good.columns)), sample, target)
    assert target.read_bytes() == before  # the previous file is left as it was

    real_assemble = submission_module._assemble
    monkeypatch.setattr(
        submission_module, "_assemble", lambda *a: real_assemble(*a).head(sample.height - 1)
    )
    output = tmp_path / "e2e" / "submission.csv"
    with pytest.raises(ValueError, match="patients missing from the submission"):
        predict_test_set(tiny_competition, model_dir, output, workers=0, progress=False)
    assert not output.exists() and not list(output.parent.glob("*"))


def miscalibrated(seed: int = 0, n: int = 300) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Labels and predictions that know the truth but are far too confident in "healthy"."""
    rng = np.random.default_rng(seed)
    labels: dict[str, object] = {"patient_id": np.arange(n)}
    predictions: dict[str, object] = {"patient_id": np.arange(n)}
    for columns in TARGET_GROUPS.values():
        truth = np.where(rng.random(n) < 0.3, rng.integers(1, len(columns), n), 0)
        noisy = np.clip(truth + (rng.random(n) < 0.3), 0, len(columns) - 1)
        for index, column in enumerate(columns):
            labels[column] = (truth == index).astype(np.int64)
            predictions[column] = np.where(noisy == index, 0.8, 0.2 / (len(columns) - 1))
            if index == 0:
                predictions[column] = predictions[column] * 6  # type: ignore[operator]
    return pl.DataFrame(labels), apply_probability_scaling(pl.DataFrame(predictions), {})


def test_calibration_never_worsens_the_oof_score_and_keeps_groups_normalised(
    tiny_competition: Path, model_dir: Path
) -> None:
    labels = read_labels(tiny_competition)
    oof = pl.read_parquet(model_dir / "oof_patient.parquet")
    truth = labels.join(oof.select("patient_id"), on="patient_id", how="semi")
    calibration = fit_calibration(labels, oof, training_prior(truth))
    before = rsna_score(truth, oof.drop("fold"))
    assert rsna_score(truth, apply_calibration(oof.drop("fold"), calibration)) <= before

    labels, predictions = miscalibrated()
    calibration = fit_calibration(labels, predictions, training_prior(labels))
    calibrated = apply_calibration(predictions, calibration)
    assert rsna_score(labels, calibrated) < rsna_score(labels, predictions) - 0.05
    assert min(calibration.factors.values()) >= 0.5 and max(calibration.factors.values()) <= 2.0
    np.testing.assert_allclose(group_sums(calibrated), 1.0, atol=1e-12)
    assert calibrated["patient_id"].equals(predictions["patient_id"])
    with pytest.raises(ValueError, match="unknown columns"):
        apply_probability_scaling(predictions, {"liver_medium": 2.0})
    with pytest.raises(ValueError, match="positive"):
        apply_probability_scaling(predictions, {"liver_low": 0.0})
    with pytest.raises(ValueError, match="model_weight"):
        Calibration(calibration.prior, {"liver": 1.5})


def slow_apply_calibration(frame: pl.DataFrame, calibration: Calibration) -> np.ndarray:
    rows = []
    for row in frame.iter_rows(named=True):
        out: list[float] = []
        for target, columns in TARGET_GROUPS.items():
            w = calibration.model_weight.get(target, 1.0)
            values = [
                (w * row[c] + (1 - w) * calibration.prior[c]) * calibration.factors.get(c, 1.0)
                for c in columns
            ]
            out += [v / sum(values) for v in values]
        rows.append(out)
    return np.array(rows)


def test_apply_calibration_matches_slow_reference() -> None:
    labels, predictions = miscalibrated(n=20)
    prior = training_prior(labels)
    calibration = Calibration(
        prior, {"bowel": 0.0, "liver": 0.3, "spleen": 1.0}, {"liver_low": 1.7, "bowel_injury": 0.6}
    )
    calibrated = apply_calibration(predictions, calibration)
    np.testing.assert_allclose(
        calibrated.select(LABEL_COLUMNS).to_numpy(),
        slow_apply_calibration(predictions, calibration),
        rtol=1e-12,
    )
    np.testing.assert_allclose(  # weight 0: exactly the prior
        calibrated.select(TARGET_GROUPS["bowel"]).to_numpy()[0],
        apply_probability_scaling(
            constant_submission([0], prior), {"bowel_injury": 0.6}
        ).select(TARGET_GROUPS["bowel"]).to_numpy()[0],
    )  # fmt: skip


def test_blend_hands_a_useless_head_back_to_the_prior() -> None:
    labels, predictions = miscalibrated(n=400)
    rng = np.random.default_rng(5)
    noise = rng.dirichlet([1.0, 1.0, 1.0], size=predictions.height)  # liver: pure noise
    predictions = predictions.with_columns(
        pl.Series(c, noise[:, k]) for k, c in enumerate(TARGET_GROUPS["liver"])
    )
    calibration = fit_calibration(labels, predictions, training_prior(labels))
    assert calibration.model_weight["liver"] <= 0.2
    assert calibration.model_weight["spleen"] >= 0.7  # informative: kept


def test_cross_fitted_calibration_never_sees_the_fold_it_calibrates() -> None:
    labels, predictions = miscalibrated(n=120)
    oof = predictions.with_columns((pl.col("patient_id") % 3).alias("fold"))
    calibrated = cross_fitted(labels, oof)
    assert calibrated.sort("patient_id")["patient_id"].equals(oof["patient_id"])
    flipped = labels.with_columns(  # fold 0's liver labels changed: fold 0 must not move
        pl.when(pl.col("patient_id") % 3 == 0).then(1 - pl.col("liver_healthy"))
        .otherwise(pl.col("liver_healthy")).alias("liver_healthy"),
        pl.when(pl.col("patient_id") % 3 == 0).then(pl.col("liver_healthy"))
        .otherwise(pl.col("liver_low")).alias("liver_low"),
        pl.when(pl.col("patient_id") % 3 == 0).then(0)
        .otherwise(pl.col("liver_high")).alias("liver_high"),
    )  # fmt: skip
    again = cross_fitted(flipped, oof)
    fold0 = pl.col("fold") == 0
    assert calibrated.filter(fold0).equals(again.filter(fold0))
    assert not calibrated.filter(~fold0).equals(again.filter(~fold0))
    assert cross_fitted(labels, oof.with_columns(pl.lit(0).alias("fold"))).equals(
        oof.with_columns(pl.lit(0).alias("fold"))
    )


def test_calibration_json_in_the_model_folder_is_applied(
    tiny_competition: Path, model_dir: Path, clean: SubmissionResult, tmp_path: Path
) -> None:
    calibrated_dir = copy_model_dir(model_dir, tmp_path)
    calibration = Calibration(
        clean.prior, {"liver": 0.5}, {"liver_healthy": 2.0, "spleen_high": 0.5}
    )
    calibration.to_json(calibrated_dir / CALIBRATION_FILE)
    assert read_calibration(calibrated_dir) == calibration
    result = predict_test_set(
        tiny_competition, calibrated_dir, tmp_path / "sub.csv", workers=0, progress=False
    )
    # fitted on single models' predictions, it is applied to each model's, then averaged
    per_model = aggregate_patients(clean.series_by_model, "mean", by_fold=True)
    expected = ensemble_patients(apply_calibration(per_model, calibration))
    expected = clean.submission.select("patient_id").join(expected, on="patient_id")
    calibrated_ensemble = apply_calibration(clean.submission, calibration)
    assert not np.allclose(
        expected.select(LABEL_COLUMNS).to_numpy(),
        calibrated_ensemble.select(LABEL_COLUMNS).to_numpy(),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        result.submission.select(LABEL_COLUMNS).to_numpy(),
        expected.select(LABEL_COLUMNS).to_numpy(),
        atol=1e-9,
    )
    assert result.settings["calibration"]["model_weight"] == {"liver": 0.5}


def test_score_against_labels_gives_the_model_and_the_prior(
    tiny_competition: Path, clean: SubmissionResult
) -> None:
    labels_csv = tiny_competition / "test_labels.csv"
    scores = score_against_labels(clean.submission, labels_csv, clean.prior)
    labels = pl.read_csv(labels_csv)
    assert scores["n_patients"] == labels.height == clean.submission.height
    assert scores["submission"]["rsna_score"] == pytest.approx(rsna_score(labels, clean.submission))
    constant = constant_submission(labels["patient_id"], clean.prior)
    assert scores["prior"]["rsna_score"] == pytest.approx(rsna_score(labels, constant))
    assert set(scores["prior"]) == {"rsna_score", "bowel", "extravasation", "kidney", "liver",
                                    "spleen", "any_injury"}  # fmt: skip
    table = score_table(scores)
    assert table["prediction"].to_list() == ["submission", "prior"]
    oracle = score_against_labels(clean.submission, labels_csv)
    assert oracle["prior"]["rsna_score"] <= scores["prior"]["rsna_score"] + 1e-12
    with pytest.raises(ValueError, match="no patient"):
        score_against_labels(clean.submission.with_columns(pl.col("patient_id") + 1), labels_csv)


def test_preprocessing_settings_come_from_the_model_folder_or_the_cache(
    model_dir: Path, train_cache: Path, tmp_path: Path
) -> None:
    meta = json.loads((model_dir / "fold0" / "model.json").read_text())
    config, source = preprocess_settings(model_dir, meta)
    assert source == str(model_dir / "preprocess.json")  # notebook 03 writes it
    assert config.shapes == (SHAPE,) and config.windows == ((50.0, 400.0),) and config.body_crop

    moved = copy_model_dir(model_dir, tmp_path)  # as on Kaggle: the cache is not attached
    (moved / "preprocess.json").unlink()
    assert preprocess_settings(moved, meta)[1] == f"training cache {train_cache}"
    settings = json.loads((moved / "config.json").read_text()) | {"cache_dir": "/nowhere"}
    (moved / "config.json").write_text(json.dumps(settings))
    assert preprocess_settings(moved, meta)[1].startswith("default")

    save_preprocess_settings(moved, PreprocessConfig(windows=((40.0, 1000.0),), body_crop=False))
    config, source = preprocess_settings(moved, meta)
    assert source.endswith("preprocess.json")
    assert config.windows == ((40.0, 1000.0),) and not config.body_crop
    save_preprocess_settings(moved, PreprocessConfig(windows=((50.0, 400.0), (80.0, 150.0))))
    with pytest.raises(ValueError, match="take 1 channels"):
        preprocess_settings(moved, meta)
    with pytest.raises(FileNotFoundError, match=r"config\.json names no training cache"):
        save_preprocess_settings(moved)


def test_preprocessing_settings_come_from_several_training_caches(
    model_dir: Path, train_cache: Path, tmp_path: Path
) -> None:
    # notebook 03 trained on notebook 01's shards: config.json names a list (or a pattern)
    meta = json.loads((model_dir / "fold0" / "model.json").read_text())
    moved = copy_model_dir(model_dir, tmp_path)
    (moved / "preprocess.json").unlink()
    shard = Path(shutil.copytree(train_cache, tmp_path / "shard-1"))
    shutil.copytree(train_cache, tmp_path / "shard-0")
    settings = json.loads((moved / "config.json").read_text())
    for cache_dir, named in [
        ([str(train_cache), str(shard)], f"{train_cache}, {shard}"),
        (str(tmp_path / "shard-*"), f"{tmp_path / 'shard-0'}, {shard}"),
    ]:
        (moved / "config.json").write_text(json.dumps(settings | {"cache_dir": cache_dir}))
        config, source = preprocess_settings(moved, meta)
        assert source == f"training cache {named}" and config.windows == ((50.0, 400.0),)
    assert save_preprocess_settings(moved).is_file()
    (moved / "config.json").write_text(
        json.dumps(settings | {"cache_dir": [str(train_cache), str(tmp_path / "gone")]})
    )
    (moved / "preprocess.json").unlink()
    assert preprocess_settings(moved, meta)[1].startswith("default")  # not all attached


def test_model_dir_must_hold_fold_models(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no finished fold"):
        resolve_model_dir(tmp_path)


def test_a_fold_stopped_before_it_finished_is_left_out(
    tiny_competition: Path, model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Notebook 03 stopped at its time limit: fold1 has a best.pt but no done.json."""
    models = copy_model_dir(model_dir, tmp_path)
    (models / "fold1" / "done.json").unlink()
    with caplog.at_level(logging.WARNING, logger="kaggle_utils.submission.inference"):
        folds = load_fold_models(models, torch.device("cpu"))
    assert [f.fold for f in folds] == [0]
    assert any("fold1 not finished" in m for m in caplog.messages)
    (models / "fold0" / "done.json").unlink()
    with pytest.raises(FileNotFoundError, match="no finished fold"):
        resolve_model_dir(models)


@pytest.mark.slow
def test_worker_processes_give_the_same_file(
    tiny_competition: Path, model_dir: Path, clean: SubmissionResult, tmp_path: Path
) -> None:
    result = predict_test_set(
        tiny_competition, model_dir, tmp_path / "sub.csv", workers=2, max_prior_share=0,
        progress=False,
    )  # fmt: skip
    assert result.problems.height == 0
    np.testing.assert_allclose(
        result.submission.select(LABEL_COLUMNS).to_numpy(),
        clean.submission.select(LABEL_COLUMNS).to_numpy(),
        atol=1e-6,
    )


CRASH_HOOK = Path(__file__).resolve().parent / "crash_hook"


def with_crashing_series(tiny_competition: Path, tmp_path: Path) -> Path:
    """A copy whose series 13084/23900 holds a file that kills the process decoding it
    (tests/crash_hook: SIGSEGV, as a native decoder crash)."""
    data = corrupt_copy(tiny_competition, tmp_path)
    series_dir = data / "test_images" / "13084" / "23900"
    shutil.copy(next(series_dir.iterdir()), series_dir / "segfault.dcm")
    return data


@pytest.fixture(scope="module")
def crashing(
    tiny_competition: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, SubmissionResult]:
    """`with_crashing_series` and its submission from two decoding processes; every patient
    still has a series that works, so none may get the prior (`max_prior_share=0`)."""
    tmp_path = tmp_path_factory.mktemp("sub_crash")
    data = with_crashing_series(tiny_competition, tmp_path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", str(CRASH_HOOK))  # read by the spawned workers
        result = predict_test_set(
            data, model_dir, tmp_path / "sub.csv", workers=2, max_prior_share=0, progress=False
        )
    return data, result


def test_a_series_that_kills_its_decoding_process_costs_only_that_series(
    crashing: tuple[Path, SubmissionResult],
) -> None:
    data, result = crashing
    validate_submission(pl.read_csv(result.csv_path), pl.read_csv(data / "sample_submission.csv"))
    problems = result.problems.to_dicts()
    assert [(p["patient_id"], p["series_id"]) for p in problems] == [(13084, 23900)]
    assert "worker process died" in problems[0]["reason"]
    assert problems[0]["fallback"] == "other series"
    assert result.series.height == len(list_series(data, "test")) - 1


@pytest.mark.slow
def test_notebook_04_writes_a_valid_submission_and_survives_a_decoder_crash(
    model_dir: Path,
    crashing: tuple[Path, SubmissionResult],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Notebook 04 with its default `workers` (no smoke: smoke also keeps them) fails if a
    patient gets the prior; it survives the series that kills its decoding process, writes
    what `predict_test_set` called here writes on the same data (every patient predicted by
    the models, none the prior), scores itself against the labels and prints no warning."""
    data, direct = crashing
    monkeypatch.setenv("PYTHONPATH", str(CRASH_HOOK))  # the kernel and the workers
    csv = tmp_path / "submission.csv"
    executed = tmp_path / "executed.ipynb"
    papermill.execute_notebook(
        str(ROOT / "notebooks" / "04_submission.ipynb"), str(executed),
        parameters={"data_root": str(data), "model_dir": str(model_dir), "output_csv": str(csv),
                    "max_prior_share": 0},
        kernel_name="python3", cwd=str(ROOT), progress_bar=False,
    )  # fmt: skip
    assert_same_submission(csv, direct, data / "sample_submission.csv")
    written = pl.read_csv(csv)
    assert differs_from_the_prior(written, direct.prior) == written["patient_id"].to_list()
    assert_no_notebook_warnings(executed)
    text = executed.read_text()
    assert "worker process died" in text
    assert "rsna_score" in text and "per_study_s" in text
