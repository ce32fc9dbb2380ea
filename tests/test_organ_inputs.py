"""What the classifiers take from the organs and the neighbouring slices: 2.5D stacks and the
encoder's adapted first convolution, organ-visibility slice labels, organ crops of test scans
in notebook 04, and the per-target combination of whole-scan and organ-crop runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from kaggle_utils.finetune.data import (
    VISIBILITY_TARGETS,
    SeriesDataset,
    organ_visibility_labels,
    series_table,
    slice_stack,
)
from kaggle_utils.finetune.model import adapt_input_conv, build_classifier
from kaggle_utils.finetune.predict import load_fold_model
from kaggle_utils.finetune.train import FinetuneConfig, run_cross_validation
from kaggle_utils.metric import LABEL_COLUMNS, validate_submission
from kaggle_utils.segmentation import organ_crops
from kaggle_utils.segmentation import train as seg
from kaggle_utils.submission.inference import (
    PROBABILITY_COLUMNS,
    combine_runs,
    explain_test_patients,
    organ_run_targets,
    predict_test_set,
)

from conftest import save_encoder

# --------------------------------------------------------------------------- 2.5D


def test_slice_stack_puts_each_slices_neighbours_in_its_channels() -> None:
    rng = np.random.default_rng(0)
    volume = rng.integers(0, 256, size=(6, 2, 3, 4), dtype=np.uint8)
    indices = np.array([0, 2, 5])
    stack = slice_stack(volume, indices, neighbours=1)
    assert stack.shape == (3, 6, 3, 4)
    for row, index in enumerate(indices):
        expected = []
        for offset in (-1, 0, 1):  # lowest first, the edge slice repeated past the ends
            expected += list(volume[min(max(index + offset, 0), 5)])
        np.testing.assert_array_equal(stack[row], np.stack(expected))
    np.testing.assert_array_equal(slice_stack(volume, indices, 0), volume[indices])


def test_the_adapted_first_convolution_answers_repeated_slices_as_the_pretrained_one() -> None:
    torch.manual_seed(0)
    weight = torch.randn(8, 2, 3, 3)
    image = torch.randn(1, 2, 9, 9)
    adapted = adapt_input_conv(weight, 6)
    assert adapted.shape == (8, 6, 3, 3)
    # three identical neighbours (a scan that does not change over three slices)
    repeated = image.repeat(1, 3, 1, 1)
    torch.testing.assert_close(
        torch.nn.functional.conv2d(repeated, adapted), torch.nn.functional.conv2d(image, weight)
    )
    # timm's rule from 3 channels: repeat, cut, scale by 3 / in_chans
    three = torch.randn(4, 3, 1, 1)
    torch.testing.assert_close(
        adapt_input_conv(three, 4), torch.cat([three, three[:, :1]], dim=1) * 0.75
    )


def test_a_one_channel_encoder_starts_a_three_slice_classifier(tmp_path: Path) -> None:
    encoder, encoder_file = save_encoder(tmp_path, "encoder", 1)
    model = build_classifier(
        "test_efficientnet", 3, "voco", encoder_file, hidden_size=8, num_layers=1
    )
    torch.testing.assert_close(
        model.backbone.conv_stem.weight, encoder.conv_stem.weight.repeat(1, 3, 1, 1) / 3
    )
    torch.testing.assert_close(model.backbone.bn1.weight, encoder.bn1.weight)
    save_encoder(tmp_path, "two", 2)
    with pytest.raises(ValueError, match="or a multiple of it"):
        build_classifier("test_efficientnet", 3, "voco", tmp_path / "two.pt")


# --------------------------------------------------------------------------- visibility


def _labels(rows: dict[int, dict[str, int]]) -> pl.DataFrame:
    """train.csv from {patient: {target: class index}} (unnamed targets healthy)."""
    from kaggle_utils.metric import TARGET_CLASSES

    table = []
    for patient, classes in rows.items():
        row: dict[str, int] = {"patient_id": patient}
        for target, names in TARGET_CLASSES.items():
            for index, name in enumerate(names):
                row[f"{target}_{name}"] = int(classes.get(target, 0) == index)
        row["any_injury"] = int(any(classes.values()))
        table.append(row)
    return pl.DataFrame(table)


def _organ_row(series: int, patient: int, organ: str, area: list[float] | None) -> dict:
    return {
        "series_id": series, "patient_id": patient, "organ": organ, "found": area is not None,
        "voxels": 1, "box": None, "box_fraction": None, "area": area or [0.0] * 4,
        "grid": [4, 8, 8],
    }  # fmt: skip


def test_organ_visibility_is_the_injury_times_the_normalised_area() -> None:
    labels = _labels({1: {"liver": 2}, 2: {}})
    organs = pl.DataFrame(
        [
            _organ_row(10, 1, "liver", [0.0, 0.1, 0.4, 0.2]),
            _organ_row(10, 1, "spleen", [0.1, 0.2, 0.0, 0.0]),
            _organ_row(10, 1, "kidney", [0.0, 0.3, 0.3, 0.0]),
            _organ_row(20, 2, "liver", [0.2, 0.4, 0.4, 0.2]),
            _organ_row(20, 2, "spleen", None),
            _organ_row(20, 2, "kidney", [0.0, 0.1, 0.1, 0.0]),
            _organ_row(30, 1, "liver", None),  # injured, liver not found: unknown
            _organ_row(30, 1, "spleen", [0.1, 0.1, 0.1, 0.1]),
            _organ_row(30, 1, "kidney", [0.1, 0.1, 0.1, 0.1]),
        ],
        schema=seg.ORGAN_SCHEMA,
    )
    table = organ_visibility_labels(organs, labels, 4)
    got = {row["series_id"]: row for row in table.to_dicts()}
    assert got[10]["slices_liver"] == pytest.approx([0.0, 0.25, 1.0, 0.5])
    assert got[10]["slices_spleen"] == [0.0] * 4  # the spleen is healthy
    assert got[20]["slices_liver"] == [0.0] * 4 and got[20]["slices_spleen"] == [0.0] * 4
    assert got[30]["slices_liver"] is None
    # at another depth, the areas are resampled as the volumes were (averaged pairs)
    halved = organ_visibility_labels(organs, labels, 2).filter(pl.col("series_id") == 10)
    assert halved["slices_liver"][0].to_list() == pytest.approx([0.05 / 0.3, 1.0], abs=1e-4)
    assert set(VISIBILITY_TARGETS) == {"kidney", "liver", "spleen"}


def test_organ_visibility_needs_a_whole_scan_and_a_segmentation() -> None:
    with pytest.raises(ValueError, match="segmentation_dir"):
        FinetuneConfig(organ_visibility=True)
    with pytest.raises(ValueError, match="whole scans"):
        FinetuneConfig(
            organ_visibility=True, segmentation_dir="x", input="liver", targets=["liver"]
        )
    with pytest.raises(ValueError, match="neighbour_slices"):
        FinetuneConfig(neighbour_slices=-1)


# --------------------------------------------------------------------------- combining runs


def _probabilities(rng: np.random.Generator, patients: list[int]) -> pl.DataFrame:
    from kaggle_utils.metric import TARGET_GROUPS

    columns: dict[str, list[float]] = {"patient_id": patients}
    for group in TARGET_GROUPS.values():
        values = rng.dirichlet(np.ones(len(group)), size=len(patients))
        for index, column in enumerate(group):
            columns[column] = values[:, index].tolist()
    return pl.DataFrame(columns)


def test_combined_runs_average_each_target_over_the_runs_trained_on_it() -> None:
    from kaggle_utils.finetune.data import label_columns

    rng = np.random.default_rng(3)
    scan = _probabilities(rng, [1, 2, 3])
    liver = _probabilities(rng, [1, 3])  # patient 2 has no liver crop prediction
    spleen = _probabilities(rng, [1, 2, 3])
    targets = [
        ("bowel", "extravasation", "kidney", "liver", "spleen"), ("liver",), ("spleen",)
    ]  # fmt: skip
    combined = combine_runs([scan, liver, spleen], targets, ["patient_id"])
    assert combined["patient_id"].to_list() == [1, 2, 3]
    tables = {"scan": scan, "liver": liver, "spleen": spleen}
    for row in combined.to_dicts():
        patient = row["patient_id"]
        for column in LABEL_COLUMNS:
            target = next(t for t in ("bowel", "extravasation", "kidney", "liver", "spleen")
                          if column in label_columns(t))  # fmt: skip
            runs = ["scan"] + ([target] if target in ("liver", "spleen") else [])
            values = [
                tables[r].filter(pl.col("patient_id") == patient)[column].to_list() for r in runs
            ]
            present = [v[0] for v in values if v]
            assert row[column] == pytest.approx(sum(present) / len(present)), (patient, column)
    # the "organ" rule: liver and spleen from their crop runs alone (the scan where missing)
    organ_targets = organ_run_targets(targets, ["scan", "liver", "spleen"])
    assert organ_targets[0] == ("bowel", "extravasation", "kidney")
    by_organ = combine_runs([scan, liver, spleen], organ_targets, ["patient_id"], targets)
    for patient, crop_run, column in ((1, liver, "liver_low"), (3, spleen, "spleen_high")):
        expected = crop_run.filter(pl.col("patient_id") == patient)[column][0]
        assert by_organ.filter(pl.col("patient_id") == patient)[column][0] == pytest.approx(
            expected
        )
    missing = by_organ.filter(pl.col("patient_id") == 2)["liver_low"][0]
    assert missing == pytest.approx(combined.filter(pl.col("patient_id") == 2)["liver_low"][0])
    alone = combine_runs([scan], targets[:1], ["patient_id"])
    assert alone.select(PROBABILITY_COLUMNS).equals(scan.select(PROBABILITY_COLUMNS))


def test_a_crop_where_no_organ_was_found_is_the_whole_scan() -> None:
    rng = np.random.default_rng(1)
    volume = rng.integers(0, 256, size=(8, 16, 16), dtype=np.uint8)
    config = organ_crops.CropConfig("spleen", (8, 16, 16), (4, 8, 8))
    rows = [_organ_row(1, 1, "spleen", None), _organ_row(1, 1, "liver", [0.1] * 4)]
    crop, reason = organ_crops.crop_from_rows(volume, rows, config)
    assert reason is not None and "no spleen" in reason
    np.testing.assert_array_equal(
        crop, organ_crops.cut_crop(volume, (0, 8, 0, 16, 0, 16), (4, 8, 8))
    )
    found = dict(rows[0], found=True, box_fraction=[0.0, 0.5, 0.25, 0.75, 0.0, 0.5])
    crop, reason = organ_crops.crop_from_rows(volume, [found], config)
    assert reason is None
    box = organ_crops.crop_box(found["box_fraction"], config)
    np.testing.assert_array_equal(crop, organ_crops.cut_crop(volume, box, (4, 8, 8)))


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_scan_and_liver_crop_runs_make_one_submission(
    segmented_competition: Path, segmented_cache: Path, tmp_path: Path
) -> None:
    """Notebook 06 (two epochs), a liver-crop run with organ-visibility off and a 2.5D
    whole-scan run with organ visibility, then notebook 04 on both: liver from both runs,
    the other targets from the whole-scan run alone."""
    segmentation_dir = tmp_path / "segmentation"
    seg.run_segmentation(
        seg.SegmentationConfig(
            data_root=str(segmented_competition), cache_dir=str(segmented_cache),
            output_dir=str(segmentation_dir), shape=[8, 32, 32], input_shape=[8, 32, 32],
            channels=[4, 8], num_res_units=0, epochs=2, holdout=0.3,
        ),
        progress=False,
    )  # fmt: skip
    crops = organ_crops.organ_crop_cache(
        "liver", segmentation_dir, segmented_cache, tmp_path / "crops", (8, 32, 32), (4, 16, 16),
        progress=False,
    )  # fmt: skip
    common = {
        "data_root": str(segmented_competition), "backbone": "test_efficientnet",
        "init": "random", "hidden_size": 8, "num_layers": 1, "epochs": 1, "batch_size": 2,
        "n_folds": 2, "num_workers": 0,
    }  # fmt: skip
    liver_run = tmp_path / "liver"
    run_cross_validation(
        FinetuneConfig(
            cache_dir=str(crops), output_dir=str(liver_run), shape=[4, 16, 16], input="liver",
            targets=["liver"], image_size=16, segmentation_dir=str(segmentation_dir), **common,
        ),
        progress=False,
    )  # fmt: skip
    assert (liver_run / "segmentation" / "model.pt").is_file()
    assert (liver_run / "crop.json").is_file()
    scan_run = tmp_path / "scan"
    run_cross_validation(
        FinetuneConfig(
            cache_dir=str(segmented_cache), output_dir=str(scan_run), shape=[8, 32, 32],
            image_size=32, neighbour_slices=1, organ_visibility=True,
            segmentation_dir=str(segmentation_dir), **common,
        ),
        progress=False,
    )  # fmt: skip
    _, meta = load_fold_model(scan_run / "fold0")
    assert meta["in_chans"] == 3 and meta["neighbour_slices"] == 1
    assert set(VISIBILITY_TARGETS) <= set(meta["slice_targets"])

    result = predict_test_set(
        segmented_competition, [scan_run, liver_run], tmp_path / "submission.csv", workers=0,
        combine="mean", progress=False,
    )  # fmt: skip
    sample = pl.read_csv(segmented_competition / "sample_submission.csv")
    validate_submission(pl.read_csv(result.csv_path), sample)
    assert [r["input"] for r in result.settings["runs"]] == ["scan", "liver"]
    with pytest.raises(ValueError, match="combine must be"):
        predict_test_set(segmented_competition, scan_run, tmp_path / "x.csv", combine="best")
    by_run = result.series_by_model.group_by("run", "series_id").agg(
        pl.col(c).mean() for c in PROBABILITY_COLUMNS
    )
    for row in result.series.to_dicts():
        scan = by_run.filter(pl.col("run") == 0, pl.col("series_id") == row["series_id"])
        liver = by_run.filter(pl.col("run") == 1, pl.col("series_id") == row["series_id"])
        assert row["liver_high"] == pytest.approx(
            (scan["liver_high"][0] + liver["liver_high"][0]) / 2
        )
        assert row["spleen_high"] == pytest.approx(scan["spleen_high"][0])
    patient = int(sample["patient_id"][0])
    for run, n_slices, chosen in ((liver_run, 4, [patient]), (scan_run, 8, 1)):
        # by id, or the first n patients of the sample submission
        explanations = explain_test_patients(
            segmented_competition, run, chosen, device="cpu", workers=0
        )
        assert explanations and {e.patient_id for e in explanations} == {patient}
        for explanation in explanations:
            assert explanation.images.shape[0] == n_slices
            for weights in explanation.importance.values():
                assert weights.shape == (n_slices,) and weights.sum() == pytest.approx(1.0)
    # the table the crop run trained on holds only series where the segmentation found a liver
    labels = pl.read_csv(segmented_competition / "train.csv")
    assert series_table(labels, crops, (4, 16, 16)).height > 0
    dataset = SeriesDataset(
        series_table(labels, segmented_cache, (8, 32, 32)), ["liver"], image_size=32, neighbours=1
    )
    assert dataset[0]["image"].shape == (8, 3, 32, 32)


class _StubLocator:
    """Stands in for notebook 06's model: finds nothing, or fails."""

    key, shape = "stub", (8, 16, 16)

    def __init__(self, fail: bool) -> None:
        self.fail, self.calls = fail, 0

    def locate(self, volume: np.ndarray, series_id: int, patient_id: int) -> list[dict]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("out of memory")
        return [_organ_row(series_id, patient_id, "kidney", None)]


