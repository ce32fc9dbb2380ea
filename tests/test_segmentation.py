"""Organ segmentation: masks aligned through their affine and the series geometry (DICOM
series stored in several orientations, the generator's competition-style files, a real CT's
organ labels), labels resampled exactly as the volumes, Dice and organ boxes against
obvious references, and a tiny training run that resumes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
import torch

from kaggle_utils.cache.dicom import load_series
from kaggle_utils.cache.preprocess import list_series, load_cached_volume, load_metadata
from kaggle_utils.cache.volume import crop_and_resample
from kaggle_utils.demo.anatomy import SEGMENTATIONS_DIR
from kaggle_utils.segmentation import train as seg
from tests.conftest import write_ct_dicom

# --------------------------------------------------------------------------- alignment


def _patient_volume() -> tuple[np.ndarray, np.ndarray]:
    """HU and labels in the `load_series` layout (z up, rows A->P, columns R->L), with
    objects placed so that any flip or transpose would move them: (6, 10, 12)."""
    hu = np.full((6, 10, 12), -1000, dtype=np.int16)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    hu[1:4, 1:4, 1:5], labels[1:4, 1:4, 1:5] = 100, 1  # anterior, patient's right, low
    hu[3:6, 6:9, 8:11], labels[3:6, 6:9, 8:11] = 200, 2  # posterior, patient's left, high
    hu[5, 0, 11], labels[5, 0, 11] = 300, 5  # one corner voxel
    return hu, labels


ORIENTATIONS = {
    "standard": ((1, 0, 0), (0, 1, 0)),
    "flipped_rows": ((1, 0, 0), (0, -1, 0)),
    "flipped_columns": ((-1, 0, 0), (0, 1, 0)),
    "transposed": ((0, 1, 0), (1, 0, 0)),
}


def _write_case(
    folder: Path, row_cos: tuple, col_cos: tuple, nifti_descending: bool
) -> tuple[Path, Path]:
    """The patient volume as a DICOM series stored with these direction cosines (files named
    against z order), and its labels as a NIfTI on the same stored grid (i = column,
    j = row, as ITK writes) with the affine that says so."""
    hu, labels = _patient_volume()
    depth, n_y, n_x = hu.shape
    spacing, z_spacing = 0.8, 2.5
    row_cos, col_cos = np.array(row_cos, float), np.array(col_cos, float)
    # the stored grid: columns run along row_cos, rows along col_cos, origin at the corner
    # of the patient box where both indices are 0
    extent = {0: n_x, 1: n_y}
    n_cols, n_rows = extent[int(np.abs(row_cos).argmax())], extent[int(np.abs(col_cos).argmax())]
    corner = np.zeros(3)
    for cosines, n in ((row_cos, n_cols), (col_cos, n_rows)):
        corner -= np.minimum(cosines, 0) * (n - 1) * spacing
    stored_hu = np.zeros((depth, n_rows, n_cols), dtype=np.int16)
    stored_labels = np.zeros_like(stored_hu, dtype=np.uint8)
    for r in range(n_rows):
        for c in range(n_cols):
            x, y, _ = np.rint((corner + c * spacing * row_cos + r * spacing * col_cos) / spacing)
            stored_hu[:, r, c] = hu[:, int(y), int(x)]
            stored_labels[:, r, c] = labels[:, int(y), int(x)]
    series = folder / "series"
    series.mkdir(parents=True)
    for k in range(depth):
        write_ct_dicom(
            series / f"{depth - k}.dcm", stored_hu[k], instance_number=depth - k,
            position=tuple(float(v) for v in corner + np.array([0, 0, 40.0 + k * z_spacing])),
            orientation=tuple(float(v) for v in (*row_cos, *col_cos)),
            pixel_spacing=(spacing, spacing),
            slice_thickness=z_spacing,
        )  # fmt: skip
    import nibabel as nib

    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = row_cos * spacing, col_cos * spacing
    lps[:3, 2], lps[:3, 3] = (0, 0, z_spacing), corner + np.array([0, 0, 40.0])
    data = stored_labels.transpose(2, 1, 0)  # (i = column, j = row, k = slice)
    if nifti_descending:  # slices stored from the top, the affine's k axis pointing down
        data = data[:, :, ::-1]
        lps[:3, 3] = lps[:3, 3] + (depth - 1) * lps[:3, 2]
        lps[:3, 2] = -lps[:3, 2]
    mask = folder / "mask.nii"
    nib.save(nib.Nifti1Image(np.ascontiguousarray(data), np.diag([-1, -1, 1, 1]) @ lps), mask)
    return series, mask


def _record(series_dir: Path) -> dict:
    series = load_series(series_dir)
    return {
        "series_id": 1,
        "n_slices": series.hu.shape[0],
        "height": series.hu.shape[1],
        "width": series.hu.shape[2],
        "spacing_z": series.spacing[0],
        "spacing_y": series.spacing[1],
        "spacing_x": series.spacing[2],
        "z_first": float(series.z_positions[0]),
        "z_last": float(series.z_positions[-1]),
        "hu": series.hu,
    }


@pytest.mark.parametrize("descending", [False, True], ids=["k_up", "k_down"])
@pytest.mark.parametrize("orientation", list(ORIENTATIONS))
def test_a_mask_lands_on_its_organs_whatever_the_series_orientation(
    tmp_path: Path, orientation: str, descending: bool
) -> None:
    series_dir, mask_path = _write_case(tmp_path, *ORIENTATIONS[orientation], descending)
    record = _record(series_dir)
    aligned = seg.align_mask(seg.load_mask(mask_path), record)
    hu, labels = _patient_volume()
    np.testing.assert_array_equal(record["hu"], hu)  # load_series undid the storage
    np.testing.assert_array_equal(aligned, labels)  # and the affine undid the mask's


def test_a_mask_on_another_grid_or_range_is_refused(tmp_path: Path) -> None:
    series_dir, mask_path = _write_case(tmp_path, *ORIENTATIONS["standard"], False)
    record = _record(series_dir)
    mask = seg.load_mask(mask_path)
    with pytest.raises(seg.MaskAlignmentError, match="pixel grid"):
        seg.align_mask(mask, record | {"width": record["width"] + 1})
    with pytest.raises(seg.MaskAlignmentError, match="pixel spacing"):
        seg.align_mask(mask, record | {"spacing_x": 1.2})
    with pytest.raises(seg.MaskAlignmentError, match="do not overlap"):
        seg.align_mask(mask, record | {"z_first": 500.0, "z_last": 520.0})


def test_a_series_missing_slices_keeps_its_organs_in_place(tmp_path: Path) -> None:
    """Slices matched by position: a series decoded without its two lowest slices takes the
    mask's slices 2.. (not 0..)."""
    series_dir, mask_path = _write_case(tmp_path, *ORIENTATIONS["standard"], False)
    record = _record(series_dir)
    step = (record["z_last"] - record["z_first"]) / (record["n_slices"] - 1)
    shorter = record | {"n_slices": record["n_slices"] - 2, "z_first": record["z_first"] + 2 * step}
    aligned = seg.align_mask(seg.load_mask(mask_path), shorter)
    np.testing.assert_array_equal(aligned, _patient_volume()[1][2:])


