from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from kaggle_utils.cache.preprocess import (
    PreprocessConfig,
    list_series,
    preprocess_dataset,
    shard_tasks,
)
from kaggle_utils.cache.volume import resample_volume
from kaggle_utils.common.backbone import build_backbone
from kaggle_utils.common.runtime import copy_previous_run
from kaggle_utils.finetune import train as finetune_module
from kaggle_utils.finetune.data import (
    AugmentConfig,
    SeriesDataset,
    SquareCrop,
    build_transform,
    cached_slice_labels,
    cached_slice_spans,
    class_indices,
    holdout_patients,
    make_folds,
    series_table,
    slice_indices,
)
from kaggle_utils.finetune.losses import expected_weights, slice_loss, weighted_loss
from kaggle_utils.finetune.model import CNNBiLSTM, build_classifier
from kaggle_utils.finetune.predict import aggregate_patients, load_fold_model
from kaggle_utils.finetune.report import cross_validation_report, markdown_table, training_prior
from kaggle_utils.finetune.train import (
    FinetuneConfig,
    read_cv_result,
    read_labels,
    run_cross_validation,
    stopped_message,
)
from kaggle_utils.metric import ALL_TARGETS, CLASS_WEIGHTS, LABEL_COLUMNS, TARGET_CLASSES

from conftest import run_torchrun_on_cpu, save_encoder

SHAPE = (8, 32, 32)


def tiny_model(pooling: str = "attention", targets=ALL_TARGETS) -> CNNBiLSTM:
    torch.manual_seed(0)
    return CNNBiLSTM(build_backbone("test_efficientnet", 1), targets, 8, 1, 0.0, pooling)  # type: ignore[arg-type]


@pytest.mark.parametrize("pooling", ["attention", "max", "mean"])
def test_model_output_shapes(pooling: str) -> None:
    out = tiny_model(pooling)(torch.randn(3, 5, 1, 32, 32))
    assert list(out) == list(ALL_TARGETS)
    for target, logits in out.items():
        assert logits.shape == (3, len(TARGET_CLASSES[target]))


def test_subset_of_targets_and_bad_arguments() -> None:
    model = tiny_model(targets=("liver",))
    assert list(model(torch.randn(2, 4, 1, 32, 32))) == ["liver"]
    with pytest.raises(ValueError, match="targets"):
        tiny_model(targets=("lungs",))
    with pytest.raises(ValueError, match="pooling"):
        tiny_model(pooling="sum")


def test_the_model_starts_exactly_at_the_prior() -> None:
    model = tiny_model().eval()
    prior = {c: 1.0 for c in LABEL_COLUMNS} | {"liver_healthy": 8.0, "liver_low": 1.0}
    prior = {
        k: v / sum(prior[f"{k.split('_')[0]}_{c}"] for c in TARGET_CLASSES[k.split("_")[0]])
        for k, v in prior.items()
    }
    model.start_at_prior(prior)
    out = model(torch.randn(2, 3, 1, 32, 32))
    expected = [prior["liver_healthy"], prior["liver_low"], prior["liver_high"]]
    for row in torch.softmax(out["liver"], dim=1).tolist():  # every input, not just on average
        assert row == pytest.approx(expected)
    out["liver"].sum().backward()
    assert model.heads["liver"].weight.grad is not None
    assert model.heads["liver"].weight.grad.abs().sum() > 0  # it can still learn


def test_frozen_backbone_gets_no_gradient_and_keeps_bn_statistics() -> None:
    model = tiny_model()
    model.set_backbone_trainable(False)
    model.train()
    running = model.backbone.bn1.running_mean.clone()
    out = model(torch.randn(2, 3, 1, 32, 32) * 5)
    sum(v.sum() for v in out.values()).backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert torch.equal(model.backbone.bn1.running_mean, running)
    assert any(p.grad is not None for p in model.lstm.parameters())


def test_voco_init_loads_the_encoder_and_checks_its_backbone(tmp_path: Path) -> None:
    encoder, encoder_file = save_encoder(tmp_path, "encoder", 1)
    model = build_classifier(
        "test_efficientnet", 1, "voco", encoder_file, hidden_size=8, num_layers=1
    )
    torch.testing.assert_close(model.backbone.conv_stem.weight, encoder.conv_stem.weight)
    with pytest.raises(ValueError, match="pretrained as test_efficientnet with 1"):
        build_classifier("test_resnet", 1, "voco", tmp_path / "encoder.pt")
    with pytest.raises(ValueError, match="needs encoder_file"):
        build_classifier("test_efficientnet", 1, "voco")


