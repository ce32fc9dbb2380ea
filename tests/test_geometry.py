"""The patient-based layout of `load_series`, whatever orientation the files were written in.

Real slices (tests/data/real-ct, pydicom-data) are re-written in every in-plane layout a
scanner can store (rows or columns reversed, rows and columns swapped, and so the normal to the
feet), in shuffled file order, and must decode to the identical volume, spacing and positions;
NIfTI files of the same voxels must agree exactly. Then the stacks that are not a clean
uniform axial series: duplicates, gaps, tilted planes, sheared stacks, sagittal and coronal.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import polars as pl
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from kaggle_utils.cache.dicom import SeriesGeometry, UnsupportedGeometryError, load_series
from kaggle_utils.cache.sources import load_nifti_series

from conftest import pydicom_test_file, write_ct_dicom

LAYOUTS = list(itertools.product([False, True], repeat=3))  # transposed, flip rows, flip cols
SPACING = (2.5, 0.7, 0.8)  # (z, y, x) mm
ORIGIN = (-100.0, -150.0, -300.0)  # LPS mm of patient voxel (0, 0, 0)


def layout_id(layout: tuple[bool, bool, bool]) -> str:
    names = [n for n, on in zip(("transposed", "rows", "columns"), layout, strict=True) if on]
    return "+".join(names) or "standard"


def write_oriented_series(
    folder: Path,
    volume: np.ndarray,
    layout: tuple[bool, bool, bool],
    *,
    z_positions: list[float] | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    seed: int = 0,
    shear_mm_per_slice: float = 0.0,
) -> None:
    """Write `volume` (slices, rows, cols: int16 HU in the patient-based layout) as the slices a
    scanner storing with this layout would write, in shuffled file and InstanceNumber order."""
    transposed, flip_rows, flip_columns = layout
    dz, dy, dx = SPACING
    n, height, width = volume.shape
    sy, sx = (-1.0 if flip_rows else 1.0), (-1.0 if flip_columns else 1.0)
    along_columns, along_rows = (sx, 0.0, 0.0), (0.0, sy, 0.0)  # where P's col/row index grow
    if transposed:  # the stored rows run along x, the stored columns along y
        orientation = (*along_rows, *along_columns)
        pixel_spacing = (dx, dy)
    else:
        orientation = (*along_columns, *along_rows)
        pixel_spacing = (dy, dx)
    first_row, first_col = (height - 1 if flip_rows else 0), (width - 1 if flip_columns else 0)
    zs = z_positions if z_positions is not None else [ORIGIN[2] + k * dz for k in range(n)]
    rng = np.random.default_rng(seed)
    names = rng.permutation(n) + 1
    numbers = rng.permutation(n) + 10
    for k in range(n):
        image = volume[k][:: int(sy), :: int(sx)]
        stored = np.ascontiguousarray(image.T if transposed else image)
        position = (
            ORIGIN[0] + first_col * dx,
            ORIGIN[1] + first_row * dy + k * shear_mm_per_slice,
            zs[k],
        )
        write_ct_dicom(
            folder / f"{names[k]}.dcm",
            stored.astype(np.int16),
            instance_number=int(numbers[k]),
            position=position,
            orientation=orientation,
            pixel_spacing=pixel_spacing,
            transfer_syntax=transfer_syntax,
        )


@pytest.fixture(scope="module")
def real_hu(real_dicom_series: Path) -> np.ndarray:
    return load_series(real_dicom_series).hu


def real_volume(hu: np.ndarray, n: int = 4, rows: int = 40, cols: int = 56) -> np.ndarray:
    """A few real slices, cut non-square (so a swap of rows and columns changes the shape)."""
    return np.rint(hu[8 : 8 + n, 200 : 200 + rows, 180 : 180 + cols]).astype(np.int16)


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_real_slices_in_every_layout_decode_to_one_volume(
    tmp_path: Path, real_hu: np.ndarray, layout: tuple[bool, bool, bool]
) -> None:
    volume = real_volume(real_hu)
    write_oriented_series(tmp_path, volume, layout)
    series = load_series(tmp_path)
    np.testing.assert_array_equal(series.hu, volume)
    assert series.spacing == pytest.approx(SPACING)
    np.testing.assert_allclose(series.z_positions, ORIGIN[2] + SPACING[0] * np.arange(4))
    transposed, flip_rows, flip_columns = layout
    geometry = series.geometry
    assert (geometry.transposed, geometry.flipped_rows, geometry.flipped_columns) == layout
    # One in-plane reversal (or a swap) turns the right-handed normal to the feet.
    assert geometry.normal_to_feet == bool((transposed + flip_rows + flip_columns) % 2)
    assert geometry.tilt_degrees == 0.0 and geometry.shear_degrees == 0.0
    assert series.skipped == []


@pytest.mark.parametrize("layout", [(True, False, True), (False, True, True)], ids=layout_id)
def test_square_real_slices_in_rle_are_reoriented_too(
    tmp_path: Path, real_hu: np.ndarray, layout: tuple[bool, bool, bool]
) -> None:
    """Square slices take the in-place path, RLE the competition's syntax and dicomsdl."""
    volume = real_volume(real_hu, n=3, rows=48, cols=48)
    write_oriented_series(tmp_path, volume, layout, transfer_syntax=RLELossless)
    series = load_series(tmp_path)
    np.testing.assert_array_equal(series.hu, volume)
    assert series.decoder == "dicomsdl"


