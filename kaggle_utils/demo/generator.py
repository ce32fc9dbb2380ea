"""A deterministic miniature of the RSNA 2023 Abdominal Trauma Detection folder.

Newcomers without the competition download (hundreds of GB) still have to be able to run the whole
pipeline (decode, cache, pretrain, fine-tune, submit, score), so this module writes the exact
layout of the competition root (SPEC sec. 2) from simple abdominal phantoms in which the
injuries are visible (SPEC sec. 9):

    python -m kaggle_utils.demo OUT_DIR [--train-patients 40] [--test-patients 12]
        [--image-size 160] [--min-slices 40] [--max-slices 64] [--seed 2023] [--overwrite]

The DICOMs deliberately carry the pitfalls of the real data: shuffled file names versus z order,
instance numbers running either way, four pixel encodings (both PixelRepresentations, 12 and
16 stored bits, a signed 12-bit encoding whose unused high bits are zero), uncompressed, RLE
Lossless and JPEG 2000 Lossless transfer syntaxes, 1 or 2 series per patient and one truncated
file that the reader has to survive.

The same seed and options give byte-identical CSVs and identical pixel data: every random draw
comes from `np.random.default_rng(seed)` (dataset plan) or `np.random.default_rng([seed,
patient_index])` (one patient's phantom and series), every UID is a hash of the seed and ids,
and nothing reads the clock.

Phantom coordinates are normalised: x (columns, image-right = patient's left) and y (rows,
down = posterior) run over [-1, 1] across the field of view, z runs over [0, 1] from the pelvis
(0) to the diaphragm (1). A series samples a sub-range of z.

Injuries are drawn at demo scale, not to real proportions (`DEMO_LESION_SCALE`): `make demo`
caches 128 px series at 32x96x96 and its tiny CNN-BiLSTM sees 12 of those slices (16 when this
was measured), where injuries of real size vanish. Measured on that path (voxels changed by >=
20 grey levels on the 16 slices seen, median of 8 patients), the generator before this (version
2) left a low-grade kidney injury 19, a low-grade spleen injury 75, an extravasation 39 and a
bowel injury 95, against 316 for a low-grade liver injury, and the demo learned only the liver.
Now every lesion has a floor on its size (the small organs' lesions reach half the organ); the
spleen enhances like the kidney cortex, so that its lesions are dark in a bright organ; the
spleen and kidneys sit in fat pads into which their injuries bleed (a perisplenic or perirenal
clot, denser than soft tissue, all around the organ where the dark fat was); the kidneys are
larger and injured as often as the liver and spleen; and extravasation, free air and the
injured bowel wall are larger: 1631 (spleen), 1820 (kidney), 447 (extravasation), 207 (bowel),
405 (liver). `tests/test_synthetic.py` checks a floor of 100 voxels on >= 2 slices. What the
demo then learns, per target and per recipe, is in docs/demo-data.md: in the recipe trials the
spleen was learned only once its injury showed as something present (the clot, the dark lesion
in the enhancing spleen), not as the dark fat ring gone."""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.uid import (
    JPEG2000Lossless,
    RLELossless,
)

from kaggle_utils.demo.anatomy import SEGMENTATIONS_DIR
from kaggle_utils.demo.dicom_writer import (
    ENCODINGS,
    SYNTAX_NAMES,
    TEST_SYNTAX_CYCLE,
    TRAIN_SYNTAX_CYCLE,
    PatientPlan,
    SeriesPlan,
    SeriesRecord,
    j2k_encoder_works,
    write_patient,
)
from kaggle_utils.demo.labels import (
    GROUPS,
    IMAGE_LEVEL_COLUMNS,
    INJURY_NAMES,
    SUBMISSION_COLUMNS,
    TEST_SERIES_META_COLUMNS,
    TRAIN_COLUMNS,
    TRAIN_SERIES_META_COLUMNS,
    PatientLabels,
    SyntheticConfig,
    sample_labels,
)

COMPLETE_MARKER = "_COMPLETE"