def slow_weighted_loss(logits, labels, any_injury, any_weight, normalisers=None) -> float:
    """sum(w * CE) over the batch, over sum(w) (normalisers None) or over B * normaliser."""
    terms = []
    n_rows = labels.shape[0]
    for index, (target, values) in enumerate(logits.items()):
        weights = CLASS_WEIGHTS[target]
        num = den = 0.0
        for row in range(n_rows):
            probs = torch.softmax(values[row].double(), 0)
            truth = int(labels[row, index])
            num += weights[truth] * -math.log(probs[truth].item())
            den += weights[truth]
        terms.append(num / (den if normalisers is None else n_rows * normalisers[target]))
    if any_weight:
        num = den = 0.0
        for row in range(n_rows):
            injured = max(1 - torch.softmax(v[row].double(), 0)[0].item() for v in logits.values())
            y = float(any_injury[row])
            w = 6.0 if y else 1.0
            num += w * -(y * math.log(injured) + (1 - y) * math.log(1 - injured))
            den += w
        scale = den if normalisers is None else n_rows * normalisers["any_injury"]
        terms.append(any_weight * num / scale)
    return sum(terms) / len(terms)


@pytest.mark.parametrize("normalised", [False, True], ids=["batch", "expected"])
@pytest.mark.parametrize("any_weight", [0.0, 1.0])
def test_weighted_loss_matches_slow_reference(any_weight: float, normalised: bool) -> None:
    g = torch.Generator().manual_seed(1)
    logits = {t: torch.randn(6, len(c), generator=g) for t, c in TARGET_CLASSES.items()}
    labels = torch.stack(
        [torch.randint(0, len(c), (6,), generator=g) for c in TARGET_CLASSES.values()], 1
    )
    any_injury = (labels > 0).any(1).float()
    weights = {t: torch.tensor(CLASS_WEIGHTS[t]) for t in TARGET_CLASSES}
    normalisers = {t: 1.3 + k for k, t in enumerate([*TARGET_CLASSES, "any_injury"])}
    normalisers = normalisers if normalised else None
    loss = weighted_loss(logits, labels, any_injury, weights, any_weight, normalisers)
    expected = slow_weighted_loss(logits, labels, any_injury, any_weight, normalisers)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def best_constant_under_the_training_loss(normalisers: dict[str, float] | None) -> float:
    """The extravasation-injury probability minimising the expected training loss over random
    batches of 2 rows from 20 rows, 4 of them injured (every ordered pair equally likely),
    found by a fine grid over the probability."""
    rows = [1] * 4 + [0] * 16
    weights = {"extravasation": torch.tensor(CLASS_WEIGHTS["extravasation"])}
    grid = np.linspace(0.01, 0.99, 981)
    expected_loss = np.zeros_like(grid)
    pairs = [(a, b) for a in rows for b in rows]
    compositions = {k: sum(1 for pair in pairs if sum(pair) == k) / len(pairs) for k in (0, 1, 2)}
    for injured, share in compositions.items():
        labels = torch.tensor([[1]] * injured + [[0]] * (2 - injured))
        for i, q in enumerate(grid):
            logits = {"extravasation": torch.log(torch.tensor([[1 - q, q]] * 2))}
            loss = weighted_loss(logits, labels, torch.zeros(2), weights, 0.0, normalisers)
            expected_loss[i] += share * loss.item()
    return float(grid[int(np.argmin(expected_loss))])


def test_the_normalised_loss_has_the_metric_s_best_constant_at_batch_size_2() -> None:
    """The metric's best constant for a weighted log loss: w1 p / (w1 p + w0 (1 - p)) =
    6 * 0.2 / (6 * 0.2 + 0.8) = 0.6. Normalised by the expected weight the training loss has
    the same minimiser; normalised by each batch's weights it has another (about 0.31)."""
    p = 0.2
    metric_best = 6 * p / (6 * p + (1 - p))
    expected_weight = 1 * (1 - p) + 6 * p
    normalised = best_constant_under_the_training_loss({"extravasation": expected_weight})
    assert normalised == pytest.approx(metric_best, abs=2e-3)
    per_batch = best_constant_under_the_training_loss(None)
    assert per_batch == pytest.approx(0.314, abs=5e-3)


def test_expected_weights_are_the_mean_metric_weight_of_the_true_class() -> None:
    rows = pl.DataFrame(
        {"bowel_class": [0, 1, 1, 0], "extravasation_class": [0, 0, 0, 1],
         "kidney_class": [0, 1, 2, 2], "liver_class": [0, 0, 0, 0], "spleen_class": [2, 2, 2, 2],
         "any_injury": [1, 1, 1, 1]}
    )  # fmt: skip
    assert expected_weights(rows) == {
        "bowel": 1.5, "extravasation": 2.25, "kidney": 2.75, "liver": 1.0, "spleen": 4.0,
        "any_injury": 6.0,
    }  # fmt: skip


