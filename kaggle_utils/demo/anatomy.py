"""Phantom anatomy: organs as ellipsoids, vessels and bowel as tubes, and the injuries sampled
into them (lacerations, clots, extravasation, free air), plus the series each patient gets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from kaggle_utils.demo.labels import PatientLabels

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


Z_SPACINGS_MM: tuple[float, ...] = (2.0, 2.5, 3.0, 5.0)


FIELD_OF_VIEW_MM = 300.0


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