def plan_dataset(config: SyntheticConfig) -> tuple[list[PatientPlan], int]:
    """Ids, labels, series counts, encodings and syntaxes of all patients, and which train
    series (index into the split's series list) gets a truncated file.

    Drawn from `default_rng(seed)` in a fixed order, so the plan depends on nothing else.
    """
    rng = np.random.default_rng(config.seed)
    n_total = config.train_patients + config.test_patients
    ids = rng.choice(np.arange(10_000, 65_536), size=n_total, replace=False)
    train_ids = sorted(int(i) for i in ids[: config.train_patients])
    test_ids = sorted(int(i) for i in ids[config.train_patients :])
    train_labels = sample_labels(rng, config.train_patients)
    test_labels = sample_labels(rng, config.test_patients)
    n_series = 1 + (rng.random(n_total) < 0.3).astype(int)
    series_ids = rng.choice(np.arange(10_000, 100_000), size=int(n_series.sum()), replace=False)
    truncated_series = int(rng.integers(int(n_series[: config.train_patients].sum())))
    j2k = j2k_encoder_works(config.image_size)

    plans: list[PatientPlan] = []
    next_series = 0
    global_series = 0
    for split, pids, labels, offset in (
        ("train", train_ids, train_labels, 0),
        ("test", test_ids, test_labels, config.train_patients),
    ):
        cycle = TRAIN_SYNTAX_CYCLE if split == "train" else TEST_SYNTAX_CYCLE
        split_series = 0
        for i, (pid, lab) in enumerate(zip(pids, labels, strict=True)):
            series = []
            for s in range(int(n_series[offset + i])):
                syntax = cycle[split_series % len(cycle)]
                if syntax == JPEG2000Lossless and not j2k:
                    syntax = RLELossless
                series.append(
                    SeriesPlan(
                        split=split,
                        patient_id=pid,
                        series_id=int(series_ids[next_series]),
                        series_number=s + 1 + int(rng.integers(0, 3)),
                        encoding=ENCODINGS[split_series % len(ENCODINGS)],
                        syntax=syntax,
                        instance_up_with_z=global_series % 3 == 1,
                    )
                )
                next_series += 1
                split_series += 1
                global_series += 1
            plans.append(PatientPlan(split, offset + i, pid, lab, tuple(series)))
    return plans, truncated_series


def _write_patients(
    plans: list[PatientPlan], config: SyntheticConfig, root: Path, workers: int
) -> list[SeriesRecord]:
    if workers <= 1 or len(plans) < 2:
        return [r for plan in plans for r in write_patient(plan, config, root)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")  # no fork of a threaded parent
    with ProcessPoolExecutor(min(workers, len(plans)), mp_context=context) as pool:
        written = pool.map(
            write_patient, plans, [config] * len(plans), [root] * len(plans), chunksize=4
        )
        return [r for patient in written for r in patient]


def _check_same_options(out_dir: Path, config: SyntheticConfig) -> None:
    """A complete folder is only reused when it was made with these options and generator."""
    written = json.loads((Path(out_dir) / COMPLETE_MARKER).read_text(encoding="utf-8"))
    if written != config.options():
        raise FileExistsError(
            f"{out_dir} holds a demo dataset made with other options or an older generator "
            f"({written} != {config.options()}): pass --overwrite (or `make clean-demo`, "
            "which also clears the demo outputs cached from it)"
        )


def is_complete(out_dir: Path) -> bool:
    """A dataset is complete once its marker exists (written last, then renamed into place)."""
    return (Path(out_dir) / COMPLETE_MARKER).is_file()


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue(), encoding="utf-8")


def _label_row(patient_id: int, labels: PatientLabels) -> list[int]:
    return [patient_id, *labels.one_hot(), labels.any_injury]


def _write_tables(root: Path, plans: list[PatientPlan], records: list[SeriesRecord]) -> None:
    train = [p for p in plans if p.split == "train"]
    test = [p for p in plans if p.split == "test"]
    _write_csv(
        root / "train.csv", TRAIN_COLUMNS, [_label_row(p.patient_id, p.labels) for p in train]
    )
    _write_csv(
        root / "test_labels.csv", TRAIN_COLUMNS, [_label_row(p.patient_id, p.labels) for p in test]
    )
    _write_csv(
        root / "train_series_meta.csv",
        TRAIN_SERIES_META_COLUMNS,
        [
            [r.plan.patient_id, r.plan.series_id, f"{r.aortic_hu:.1f}", r.incomplete_organ]
            for r in records
            if r.plan.split == "train"
        ],
    )
    _write_csv(
        root / "test_series_meta.csv",
        TEST_SERIES_META_COLUMNS,
        [
            [r.plan.patient_id, r.plan.series_id, f"{r.aortic_hu:.1f}"]
            for r in records
            if r.plan.split == "test"
        ],
    )
    image_rows = [
        [r.plan.patient_id, r.plan.series_id, number, name]
        for r in records
        if r.plan.split == "train"
        for name in INJURY_NAMES
        for number in r.flagged[name]
    ]
    _write_csv(root / "image_level_labels.csv", IMAGE_LEVEL_COLUMNS, image_rows)
    constant = []
    for classes in GROUPS.values():
        constant.extend([repr(1 / len(classes))] * len(classes))
    _write_csv(
        root / "sample_submission.csv",
        SUBMISSION_COLUMNS,
        [[p.patient_id, *constant] for p in test],
    )