@pytest.mark.parametrize("layout", [(False, False, False), (True, True, False)], ids=layout_id)
def test_a_pydicom_data_slice_in_any_layout_too(
    tmp_path: Path, layout: tuple[bool, bool, bool]
) -> None:
    image = pydicom.dcmread(pydicom_test_file("CT_small.dcm")).pixel_array.astype(np.int16)
    volume = np.stack([image + 7 * k for k in range(3)])[:, :, 4:]  # 128 x 124
    write_oriented_series(tmp_path, volume, layout, seed=5)
    np.testing.assert_array_equal(load_series(tmp_path).hu, volume)


@pytest.mark.parametrize("layout", LAYOUTS, ids=layout_id)
def test_nifti_of_the_same_voxels_agrees_with_every_dicom_layout(
    tmp_path: Path, layout: tuple[bool, bool, bool]
) -> None:
    import nibabel as nib

    rng = np.random.default_rng(3)
    volume = rng.integers(-1000, 1500, size=(4, 6, 5)).astype(np.int16)
    write_oriented_series(tmp_path / "dicom", volume, layout)
    dz, dy, dx = SPACING
    x0, y0, z0 = ORIGIN
    # LPS voxel order data[i=col, j=row, k=slice]; the affine maps it to RAS mm.
    affine = np.array([[-dx, 0, 0, -x0], [0, -dy, 0, -y0], [0, 0, dz, z0], [0, 0, 0, 1.0]])
    path = tmp_path / "same.nii.gz"
    nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0).copy(), affine), path)
    from_dicom, from_nifti = load_series(tmp_path / "dicom"), load_nifti_series(path)
    np.testing.assert_array_equal(from_dicom.hu, volume)
    np.testing.assert_array_equal(from_nifti.hu, from_dicom.hu)
    assert from_nifti.spacing == pytest.approx(from_dicom.spacing)
    np.testing.assert_allclose(from_nifti.z_positions, from_dicom.z_positions)


def ramp(n: int, size: int = 8) -> np.ndarray:
    """Slice k holds 100 * k everywhere, so order and interpolation are visible."""
    return np.stack([np.full((size, size), 100 * k, dtype=np.int16) for k in range(n)])


def test_duplicate_positions_are_dropped_and_reported(tmp_path: Path) -> None:
    volume = ramp(4)
    write_oriented_series(tmp_path, volume, (False, False, False))
    # A second file at the position of slice 2, with other pixels and a later InstanceNumber.
    write_ct_dicom(
        tmp_path / "copy.dcm", np.full((8, 8), -7, dtype=np.int16), instance_number=99,
        position=(ORIGIN[0], ORIGIN[1], ORIGIN[2] + 2 * SPACING[0]), pixel_spacing=(0.7, 0.8),
    )  # fmt: skip
    series = load_series(tmp_path)
    np.testing.assert_array_equal(series.hu, volume)
    assert series.geometry.n_duplicates == 1
    assert [s.name for s in series.skipped] == ["copy.dcm"]
    assert "duplicate position" in series.skipped[0].reason
    assert series.n_files == 5