def labels_table(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    columns: dict[str, list[int]] = {"patient_id": list(range(100, 100 + n))}
    for target, classes in TARGET_CLASSES.items():
        probs = [0.7] + [0.3 / (len(classes) - 1)] * (len(classes) - 1)
        picked = rng.choice(len(classes), size=n, p=probs)
        for index, name in enumerate(classes):
            columns[f"{target}_{name}"] = (picked == index).astype(int).tolist()
    frame = pl.DataFrame(columns)
    return frame.with_columns(class_indices(frame)["any_injury"])


@pytest.mark.parametrize("holdout", [0.0, 0.2])
def test_folds_partition_patients_stratified_and_deterministic(holdout: float) -> None:
    labels = labels_table(200)
    folds = make_folds(labels, 5, seed=3, holdout=holdout)
    assert folds["patient_id"].n_unique() == 200 == folds.height
    assert folds.equals(make_folds(labels, 5, seed=3, holdout=holdout))
    held = folds.filter(pl.col("fold") == -1).height
    assert held == pytest.approx(200 * holdout, abs=1)
    joined = folds.join(class_indices(labels), on="patient_id").filter(pl.col("fold") >= 0)
    sizes = joined.group_by("fold").len()["len"]
    assert sizes.max() - sizes.min() <= 1
    injured = joined.group_by("fold").agg(pl.col("any_injury").mean())["any_injury"]
    assert injured.max() - injured.min() < 0.15


@pytest.mark.parametrize(("n_folds", "seed"), [(3, 0), (5, 0), (5, 7)])
def test_holdout_patients_are_make_folds_held_out_patients(n_folds: int, seed: int) -> None:
    """What notebook 02 leaves out of pretraining is what notebook 03 holds out, whatever
    its number of folds."""
    labels = labels_table(150)
    folds = make_folds(labels, n_folds, seed=seed, holdout=0.2)
    expected = sorted(folds.filter(pl.col("fold") == -1)["patient_id"].to_list())
    assert holdout_patients(labels, 0.2, seed) == expected and len(expected) == 30
    assert holdout_patients(labels, 0.0, seed) == []


def test_z_flip_reverses_the_slices_and_their_labels(tiny_competition: Path, cached: Path) -> None:
    labels = read_labels(tiny_competition)
    image_labels = pl.read_csv(tiny_competition / "image_level_labels.csv")
    table = series_table(labels, cached, SHAPE, image_labels=image_labels).head(1)
    kwargs: dict[str, Any] = {
        "n_slices": 0, "image_size": 32, "train": True, "seed": 0,
        "slice_targets": ("bowel", "extravasation"),
    }  # fmt: skip
    plain = SeriesDataset(table, ALL_TARGETS, augment=AugmentConfig(0, 0, 0, 0, 0, 0), **kwargs)
    flipped = SeriesDataset(
        table, ALL_TARGETS, augment=AugmentConfig(zflip_prob=1.0, affine_prob=0,
        brightness_contrast_prob=0, coarse_dropout_prob=0), **kwargs,
    )  # fmt: skip
    a, b = plain[0], flipped[0]
    volume = np.load(table["path"][0])
    assert not np.array_equal(volume, volume[::-1])
    # the same random crop: compare the slice order through the full-size slices
    np.testing.assert_array_equal(a["image"].numpy(), b["image"].numpy()[::-1])
    np.testing.assert_array_equal(a["slice_labels"].numpy(), b["slice_labels"].numpy()[::-1])
    # 2.5D: each slice's neighbour channels run the other way too
    plain, flipped = (
        SeriesDataset(table, ALL_TARGETS, augment=augment, neighbours=1, **kwargs)
        for augment in (plain.augment, flipped.augment)
    )
    a, b = plain[0]["image"].numpy(), flipped[0]["image"].numpy()
    np.testing.assert_array_equal(a, b[::-1, ::-1])


def test_slice_indices() -> None:
    np.testing.assert_array_equal(slice_indices(10, 0), np.arange(10))
    np.testing.assert_array_equal(slice_indices(10, 5), [1, 3, 5, 7, 9])
    jittered = slice_indices(96, 24, np.random.default_rng(0))
    assert len(jittered) == 24 and np.all(np.diff(jittered) >= 0) and jittered.max() < 96
    bins = np.floor(np.arange(24) * 4)
    assert np.all((jittered >= bins) & (jittered < bins + 4))
    assert len(slice_indices(5, 8)) == 8  # more slices than available: repeats


def test_aggregate_patients_mean_max_and_renormalise() -> None:
    series = pl.DataFrame(
        {"patient_id": [1, 1, 2], "series_id": [10, 11, 20]}
        | {c: [0.2, 0.6, 0.5] for c in LABEL_COLUMNS}
    )
    mean = aggregate_patients(series, "mean")
    assert mean.height == 2
    assert mean.filter(pl.col("patient_id") == 1)["liver_low"][0] == pytest.approx(1 / 3)
    maximum = aggregate_patients(series, "max")
    assert maximum.filter(pl.col("patient_id") == 1)["bowel_injury"][0] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def cached(tiny_competition: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache = tmp_path_factory.mktemp("ft_cache")
    preprocess_dataset(
        list_series(tiny_competition, "train"), cache, PreprocessConfig(shapes=(SHAPE,)),
        workers=0, progress=False,
    )  # fmt: skip
    return cache


def test_series_table_and_dataset(tiny_competition: Path, cached: Path) -> None:
    labels = read_labels(tiny_competition)
    table = series_table(labels, cached, SHAPE)
    assert set(table["patient_id"]) <= set(labels["patient_id"])
    assert table.height == pl.read_parquet(cached / "metadata.parquet").height
    train = SeriesDataset(table, ALL_TARGETS, n_slices=4, image_size=24, train=True, seed=1)
    item = train[0]
    assert item["image"].shape == (4, 1, 24, 24) and item["image"].dtype == torch.uint8
    assert item["labels"].shape == (5,)
    assert torch.equal(item["image"], train[0]["image"])  # (seed, epoch, index) decides
    train.set_epoch(1)
    assert not torch.equal(item["image"], train[0]["image"])
    evaluation = SeriesDataset(table, ("liver",), n_slices=0, image_size=32)
    assert evaluation[0]["image"].shape == (8, 1, 32, 32)
    np.testing.assert_array_equal(evaluation[0]["image"][:, 0].numpy(), np.load(table["path"][0]))


def smoke_config(
    tiny_competition: Path, cached: Path, output: Path, **overrides: object
) -> FinetuneConfig:
    settings: dict[str, object] = {
        "data_root": str(tiny_competition), "cache_dir": str(cached), "output_dir": str(output),
        "shape": list(SHAPE), "backbone": "test_efficientnet", "init": "random",
        "hidden_size": 8, "num_layers": 1, "image_size": 32, "epochs": 2, "batch_size": 2,
        "lr": 1e-3, "n_folds": 2, "num_workers": 0,
    }  # fmt: skip
    settings.update(overrides)
    return FinetuneConfig(**settings)  # type: ignore[arg-type]


@pytest.mark.slow
def test_cross_validation_writes_oof_checkpoints_and_report(
    tiny_competition: Path, cached: Path, tmp_path: Path
) -> None:
    result = run_cross_validation(smoke_config(tiny_competition, cached, tmp_path), progress=False)
    labels = read_labels(tiny_competition)
    assert set(result.fold_scores) == {0, 1} and all(
        math.isfinite(v) for v in result.fold_scores.values()
    )
    assert result.oof_patient["patient_id"].n_unique() == result.oof_patient.height
    assert set(result.oof_patient["patient_id"]) == set(
        series_table(labels, cached, SHAPE)["patient_id"]
    )
    for fold in (0, 1):
        fold_dir = tmp_path / f"fold{fold}"
        assert (fold_dir / "done.json").is_file()
        model, meta = load_fold_model(fold_dir)
        assert meta["targets"] == list(ALL_TARGETS) and not model.training
    report = cross_validation_report(labels, result.oof_patient, result.folds)
    assert set(report["folds"]) == {0, 1}
    assert "rsna_score" in markdown_table(report)
    assert report["prior_summary"]["rsna_score"]["n"] == 2


@pytest.mark.slow
def test_an_interrupted_fold_resumes_and_finished_folds_are_skipped(
    tiny_competition: Path, cached: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    straight = smoke_config(tiny_competition, cached, tmp_path / "straight", folds_to_run=[0])
    run_cross_validation(straight, progress=False)
    config = smoke_config(tiny_competition, cached, tmp_path, folds_to_run=[0])
    real_save = finetune_module.save_checkpoint

    def killed_after_first_epoch(*args: Any, **kwargs: Any) -> None:
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(finetune_module, "save_checkpoint", killed_after_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        run_cross_validation(config, progress=False)
    monkeypatch.setattr(finetune_module, "save_checkpoint", real_save)
    run_cross_validation(config, progress=False)
    log = pl.read_csv(tmp_path / "fold0" / "log.csv")
    assert log["epoch"].to_list() == [1, 2]
    # bit-exact: the killed and resumed fold ends where the uninterrupted one does
    a = torch.load(tmp_path / "straight" / "fold0" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "fold0" / "last.pt", weights_only=True)
    for key, value in a["modules"]["model"].items():
        assert torch.equal(value, b["modules"]["model"][key]), f"{key} differs after resume"
    assert a["scheduler"] == b["scheduler"] and a["state"] == b["state"]
    best = tmp_path / "fold0" / "best.pt"
    stamp = best.stat().st_mtime_ns
    run_cross_validation(config, progress=False)  # done: nothing retrained
    assert best.stat().st_mtime_ns == stamp


def test_training_prior_is_floored() -> None:
    labels = (
        labels_table(50)
        .drop("any_injury")
        .with_columns(
            pl.lit(1).alias("kidney_healthy"),
            pl.lit(0).alias("kidney_low"),
            pl.lit(0).alias("kidney_high"),
        )
    )
    prior = training_prior(labels)
    assert prior["kidney_high"] == pytest.approx(1e-3, rel=0.01)
    assert sum(prior[f"kidney_{c}"] for c in TARGET_CLASSES["kidney"]) == pytest.approx(1.0)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_with_gloo(
    tiny_competition: Path, cached: Path, tmp_path: Path
) -> None:
    config = smoke_config(tiny_competition, cached, tmp_path, folds_to_run=[0])
    config.to_json(tmp_path / "config.json")
    run_torchrun_on_cpu("kaggle_utils.finetune.train", tmp_path / "config.json")
    assert pl.read_csv(tmp_path / "fold0" / "log.csv")["epoch"].to_list() == [1, 2]  # rank 0 only
    oof = pl.read_parquet(tmp_path / "oof_patient.parquet")
    folds = pl.read_csv(tmp_path / "folds.csv")
    assert set(oof["patient_id"]) == set(folds.filter(pl.col("fold") == 0)["patient_id"])
    model, meta = load_fold_model(tmp_path / "fold0")  # saved unwrapped: no "module." keys
    assert meta["targets"] == list(ALL_TARGETS) and not model.training


@pytest.mark.slow
def test_torchrun_ranks_stop_together_at_the_time_limit(
    tiny_competition: Path, cached: Path, tmp_path: Path
) -> None:
    config = smoke_config(tiny_competition, cached, tmp_path, time_limit_s=1e-9)
    config.to_json(tmp_path / "config.json")
    run_torchrun_on_cpu("kaggle_utils.finetune.train", tmp_path / "config.json")  # no rank hangs
    result = read_cv_result(tmp_path)
    assert not result.finished and result.folds_pending == [0, 1]
    assert not (tmp_path / "fold0" / "last.pt").exists()


# --------------------------------------------------------------------------------------------
# Slice-level supervision (image_level_labels.csv)


def test_slice_head_logits_per_slice() -> None:
    torch.manual_seed(0)
    model = CNNBiLSTM(
        build_backbone("test_efficientnet", 1), ALL_TARGETS, 8, 1, 0.0, "max",
        slice_targets=("bowel", "extravasation"),
    )  # fmt: skip
    volumes = torch.randn(2, 5, 1, 32, 32)
    _, slice_logits = model(volumes, with_slices=True)
    assert slice_logits is not None and slice_logits.shape == (2, 5, 2)
    model.eval()
    plain = model(volumes)
    assert all(torch.allclose(plain[t], model(volumes, with_slices=True)[0][t]) for t in plain)
    assert tiny_model()(volumes, with_slices=True)[1] is None


def slow_contributors(n_original: int, n_cached: int) -> list[set[int]]:
    """Which original slices each cached slice is made of, found by resampling one-hot
    volumes through the cache's own resampler."""
    contributors: list[set[int]] = [set() for _ in range(n_cached)]
    for i in range(n_original):
        volume = np.zeros((n_original, 2, 2), np.float32)
        volume[i] = 1.0
        resampled = resample_volume(volume, (n_cached, 2, 2))
        for j in np.nonzero(resampled[:, 0, 0] > 1e-6)[0]:
            contributors[int(j)].add(i)
    return contributors


@pytest.mark.parametrize(("n_original", "n_cached"), [(64, 32), (50, 32), (33, 32), (32, 32),
                                                      (20, 32), (7, 32), (100, 7)])  # fmt: skip
def test_cached_slice_spans_match_the_resampler(n_original: int, n_cached: int) -> None:
    spans = cached_slice_spans(n_original, n_cached)
    expected = slow_contributors(n_original, n_cached)
    assert [set(range(a, b)) for a, b in spans] == expected


def test_cached_slice_labels_follow_z_order_and_mark_unknowns() -> None:
    # Patient 1: extravasation, annotated on series 10 (instance numbers run backwards in z);
    # patient 2: extravasation and bowel, series 20 not annotated; patient 3: uninjured.
    labels = labels_table(3).with_columns(
        pl.Series("patient_id", [1, 2, 3]),
        pl.Series("bowel_healthy", [1, 0, 1]), pl.Series("bowel_injury", [0, 1, 0]),
        pl.Series("extravasation_healthy", [0, 0, 1]),
        pl.Series("extravasation_injury", [1, 1, 0]),
    )  # fmt: skip
    metadata = pl.DataFrame(
        {"patient_id": [1, 2, 3], "series_id": [10, 20, 30],
         "instance_numbers": [list(range(8, 0, -1)), list(range(1, 9)), list(range(1, 5))]},
    )  # fmt: skip
    image_labels = pl.DataFrame(
        {"patient_id": [1, 1], "series_id": [10, 10], "instance_number": [8, 1],
         "injury_name": ["Active_Extravasation", "Active_Extravasation"]},
    )  # fmt: skip
    table = cached_slice_labels(metadata, labels, image_labels, n_cached=4).sort("series_id")
    rows = {r["series_id"]: r for r in table.to_dicts()}
    # instance 8 is z index 0 -> cached slice 0; instance 1 is z index 7 -> cached slice 3
    assert rows[10]["slices_extravasation"] == [1, 0, 0, 1]
    assert rows[10]["slices_bowel"] == [0, 0, 0, 0]  # patient 1 has no bowel injury
    assert rows[20]["slices_extravasation"] is None and rows[20]["slices_bowel"] is None
    assert rows[30]["slices_extravasation"] == [0, 0, 0, 0]


def slow_slice_loss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    per_target = []
    for k in range(logits.shape[-1]):
        terms = []
        for b in range(logits.shape[0]):
            for s in range(logits.shape[1]):
                y = float(labels[b, s, k])
                if y < 0:
                    continue
                p = 1 / (1 + math.exp(-float(logits[b, s, k])))
                terms.append(-(y * math.log(p) + (1 - y) * math.log(1 - p)))
        if terms:
            per_target.append(sum(terms) / len(terms))
    return sum(per_target) / len(per_target) if per_target else 0.0


def test_slice_loss_matches_slow_reference_and_ignores_unknowns() -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 6, 2, generator=g, requires_grad=True)
    labels = torch.randint(0, 2, (3, 6, 2), generator=g).float()
    labels[1, :, 0] = -1  # one unknown series for the first target
    labels[:, :, 1] = -1  # the second target entirely unknown in this batch
    loss = slice_loss(logits, labels)
    assert loss.item() == pytest.approx(slow_slice_loss(logits.detach(), labels), rel=1e-5)
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad[1, :, 0] == 0)
    assert torch.all(logits.grad[..., 1] == 0)
    empty = slice_loss(logits, torch.full_like(labels, -1))
    assert empty.item() == 0.0 and empty.requires_grad


def test_dataset_slice_labels_follow_the_sampled_slices(
    tiny_competition: Path, cached: Path
) -> None:
    labels = read_labels(tiny_competition)
    image_labels = pl.read_csv(tiny_competition / "image_level_labels.csv")
    table = series_table(labels, cached, SHAPE, image_labels=image_labels)
    annotated = table.filter(pl.col("slices_extravasation").list.sum() > 0)
    assert annotated.height > 0  # the generator annotates its extravasation slices
    dataset = SeriesDataset(
        annotated, ALL_TARGETS, n_slices=4, image_size=24, train=True, seed=0,
        slice_targets=("bowel", "extravasation"),
    )  # fmt: skip
    row = annotated.row(0, named=True)
    item = dataset[0]
    rng = np.random.default_rng([0, 0, 0])  # the dataset's own draw for (seed, epoch, index)
    indices = slice_indices(SHAPE[0], 4, rng)
    expected = np.asarray(row["slices_extravasation"])[indices]
    np.testing.assert_array_equal(item["slice_labels"][:, 1].numpy(), expected)
    with pytest.raises(ValueError, match="image_labels"):
        SeriesDataset(series_table(labels, cached, SHAPE), ALL_TARGETS, slice_targets=("bowel",))


# --------------------------------------------------------------------------------------------
# Kaggle's limits: several cache folders, and a time limit per session


@pytest.fixture(scope="module")
def shard_caches(tiny_competition: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny training set cached in two shards, `shard-0/` and `shard-1/`, as notebook 01
    writes them with num_shards=2."""
    root = tmp_path_factory.mktemp("ft_shards")
    tasks = list_series(tiny_competition, "train")
    for index in range(2):
        preprocess_dataset(
            shard_tasks(tasks, index, 2), root / f"shard-{index}",
            PreprocessConfig(shapes=(SHAPE,)), workers=0, progress=False,
        )  # fmt: skip
    return root


def test_series_table_reads_several_caches(
    tiny_competition: Path, cached: Path, shard_caches: Path, tmp_path: Path
) -> None:
    labels = read_labels(tiny_competition)
    whole = series_table(labels, cached, SHAPE)
    sharded = series_table(labels, str(shard_caches / "shard-*"), SHAPE)
    assert sharded.drop("path").equals(whole.drop("path"))
    for path, series_id in sharded.select("path", "series_id").iter_rows():
        shard = Path(path).parents[1]
        assert shard.parent == shard_caches
        own = pl.read_parquet(shard / "metadata.parquet")["series_id"].to_list()
        assert series_id in own  # the path points into the cache that holds the series
    config = smoke_config(
        tiny_competition, cached, tmp_path, epochs=1, folds_to_run=[0],
        cache_dir=[str(shard_caches / "shard-0"), str(shard_caches / "shard-1")],
    )  # fmt: skip
    config.to_json(tmp_path / "config.json")
    assert FinetuneConfig.from_json(tmp_path / "config.json") == config  # still plain JSON
    result = run_cross_validation(config, progress=False)
    assert result.finished and set(result.oof_patient["patient_id"]) == set(
        result.folds.filter(pl.col("fold") == 0)["patient_id"]
    )
    assert json.loads((tmp_path / "preprocess.json").read_text())["windows"] == [[50.0, 400.0]]


def test_time_limit_stops_between_epochs_and_the_next_sessions_finish_the_same_run(
    tiny_competition: Path, cached: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = run_cross_validation(smoke_config(tiny_competition, cached, tmp_path / "whole"), False)
    assert whole.finished and whole.folds_pending == []

    # Every epoch takes 100 s on a fake clock; 150 s leave room for one epoch per session.
    now = [0.0]
    monkeypatch.setattr(finetune_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    real_save = finetune_module.save_checkpoint

    def save_after_100_s(*args: Any, **kwargs: Any) -> None:
        now[0] += 100.0
        real_save(*args, **kwargs)

    monkeypatch.setattr(finetune_module, "save_checkpoint", save_after_100_s)
    output = tmp_path / "sessions"
    config = smoke_config(tiny_competition, cached, output, time_limit_s=150.0)
    sessions = []
    for _ in range(6):
        result = run_cross_validation(config, progress=False)
        logs = [pl.read_csv(output / f"fold{k}" / "log.csv")["epoch"].to_list()
                if (output / f"fold{k}" / "log.csv").is_file() else [] for k in (0, 1)]  # fmt: skip
        sessions.append((result.finished, sorted(result.fold_scores), result.folds_pending, logs))
        if result.finished:
            break
        assert not (output / "oof_patient.parquet").exists()  # only a finished run writes it
        assert "time limit" in stopped_message(result) and "resume_from" in stopped_message(result)
    assert sessions == [
        (False, [], [0, 1], [[1], []]),  # stopped after fold 0's first epoch
        (False, [0], [1], [[1, 2], []]),  # fold 0 finished; no room for fold 1's first epoch
        (False, [0], [1], [[1, 2], [1]]),
        (True, [0, 1], [], [[1, 2], [1, 2]]),
    ]
    assert result.fold_scores == pytest.approx(whole.fold_scores, abs=1e-9)
    assert_frames_close(result.oof_patient, whole.oof_patient, abs_tol=1e-7)
    for k in (0, 1):
        resumed = pl.read_csv(output / f"fold{k}" / "log.csv")
        straight = pl.read_csv(tmp_path / "whole" / f"fold{k}" / "log.csv")
        assert_frames_close(resumed.drop("seconds"), straight.drop("seconds"), abs_tol=1e-7)
    assert read_cv_result(output).finished


def assert_frames_close(left: pl.DataFrame, right: pl.DataFrame, abs_tol: float) -> None:
    """Same columns, types and rows; floats within `abs_tol` (polars' own tolerance argument
    changed its name in 1.32, and the suite runs on older polars too)."""
    assert left.schema == right.schema and left.height == right.height
    for name, dtype in left.schema.items():
        if dtype.is_float():
            assert np.allclose(left[name], right[name], rtol=0.0, atol=abs_tol), name
        else:
            assert left[name].to_list() == right[name].to_list(), name


def test_an_unfinished_run_reads_back_as_unfinished(
    tiny_competition: Path, cached: Path, tmp_path: Path
) -> None:
    config = smoke_config(tiny_competition, cached, tmp_path / "run", epochs=1)
    run_cross_validation(config, progress=False)
    (tmp_path / "run" / "fold1" / "done.json").unlink()  # as if fold 1 were still training
    # on Kaggle the next session copies it from /kaggle/input (notebook 03's resume_from)
    assert copy_previous_run(tmp_path / "run", tmp_path / "next")
    result = read_cv_result(tmp_path / "next")
    assert not result.finished and result.folds_pending == [1]
    assert set(result.fold_scores) == {0} and set(result.oof_series["fold"]) == {0}
    assert result.holdout_folds is None


def test_train_fraction_subsets_only_the_training_folds(
    tiny_competition: Path, cached: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each fold trains on its share of the training patients; validation keeps them all."""
    seen: dict[int, tuple[set[int], set[int]]] = {}

    def record(config, fold, train_rows, valid_rows, *args, **kwargs):  # type: ignore[no-untyped-def]
        seen[fold] = (set(train_rows["patient_id"]), set(valid_rows["patient_id"]))
        return None  # as if the time limit stopped the session: nothing is trained

    monkeypatch.setattr(finetune_module, "train_fold", record)
    for fraction in (1.0, 0.5):
        config = smoke_config(
            tiny_competition, cached, tmp_path / str(fraction), holdout=0.2, fold_seed=3,
            seed=int(fraction * 10), train_fraction=fraction, folds_to_run=[0],
        )  # fmt: skip
        run_cross_validation(config, progress=False)
        folds = pl.read_csv(tmp_path / str(fraction) / "folds.csv")
        train, valid = seen[0]
        assert valid == set(folds.filter(pl.col("fold") == 0)["patient_id"])
        others = set(folds.filter(pl.col("fold") == 1)["patient_id"])
        assert train <= others and len(train) == max(1, round(fraction * len(others)))
    # fold_seed, not the training seed, makes the folds: both runs split alike
    assert pl.read_csv(tmp_path / "1.0" / "folds.csv").equals(
        pl.read_csv(tmp_path / "0.5" / "folds.csv")
    )


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [(96, 96, 64), (97, 95, 64), (50, 70, 64), (63, 64, 64), (64, 64, 64), (10, 200, 64)],
)
def test_the_plain_crop_is_albumentations_centre_crop_pixel_for_pixel(
    height: int, width: int, size: int
) -> None:
    """Evaluation crops without albumentations (a GPU image may lack it and its OpenCV), yet
    exactly as the models were validated before: `CenterCrop(pad_if_needed=True)`."""
    import albumentations as A

    image = np.random.default_rng(height * width).integers(0, 256, (height, width, 7), np.uint8)
    reference = A.CenterCrop(size, size, pad_if_needed=True)(image=image)["image"]
    ours = build_transform(size, False, AugmentConfig())(image=image)["image"]
    assert isinstance(build_transform(size, False, AugmentConfig()), SquareCrop)
    np.testing.assert_array_equal(ours, reference)


def test_training_without_augmentation_crops_at_random_without_albumentations() -> None:
    off = AugmentConfig(
        hflip_prob=0, affine_prob=0, brightness_contrast_prob=0, coarse_dropout_prob=0
    )
    crop = build_transform(32, True, off)
    assert isinstance(crop, SquareCrop)
    image = np.arange(48 * 40 * 2, dtype=np.int32).reshape(48, 40, 2)
    seen = set()
    for seed in range(30):
        crop.set_random_seed(seed)
        out = crop(image=image)["image"]
        assert out.shape == (32, 32, 2)
        y0, x0 = divmod(int(out[0, 0, 0]) // 2, 40)  # where the crop starts in the image
        np.testing.assert_array_equal(out, image[y0 : y0 + 32, x0 : x0 + 32])
        seen.add((y0, x0))
    assert len(seen) > 10  # uniform over the 17 x 9 positions, not the centre
    crop.set_random_seed(3)
    first = crop(image=image)["image"]
    crop.set_random_seed(3)
    np.testing.assert_array_equal(crop(image=image)["image"], first)  # seeded per item
    assert not isinstance(build_transform(32, True, AugmentConfig()), SquareCrop)
