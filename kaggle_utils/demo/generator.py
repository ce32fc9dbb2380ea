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
in the enhancing spleen), not as the dark fat ring gone. """

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

COMPLETE_MARKER = "_COMPLETE"
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

# Demo-scale visibility, not realism (see the module docstring). The demo trains on 16 of 32
# slices of 96x96 crops of 128 px images, and a lesion drawn as a fraction of its organ
# vanishes there for the small organs: a low-grade kidney contusion (a third of a 7 px kidney)
# kept ~20 changed voxels on one sampled slice. So every lesion has a floor on its size in
# normalised units (1 = half the field of view; at 128 px one unit is 64 px, ~57 px after the
# body crop to 96): radii in x/y and z, the laceration half-thickness and the rim of fluid
# around a high-grade organ. Large organs (liver) are barely affected.
DEMO_LESION_SCALE: dict[str, float] = {
    "min_radius_xy": 0.09,  # a hypodense region's in-plane radius (~5 px at 96 px)
    "min_radius_z": 0.08,  # its z half-extent (~2.7 of 32 cached slices: >= 2 sampled)
    "max_organ_fraction": 0.7,  # but a low-grade lesion stays inside its organ
    "min_laceration_half_thickness": 0.032,  # a laceration ~4 px wide at 96 px
    "min_fluid_rim": 0.06,  # a high-grade organ's fluid crescent, ~3 px thick
}

# The spleen's contrast uptake at enhancement 1 (real portal-venous spleens reach 100-130 HU).
SPLEEN_ENHANCEMENT_HU = 60.0

Z_SPACINGS_MM: tuple[float, ...] = (2.0, 2.5, 3.0, 5.0)
FIELD_OF_VIEW_MM = 300.0
SERIES_UID_ROOT = "1.2.123.12345.1.2.3."
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."


# --------------------------------------------------------------------------------------------
# Labels


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


# --------------------------------------------------------------------------------------------
# Phantom geometry


@dataclass(frozen=True)
class Ellipsoid:
    """Axis-aligned ellipsoid in normalised coordinates (x, y, z)."""

    center: tuple[float, float, float]
    radii: tuple[float, float, float]

    @property
    def z_extent(self) -> tuple[float, float]:
        return self.center[2] - self.radii[2], self.center[2] + self.radii[2]


@dataclass(frozen=True)
class Laceration:
    """A thin slab through `point` with unit `normal`, limited to a ball of `radius`."""

    point: tuple[float, float, float]
    normal: tuple[float, float, float]
    half_thickness: float
    radius: float


@dataclass(frozen=True)
class Tube:
    """A bowel loop: a wandering circular tube along z with a wall and air/fluid content.

    `air_level` in [-1, 1] is where the air-fluid level sits, relative to the lumen radius
    (-1: all fluid, 1: all air); air floats anteriorly (smaller y).
    """

    x0: float
    y0: float
    amplitude: tuple[float, float]
    frequency: float
    phase: float
    radius: float
    wall: float
    z_range: tuple[float, float]
    air_level: float

    def centers(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tube centre (x, y) at the given z values."""
        angle = 2 * np.pi * self.frequency * (z - self.z_range[0]) + self.phase
        return (
            self.x0 + self.amplitude[0] * np.sin(angle),
            self.y0 + self.amplitude[1] * np.cos(angle),
        )


@dataclass(frozen=True)
class OrganInjury:
    """Hypodense regions, lacerations and a crescent of fluid or blood of one solid organ.

    `fluid` is the crescent's outer surface (None: no crescent), `fluid_hu` its density: 20 HU
    (fluid) or 65-80 HU (a clot); on the organ's lateral side only, or all around it.
    """

    organ: str
    grade: int
    hypodense: tuple[Ellipsoid, ...]
    lacerations: tuple[Laceration, ...]
    fluid: Ellipsoid | None
    delta_hu: float
    fluid_hu: float = 20.0
    fluid_lateral: bool = True


@dataclass(frozen=True)
class Anatomy:
    """Everything about one patient that both of their series share."""

    labels: PatientLabels
    body_center: tuple[float, float]
    body_radii: tuple[float, float]
    fat_fraction: float
    table_gap: float
    organs: dict[str, Ellipsoid]
    organ_hu: dict[str, float]
    spine_center: tuple[float, float]
    spine_radius: float
    aorta_center: tuple[float, float]
    aorta_radius: float
    ivc_center: tuple[float, float]
    ivc_radius: float
    bowel: tuple[Tube, ...]
    noise_sigma: float
    perirenal_fat: float = 0.0
    perisplenic_fat: float = 0.0
    organ_injuries: tuple[OrganInjury, ...] = ()
    extravasation: tuple[Ellipsoid, ...] = ()
    extravasation_hu: float = 320.0
    free_air: tuple[Ellipsoid, ...] = ()
    injured_wall: tuple[int, float, float] | None = None


@dataclass(frozen=True)
class SeriesView:
    """How one series samples the shared anatomy: z range, contrast phase and a small shift.

    `enhancement` scales the contrast-enhanced kidney cortex (1 = arterial); `liver_boost` is
    the extra liver/spleen enhancement of a portal-venous phase.
    """

    z_bottom: float = 0.0
    z_top: float = 1.0
    aortic_hu: float = 220.0
    enhancement: float = 1.0
    liver_boost: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)


@dataclass
class Phantom:
    """A rendered series: HU volume (slice 0 = top, i.e. most superior), masks and flags.

    `masks` holds the organs (exclusive, like a segmentation), `injury_masks` the visible
    injuries per group, `slice_flags` one boolean per slice per `injury_name` of
    `image_level_labels.csv`.
    """

    hu: np.ndarray
    masks: dict[str, np.ndarray]
    injury_masks: dict[str, np.ndarray]
    slice_flags: dict[str, np.ndarray]
    z: np.ndarray
    anatomy: Anatomy = field(repr=False)