def test_a_gap_is_resampled_by_position_not_by_index(tmp_path: Path) -> None:
    """Slices at z = 0, 2.5, 5, 10, 12.5 (7.5 missing): the volume gets a slice at 7.5, the
    mean of its neighbours, and a uniform 2.5 mm grid."""
    z = [0.0, 2.5, 5.0, 10.0, 12.5]
    stored = np.stack([np.full((8, 8), 40 * v, dtype=np.int16) for v in z])  # HU = 40 * z
    write_oriented_series(tmp_path, stored, (False, True, False), z_positions=z)
    series = load_series(tmp_path)
    np.testing.assert_allclose(series.z_positions, np.arange(6) * 2.5)
    np.testing.assert_allclose(series.hu[:, 0, 0], 40 * np.arange(6) * 2.5)
    assert series.spacing[0] == pytest.approx(2.5)
    geometry = series.geometry
    assert geometry.z_resampled and geometry.z_gap_ratio == pytest.approx(2.0)
    assert series.n_decoded == 5 and series.n_files == 5
    # The new slice takes the InstanceNumber of its nearest source (a tie goes up).
    by_z = {round(p[2], 3): n for p, n in positions_and_numbers(tmp_path)}
    assert series.instance_numbers.tolist() == [by_z[v] for v in (0, 2.5, 5, 10, 10, 12.5)]


def positions_and_numbers(folder: Path) -> list[tuple[tuple[float, ...], int]]:
    rows = []
    for path in folder.glob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rows.append((tuple(float(v) for v in ds.ImagePositionPatient), int(ds.InstanceNumber)))
    return rows


def test_uniform_spacing_with_rounding_noise_is_not_resampled(tmp_path: Path) -> None:
    z = [ORIGIN[2] + 2.5 * k + noise for k, noise in enumerate([0, 0.01, -0.02, 0.0, 0.015])]
    write_oriented_series(tmp_path, ramp(5), (False, False, False), z_positions=z)
    series = load_series(tmp_path)
    assert not series.geometry.z_resampled
    np.testing.assert_array_equal(series.hu, ramp(5))


def tilted_orientation(degrees: float) -> tuple[float, ...]:
    """Rows along x; columns along y tipped towards z (a gantry tilted about the x axis)."""
    angle = np.radians(degrees)
    return (1.0, 0.0, 0.0, 0.0, float(np.cos(angle)), float(np.sin(angle)))


def write_stack(folder: Path, orientation: tuple[float, ...], step: tuple[float, float, float]):  # type: ignore[no-untyped-def]
    for k in range(3):
        write_ct_dicom(
            folder / f"{k}.dcm", np.full((8, 8), 10 * k, dtype=np.int16), instance_number=k + 1,
            position=tuple(k * v for v in step), orientation=orientation,
        )  # fmt: skip


def test_a_small_gantry_tilt_is_kept_on_the_axial_grid_and_recorded(tmp_path: Path) -> None:
    orientation = tilted_orientation(12.0)
    write_stack(tmp_path, orientation, (0.0, 0.0, 2.5))  # the table moves along z
    series = load_series(tmp_path)
    np.testing.assert_array_equal(series.hu[:, 0, 0], [0, 10, 20])
    assert series.geometry.tilt_degrees == pytest.approx(12.0, abs=1e-3)
    assert series.geometry.shear_degrees == pytest.approx(12.0, abs=1e-3)
    assert series.spacing[0] == pytest.approx(2.5 * np.cos(np.radians(12.0)))


def test_a_sheared_axial_stack_is_recorded(tmp_path: Path) -> None:
    step = (0.0, 2.5 * np.tan(np.radians(8.0)), 2.5)
    write_stack(tmp_path, (1.0, 0, 0, 0, 1.0, 0), step)
    geometry = load_series(tmp_path).geometry
    assert geometry.tilt_degrees == 0.0
    assert geometry.shear_degrees == pytest.approx(8.0, abs=1e-3)