@pytest.mark.parametrize("fail", [False, True], ids=["not found", "segmentation fails"])
def test_notebook_04_crops_the_whole_scan_when_the_organ_is_not_found(fail: bool) -> None:
    from kaggle_utils.submission.inference import (
        FALLBACK_WHOLE_SCAN,
        ModelRun,
        PreparedSeries,
        _with_fallbacks,
        run_input,
    )

    volume = np.random.default_rng(0).integers(0, 256, size=(8, 16, 16), dtype=np.uint8)
    locator = _StubLocator(fail)
    crop = organ_crops.CropConfig("kidney", (8, 16, 16), (4, 8, 8))
    run = ModelRun(Path("run"), [], None, crop=crop, locator=locator)  # type: ignore[arg-type]
    prepared = PreparedSeries(7, 70, volume)
    located: dict = {}
    notes: list = []
    out = run_input(run, prepared, located, notes)
    np.testing.assert_array_equal(
        out, organ_crops.cut_crop(volume, (0, 8, 0, 16, 0, 16), (4, 8, 8))
    )
    run_input(run, prepared, located, notes)  # a second run with the same model: no new call
    assert locator.calls == 1
    assert len(notes) == 2 if not fail else len(notes) == 1
    assert ("segmentation failed" in notes[0]["reason"]) == fail
    table = _with_fallbacks(notes, {7})
    assert set(table["fallback"]) == {FALLBACK_WHOLE_SCAN} and set(table["stage"]) == {"segment"}