# Label map values (and SPEC's segmentation ids where they exist).
ORGAN_LABELS: dict[str, int] = {
    "liver": 1,
    "spleen": 2,
    "kidney_left": 3,
    "kidney_right": 4,
    "bowel": 5,
    "body": 6,
    "spine": 7,
    "aorta": 8,
    "ivc": 9,
    "table": 10,
}
# The competition's `segmentations/<series_id>.nii` label values (SPEC sec. 2).
SEGMENTATION_LABELS: dict[str, int] = {
    name: ORGAN_LABELS[name] for name in ("liver", "spleen", "kidney_left", "kidney_right", "bowel")
}
SEGMENTATIONS_DIR = "segmentations"
# The organs whose cut-off by the scan range makes a series `incomplete_organ`.
SOLID_ORGANS: tuple[str, ...] = ("liver", "spleen", "kidney_left", "kidney_right")
# Injuries that image_level_labels.csv lists by slice stay inside every series' z range.
_INJURY_Z_RANGE = (0.15, 0.8)


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _body_point(
    center: tuple[float, float], radii: tuple[float, float], u: float, v: float
) -> tuple[float, float]:
    """Body-relative (u, v) in [-1, 1] to normalised image (x, y)."""
    return center[0] + u * radii[0], center[1] + v * radii[1]


def sample_anatomy(rng: np.random.Generator, labels: PatientLabels) -> Anatomy:
    """A healthy abdomen from `rng`, then the injuries of `labels` from a child generator.

    The healthy part draws the same numbers whatever the labels, so a seed gives the same
    patient with or without an injury (which lets tests compare them directly).
    """
    injury_rng = np.random.default_rng(int(rng.integers(2**63)))
    center = (_u(rng, -0.05, 0.05), _u(rng, -0.12, -0.02))
    radii = (_u(rng, 0.74, 0.86), _u(rng, 0.56, 0.66))

    def at(u: float, v: float) -> tuple[float, float]:
        return _body_point(center, radii, u, v)

    def organ(u: float, v: float, ru: float, rv: float, z: float, rz: float) -> Ellipsoid:
        x, y = at(u + _u(rng, -0.04, 0.04), v + _u(rng, -0.04, 0.04))
        scale = _u(rng, 0.9, 1.1)
        return Ellipsoid(
            (x, y, z + _u(rng, -0.02, 0.02)),
            (ru * radii[0] * scale, rv * radii[1] * scale, rz * _u(rng, 0.92, 1.05)),
        )

    # kidneys ~4.1 cm wide at the mean body size (version 2: 3.4 cm; real ones are 5-6 cm)
    organs = {
        "liver": organ(-0.33, -0.08, 0.5, 0.58, 0.75, 0.17),
        "spleen": organ(0.52, 0.30, 0.2, 0.3, 0.77, 0.12),
        "kidney_right": organ(-0.34, 0.46, 0.17, 0.25, 0.48, 0.12),
        "kidney_left": organ(0.34, 0.46, 0.17, 0.25, 0.5, 0.12),
    }
    organ_hu = {
        "liver": _u(rng, 58, 68),
        "spleen": _u(rng, 46, 54),
        "kidney": _u(rng, 28, 36),
        "soft": _u(rng, 32, 42),
        "fat": _u(rng, -110, -90),
        "table": _u(rng, 20, 90),
    }
    spine_center = at(_u(rng, -0.03, 0.03), 0.66)
    spine_radius = 0.11 * radii[0]
    aorta_radius = _u(rng, 0.055, 0.07) * radii[0]
    aorta_center = (
        spine_center[0] + 0.08 * radii[0],
        spine_center[1] - spine_radius - aorta_radius - 0.01,
    )
    ivc_radius = _u(rng, 0.05, 0.065) * radii[0]
    ivc_center = (
        spine_center[0] - 0.14 * radii[0],
        spine_center[1] - spine_radius - ivc_radius - 0.005,
    )
    n_tubes = int(rng.integers(4, 7))
    bowel = tuple(_sample_tube(rng, at, i, n_tubes) for i in range(n_tubes))
    anatomy = Anatomy(
        labels=labels,
        body_center=center,
        body_radii=radii,
        fat_fraction=_u(rng, 0.07, 0.12),
        table_gap=_u(rng, 0.04, 0.07),
        organs=organs,
        organ_hu=organ_hu,
        spine_center=spine_center,
        spine_radius=spine_radius,
        aorta_center=aorta_center,
        aorta_radius=aorta_radius,
        ivc_center=ivc_center,
        ivc_radius=ivc_radius,
        bowel=bowel,
        noise_sigma=_u(rng, 10.0, 15.0),
        perirenal_fat=_u(rng, 0.06, 0.08),
        perisplenic_fat=_u(rng, 0.045, 0.06),
    )
    return _add_injuries(injury_rng, anatomy)


def _sample_tube(
    rng: np.random.Generator,
    at: Callable[[float, float], tuple[float, float]],
    index: int,
    n_tubes: int,
) -> Tube:
    """One bowel loop in the lower, anterior abdomen (spread over x by its index)."""
    u = -0.5 + (index + _u(rng, 0.2, 0.8)) / n_tubes
    x0, y0 = at(u, _u(rng, -0.38, 0.05))
    z0 = _u(rng, 0.05, 0.15)
    return Tube(
        x0=x0,
        y0=y0,
        amplitude=(_u(rng, 0.02, 0.06), _u(rng, 0.02, 0.05)),
        frequency=_u(rng, 1.0, 3.0),
        phase=_u(rng, 0, 2 * np.pi),
        radius=_u(rng, 0.05, 0.075),
        wall=_u(rng, 0.012, 0.018),
        z_range=(z0, _u(rng, 0.38, 0.5)),
        air_level=float(rng.choice([-1.0, 1.0, _u(rng, -0.6, 0.6)])),
    )