@pytest.mark.parametrize(
    ("orientation", "step", "message"),
    [
        (tilted_orientation(40.0), (0.0, 0.0, 2.5), "tilted 40.0 degrees"),
        ((1.0, 0, 0, 0, 0, -1.0), (0.0, 2.5, 0.0), "a coronal series"),
        ((0, 1.0, 0, 0, 0, -1.0), (2.5, 0.0, 0.0), "a sagittal series"),
        ((1.0, 0, 0, 0, 1.0, 0), (0.0, 2.5, 2.5), "stack 45.0 degrees off"),
    ],
)
def test_non_axial_or_steeply_tilted_series_are_refused_with_the_reason(
    tmp_path: Path, orientation: tuple[float, ...], step: tuple[float, float, float], message: str
) -> None:
    write_stack(tmp_path, orientation, step)
    with pytest.raises(UnsupportedGeometryError, match=message):
        load_series(tmp_path)


def test_the_tilt_limit_is_a_parameter(tmp_path: Path) -> None:
    write_stack(tmp_path, tilted_orientation(40.0), (0.0, 0.0, 2.5))
    assert load_series(tmp_path, max_tilt_degrees=45.0).geometry.tilt_degrees == pytest.approx(40)


def test_geometry_flips_name_what_was_done() -> None:
    assert SeriesGeometry().flips == "none"
    assert SeriesGeometry(transposed=True, flipped_columns=True).flips == (
        "transposed+flipped_columns"
    )


def test_slices_are_decoded_into_one_volume_never_stacked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory contract: a series is held once (np.stack would hold it twice)."""
    import kaggle_utils.cache.dicom as dicom

    expected = ramp(5)
    write_oriented_series(tmp_path, expected, (False, True, True))

    def no_stack(*args: object, **kwargs: object) -> None:
        raise AssertionError("load_series stacked the slices")

    monkeypatch.setattr(dicom.np, "stack", no_stack)
    np.testing.assert_array_equal(load_series(tmp_path).hu, expected)


def test_reuse_memory_decodes_into_one_buffer_series_after_series(tmp_path: Path) -> None:
    small, large = ramp(3), ramp(6) + 5
    write_oriented_series(tmp_path / "small", small, (False, False, False))
    write_oriented_series(tmp_path / "large", large, (True, False, True), seed=2)
    first = load_series(tmp_path / "large", reuse_memory=True)
    np.testing.assert_array_equal(first.hu, large)
    second = load_series(tmp_path / "small", reuse_memory=True)
    np.testing.assert_array_equal(second.hu, small)
    assert np.shares_memory(first.hu, second.hu)  # the second call overwrote the first
    fresh = load_series(tmp_path / "small")
    assert not np.shares_memory(fresh.hu, second.hu)


def test_the_metadata_records_what_was_done_and_the_report_lists_it(tmp_path: Path) -> None:
    from kaggle_utils.cache import preprocess

    config = preprocess.PreprocessConfig(shapes=((4, 8, 8),))
    write_oriented_series(tmp_path / "images" / "1" / "10", ramp(4, 16), (True, False, True))
    write_oriented_series(tmp_path / "images" / "1" / "11", ramp(4, 16), (False, False, False))
    for k in range(4):  # series 12: no positions, so ordered by InstanceNumber
        write_ct_dicom(
            tmp_path / "images" / "1" / "12" / f"{k}.dcm", np.full((16, 16), 10 * k, np.int16),
            instance_number=k + 1, position=None,
        )  # fmt: skip
    for series_id in (10, 11, 12):
        task = preprocess.SeriesTask(1, series_id, tmp_path / "images" / "1" / str(series_id))
        preprocess.process_series(task, tmp_path / "cache", config)
    metadata = preprocess.write_metadata(tmp_path / "cache")
    row = metadata.filter(pl.col("series_id") == 10).row(0, named=True)
    assert row["flips"] == "transposed+flipped_columns" and not row["normal_to_feet"]
    assert row["orientation"] == [0.0, 1.0, 0.0, -1.0, 0.0, 0.0]
    report = preprocess.geometry_report(metadata)
    assert report["series_id"].to_list() == [10, 12]
    assert report["ordered_by"].to_list() == ["position", "instance_number"]


def test_gaps_too_large_to_fill_are_refused(tmp_path: Path) -> None:
    """Two clusters of slices 200 mm apart look like two scans, not one with a gap."""
    z = [0.0, 2.5, 5.0, 200.0, 202.5]
    write_oriented_series(tmp_path, ramp(5), (False, False, False), z_positions=z)
    with pytest.raises(UnsupportedGeometryError, match="more than one scan"):
        load_series(tmp_path)
