"""The demo's labels and competition tables: the columns of train.csv and the series
meta tables, class prevalences, the generator's settings, and each patient's sampled labels."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

# Raised whenever the same options would give different data, so that an old folder is not
# silently reused (2: larger low-grade injuries; 3: demo-scale floors on every lesion's size,
# fat pads and clots around the spleen and kidneys, an enhancing spleen, larger kidneys injured
# as often as the other organs, larger extravasation, free air and bowel wall; see the module
# docstring; 4: organ masks in `segmentations/`, the pixel data and CSVs unchanged).
GENERATOR_VERSION = 4


BINARY_CLASSES: tuple[str, ...] = ("healthy", "injury")


TERNARY_CLASSES: tuple[str, ...] = ("healthy", "low", "high")


GROUPS: dict[str, tuple[str, ...]] = {
    "bowel": BINARY_CLASSES,
    "extravasation": BINARY_CLASSES,
    "kidney": TERNARY_CLASSES,
    "liver": TERNARY_CLASSES,
    "spleen": TERNARY_CLASSES,
}


LABEL_COLUMNS: tuple[str, ...] = tuple(f"{g}_{c}" for g, classes in GROUPS.items() for c in classes)


TRAIN_COLUMNS: tuple[str, ...] = ("patient_id", *LABEL_COLUMNS, "any_injury")


TRAIN_SERIES_META_COLUMNS: tuple[str, ...] = (
    "patient_id",
    "series_id",
    "aortic_hu",
    "incomplete_organ",
)


TEST_SERIES_META_COLUMNS: tuple[str, ...] = ("patient_id", "series_id", "aortic_hu")


IMAGE_LEVEL_COLUMNS: tuple[str, ...] = ("patient_id", "series_id", "instance_number", "injury_name")


SUBMISSION_COLUMNS: tuple[str, ...] = ("patient_id", *LABEL_COLUMNS)


INJURY_NAMES: tuple[str, ...] = ("Active_Extravasation", "Bowel")


# Per-patient class probabilities, well above the real prevalence (SPEC sec. 2): every class
# occurs even in a few dozen patients, and a CPU-sized demo has enough injured examples of each
# class for a small model to learn from.
PREVALENCE: dict[str, tuple[float, ...]] = {
    "bowel": (0.75, 0.25),
    "extravasation": (0.70, 0.30),
    "kidney": (0.60, 0.22, 0.18),
    "liver": (0.60, 0.22, 0.18),
    "spleen": (0.60, 0.22, 0.18),
}


@dataclass(frozen=True)
class PatientLabels:
    """One patient's target: 0/1 for the binary groups, 0/1/2 (healthy/low/high) otherwise."""

    bowel: int = 0
    extravasation: int = 0
    kidney: int = 0
    liver: int = 0
    spleen: int = 0

    def one_hot(self) -> list[int]:
        """The 13 label columns of `train.csv`, in file order."""
        row: list[int] = []
        for group, classes in GROUPS.items():
            value = getattr(self, group)
            row.extend(int(value == k) for k in range(len(classes)))
        return row

    @property
    def any_injury(self) -> int:
        return int(any(getattr(self, group) for group in GROUPS))


# Assigned to the first patients of a split (before shuffling) so that every class of every
# group occurs at least once; the rest are sampled from PREVALENCE.
COVERAGE_LABELS: tuple[PatientLabels, ...] = (
    PatientLabels(bowel=1, extravasation=0, kidney=1, liver=2, spleen=1),
    PatientLabels(bowel=0, extravasation=1, kidney=2, liver=1, spleen=2),
    PatientLabels(),
)


def sample_labels(rng: np.random.Generator, n_patients: int) -> list[PatientLabels]:
    """Labels for one split; every class is covered whenever there are >= 3 patients."""
    fixed = list(COVERAGE_LABELS) if n_patients >= len(COVERAGE_LABELS) else []
    sampled = [
        PatientLabels(
            **{g: int(rng.choice(len(p), p=np.asarray(p))) for g, p in PREVALENCE.items()}
        )
        for _ in range(n_patients - len(fixed))
    ]
    labels = fixed + sampled
    return [labels[i] for i in rng.permutation(n_patients)]


@dataclass(frozen=True)
class SyntheticConfig:
    """The generator's options (the CLI's flags)."""

    train_patients: int = 40
    test_patients: int = 12
    image_size: int = 160
    min_slices: int = 40
    max_slices: int = 64
    seed: int = 2023
    # share of the train patients whose first series gets an organ mask (the competition
    # has ~206 of ~4,700 series; the demo needs enough to train the segmentation step)
    segmented_share: float = 0.3
    overwrite: bool = False

    def validate(self) -> None:
        if self.train_patients < 1 or self.test_patients < 1:
            raise ValueError("need at least one train and one test patient")
        if self.image_size < 32:
            raise ValueError("image_size must be >= 32")
        if not 3 <= self.min_slices <= self.max_slices:
            raise ValueError("need 3 <= min_slices <= max_slices (one slice gets truncated)")
        if not 0.0 <= self.segmented_share <= 1.0:
            raise ValueError("segmented_share must be in [0, 1]")

    def options(self) -> dict[str, int]:
        """Everything that determines the data (all but `overwrite`, plus the generator's
        version)."""
        options = {k: v for k, v in asdict(self).items() if k != "overwrite"}
        return options | {"generator_version": GENERATOR_VERSION}