def _organ_injury(
    rng: np.random.Generator, organ: str, box: Ellipsoid, grade: int, fat_pad: float = 0.0
) -> OrganInjury:
    """Grade 1: one small hypodense region or one laceration; grade 2: a large hypodense
    region, two or three lacerations and a perihepatic/perisplenic/perirenal fluid crescent.
    An injured spleen or kidney of either grade also bleeds into the fat all around it
    (`fat_pad` thick: a perisplenic or perirenal hematoma, on CT the commonest sign of their
    injury; a clot at 65-80 HU, the "sentinel clot", denser than soft tissue), and a kidney's
    hypodense region lies off-centre so that it breaks the enhancing
    cortex, as lacerations from the capsule do.

    Low-grade lesions and lacerations are drawn larger than most real ones (a third to two
    fifths of the organ, and never below DEMO_LESION_SCALE's floors: ~1 cm wide lacerations,
    contusions of half a kidney): the demo trains at 96 px, where a realistic 1 cm kidney
    contusion would span two or three pixels and no CPU-sized model could learn it.
    """
    (cx, cy, cz), (rx, ry, rz) = box.center, box.radii
    floor = DEMO_LESION_SCALE
    kidney = organ.startswith("kidney")

    def at_least(f: float, radius: float, minimum: float) -> float:
        return max(f * radius, min(minimum, floor["max_organ_fraction"] * radius))

    def inside(spread: float, scale: tuple[float, float]) -> Ellipsoid:
        if kidney:  # towards the surface, in any in-plane direction
            angle, distance = _u(rng, 0, 2 * np.pi), _u(rng, 0.4, 0.6)
            du, dv = distance * np.cos(angle), distance * np.sin(angle)
        else:
            du, dv = _u(rng, -spread, spread), _u(rng, -spread, spread)
        center = (cx + du * rx, cy + dv * ry, cz + _u(rng, -spread, spread) * rz)
        f = _u(rng, *scale)
        fz = f * _u(rng, 0.8, 1.1)
        radii = (
            at_least(f, rx, floor["min_radius_xy"]),
            at_least(f, ry, floor["min_radius_xy"]),
            at_least(fz, rz, floor["min_radius_z"]),
        )
        return Ellipsoid(center, radii)

    def laceration() -> Laceration:
        angle = _u(rng, 0, np.pi)
        tilt = _u(rng, -0.3, 0.3)
        normal = np.array([np.cos(angle), np.sin(angle), tilt])
        normal /= np.linalg.norm(normal)
        point = (
            cx + _u(rng, -0.3, 0.3) * rx,
            cy + _u(rng, -0.3, 0.3) * ry,
            cz + _u(rng, -0.3, 0.3) * rz,
        )
        half = max(_u(rng, 0.018, 0.026), floor["min_laceration_half_thickness"])
        return Laceration(point, tuple(float(v) for v in normal), half, 0.9 * rx)

    def rim(extra: float) -> Ellipsoid:
        return Ellipsoid(box.center, (rx + extra, ry + extra, rz + extra))

    # Lacerations and contusions enhance far less than parenchyma in portal-venous CT: 60-95 HU
    # darker than the enhanced organ.
    delta = _u(rng, 60.0, 95.0)
    blood = _u(rng, 65.0, 80.0)  # clotted blood (the "sentinel clot"), denser than soft tissue
    if grade == 1:
        # the hematoma fills the fat pad all around the organ (perisplenic; perirenal, inside
        # Gerota's fascia)
        fluid = rim(fat_pad) if fat_pad > 0 else None
        lesions = (
            ((inside(0.3, (0.32, 0.42)),), ()) if rng.random() < 0.5 else ((), (laceration(),))
        )
        return OrganInjury(organ, 1, *lesions, fluid, delta, blood, fluid_lateral=False)
    n_lacerations = int(rng.integers(2, 4))
    extra = max(0.22 * min(rx, ry), floor["min_fluid_rim"], fat_pad + 0.05)
    return OrganInjury(
        organ,
        2,
        (inside(0.12, (0.58, 0.68)),),
        tuple(laceration() for _ in range(n_lacerations)),
        rim(extra),
        delta,
        blood if fat_pad > 0 else 20.0,
        fluid_lateral=fat_pad == 0,  # a high-grade spleen or kidney: blood all around it
    )


def _fat_pad(anatomy: Anatomy, organ: str) -> float:
    """Thickness of the fat around an organ (normalised units; the liver has none here)."""
    if organ.startswith("kidney"):
        return anatomy.perirenal_fat
    return anatomy.perisplenic_fat if organ == "spleen" else 0.0


def _add_injuries(rng: np.random.Generator, anatomy: Anatomy) -> Anatomy:
    """Place the injuries that `anatomy.labels` call for; all lie inside the body."""
    labels = anatomy.labels
    injuries: list[OrganInjury] = []
    for group in ("liver", "spleen", "kidney"):
        grade = getattr(labels, group)
        if not grade:
            continue
        organ = group
        if group == "kidney":
            organ = "kidney_left" if rng.random() < 0.5 else "kidney_right"
        organ_box = anatomy.organs[organ]
        fat_pad = _fat_pad(anatomy, organ)
        injuries.append(_organ_injury(rng, organ, organ_box, grade, fat_pad))

    def at(u: float, v: float) -> tuple[float, float]:
        return _body_point(anatomy.body_center, anatomy.body_radii, u, v)

    def clamp_z(z: float) -> float:
        return float(np.clip(z, *_INJURY_Z_RANGE))

    blobs: list[Ellipsoid] = []
    if labels.extravasation:
        for _ in range(int(rng.integers(2, 5))):  # demo scale: 2-4 (was 1-3)
            if injuries:
                box = anatomy.organs[injuries[int(rng.integers(len(injuries)))].organ]
                (cx, cy, cz), (rx, ry, rz) = box.center, box.radii
                x, y, z = (
                    cx + _u(rng, -0.7, 0.7) * rx,
                    cy + _u(rng, -0.7, 0.7) * ry,
                    cz + _u(rng, -0.6, 0.6) * rz,
                )
            else:
                x, y = at(_u(rng, -0.4, 0.4), _u(rng, -0.3, 0.3))
                z = _u(rng, 0.2, 0.8)
            r = _u(rng, 0.06, 0.085)  # demo scale (was 0.03-0.05): ~3.5-5 px at 96 px
            blobs.append(Ellipsoid((x, y, clamp_z(z)), (r, r, _u(rng, 0.07, 0.09))))

    air: list[Ellipsoid] = []
    wall: tuple[int, float, float] | None = None
    if labels.bowel:
        for _ in range(int(rng.integers(2, 6))):
            x, y = at(_u(rng, -0.45, 0.45), _u(rng, -0.86, -0.7))
            r = _u(rng, 0.022, 0.035)  # demo scale (was 0.012-0.025)
            air.append(Ellipsoid((x, y, clamp_z(_u(rng, 0.15, 0.5))), (1.6 * r, r, 0.045)))
        index = int(rng.integers(len(anatomy.bowel)))
        z0, z1 = anatomy.bowel[index].z_range
        zc = clamp_z(_u(rng, z0 + 0.05, z1 - 0.05))
        half = _u(rng, 0.08, 0.12)  # demo scale (was 0.05-0.08)
        wall = (index, zc - half, zc + half)
    return replace(
        anatomy,
        organ_injuries=tuple(injuries),
        extravasation=tuple(blobs),
        extravasation_hu=_u(rng, 300.0, 360.0),
        free_air=tuple(air),
        injured_wall=wall,
    )