def test_label_values_outside_the_competitions_are_refused(tmp_path: Path) -> None:
    import nibabel as nib

    path = tmp_path / "bad.nii"
    nib.save(nib.Nifti1Image(np.full((4, 4, 3), 7, dtype=np.uint8), np.eye(4)), path)
    with pytest.raises(seg.MaskAlignmentError, match="0-5"):
        seg.load_mask(path)
    mapped = seg.load_mask(path, label_map={7: 2})
    assert set(np.unique(mapped.labels)) == {2}


# --------------------------------------------------------------------------- resampling


def test_labels_are_resampled_with_the_volumes_geometry() -> None:
    """An image that is a function of the labels, cropped and resampled as notebook 01 does,
    equals the same function of the resampled label shares: labels and volumes share every
    voxel's footprint (box, squaring, padding, area averaging, interpolation)."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, seg.N_CLASSES, size=(13, 20, 17)).astype(np.uint8)
    values = np.array([-1000.0, 60.0, 120.0, 30.0, 35.0, 10.0], dtype=np.float32)
    box = (3, 18, 2, 11)  # not square: squared around its centre, leaving the image
    for shape in [(5, 8, 8), (13, 15, 15), (20, 30, 30)]:
        _, shares = seg.labels_to_shape(labels, box, shape)
        image = crop_and_resample(values[labels], box, [shape], fill=-1000.0)[shape]
        np.testing.assert_allclose((shares * values[:, None, None, None]).sum(0), image, atol=1e-3)
        np.testing.assert_allclose(shares.sum(0), 1.0, atol=1e-5)


def test_downsampling_uniform_blocks_keeps_their_label() -> None:
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, seg.N_CLASSES, size=(3, 4, 4)).astype(np.uint8)
    labels = blocks.repeat(2, 0).repeat(2, 1).repeat(2, 2)
    resampled, _ = seg.labels_to_shape(labels, (0, 8, 0, 8), (3, 4, 4))
    np.testing.assert_array_equal(resampled, blocks)


# --------------------------------------------------------------------------- Dice and boxes


def _dice_reference(predicted: np.ndarray, truth: np.ndarray, value: int) -> float | None:
    both = sum(1 for p, t in zip(predicted.ravel(), truth.ravel(), strict=True) if p == t == value)
    n_p = sum(1 for p in predicted.ravel() if p == value)
    n_t = sum(1 for t in truth.ravel() if t == value)
    return None if n_p + n_t == 0 else 2 * both / (n_p + n_t)


def test_dice_matches_a_voxel_by_voxel_count() -> None:
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 5, size=(4, 6, 6)).astype(np.uint8)  # no bowel (5) anywhere
    predicted = np.where(rng.random(truth.shape) < 0.3, rng.integers(0, 5, truth.shape), truth)
    scores = seg.dice_scores(predicted.astype(np.uint8), truth)
    for organ, value in seg.ORGAN_LABELS.items():
        assert scores[organ] == pytest.approx(_dice_reference(predicted, truth, value))
    assert scores["bowel"] is None
    assert seg.dice_scores(truth, truth)["liver"] == 1.0


def test_organ_rows_box_the_largest_component_and_measure_every_slice() -> None:
    labels = np.zeros((4, 10, 10), dtype=np.uint8)
    labels[1:3, 2:5, 1:4] = 1  # liver: 2 x 3 x 3
    labels[0, 9, 9] = 1  # a stray liver voxel, not part of the box
    labels[2:4, 6:8, 2:3] = 4  # right kidney
    labels[1:2, 6:9, 7:9] = 3  # left kidney
    rows = {r["organ"]: r for r in seg.organ_rows(labels, series_id=7, patient_id=3)}
    assert rows["liver"]["box"] == [1, 3, 2, 5, 1, 4] and rows["liver"]["voxels"] == 18
    assert rows["liver"]["area"] == pytest.approx([0, 0.09, 0.09, 0])
    assert rows["kidney"]["box"] == [1, 4, 6, 9, 2, 9]  # around both kidneys
    assert not rows["spleen"]["found"] and rows["spleen"]["box"] is None
    assert rows["liver"]["box_fraction"] == pytest.approx([0.25, 0.75, 0.2, 0.5, 0.1, 0.4])
    assert seg.box_in_shape(rows["liver"]["box_fraction"], (8, 20, 20)) == (2, 6, 4, 10, 2, 8)


def test_areas_at_another_depth_average_like_the_volumes() -> None:
    area = [0.0, 0.2, 0.4, 0.2]
    np.testing.assert_allclose(seg.area_at_depth(area, 2), [0.1, 0.3], atol=1e-6)
    np.testing.assert_allclose(seg.area_at_depth([0.3] * 5, 9), 0.3, atol=1e-6)


# --------------------------------------------------------------------------- real anatomy


def test_real_organ_labels_come_out_on_the_right_side_of_the_patient(real_ct_dir: Path) -> None:
    """A real CT's TotalSegmentator labels, mapped to the competition's: in the patient-based
    layout (column 0 = the patient's right) the liver and the right kidney lie right of the
    spleen and the left kidney, the vertebra-free midline between them."""
    mask = seg.load_mask(
        real_ct_dir / "abdomen-ct-3mm-30slices-organs.nii.gz",
        label_map=seg.TOTALSEGMENTATOR_TO_COMPETITION,
    )
    rows = {r["organ"]: r for r in seg.organ_rows(mask.labels, series_id=0, patient_id=0)}
    width = mask.labels.shape[2]

    def x_centre(organ: str) -> float:
        box = rows[organ]["box"]
        return (box[4] + box[5]) / 2

    for organ in ("liver", "spleen", "kidney_left", "kidney_right"):
        assert rows[organ]["found"], organ
    assert x_centre("liver") < width / 2 < x_centre("spleen")
    assert x_centre("kidney_right") < width / 2 < x_centre("kidney_left")
    # the kidneys lie posterior to the liver's centre (rows grow towards posterior)
    assert rows["kidney_right"]["box"][3] > (rows["liver"]["box"][2] + rows["liver"]["box"][3]) / 2


# --------------------------------------------------------------------------- the generator


def test_generated_masks_are_stored_as_the_competitions(segmented_competition: Path) -> None:
    """Public solutions read a competition mask with `get_fdata().transpose(1, 0, 2)[::-1]`
    and get (rows, columns, slices) of the DICOM grid, slices in ascending z: so do ours,
    and the affine path agrees; the organs sit on their own tissue."""
    import nibabel as nib

    masks = sorted((segmented_competition / SEGMENTATIONS_DIR).glob("*.nii"))
    tasks = {t.series_id: t for t in list_series(segmented_competition, "train")}
    labels = pl.read_csv(segmented_competition / "train.csv")
    healthy = {
        organ: set(labels.filter(pl.col(f"{organ}_healthy") == 1)["patient_id"])
        for organ in ("liver", "spleen")
    }
    assert len(masks) == 6  # each train patient's first series
    checked = {"liver": 0, "spleen": 0}
    for path in masks:
        task = tasks[int(path.stem)]
        record = _record(task.series_dir)
        aligned = seg.align_mask(seg.load_mask(path), record)
        public = np.asarray(nib.load(path).dataobj).transpose(1, 0, 2)[::-1]
        np.testing.assert_array_equal(public.transpose(2, 0, 1), aligned)
        hu = record["hu"]
        if task.patient_id in healthy["liver"]:  # an injured organ is partly hypodense
            assert 50 < np.median(hu[aligned == 1]) < 110
            checked["liver"] += 1
        if task.patient_id in healthy["spleen"]:  # the enhancing spleen
            assert 80 < np.median(hu[aligned == 2]) < 150
            checked["spleen"] += 1
        assert np.median(hu[aligned == 0]) < -500  # mostly air around the body
        columns = np.nonzero(aligned == 1)[2].mean(), np.nonzero(aligned == 2)[2].mean()
        assert columns[0] < hu.shape[2] / 2 < columns[1]  # liver on the patient's right
    assert min(checked.values()) >= 1


def test_cached_masks_lie_on_the_cached_organs(
    segmented_competition: Path, segmented_cache: Path
) -> None:
    metadata = load_metadata(segmented_cache)
    table = seg.segmented_series(segmented_competition, metadata)
    assert table.height == 6
    for record in table.to_dicts():
        aligned = seg.align_mask(seg.load_mask(record["mask_path"]), record)
        _, shares = seg.labels_to_shape(aligned, record["body_bbox"], (8, 32, 32))
        volume = load_cached_volume(segmented_cache, (8, 32, 32), record["series_id"])
        # the cached volume is the decoded series cut by the record's body box: the box the
        # labels were cut by (the two resample alike: test_labels_are_resampled_with_...)
        hu = load_series(record["source_dir"]).hu
        remade = crop_and_resample(hu, record["body_bbox"], [(8, 32, 32)])[(8, 32, 32)]
        windowed = np.clip((remade + 150.0) / 400.0 * 255.0, 0, 255)
        assert np.abs(windowed - volume).max() <= 1.0
        assert (shares[1] > 0.5).sum() > 20  # the liver is there, at this small size too


def test_a_tiny_segmentation_run_predicts_every_series_and_resumes(
    segmented_competition: Path, segmented_cache: Path, tmp_path: Path
) -> None:
    config = seg.SegmentationConfig(
        data_root=str(segmented_competition), cache_dir=str(segmented_cache),
        output_dir=str(tmp_path / "run"), shape=[8, 32, 32], input_shape=[8, 32, 32],
        channels=[4, 8], num_res_units=0, epochs=2, holdout=0.3, seed=0,
    )  # fmt: skip
    result = seg.run_segmentation(config, progress=False)
    assert result.n_train + result.n_holdout == 6 and result.n_holdout == 2
    assert result.epochs_done == 2 and not result.problems
    n_series = load_metadata(segmented_cache).filter(pl.col("status") == "ok").height
    organs = seg.organ_table(tmp_path / "run")
    assert organs.height == 6 * n_series  # five labels and both kidneys, every series
    assert set(organs["organ"]) == {*seg.ORGAN_LABELS, "kidney"}
    assert all(len(a) == 8 for a in organs["area"])
    assert set(json.loads((tmp_path / "run" / "dice.json").read_text())["dice"]) == set(
        seg.ORGAN_LABELS
    )
    resumed = seg.run_segmentation(
        seg.SegmentationConfig(**{**config.__dict__, "epochs": 3}), progress=False
    )
    log = pl.read_csv(tmp_path / "run" / "log.csv")
    assert resumed.epochs_done == 3 and log["epoch"].to_list() == [1, 2, 3]
    model = seg.load_model(tmp_path / "run")
    image, labels = seg.predict_volume(
        model, load_cached_volume(segmented_cache, (8, 32, 32), organs["series_id"][0]), config
    )
    assert image.shape == labels.shape == (8, 32, 32)


def test_a_killed_segmentation_run_resumes_bit_exactly(
    segmented_competition: Path,
    segmented_cache: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Killed right after epoch 1's checkpoint, then resumed: the weights, optimizer moments,
    scheduler and batch generator end where an uninterrupted run's do."""

    def config(name: str) -> seg.SegmentationConfig:
        return seg.SegmentationConfig(
            data_root=str(segmented_competition), cache_dir=str(segmented_cache),
            output_dir=str(tmp_path / name), shape=[8, 32, 32], input_shape=[8, 32, 32],
            channels=[4, 8], num_res_units=0, epochs=3, holdout=0.3, seed=0, intensity=0.1,
            predict=False,
        )  # fmt: skip

    seg.run_segmentation(config("straight"), progress=False)
    real_save = seg.save_checkpoint

    def killed_after_saving(*args: Any, **kwargs: Any) -> None:
        real_save(*args, **kwargs)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(seg, "save_checkpoint", killed_after_saving)
    with pytest.raises(KeyboardInterrupt):
        seg.run_segmentation(config("killed"), progress=False)
    monkeypatch.setattr(seg, "save_checkpoint", real_save)
    seg.run_segmentation(config("killed"), progress=False)
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert a["state"] == b["state"] == {"epoch": 3}
    for key, value in a["modules"]["model"].items():
        assert torch.equal(value, b["modules"]["model"][key]), f"{key} differs after resume"
    moments_a, moments_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(moments_a[k]["exp_avg"], moments_b[k]["exp_avg"]) for k in moments_a)
    assert a["scheduler"] == b["scheduler"] and a["numpy_rng"] == b["numpy_rng"]
    log = pl.read_csv(tmp_path / "killed" / "log.csv")
    assert log["epoch"].to_list() == [1, 2, 3]


@pytest.mark.slow
def test_notebook_06_trains_predicts_and_draws(
    segmented_competition: Path, segmented_cache: Path, tmp_path: Path
) -> None:
    from tests.test_notebooks import run_notebook

    run = tmp_path / "segmentation"
    run_notebook(
        "06_organ_segmentation", tmp_path, data_root=str(segmented_competition),
        cache_dir=str(segmented_cache), output_dir=str(run), shape=[8, 32, 32],
        input_shape=[8, 32, 32], smoke=True,
    )  # fmt: skip
    for name in ("model.pt", "organs.parquet", "montage.png", "curves.png", "dice.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 2 and set(summary["dice"]) == set(seg.ORGAN_LABELS)
