"""The synthetic demo folder must look like the competition's to every reader downstream.

One tiny dataset (8 train + 4 test patients, 64x64, 12-20 slices) is generated per module and
checked for layout, labels, DICOM encodings, determinism and visible injuries.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from kaggle_utils.demo.anatomy import Phantom, SeriesView
from kaggle_utils.demo.dicom_writer import ENCODINGS, encode_hu
from kaggle_utils.demo.generator import COMPLETE_MARKER, generate_dataset
from kaggle_utils.demo.labels import (
    GROUPS,
    IMAGE_LEVEL_COLUMNS,
    LABEL_COLUMNS,
    SUBMISSION_COLUMNS,
    TEST_SERIES_META_COLUMNS,
    TRAIN_COLUMNS,
    TRAIN_SERIES_META_COLUMNS,
    PatientLabels,
    SyntheticConfig,
    sample_labels,
)
from kaggle_utils.demo.render import make_phantom

REPO = Path(__file__).resolve().parents[1]
TINY = SyntheticConfig(
    train_patients=8, test_patients=4, image_size=64, min_slices=12, max_slices=20, seed=11
)
TRUNCATION_ERRORS = (ValueError, AttributeError, EOFError, RuntimeError, OSError)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synthetic") / "comp", TINY)


@pytest.fixture(scope="module")
def dataset_again(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synthetic_again") / "comp", TINY)


@pytest.fixture(scope="module")
def headers(dataset: Path) -> dict[Path, pydicom.Dataset]:
    """Headers of every DICOM file (pixel data not decoded), keyed by path."""
    return {
        path: pydicom.dcmread(path, stop_before_pixels=True)
        for path in sorted(dataset.glob("*_images/*/*/*.dcm"))
    }


@pytest.fixture(scope="module")
def truncated(dataset: Path) -> Path:
    line = next(
        line for line in (dataset / "README.md").read_text().splitlines() if "Truncated" in line
    )
    return dataset / line.split("`")[1]


def series_dirs(dataset: Path, split: str) -> set[tuple[int, int]]:
    return {(int(d.parent.name), int(d.name)) for d in (dataset / f"{split}_images").glob("*/*")}


def test_csv_layout(dataset: Path) -> None:
    expected = {
        "train.csv": TRAIN_COLUMNS,
        "test_labels.csv": TRAIN_COLUMNS,
        "train_series_meta.csv": TRAIN_SERIES_META_COLUMNS,
        "test_series_meta.csv": TEST_SERIES_META_COLUMNS,
        "image_level_labels.csv": IMAGE_LEVEL_COLUMNS,
        "sample_submission.csv": SUBMISSION_COLUMNS,
    }
    assert TRAIN_COLUMNS[0] == "patient_id" and TRAIN_COLUMNS[-1] == "any_injury"
    assert LABEL_COLUMNS[:4] == (
        "bowel_healthy",
        "bowel_injury",
        "extravasation_healthy",
        "extravasation_injury",
    )
    assert LABEL_COLUMNS[-3:] == ("spleen_healthy", "spleen_low", "spleen_high")
    assert "incomplete_organ" not in TEST_SERIES_META_COLUMNS
    for name, columns in expected.items():
        header, _ = read_csv(dataset / name)
        assert tuple(header) == columns, name
    assert (dataset / COMPLETE_MARKER).is_file()
    assert (dataset / "README.md").is_file()
    _, train = read_csv(dataset / "train.csv")
    _, test = read_csv(dataset / "test_labels.csv")
    _, submission = read_csv(dataset / "sample_submission.csv")
    assert len(train) == TINY.train_patients and len(test) == TINY.test_patients
    ids = [int(r["patient_id"]) for r in train + test]
    assert len(set(ids)) == len(ids)
    assert all(10_000 <= i <= 99_999 for i in ids)
    assert [r["patient_id"] for r in submission] == [r["patient_id"] for r in test]
    for row in submission:
        for group, classes in GROUPS.items():
            total = sum(float(row[f"{group}_{c}"]) for c in classes)
            assert total == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["train.csv", "test_labels.csv"])
def test_labels_one_hot_and_any_injury(dataset: Path, name: str) -> None:
    _, rows = read_csv(dataset / name)
    for row in rows:
        injured = 0
        for group, classes in GROUPS.items():
            values = [int(row[f"{group}_{c}"]) for c in classes]
            assert sorted(values) == [0] * (len(classes) - 1) + [1]
            injured = max(injured, 1 - values[0])
        assert int(row["any_injury"]) == injured


def test_every_class_occurs_in_train(dataset: Path) -> None:
    _, rows = read_csv(dataset / "train.csv")
    for column in LABEL_COLUMNS:
        assert any(row[column] == "1" for row in rows), column


def test_sample_labels_cover_every_class() -> None:
    labels = sample_labels(np.random.default_rng(0), 12)
    for group, classes in GROUPS.items():
        assert {getattr(lab, group) for lab in labels} == set(range(len(classes)))


@pytest.mark.parametrize("split", ["train", "test"])
def test_series_meta_matches_folders(dataset: Path, split: str) -> None:
    _, meta = read_csv(dataset / f"{split}_series_meta.csv")
    listed = {(int(r["patient_id"]), int(r["series_id"])) for r in meta}
    assert listed == series_dirs(dataset, split)
    for patient_id, series_id in listed:
        assert any((dataset / f"{split}_images" / str(patient_id) / str(series_id)).glob("*.dcm"))
    per_patient: dict[int, int] = defaultdict(int)
    for patient_id, _ in listed:
        per_patient[patient_id] += 1
    assert set(per_patient.values()) <= {1, 2}
    labels_file = "train.csv" if split == "train" else "test_labels.csv"
    _, labels = read_csv(dataset / labels_file)
    assert set(per_patient) == {int(r["patient_id"]) for r in labels}
    for row in meta:
        assert 150.0 <= float(row["aortic_hu"]) <= 300.0
        if split == "train":
            assert row["incomplete_organ"] in {"0", "1"}


def test_series_ids_distinct(dataset: Path) -> None:
    ids = [sid for split in ("train", "test") for _, sid in series_dirs(dataset, split)]
    assert len(set(ids)) == len(ids)
    assert all(10_000 <= i <= 99_999 for i in ids)


def test_file_names_are_instance_numbers_and_z_order_differs(
    headers: dict[Path, pydicom.Dataset],
) -> None:
    by_series: dict[Path, list[tuple[float, int]]] = defaultdict(list)
    for path, ds in headers.items():
        assert int(path.stem) == ds.InstanceNumber
        by_series[path.parent].append((float(ds.ImagePositionPatient[2]), ds.InstanceNumber))
    differs = 0
    for slices in by_series.values():
        z = sorted(z for z, _ in slices)
        assert len(set(z)) == len(z), "z positions must be distinct"
        by_z = [n for _, n in sorted(slices)]
        by_instance = sorted(by_z)
        assert by_z in (by_instance, by_instance[::-1])
        differs += by_z != by_instance
    assert 0 < differs < len(by_series), "both instance directions should occur"


def test_headers(dataset: Path, headers: dict[Path, pydicom.Dataset]) -> None:
    study_uids: dict[str, set[str]] = defaultdict(set)
    for path, ds in headers.items():
        patient_id, series_id = path.parent.parent.name, path.parent.name
        assert ds.Modality == "CT"
        assert ds.PatientID == patient_id
        assert ds.SeriesInstanceUID.split(".")[-1] == series_id
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.file_meta.MediaStorageSOPClassUID == pydicom.uid.CTImageStorage
        assert ds.HighBit == ds.BitsStored - 1
        assert ds.BitsAllocated == 16 and ds.SamplesPerPixel == 1
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.RescaleSlope == 1 and ds.RescaleType == "HU"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert ds.Rows == ds.Columns == TINY.image_size
        assert ds.PatientPosition in {"HFS", "FFS"}
        assert float(ds.WindowCenter) == 50 and float(ds.WindowWidth) == 400
        study_uids[patient_id].add(ds.StudyInstanceUID)
    assert all(len(uids) == 1 for uids in study_uids.values())
    assert len({next(iter(u)) for u in study_uids.values()}) == len(study_uids)


def test_encodings_and_transfer_syntaxes(headers: dict[Path, pydicom.Dataset]) -> None:
    syntaxes = {ds.file_meta.TransferSyntaxUID for ds in headers.values()}
    assert {ExplicitVRLittleEndian, RLELossless} <= syntaxes
    assert {ds.PixelRepresentation for ds in headers.values()} == {0, 1}
    assert {ds.BitsStored for ds in headers.values()} == {12, 16}
    for split in ("train_images", "test_images"):
        encodings = {
            (ds.PixelRepresentation, ds.BitsStored, float(ds.RescaleIntercept))
            for path, ds in headers.items()
            if split in path.parts
        }
        expected = {(e.pixel_representation, e.bits_stored, e.rescale_intercept) for e in ENCODINGS}
        assert encodings == expected, split
    test_syntaxes = [
        ds.file_meta.TransferSyntaxUID for p, ds in headers.items() if "test_images" in p.parts
    ]
    assert test_syntaxes.count(RLELossless) > len(test_syntaxes) / 3


def test_signed_12_bit_encoding_keeps_high_bits_zero() -> None:
    signed12 = next(e for e in ENCODINGS if e.pixel_representation == 1 and e.bits_stored == 12)
    stored = encode_hu(np.array([-1000.0, 40.0, 3000.0]), signed12)
    assert stored.dtype == np.uint16
    assert stored.tolist() == [3096, 40, 2047]


def test_decoded_slices_are_in_phantom_range(
    dataset: Path, truncated: Path, headers: dict[Path, pydicom.Dataset]
) -> None:
    folders = sorted({p.parent for p in headers})
    for folder in folders:
        files = sorted(p for p in folder.glob("*.dcm") if p != truncated)
        ds = pydicom.dcmread(files[len(files) // 2])
        hu = apply_rescale(ds.pixel_array, ds)
        assert hu.shape == (TINY.image_size, TINY.image_size)
        corner = hu[:4, :4]
        assert abs(float(np.median(corner)) + 1000) < 60, folder
        body = hu[hu > -500]
        assert body.size > hu.size * 0.2
        assert 0 <= float(np.median(body)) <= 100, folder
        assert hu.max() < 1500, "no naive sign misread"


def test_truncated_file_fails_to_decode(dataset: Path, truncated: Path) -> None:
    assert truncated.is_file() and "train_images" in truncated.parts
    siblings = [p.stat().st_size for p in truncated.parent.glob("*.dcm") if p != truncated]
    assert truncated.stat().st_size < 0.75 * min(siblings)
    others = [int(p.stem) for p in truncated.parent.glob("*.dcm") if p != truncated]
    assert min(others) < int(truncated.stem) < max(others), "neither first nor last slice"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(TRUNCATION_ERRORS):
            ds = pydicom.dcmread(truncated)
            _ = ds.pixel_array


def test_image_level_labels_refer_to_files_and_labels(dataset: Path) -> None:
    _, rows = read_csv(dataset / "image_level_labels.csv")
    _, train = read_csv(dataset / "train.csv")
    _, meta = read_csv(dataset / "train_series_meta.csv")
    labels = {r["patient_id"]: r for r in train}
    column = {"Active_Extravasation": "extravasation_injury", "Bowel": "bowel_injury"}
    flagged: set[tuple[str, str]] = set()
    assert rows, "the tiny set has injured patients"
    for row in rows:
        path = (
            dataset
            / "train_images"
            / row["patient_id"]
            / row["series_id"]
            / f"{row['instance_number']}.dcm"
        )
        assert path.is_file()
        assert labels[row["patient_id"]][column[row["injury_name"]]] == "1"
        flagged.add((row["series_id"], row["injury_name"]))
    for series in meta:
        for name, col in column.items():
            if labels[series["patient_id"]][col] == "1":
                assert (series["series_id"], name) in flagged, "injury must be visible"


def test_same_seed_same_bytes(dataset: Path, dataset_again: Path, truncated: Path) -> None:
    names = sorted(p.name for p in dataset.glob("*.csv"))
    assert len(names) == 6
    assert names == sorted(p.name for p in dataset_again.glob("*.csv"))
    for name in [*names, "README.md"]:
        assert (dataset / name).read_bytes() == (dataset_again / name).read_bytes(), name
    files = sorted(p.relative_to(dataset) for p in dataset.glob("*_images/*/*/*.dcm"))
    again = sorted(p.relative_to(dataset_again) for p in dataset_again.glob("*_images/*/*/*.dcm"))
    assert files == again
    for relative in files:
        assert (dataset / relative).read_bytes() == (dataset_again / relative).read_bytes()
    readable = [r for r in files if dataset / r != truncated]
    for relative in readable[:: max(1, len(readable) // 3)]:
        first = pydicom.dcmread(dataset / relative)
        second = pydicom.dcmread(dataset_again / relative)
        np.testing.assert_array_equal(first.pixel_array, second.pixel_array)


def test_different_seed_differs(tmp_path: Path, dataset: Path) -> None:
    config = SyntheticConfig(
        train_patients=3, test_patients=1, image_size=64, min_slices=4, max_slices=5, seed=12
    )
    other = generate_dataset(tmp_path / "other", config)
    _, a = read_csv(dataset / "train_series_meta.csv")
    _, b = read_csv(other / "train_series_meta.csv")
    assert {r["series_id"] for r in a} != {r["series_id"] for r in b}


def test_second_run_without_overwrite_is_a_noop(dataset: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in dataset.rglob("*")}
    assert generate_dataset(dataset, TINY) == dataset
    assert {p: p.stat().st_mtime_ns for p in dataset.rglob("*")} == before
    leftovers = [p for p in dataset.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    small = SyntheticConfig(
        train_patients=1, test_patients=1, image_size=32, min_slices=3, max_slices=3, overwrite=True
    )
    with pytest.raises(FileExistsError):
        generate_dataset(target, small)
    assert (target / "notes.txt").read_text() == "keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    args = [
        sys.executable,
        "-m",
        "kaggle_utils.demo",
        str(out),
        "--train-patients",
        "3",
        "--test-patients",
        "1",
        "--image-size",
        "64",
        "--min-slices",
        "4",
        "--max-slices",
        "6",
        "--seed",
        "5",
    ]

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*args, *extra], cwd=REPO, capture_output=True, text=True, check=True, timeout=120
        )

    def contents() -> dict[str, bytes]:
        return {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    first = run()
    assert "wrote 3 train + 1 test patients" in first.stdout
    assert (out / COMPLETE_MARKER).is_file()
    written = contents()
    second = run()
    assert "nothing to do" in second.stdout
    third = run("--overwrite", "--workers", "2")  # patients rendered in two processes
    assert "wrote" in third.stdout
    assert contents() == written  # byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    other = subprocess.run(
        [*args[:-1], "6"], cwd=REPO, capture_output=True, text=True, timeout=120
    )  # another seed into the same folder, without --overwrite
    assert other.returncode == 2 and "--overwrite" in other.stderr
    assert contents() == written


def _pair(labels: PatientLabels, seed: int = 3, n_slices: int = 24, size: int = 96):
    """A healthy and an injured phantom of the same patient (same seed, same anatomy)."""
    healthy = make_phantom(np.random.default_rng(seed), PatientLabels(), n_slices, size)
    injured = make_phantom(np.random.default_rng(seed), labels, n_slices, size)
    return healthy, injured


def test_phantom_shapes_and_masks() -> None:
    phantom = make_phantom(np.random.default_rng(0), PatientLabels(), 16, 64)
    assert phantom.hu.shape == (16, 64, 64) and phantom.hu.dtype == np.float32
    assert np.all(np.diff(phantom.z) < 0), "slice 0 is the top"
    for name in ("liver", "spleen", "kidney_left", "kidney_right", "bowel", "spine", "aorta"):
        assert phantom.masks[name].any(), name
    assert float(np.median(phantom.hu[~phantom.masks["body"] & ~phantom.masks["table"]])) < -900
    liver_z = np.nonzero(phantom.masks["liver"].any(axis=(1, 2)))[0].mean()
    bowel_z = np.nonzero(phantom.masks["bowel"].any(axis=(1, 2)))[0].mean()
    assert liver_z < bowel_z, "liver above bowel (slice 0 = superior)"
    liver_x = np.nonzero(phantom.masks["liver"])[2].mean()
    spleen_x = np.nonzero(phantom.masks["spleen"])[2].mean()
    assert liver_x < 32 < spleen_x, "liver on image-left (patient's right)"
    assert not any(flags.any() for flags in phantom.slice_flags.values())


def organ_mask(phantom: Phantom, group: str) -> np.ndarray:
    if group == "kidney":
        return phantom.masks["kidney_left"] | phantom.masks["kidney_right"]
    return phantom.masks[group]


@pytest.mark.parametrize("group", ["liver", "spleen", "kidney"])
def test_organ_injury_is_visible_and_graded(group: str) -> None:
    healthy, high = _pair(PatientLabels(**{group: 2}))
    _, low = _pair(PatientLabels(**{group: 1}))
    organ = organ_mask(healthy, group)
    np.testing.assert_array_equal(organ, organ_mask(high, group))
    assert high.injury_masks[group].sum() > 2 * low.injury_masks[group].sum() > 0
    lesion = high.injury_masks[group] & organ
    assert float(high.hu[lesion].mean()) < float(healthy.hu[lesion].mean()) - 25
    assert float(high.hu[organ].mean()) < float(healthy.hu[organ].mean()) - 5


def test_liver_high_grade_lowers_mean_liver_hu() -> None:
    healthy, injured = _pair(PatientLabels(liver=2), seed=21, n_slices=40, size=128)
    liver = healthy.masks["liver"]
    np.testing.assert_array_equal(liver, injured.masks["liver"])
    assert float(injured.hu[liver].mean()) < float(healthy.hu[liver].mean()) - 5


def test_extravasation_is_bright_and_flagged() -> None:
    view = SeriesView(aortic_hu=200.0)
    phantom = make_phantom(np.random.default_rng(4), PatientLabels(extravasation=1), 20, 64, view)
    blobs = phantom.injury_masks["extravasation"]
    assert blobs.any()
    assert float(np.median(phantom.hu[blobs])) > 200.0 + 30
    np.testing.assert_array_equal(
        phantom.slice_flags["Active_Extravasation"], blobs.any(axis=(1, 2))
    )
    assert 0 < phantom.slice_flags["Active_Extravasation"].sum() < 20


def test_bowel_injury_shows_free_air_outside_the_loops() -> None:
    phantom = make_phantom(np.random.default_rng(6), PatientLabels(bowel=1), 20, 64)
    injury = phantom.injury_masks["bowel"]
    assert injury.any()
    free_air = injury & ~phantom.masks["bowel"] & (phantom.hu < -500)
    assert free_air.any()
    np.testing.assert_array_equal(phantom.slice_flags["Bowel"], injury.any(axis=(1, 2)))
    assert not phantom.slice_flags["Active_Extravasation"].any()


@pytest.mark.parametrize("seed", range(6))
def test_small_injuries_visible_on_few_slices(seed: int) -> None:
    labels = PatientLabels(bowel=1, extravasation=1, kidney=1, liver=1, spleen=1)
    phantom = make_phantom(np.random.default_rng(seed), labels, 6, 32)
    for group in ("liver", "spleen", "kidney", "bowel", "extravasation"):
        assert phantom.injury_masks[group].any(), group
    assert all(flags.any() for flags in phantom.slice_flags.values())


def test_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        generate_dataset(tmp_path / "x", SyntheticConfig(min_slices=10, max_slices=5))
    assert not (tmp_path / "x").exists()


def test_a_complete_folder_made_with_other_options_is_not_reused(dataset: Path) -> None:
    with pytest.raises(FileExistsError, match="--overwrite"):
        generate_dataset(dataset, replace(TINY, test_patients=TINY.test_patients + 1))


def _demo_cache(phantom: Phantom, box: tuple[int, int, int, int] | None = None):
    """A phantom as notebook 01 caches it for the demo's fine-tuning: body crop, 32x96x96,
    soft-tissue window (uint8); and the body box used."""
    from kaggle_utils.cache.volume import apply_window, body_bbox, crop_and_resample

    box = box or body_bbox(phantom.hu)
    shape = (32, 96, 96)
    return apply_window(crop_and_resample(phantom.hu, box, [shape])[shape]), box


DEMO_CASES = [
    ("liver", 1),
    ("liver", 2),
    ("spleen", 1),
    ("spleen", 2),
    ("kidney", 1),
    ("kidney", 2),
    ("extravasation", 1),
    ("bowel", 1),
]


@pytest.mark.parametrize(("group", "grade"), DEMO_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_injury_survives_the_demo_cache(group: str, grade: int, seed: int) -> None:
    """DEMO_LESION_SCALE's point: at the demo's scale (128 px, 40-56 slices, cached at
    32x96x96, 16 evenly spaced slices fed to the model) every kind of injury still changes
    >= 100 voxels by >= 20 grey levels, on at least two of the slices the model sees. Before
    the floors a low-grade kidney lesion kept ~20 such voxels on one slice."""
    from kaggle_utils.finetune.data import slice_indices

    healthy, injured = _pair(PatientLabels(**{group: grade}), seed=seed, n_slices=48, size=128)
    # same seed: same anatomy and the same noise, so the difference is the injury alone
    injured_cache, box = _demo_cache(injured)
    healthy_cache, _ = _demo_cache(healthy, box)
    seen = slice_indices(32, 16)
    changed = np.abs(injured_cache.astype(int) - healthy_cache.astype(int))[seen] >= 20
    assert changed.sum() >= 100, (group, grade, int(changed.sum()))
    assert changed.any(axis=(1, 2)).sum() >= 2, (group, grade)


@pytest.mark.parametrize("group", ["spleen", "kidney"])
def test_spleen_and_kidney_injuries_bleed_into_their_fat(group: str) -> None:
    healthy, injured = _pair(PatientLabels(**{group: 1}), size=96)
    bleed = injured.injury_masks[group] & ~organ_mask(injured, group)
    assert bleed.sum() > 50
    assert float(np.median(healthy.hu[bleed])) < -50, "the organ sits in fat"
    soft = float(
        np.median(healthy.hu[healthy.masks["body"] & (healthy.hu > 0) & (healthy.hu < 45)])
    )
    assert float(np.median(injured.hu[bleed])) > soft + 15, "a clot denser than soft tissue"


def test_the_spleen_enhances_so_its_lesions_are_dark_in_a_bright_organ() -> None:
    arterial = make_phantom(np.random.default_rng(2), PatientLabels(), 24, 96, SeriesView())
    spleen = arterial.masks["spleen"]
    around = arterial.masks["body"] & ~spleen & (arterial.hu > 0) & (arterial.hu < 60)
    assert float(np.median(arterial.hu[spleen])) > float(np.median(arterial.hu[around])) + 50
    _, injured = _pair(PatientLabels(spleen=2))
    organ = organ_mask(injured, "spleen")
    lesion = injured.injury_masks["spleen"] & organ
    assert float(np.median(injured.hu[lesion])) < float(np.median(injured.hu[organ & ~lesion])) - 40