# --------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class _Grid:
    """Broadcastable coordinates of one series: x (1,1,W), y (1,H,1), z (S,1,1)."""

    x: np.ndarray
    y: np.ndarray
    z: np.ndarray
    pixel: float
    dz: float

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.z.shape[0], self.y.shape[1], self.x.shape[2]


def _make_grid(n_slices: int, image_size: int, view: SeriesView) -> _Grid:
    axis = ((np.arange(image_size, dtype=np.float32) + 0.5) / image_size * 2 - 1).astype(np.float32)
    z = np.linspace(view.z_top, view.z_bottom, n_slices, dtype=np.float32)
    dz = abs(view.z_top - view.z_bottom) / max(n_slices - 1, 1)
    return _Grid(
        x=(axis - np.float32(view.shift[0]))[None, None, :],
        y=(axis - np.float32(view.shift[1]))[None, :, None],
        z=z[:, None, None],
        pixel=2.0 / image_size,
        dz=dz,
    )


def _slab(grid: _Grid, z_low: float, z_high: float) -> slice:
    """Slices whose z lies in [z_low, z_high] (z decreases with the slice index)."""
    z = grid.z[:, 0, 0]
    inside = np.nonzero((z >= z_low) & (z <= z_high))[0]
    if inside.size == 0:
        return slice(0, 0)
    return slice(int(inside[0]), int(inside[-1]) + 1)


def _ellipsoid_r2(grid: _Grid, e: Ellipsoid, sl: slice) -> np.ndarray:
    (cx, cy, cz), (rx, ry, rz) = e.center, e.radii
    return (
        ((grid.x - cx) / rx) ** 2 + ((grid.y - cy) / ry) ** 2 + ((grid.z[sl] - cz) / rz) ** 2
    ).astype(np.float32, copy=False)


def _ellipsoid_mask(grid: _Grid, e: Ellipsoid, scale: float = 1.0) -> np.ndarray:
    """Boolean mask of an ellipsoid (radii times `scale`), computed only on its z slab."""
    mask = np.zeros(grid.shape, dtype=bool)
    sl = _slab(grid, e.center[2] - e.radii[2] * scale, e.center[2] + e.radii[2] * scale)
    if sl.stop > sl.start:
        mask[sl] = _ellipsoid_r2(grid, e, sl) <= scale**2
    return mask


def _visible(grid: _Grid, e: Ellipsoid) -> Ellipsoid:
    """Grow a small lesion to at least ~1.5 pixels and one slice spacing in z, so that every
    labelled injury shows up on at least one slice whatever the sampling of the series."""
    rx, ry, rz = e.radii
    min_xy = 1.5 * grid.pixel
    return Ellipsoid(e.center, (max(rx, min_xy), max(ry, min_xy), max(rz, grid.dz)))


def _laceration_mask(grid: _Grid, lac: Laceration) -> np.ndarray:
    mask = np.zeros(grid.shape, dtype=bool)
    px, py, pz = lac.point
    nx, ny, nz = lac.normal
    radius = max(lac.radius, grid.dz)
    sl = _slab(grid, pz - radius, pz + radius)
    if sl.stop > sl.start:
        dx, dy, dz = grid.x - px, grid.y - py, grid.z[sl] - pz
        half = max(lac.half_thickness, 0.6 * grid.pixel)
        mask[sl] = (np.abs(dx * nx + dy * ny + dz * nz) <= half) & (
            dx**2 + dy**2 + dz**2 <= radius**2
        )
    return mask


