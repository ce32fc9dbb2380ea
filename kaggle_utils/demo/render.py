"""Phantoms rendered to Hounsfield units: a (slices, H, W) volume per series view with its
organ labels, the organs and injuries painted in."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kaggle_utils.demo.anatomy import (
    ORGAN_LABELS,
    SEGMENTATION_LABELS,
    SOLID_ORGANS,
    Anatomy,
    Ellipsoid,
    Laceration,
    Phantom,
    SeriesView,
    Tube,
    _fat_pad,
    sample_anatomy,
)
from kaggle_utils.demo.labels import PatientLabels

# The spleen's contrast uptake at enhancement 1 (real portal-venous spleens reach 100-130 HU).
SPLEEN_ENHANCEMENT_HU = 60.0


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


def segmentation_label_map(phantom: Phantom) -> np.ndarray:
    """The phantom's organs as one (slices, H, W) uint8 map of `SEGMENTATION_LABELS`, in the
    phantom's layout (slice 0 most superior, columns towards the patient's left)."""
    labels = np.zeros(phantom.hu.shape, dtype=np.uint8)
    for name, value in SEGMENTATION_LABELS.items():
        labels[phantom.masks[name]] = value
    return labels