def _truncate(root: Path, record: SeriesRecord) -> Path:
    """Cut the middle slice (in z order) of `record` to half its size, like a broken
    download; nothing in the CSVs says so, the reader has to notice."""
    number = record.instance_numbers[record.n_slices // 2]
    plan = record.plan
    path = (
        root / f"{plan.split}_images" / str(plan.patient_id) / str(plan.series_id) / f"{number}.dcm"
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.relative_to(root)


def _readme(config: SyntheticConfig, records: list[SeriesRecord], truncated: Path) -> str:
    lines = [
        "# Synthetic RSNA 2023 Abdominal Trauma Detection demo data",
        "",
        "Synthetic phantoms, not patient data: generated by `python -m kaggle_utils.demo` in the",
        "exact layout of the competition folder so that the whole pipeline runs and can be",
        "scored without the download (`test_labels.csv` holds the test patients' labels).",
        "",
        "Options: " + ", ".join(f"`{k}={v}`" for k, v in config.options().items()),
        "",
        f"Truncated on purpose (not recorded in any CSV): `{truncated.as_posix()}`",
        "",
        "| split | patient_id | series_id | slices | z spacing (mm) | encoding | transfer syntax "
        "| InstanceNumber vs z | PatientPosition | organ mask |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        p = r.plan
        order = "increases with z" if p.instance_up_with_z else "decreases with z"
        lines.append(
            f"| {p.split} | {p.patient_id} | {p.series_id} | {r.n_slices} | {r.z_spacing:g} "
            f"| {p.encoding.name} | {SYNTAX_NAMES[p.syntax]} | {order} | {r.patient_position} "
            f"| {'yes' if r.segmented else ''} |"
        )
    return "\n".join(lines) + "\n"


def _check_replaceable(target: Path, overwrite: bool) -> None:
    """Refuse to replace a non-empty folder unless it is one of our datasets and `overwrite`
    is set, so that a mistyped OUT_DIR never deletes someone's files."""
    if not target.exists() or not any(target.iterdir()):
        return
    ours = is_complete(target) or (target / "train.csv").is_file()
    if not (overwrite and ours):
        hint = "" if overwrite else "; pass overwrite=True / --overwrite to replace it"
        raise FileExistsError(f"{target} is not empty and not a complete synthetic dataset{hint}")


def _replace_dir(target: Path, new: Path, overwrite: bool) -> None:
    """Move `new` to `target`, replacing an existing (empty or our own) target."""
    if not target.exists():
        new.rename(target)
        return
    _check_replaceable(target, overwrite)
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    target.rename(trash / "old")
    new.rename(target)
    shutil.rmtree(trash)


def generate_dataset(out_dir: Path, config: SyntheticConfig, workers: int = 1) -> Path:
    """Write the demo competition folder to `out_dir` and return it; `workers` processes
    render patients in parallel (each patient has its own generator: same bytes either way).

    A complete dataset already there is kept unless `config.overwrite`. Everything is written
    into a hidden temporary sibling first and renamed into place at the end, with the
    `_COMPLETE` marker written last, so an interrupted run never leaves a folder that looks
    complete.
    """
    config.validate()
    out_dir = Path(out_dir)
    if is_complete(out_dir) and not config.overwrite:
        _check_same_options(out_dir, config)
        return out_dir
    _check_replaceable(out_dir, config.overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        plans, truncated_index = plan_dataset(config)
        records = _write_patients(plans, config, tmp, workers)
        (tmp / "test_images").mkdir(exist_ok=True)
        (tmp / SEGMENTATIONS_DIR).mkdir(exist_ok=True)
        _write_tables(tmp, plans, records)
        train_records = [r for r in records if r.plan.split == "train"]
        truncated = _truncate(tmp, train_records[truncated_index])
        (tmp / "README.md").write_text(_readme(config, records, truncated), encoding="utf-8")
        (tmp / COMPLETE_MARKER).write_text(
            json.dumps(config.options(), sort_keys=True) + "\n", encoding="utf-8"
        )
        _replace_dir(out_dir, tmp, config.overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = SyntheticConfig()
    parser = argparse.ArgumentParser(
        prog="python -m kaggle_utils.demo",
        description="Write a deterministic miniature RSNA 2023 abdominal trauma folder.",
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train-patients", type=int, default=defaults.train_patients)
    parser.add_argument("--test-patients", type=int, default=defaults.test_patients)
    parser.add_argument("--image-size", type=int, default=defaults.image_size)
    parser.add_argument("--min-slices", type=int, default=defaults.min_slices)
    parser.add_argument("--max-slices", type=int, default=defaults.max_slices)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--segmented-share",
        type=float,
        default=defaults.segmented_share,
        help="share of train patients with an organ mask in segmentations/",
    )
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--workers", type=int, default=1, help="processes rendering patients")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    config = SyntheticConfig(
        train_patients=args.train_patients,
        test_patients=args.test_patients,
        image_size=args.image_size,
        min_slices=args.min_slices,
        max_slices=args.max_slices,
        seed=args.seed,
        segmented_share=args.segmented_share,
        overwrite=args.overwrite,
    )
    out_dir: Path = args.out_dir
    started = time.perf_counter()
    try:
        if is_complete(out_dir) and not config.overwrite:
            _check_same_options(out_dir, config)
            print(f"{out_dir} already holds this dataset; nothing to do (--overwrite redoes it)")
            return 0
        generate_dataset(out_dir, config, args.workers)
    except (ValueError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    n_files = sum(1 for _ in out_dir.glob("*_images/*/*/*.dcm"))
    n_series = sum(1 for _ in out_dir.glob("*_images/*/*"))
    print(
        f"wrote {config.train_patients} train + {config.test_patients} test patients, "
        f"{n_series} series, {n_files} DICOM files to {out_dir} "
        f"in {time.perf_counter() - started:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