def _tube_masks(
    grid: _Grid,
    tube: Tube,
    z_range: tuple[float, float] | None = None,
    wall_scale: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(wall, air, fluid) masks of a bowel loop, optionally limited to a z sub-range."""
    shape = grid.shape
    wall = np.zeros(shape, dtype=bool)
    air = np.zeros(shape, dtype=bool)
    fluid = np.zeros(shape, dtype=bool)
    low, high = z_range if z_range is not None else tube.z_range
    sl = _slab(grid, max(low, tube.z_range[0]), min(high, tube.z_range[1]))
    if sl.stop <= sl.start:
        return wall, air, fluid
    cx, cy = tube.centers(grid.z[sl])
    dy = grid.y - cy
    r = np.sqrt((grid.x - cx) ** 2 + dy**2)
    outer = tube.radius + tube.wall * (wall_scale - 1.0)
    lumen = r <= tube.radius - tube.wall
    wall[sl] = (r <= outer) & ~lumen
    is_air = dy <= -tube.air_level * (tube.radius - tube.wall)
    air[sl] = lumen & is_air
    fluid[sl] = lumen & ~is_air
    return wall, air, fluid


def _smooth_in_plane(hu: np.ndarray) -> np.ndarray:
    """[1, 2, 1] / 4 blur along rows and columns: a cheap partial-volume effect so that edges
    are not perfectly sharp (numpy only, edges replicated)."""
    padded = np.pad(hu, ((0, 0), (1, 1), (0, 0)), mode="edge")
    hu = (padded[:, :-2] + 2 * padded[:, 1:-1] + padded[:, 2:]) * np.float32(0.25)
    padded = np.pad(hu, ((0, 0), (0, 0), (1, 1)), mode="edge")
    return (padded[:, :, :-2] + 2 * padded[:, :, 1:-1] + padded[:, :, 2:]) * np.float32(0.25)


def render_phantom(
    rng: np.random.Generator,
    anatomy: Anatomy,
    n_slices: int,
    image_size: int,
    view: SeriesView | None = None,
) -> Phantom:
    """Sample `anatomy` on a (n_slices, image_size, image_size) grid seen through `view`.

    Painting goes from large to small structures, later ones overwriting earlier ones, and a
    label map records who owns each voxel so the organ masks are exclusive. The injuries are
    painted last so that nothing hides them.
    """
    view = view or SeriesView()
    grid = _make_grid(n_slices, image_size, view)
    shape = grid.shape
    a = anatomy
    hu = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)

    def paint(mask: np.ndarray, value: float, label: int | None = None) -> None:
        hu[mask] = value
        if label is not None:
            labels[mask] = label

    (bx, by), (ax, ay) = a.body_center, a.body_radii
    taper = (1.0 + 0.06 * (grid.z - 0.5)).astype(np.float32)
    body_r2 = ((grid.x - bx) / (ax * taper)) ** 2 + ((grid.y - by) / (ay * taper)) ** 2
    body = body_r2 <= 1.0
    inner = body_r2 <= (1.0 - a.fat_fraction) ** 2
    paint(body, a.organ_hu["fat"], ORGAN_LABELS["body"])
    paint(inner, a.organ_hu["soft"])
    table_top = by + ay * 1.03 + a.table_gap
    table = np.broadcast_to(
        (grid.y >= table_top) & (grid.y <= table_top + 0.05) & (np.abs(grid.x) <= 0.95), shape
    )
    paint(table, a.organ_hu["table"], ORGAN_LABELS["table"])

    for tube in a.bowel:
        wall, air, fluid = _tube_masks(grid, tube)
        wall &= inner
        air &= inner
        fluid &= inner
        paint(wall, a.organ_hu["soft"] - 8.0, ORGAN_LABELS["bowel"])
        paint(air, -1000.0, ORGAN_LABELS["bowel"])
        paint(fluid, 10.0, ORGAN_LABELS["bowel"])

    boost = view.liver_boost
    liver = _ellipsoid_mask(grid, a.organs["liver"]) & inner
    paint(liver, a.organ_hu["liver"] + boost, ORGAN_LABELS["liver"])
    for name in ("spleen", "kidney_left", "kidney_right"):  # each in its own fat pad
        e = a.organs[name]
        grown = Ellipsoid(e.center, tuple(r + _fat_pad(a, name) for r in e.radii))
        paint(
            _ellipsoid_mask(grid, grown) & inner & ~liver, a.organ_hu["fat"], ORGAN_LABELS["body"]
        )
    spleen = _ellipsoid_mask(grid, a.organs["spleen"]) & inner
    paint(spleen, _spleen_hu(a, view), ORGAN_LABELS["spleen"])
    cortex_hu = a.organ_hu["kidney"] + 120.0 * view.enhancement
    for side in ("kidney_left", "kidney_right"):
        kidney = _ellipsoid_mask(grid, a.organs[side]) & inner
        medulla = _ellipsoid_mask(grid, a.organs[side], scale=0.72) & inner
        paint(kidney, cortex_hu, ORGAN_LABELS[side])
        paint(medulla, a.organ_hu["kidney"])

    def disc(center: tuple[float, float], radius: float) -> np.ndarray:
        return np.broadcast_to(
            (grid.x - center[0]) ** 2 + (grid.y - center[1]) ** 2 <= radius**2, shape
        )

    paint(disc(a.spine_center, a.spine_radius), 700.0, ORGAN_LABELS["spine"])
    paint(disc(a.spine_center, 0.78 * a.spine_radius), 250.0)
    process = (a.spine_center[0], a.spine_center[1] + 1.6 * a.spine_radius)
    paint(disc(process, 0.45 * a.spine_radius) & inner, 450.0, ORGAN_LABELS["spine"])
    paint(disc(a.aorta_center, a.aorta_radius), view.aortic_hu, ORGAN_LABELS["aorta"])
    ivc_hu = 40.0 + 0.45 * (view.aortic_hu - 40.0) * (1.4 if view.liver_boost else 1.0)
    paint(disc(a.ivc_center, a.ivc_radius), ivc_hu, ORGAN_LABELS["ivc"])

    organ_masks = {name: labels == ORGAN_LABELS[name] for name in ORGAN_LABELS}
    organ_masks["body"] = body
    injury_masks = _paint_organ_injuries(grid, a, view, organ_masks, inner, hu)
    hu = _smooth_in_plane(hu)
    _paint_small_injuries(grid, a, view, inner, hu, injury_masks)
    hu += rng.standard_normal(shape, dtype=np.float32) * np.float32(a.noise_sigma)
    flags = {
        "Active_Extravasation": injury_masks["extravasation"].any(axis=(1, 2)),
        "Bowel": injury_masks["bowel"].any(axis=(1, 2)),
    }
    return Phantom(
        hu=hu,
        masks=organ_masks,
        injury_masks=injury_masks,
        slice_flags=flags,
        z=grid.z[:, 0, 0].copy(),
        anatomy=anatomy,
    )


def _spleen_hu(a: Anatomy, view: SeriesView) -> float:
    """The enhanced spleen: it takes up contrast like the kidney cortex (real portal-venous
    spleens reach 100-130 HU), so that its lesions are dark in a bright organ, as the liver's
    are against the soft tissue."""
    return a.organ_hu["spleen"] + view.liver_boost + SPLEEN_ENHANCEMENT_HU * view.enhancement


def _paint_organ_injuries(
    grid: _Grid,
    a: Anatomy,
    view: SeriesView,
    organ_masks: dict[str, np.ndarray],
    inner: np.ndarray,
    hu: np.ndarray,
) -> dict[str, np.ndarray]:
    """Paint organ lesions, fluid crescents and the injured bowel wall into `hu`; return the
    injury masks per group."""
    shape = grid.shape
    result = {
        group: np.zeros(shape, dtype=bool)
        for group in ("liver", "spleen", "kidney", "bowel", "extravasation")
    }
    occupied = np.zeros(shape, dtype=bool)
    for name in ("liver", "spleen", "kidney_left", "kidney_right", "spine", "aorta", "ivc"):
        occupied |= organ_masks[name]
    for injury in a.organ_injuries:
        organ = organ_masks[injury.organ]
        if injury.organ.startswith("kidney"):
            base = a.organ_hu["kidney"]
        elif injury.organ == "spleen":
            base = _spleen_hu(a, view)
        else:
            base = a.organ_hu[injury.organ] + view.liver_boost
        lesion = np.zeros(shape, dtype=bool)
        for e in injury.hypodense:
            lesion |= _ellipsoid_mask(grid, _visible(grid, e))
        for lac in injury.lacerations:
            lesion |= _laceration_mask(grid, lac)
        lesion &= organ
        hu[lesion] = base - injury.delta_hu
        group = "kidney" if injury.organ.startswith("kidney") else injury.organ
        result[group] |= lesion
        if injury.fluid is not None:
            box = a.organs[injury.organ]
            shell = _ellipsoid_mask(grid, injury.fluid) & ~_ellipsoid_mask(grid, box)
            crescent = shell & inner & ~occupied
            if injury.fluid_lateral:
                side = np.sign(box.center[0] - a.body_center[0])
                crescent &= (grid.x - box.center[0]) * side >= 0
            hu[crescent] = injury.fluid_hu
            result[group] |= crescent
    if a.injured_wall is not None:
        index, low, high = a.injured_wall
        low, high = min(low, (low + high) / 2 - grid.dz), max(high, (low + high) / 2 + grid.dz)
        wall, _, _ = _tube_masks(grid, a.bowel[index], (low, high), wall_scale=3.0)
        wall &= inner
        hu[wall] = 95.0
        result["bowel"] |= wall
    return result


def _paint_small_injuries(
    grid: _Grid,
    a: Anatomy,
    view: SeriesView,
    inner: np.ndarray,
    hu: np.ndarray,
    result: dict[str, np.ndarray],
) -> None:
    """Paint free air and extravasation after the in-plane blur: they are only a few pixels
    wide and the blur would wash them out, while they must stay clearly visible."""
    for bubble in a.free_air:
        air = _ellipsoid_mask(grid, _visible(grid, bubble)) & inner
        hu[air] = -1000.0
        result["bowel"] |= air
    for blob in a.extravasation:
        bleed = _ellipsoid_mask(grid, _visible(grid, blob)) & inner
        hu[bleed] = max(a.extravasation_hu, view.aortic_hu + 60.0)
        result["extravasation"] |= bleed


def make_phantom(
    rng: np.random.Generator,
    labels: PatientLabels,
    n_slices: int,
    image_size: int,
    view: SeriesView | None = None,
    anatomy: Anatomy | None = None,
) -> Phantom:
    """One series of a patient with `labels`: samples the anatomy (unless given) and renders it.

    Pass the `anatomy` of a patient's first series to render a second series of the same
    patient; it must have been sampled for the same labels.
    """
    if anatomy is None:
        anatomy = sample_anatomy(rng, labels)
    elif anatomy.labels != labels:
        raise ValueError("anatomy was sampled for other labels")
    return render_phantom(rng, anatomy, n_slices, image_size, view)


def is_incomplete(anatomy: Anatomy, view: SeriesView) -> bool:
    """Whether the series' z range cuts off part of a solid organ (`incomplete_organ`)."""
    for name in SOLID_ORGANS:
        low, high = anatomy.organs[name].z_extent
        if low < view.z_bottom or high > view.z_top:
            return True
    return False


# --------------------------------------------------------------------------------------------
# DICOM encoding


@dataclass(frozen=True)
class PixelEncoding:
    """How HU become stored values; `name` says it in the README."""

    name: str
    pixel_representation: int
    bits_stored: int
    rescale_intercept: int


ENCODINGS: tuple[PixelEncoding, ...] = (
    PixelEncoding("unsigned 12-bit, intercept -1024", 0, 12, -1024),
    PixelEncoding("signed 16-bit, intercept 0", 1, 16, 0),
    PixelEncoding("signed 12-bit, high bits zero, intercept 0", 1, 12, 0),
    PixelEncoding("unsigned 16-bit, intercept -1024", 0, 16, -1024),
)


def encode_hu(hu: np.ndarray, encoding: PixelEncoding) -> np.ndarray:
    """Stored values for `encoding` as they go into PixelData (uint16, or int16 for signed
    16-bit). The signed 12-bit encoding keeps only the low 12 bits of the two's complement,
    like the scanners whose files break a naive int16 read (-1000 HU -> +3096)."""
    rounded = np.round(hu)
    if encoding.pixel_representation == 0:
        top = 2**encoding.bits_stored - 1
        return np.clip(rounded - encoding.rescale_intercept, 0, top).astype(np.uint16)
    if encoding.bits_stored == 16:
        return np.clip(rounded, -32768, 32767).astype(np.int16)
    low, high = -(2 ** (encoding.bits_stored - 1)), 2 ** (encoding.bits_stored - 1) - 1
    signed = np.clip(rounded, low, high).astype(np.int16)
    return signed.view(np.uint16) & np.uint16(2**encoding.bits_stored - 1)


SYNTAX_NAMES: dict[str, str] = {
    ExplicitVRLittleEndian: "Explicit VR Little Endian",
    RLELossless: "RLE Lossless",
    JPEG2000Lossless: "JPEG 2000 Lossless",
}
# Cycles over a split's series (length 5, coprime with the 4 encodings, so the combinations
# spread): train ~40/40/20 %, test mostly RLE like the visible RSNA test files.
TRAIN_SYNTAX_CYCLE = (
    ExplicitVRLittleEndian,
    RLELossless,
    ExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
)
TEST_SYNTAX_CYCLE = (
    RLELossless,
    ExplicitVRLittleEndian,
    RLELossless,
    RLELossless,
    JPEG2000Lossless,
)


@functools.cache
def j2k_encoder_works(image_size: int) -> bool:
    """Whether JPEG 2000 Lossless can be written at this size (needs pylibjpeg-openjpeg,
    which also refuses tiny images)."""
    ds = _image_dataset(
        np.zeros((image_size, image_size), dtype=np.uint16), ENCODINGS[0], "1.2.3", "1.2.3.4"
    )
    try:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    except Exception:  # any failure means: do not use this syntax
        return False
    return True


def _image_dataset(
    stored: np.ndarray, encoding: PixelEncoding, sop_uid: str, series_uid: str
) -> Dataset:
    """The minimal image pixel module of an uncompressed CT slice."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SeriesInstanceUID = series_uid
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = encoding.bits_stored
    ds.HighBit = encoding.bits_stored - 1
    ds.PixelRepresentation = int(stored.dtype == np.int16)
    ds.PixelData = stored.astype(stored.dtype.newbyteorder("<")).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


def _compress(ds: Dataset, syntax: str, encoding: PixelEncoding) -> None:
    """Compress in place; the signed 12-bit encoding is handed to the encoder as unsigned
    (its high bits are zero, which a signed encoder refuses) and flagged signed afterwards:
    RLE keeps the bytes, and JPEG 2000 then disagrees with the header about signedness,
    just like some of the real files."""
    if syntax != ExplicitVRLittleEndian:
        plugin = "pylibjpeg" if syntax == JPEG2000Lossless else "pydicom"
        ds.compress(syntax, encoding_plugin=plugin, generate_instance_uid=False)
    ds.PixelRepresentation = encoding.pixel_representation


def _uid(*parts: object) -> str:
    """A deterministic UID from the parts (SHA-512 under pydicom's root)."""
    return generate_uid(_UID_PREFIX, [str(p) for p in parts])


@dataclass(frozen=True)
class SeriesPlan:
    """Everything about one series that the dataset plan fixes before any rendering."""

    split: str
    patient_id: int
    series_id: int
    series_number: int
    encoding: PixelEncoding
    syntax: str
    instance_up_with_z: bool


@dataclass(frozen=True)
class PatientPlan:
    split: str
    index: int
    patient_id: int
    labels: PatientLabels
    series: tuple[SeriesPlan, ...]


@dataclass(frozen=True)
class SeriesRecord:
    """What was written for one series (for the CSVs and the README)."""

    plan: SeriesPlan
    n_slices: int
    z_spacing: float
    aortic_hu: float
    incomplete_organ: int
    instance_numbers: tuple[int, ...]  # in z order from the top (slice 0 = most superior)
    flagged: dict[str, tuple[int, ...]]
    patient_position: str
    segmented: bool = False  # has a segmentations/<series_id>.nii


def _slice_dataset(
    stored: np.ndarray,
    plan: SeriesPlan,
    *,
    seed: int,
    instance_number: int,
    position: tuple[float, float, float],
    pixel_spacing: float,
    z_spacing: float,
    patient_position: str,
    kvp: int,
) -> Dataset:
    """One CT Image Storage slice with the headers a CT reader relies on."""
    sop_uid = _uid(seed, "sop", plan.series_id, instance_number)
    series_uid = f"{SERIES_UID_ROOT}{plan.series_id}"
    ds = _image_dataset(stored, plan.encoding, sop_uid, series_uid)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Modality = "CT"
    ds.PatientID = str(plan.patient_id)
    ds.StudyInstanceUID = _uid(seed, "study", plan.patient_id)
    ds.FrameOfReferenceUID = _uid(seed, "frame", plan.patient_id)
    ds.SeriesNumber = plan.series_number
    ds.InstanceNumber = instance_number
    ds.PatientPosition = patient_position
    ds.KVP = kvp
    ds.SliceThickness = z_spacing
    ds.ImagePositionPatient = [round(v, 3) for v in position]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = round(position[2], 3)
    ds.PixelSpacing = [round(pixel_spacing, 6), round(pixel_spacing, 6)]
    ds.RescaleIntercept = plan.encoding.rescale_intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = 50
    ds.WindowWidth = 400
    _compress(ds, plan.syntax, plan.encoding)
    return ds


def _series_views(rng: np.random.Generator, anatomy: Anatomy, n_series: int) -> list[SeriesView]:
    """First series: arterial-ish, full range (occasionally cut at the liver dome, which makes
    it `incomplete_organ`); a second series: portal-venous, slightly shifted in z and x/y."""
    first_aortic = _u(rng, 170.0, 300.0)
    cut = rng.random() < 0.12
    views = [
        SeriesView(
            z_bottom=_u(rng, 0.0, 0.04),
            z_top=_u(rng, 0.84, 0.88) if cut else _u(rng, 0.95, 1.0),
            aortic_hu=first_aortic,
            enhancement=1.0,
        )
    ]
    if n_series == 2:
        views.append(
            SeriesView(
                z_bottom=_u(rng, 0.02, 0.08),
                z_top=_u(rng, 0.94, 1.02),
                aortic_hu=max(150.0, first_aortic * _u(rng, 0.6, 0.85)),
                enhancement=_u(rng, 0.55, 0.75),
                liver_boost=_u(rng, 10.0, 25.0),
                shift=(_u(rng, -0.03, 0.03), _u(rng, -0.02, 0.02)),
            )
        )
    return views


def segmentation_label_map(phantom: Phantom) -> np.ndarray:
    """The phantom's organs as one (slices, H, W) uint8 map of `SEGMENTATION_LABELS`, in the
    phantom's layout (slice 0 most superior, columns towards the patient's left)."""
    labels = np.zeros(phantom.hu.shape, dtype=np.uint8)
    for name, value in SEGMENTATION_LABELS.items():
        labels[phantom.masks[name]] = value
    return labels


def segmentation_affine(
    shape: tuple[int, int, int],
    origin: tuple[float, float, float],
    pixel_spacing: float,
    z_spacing: float,
) -> np.ndarray:
    """The RAS+ affine of a mask stored as the competition stores it, for a series of
    `shape` (slices, H, W) whose lowest slice's first pixel sits at `origin` (DICOM patient
    coordinates, LPS mm) with ImageOrientationPatient [1,0,0,0,1,0].

    The stored array is (columns, rows from the bottom, slices from the feet): public
    solutions read it with `nib.load(path).get_fdata().transpose(1, 0, 2)[::-1]` to get the
    (rows, columns, slices) of the DICOM grid with the slices in ascending
    ImagePositionPatient z. Voxel (i, j, k) is column i, row H-1-j, k-th slice from the
    bottom; LPS (x, y, z) becomes RAS (-x, -y, z)."""
    _, height, _ = shape
    x0, y0, z0 = origin
    return np.array(
        [
            [-pixel_spacing, 0.0, 0.0, -x0],
            [0.0, pixel_spacing, 0.0, -(y0 + (height - 1) * pixel_spacing)],
            [0.0, 0.0, z_spacing, z0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def write_segmentation(path: Path, labels: np.ndarray, affine: np.ndarray) -> None:
    """`labels` (slices from the top, rows, columns; the phantom's layout) as an
    uncompressed NIfTI in the competition's storage order (`segmentation_affine`)."""
    import nibabel as nib

    stored = np.ascontiguousarray(labels[::-1, ::-1, :].transpose(2, 1, 0))  # (i, j, k)
    image = nib.Nifti1Image(stored, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)


def is_segmented(config: SyntheticConfig, plan: PatientPlan) -> bool:
    """Whether the patient's first series gets a mask (train patients only, about
    `segmented_share` of them), from a generator of its own so that no other draw moves."""
    if plan.split != "train":
        return False
    return bool(
        np.random.default_rng([config.seed, plan.index, 1]).random() < config.segmented_share
    )


def write_patient(plan: PatientPlan, config: SyntheticConfig, root: Path) -> list[SeriesRecord]:
    """Render and write all series of one patient from its own generator."""
    rng = np.random.default_rng([config.seed, plan.index])
    segmented = is_segmented(config, plan)
    anatomy = sample_anatomy(rng, plan.labels)
    views = _series_views(rng, anatomy, len(plan.series))
    pixel_spacing = FIELD_OF_VIEW_MM / config.image_size * _u(rng, 0.92, 1.08)
    table_z = _u(rng, -150.0, 150.0)
    records = []
    for series, view in zip(plan.series, views, strict=True):
        n_slices = int(rng.integers(config.min_slices, config.max_slices + 1))
        z_spacing = float(rng.choice(Z_SPACINGS_MM))
        phantom = render_phantom(rng, anatomy, n_slices, config.image_size, view)
        start = int(rng.integers(1, 201))
        ks = np.arange(n_slices)
        numbers = start + (n_slices - 1 - ks if series.instance_up_with_z else ks)
        z_top = table_z + _u(rng, -10.0, 10.0)
        position = "HFS" if rng.random() < 0.5 else "FFS"
        kvp = int(rng.choice([100, 120]))
        x0 = -pixel_spacing * config.image_size / 2 + _u(rng, -5.0, 5.0)
        y0 = -pixel_spacing * config.image_size / 2 + _u(rng, -5.0, 5.0)
        folder = root / f"{plan.split}_images" / str(plan.patient_id) / str(series.series_id)
        folder.mkdir(parents=True)
        stored = encode_hu(phantom.hu, series.encoding)
        for k in range(n_slices):
            ds = _slice_dataset(
                stored[k],
                series,
                seed=config.seed,
                instance_number=int(numbers[k]),
                position=(x0, y0, z_top - k * z_spacing),
                pixel_spacing=pixel_spacing,
                z_spacing=z_spacing,
                patient_position=position,
                kvp=kvp,
            )
            ds.save_as(folder / f"{int(numbers[k])}.dcm", enforce_file_format=True)
        flagged = {
            name: tuple(sorted(int(n) for n in numbers[phantom.slice_flags[name]]))
            for name in INJURY_NAMES
        }
        mask_written = segmented and series is plan.series[0]
        if mask_written:
            bottom = (x0, y0, z_top - (n_slices - 1) * z_spacing)
            write_segmentation(
                root / SEGMENTATIONS_DIR / f"{series.series_id}.nii",
                segmentation_label_map(phantom),
                segmentation_affine(phantom.hu.shape, bottom, pixel_spacing, z_spacing),
            )
        records.append(
            SeriesRecord(
                plan=series,
                n_slices=n_slices,
                z_spacing=z_spacing,
                aortic_hu=round(view.aortic_hu, 1),
                incomplete_organ=int(is_incomplete(anatomy, view)),
                instance_numbers=tuple(int(n) for n in numbers),
                flagged=flagged,
                patient_position=position,
                segmented=mask_written,
            )
        )
    return records


# --------------------------------------------------------------------------------------------
# Dataset


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


# --------------------------------------------------------------------------------------------
# CLI


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
