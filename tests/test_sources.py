from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from kaggle_utils.cache.dicom import load_series
from kaggle_utils.cache.preprocess import PreprocessConfig
from kaggle_utils.cache.sources import (
    EXTRA_RECORDS_DIR,
    VolumeSource,
    cache_extra_sources,
    find_volume_sources,
    load_nifti_series,
    load_source,
    ras_to_axial,
    slice_positions,
)

from conftest import write_ct_dicom

# Spacing (x, y, z) of the synthetic volumes: all different, so a swapped axis shows.
ZOOMS = (0.7, 0.8, 2.5)


def ras_volume(shape: tuple[int, int, int] = (5, 6, 7), seed: int = 0) -> np.ndarray:
    """Distinct int16 values on an (i, j, k) RAS grid: any flip or transpose changes it."""
    rng = np.random.default_rng(seed)
    return rng.permutation(np.prod(shape)).reshape(shape).astype(np.int16) - 200


def ras_affine(zooms: tuple[float, float, float] = ZOOMS) -> np.ndarray:
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = (-120.0, 35.5, 94.25)
    return affine


def reoriented(
    data: np.ndarray, affine: np.ndarray, perm: tuple[int, int, int], flips: tuple[bool, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels in world space, stored with axes `perm` of the input, some flipped.

    new[n] = old[o] with o[perm[a]] = n[a] (or shape - 1 - n[a] where axis a is flipped), so
    the affine becomes `affine @ M` with M mapping new voxel indices to old ones.
    """
    new = data.transpose(perm)
    mapping = np.zeros((4, 4))
    mapping[3, 3] = 1.0
    for axis, old_axis in enumerate(perm):
        if flips[axis]:
            new = np.flip(new, axis)
            mapping[old_axis, axis] = -1.0
            mapping[old_axis, 3] = new.shape[axis] - 1
        else:
            mapping[old_axis, axis] = 1.0
    return np.ascontiguousarray(new), affine @ mapping


def save_nifti(
    path: Path, data: np.ndarray, affine: np.ndarray, scaling: tuple[float, float] | None = None
) -> Path:
    image = nib.Nifti1Image(data, affine)
    if scaling is not None:
        image.header.set_slope_inter(*scaling)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, path)
    return path


# --- the pure reorientation --------------------------------------------------------------


def test_ras_to_axial_puts_superior_up_the_slices_anterior_on_top_and_right_on_the_left() -> None:
    n_i, n_j, n_k = 4, 3, 2
    i, j, k = np.meshgrid(np.arange(n_i), np.arange(n_j), np.arange(n_k), indexing="ij")
    ras = 100 * i + 10 * j + k  # each voxel encodes its (i, j, k)
    out = ras_to_axial(ras)
    assert out.shape == (n_k, n_j, n_i)
    assert out.flags.c_contiguous
    s, r, c = np.meshgrid(np.arange(n_k), np.arange(n_j), np.arange(n_i), indexing="ij")
    np.testing.assert_array_equal(out, 100 * (n_i - 1 - c) + 10 * (n_j - 1 - r) + s)
    # The same facts as directions: k (superior) grows with the slice index, j (anterior)
    # falls down the rows, i (towards the patient's right) falls along the columns.
    assert (np.diff(out % 10, axis=0) == 1).all()
    assert (np.diff(out // 10 % 10, axis=1) == -1).all()
    assert (np.diff(out // 100, axis=2) == -1).all()
    assert out[0, 0, 0] == 100 * (n_i - 1) + 10 * (n_j - 1)  # top-left: right, anterior


def test_ras_to_axial_keeps_trailing_axes_and_rejects_2d() -> None:
    assert ras_to_axial(np.zeros((4, 3, 2, 5))).shape == (2, 3, 4, 5)
    with pytest.raises(ValueError, match="array"):
        ras_to_axial(np.zeros((4, 3)))


def test_slice_positions_ascend_along_the_normal() -> None:
    np.testing.assert_allclose(slice_positions(ras_affine(), 4), 94.25 + 2.5 * np.arange(4))
    # A gantry tilt: the slice planes are tilted about x, the normal follows them.
    tilt = np.deg2rad(20.0)
    affine = np.eye(4)
    affine[:3, 1] = (0.0, np.cos(tilt), np.sin(tilt))
    affine[:3, 2] = (0.0, -np.sin(tilt) * 3.0, np.cos(tilt) * 3.0)
    np.testing.assert_allclose(slice_positions(affine, 3), [0.0, 3.0, 6.0], atol=1e-9)


# --- NIfTI files in any orientation ------------------------------------------------------

ORIENTATIONS = {
    "RAS": ((0, 1, 2), (False, False, False)),
    "LPS": ((0, 1, 2), (True, True, False)),
    "LAS": ((0, 1, 2), (True, False, False)),
    "RAI": ((0, 1, 2), (False, False, True)),
    "SAR (axes z, y, x)": ((2, 1, 0), (False, False, False)),
    "IPL (axes z, y, x, flipped)": ((2, 1, 0), (True, True, True)),
    "ASL": ((1, 2, 0), (False, False, True)),
}


def test_every_nifti_orientation_loads_to_the_same_volume(tmp_path: Path) -> None:
    ras = ras_volume()
    expected = ras_to_axial(ras.astype(np.float32))
    for index, (name, (perm, flips)) in enumerate(ORIENTATIONS.items()):
        data, affine = reoriented(ras, ras_affine(), perm, flips)
        path = save_nifti(tmp_path / f"v{index}.nii.gz", data, affine)
        assert "".join(nib.aff2axcodes(affine)) == name[:3]
        series = load_nifti_series(path)
        np.testing.assert_array_equal(series.hu, expected, err_msg=name)
        assert series.hu.dtype == np.float32
        assert series.spacing == pytest.approx((2.5, 0.8, 0.7)), name
        np.testing.assert_allclose(series.z_positions, 94.25 + 2.5 * np.arange(7), err_msg=name)
        # nibabel's own canonical image agrees with the float32 reorientation done here.
        canonical = nib.as_closest_canonical(nib.load(path)).get_fdata()
        np.testing.assert_array_equal(series.hu, ras_to_axial(canonical), err_msg=name)


def test_nifti_series_fields_and_scaling(tmp_path: Path) -> None:
    raw = ras_volume()
    data, affine = reoriented(raw, ras_affine(), (0, 1, 2), (True, True, False))  # LPS
    path = save_nifti(tmp_path / "scaled.nii", data, affine, scaling=(2.0, -1024.0))
    series = load_nifti_series(path)
    np.testing.assert_array_equal(series.hu, ras_to_axial(raw * 2.0 - 1024.0))
    np.testing.assert_array_equal(series.instance_numbers, np.arange(7))
    assert series.ordered_by == "nifti affine"
    assert series.decoder_counts == {"nibabel": 7}
    assert series.path == path
    assert series.skipped == []


def test_nifti_4d_singleton_is_squeezed_and_non_finite_voxels_become_air(tmp_path: Path) -> None:
    data = ras_volume().astype(np.float32)
    data[0, 0, 0] = np.nan
    path = save_nifti(tmp_path / "one-volume.nii.gz", data[..., None], ras_affine())
    series = load_nifti_series(path)
    assert series.hu.shape == (7, 6, 5)
    assert np.isfinite(series.hu).all()
    assert series.hu[0, -1, -1] == -1024.0  # voxel (0, 0, 0): right, posterior, inferior


def test_nifti_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.nii\.gz"):
        load_nifti_series(tmp_path / "missing.nii.gz")
    four_d = save_nifti(tmp_path / "four-d.nii.gz", np.zeros((4, 4, 3, 2), np.int16), np.eye(4))
    with pytest.raises(ValueError, match=r"four-d\.nii\.gz: expected a 3D CT volume"):
        load_nifti_series(four_d)
    flat = save_nifti(tmp_path / "flat.nii", np.zeros((4, 4), np.int16), np.eye(4))
    with pytest.raises(ValueError, match=r"flat\.nii: expected a 3D"):
        load_nifti_series(flat)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a nifti file" * 50)
    with pytest.raises(ValueError, match=r"garbage\.nii\.gz: not a readable NIfTI"):
        load_nifti_series(garbage)


def test_nifti_and_dicom_of_the_same_scan_give_the_same_volume(tmp_path: Path) -> None:
    """Both paths share one convention: a DICOM series (IOP [1,0,0,0,1,0], LPS world) and the
    NIfTI file of the same voxels decode to identical (slices, rows, cols) HU volumes."""
    rng = np.random.default_rng(3)
    volume = rng.integers(-1000, 1500, size=(4, 6, 5)).astype(np.int16)  # (slices, rows, cols)
    dz, dy, dx = 2.5, 0.8, 0.7
    x0, y0, z0 = -100.0, -150.0, -300.0  # LPS position of voxel (0, 0, 0)
    series_dir = tmp_path / "dicom"
    for s in rng.permutation(len(volume)):  # file names not in z order
        write_ct_dicom(
            series_dir / f"{s * 7 % 4}.dcm",
            volume[s],
            instance_number=int(len(volume) - s),
            position=(x0, y0, z0 + s * dz),
            pixel_spacing=(dy, dx),
        )
    # The NIfTI in LPS voxel order: data[i=col, j=row, k=slice]; its affine gives RAS mm.
    affine = np.array(
        [[-dx, 0, 0, -x0], [0, -dy, 0, -y0], [0, 0, dz, z0], [0, 0, 0, 1]], dtype=float
    )
    nifti = save_nifti(tmp_path / "same.nii.gz", volume.transpose(2, 1, 0).copy(), affine)

    from_dicom = load_series(series_dir)
    from_nifti = load_nifti_series(nifti)
    np.testing.assert_array_equal(from_dicom.hu, volume)
    np.testing.assert_array_equal(from_nifti.hu, from_dicom.hu)
    assert from_nifti.spacing == pytest.approx(from_dicom.spacing)
    np.testing.assert_allclose(from_nifti.z_positions, from_dicom.z_positions)


# --- real CT (tests/data/real-ct) -----------------------------------------


def centroid(labels: np.ndarray, value: int) -> np.ndarray:
    """(slice, row, col) centre of the voxels with this label."""
    where = np.argwhere(labels == value)
    assert where.size, f"label {value} absent"
    return where.mean(axis=0)


def test_real_nifti_anatomy_is_in_the_dicom_display_convention(real_ct_dir: Path) -> None:
    ct = load_nifti_series(real_ct_dir / "abdomen-ct-3mm-30slices.nii.gz")
    organs = load_nifti_series(real_ct_dir / "abdomen-ct-3mm-30slices-organs.nii.gz")
    labels = np.rint(organs.hu).astype(np.int16)
    assert ct.hu.shape == labels.shape == (30, 101, 122)
    assert ct.spacing == pytest.approx((3.0, 3.0, 3.0))
    assert np.all(np.diff(ct.z_positions) == pytest.approx(3.0))

    # HU: air around the patient, soft tissue inside it.
    assert ct.hu.min() <= -990.0
    assert 0.1 < float(((ct.hu > 0) & (ct.hu < 100)).mean()) < 0.9
    # Labels and CT were reoriented alike: the liver is soft tissue in the CT.
    assert 20.0 < float(np.median(ct.hu[labels == 5])) < 200.0

    _, width = labels.shape[1:]
    spleen, right_kidney, left_kidney, liver = (centroid(labels, v) for v in (1, 2, 3, 5))
    # Columns: the patient's right (liver) on the image left, the left (spleen) on the right.
    assert liver[2] < width / 2 < spleen[2]
    assert right_kidney[2] < width / 2 < left_kidney[2]
    # Rows: the kidneys lie behind the liver, below it on the image.
    assert right_kidney[1] > liver[1] + 10
    assert left_kidney[1] > liver[1] + 10
    # Slices: the liver reaches higher (more superior) than the kidneys.
    assert liver[0] > right_kidney[0] + 5
    assert liver[0] > left_kidney[0] + 5
    # The spine: three consecutive vertebrae (TotalSegmentator v2 labels 30, 31, 32 are L2,
    # L1, T12) stack upwards in slice order, lie between the kidneys and behind the liver.
    vertebrae = [centroid(labels, v) for v in (30, 31, 32)]
    assert vertebrae[0][0] < vertebrae[1][0] < vertebrae[2][0]
    for vertebra in vertebrae:
        assert right_kidney[2] < vertebra[2] < left_kidney[2]
        assert vertebra[1] > liver[1] + 10


def liver_side_soft_tissue(hu: np.ndarray) -> tuple[float, float, float]:
    """Median HU of a band on the image's left middle (the liver's place in the DICOM
    convention) and the fraction of soft tissue there and in the mirrored band."""
    height, width = hu.shape[1:]
    rows = slice(int(0.4 * height), int(0.65 * height))
    left = hu[:, rows, int(0.22 * width) : int(0.42 * width)]
    right = hu[:, rows, int(0.58 * width) : int(0.78 * width)]

    def soft(region: np.ndarray) -> float:
        return float(((region > 20) & (region < 150)).mean())

    return float(np.median(left)), soft(left), soft(right)


def test_real_dicom_shows_the_liver_on_the_image_left_too(real_ct_dir: Path) -> None:
    dicom = load_series(real_ct_dir / "dicom-series-20-j2k")
    median, left, right = liver_side_soft_tissue(dicom.hu)
    assert 40.0 < median < 150.0
    assert left > right + 0.1
    # The upper slices of the NIfTI scan (liver and spleen level) agree.
    nifti = load_nifti_series(real_ct_dir / "abdomen-ct-3mm-30slices.nii.gz")
    median, left, right = liver_side_soft_tissue(nifti.hu[15:])
    assert 40.0 < median < 150.0
    assert left > right + 0.1


# --- finding sources ---------------------------------------------------------------------


def write_dicom_series(folder: Path, n_slices: int = 3, size: int = 16) -> Path:
    yy, xx = np.mgrid[:size, :size]
    body = (((yy - size / 2) / (size * 0.4)) ** 2 + ((xx - size / 2) / (size * 0.45)) ** 2) < 1
    for s in range(n_slices):
        hu = np.where(body, 40 + 10 * s, -1000).astype(np.int16)
        write_ct_dicom(
            folder / f"{s + 1}.dcm", hu, instance_number=s + 1, position=(0.0, 0.0, 2.5 * s)
        )
    return folder


def tiny_nifti(path: Path, size: int = 16, n_slices: int = 6) -> Path:
    i, j = np.mgrid[:size, :size]
    body = (((i - size / 2) / (size * 0.45)) ** 2 + ((j - size / 2) / (size * 0.4)) ** 2) < 1
    data = np.repeat(np.where(body, 50, -1000)[..., None], n_slices, axis=2).astype(np.int16)
    return save_nifti(path, data, ras_affine((1.5, 1.5, 3.0)))


@pytest.fixture
def extra_tree(tmp_path: Path) -> Path:
    root = tmp_path / "extra"
    tiny_nifti(root / "a" / "case1.nii.gz")
    tiny_nifti(root / "a" / "b" / "case 2.nii")
    write_dicom_series(root / "dicom" / "series1")
    (root / "dicom" / "series1" / "notes.txt").write_text("not a slice")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("no DICOM here" * 20)
    (root / "empty").mkdir()
    tiny_nifti(root / ".hidden" / "skipped.nii.gz")
    return root


def test_find_volume_sources_lists_nifti_files_and_dicom_folders(extra_tree: Path) -> None:
    sources = find_volume_sources([extra_tree])
    assert sources == [
        VolumeSource("dicom", extra_tree / "dicom" / "series1", "dicom-dicom__series1"),
        VolumeSource("nifti", extra_tree / "a" / "b" / "case 2.nii", "nifti-a__b__case_2"),
        VolumeSource("nifti", extra_tree / "a" / "case1.nii.gz", "nifti-a__case1"),
    ]
    assert find_volume_sources([str(extra_tree)]) == sources
    # A series folder given directly, and a NIfTI file given directly, are sources too.
    series = find_volume_sources([extra_tree / "dicom" / "series1"])
    assert [(s.kind, s.key) for s in series] == [("dicom", "dicom-series1")]
    single = find_volume_sources([extra_tree / "a" / "case1.nii.gz"])
    assert [(s.kind, s.key) for s in single] == [("nifti", "nifti-case1")]


def test_find_volume_sources_makes_keys_unique_and_lists_each_file_once(
    extra_tree: Path, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    tiny_nifti(other / "a" / "case1.nii.gz")  # same relative path as in extra_tree
    tiny_nifti(other / "x.nii")
    tiny_nifti(other / "x.nii.gz")  # same key stem next to it
    sources = find_volume_sources([extra_tree, other, extra_tree / "a"])
    keys = [s.key for s in sources]
    assert len(set(keys)) == len(keys) == 6
    assert len({s.path.resolve() for s in sources}) == 6  # extra_tree/a counted once
    assert keys == sorted(keys)
    assert sum(k.startswith("nifti-a__case1-") for k in keys) == 2
    assert sum(k.startswith("nifti-x-") for k in keys) == 2
    assert sources == find_volume_sources([extra_tree, other, extra_tree / "a"])


def test_find_volume_sources_rejects_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="extra CT folder not found"):
        find_volume_sources([tmp_path / "nowhere"])


def test_load_source_dispatches_on_kind(extra_tree: Path) -> None:
    by_kind = {s.kind: s for s in find_volume_sources([extra_tree])}
    assert load_source(by_kind["dicom"]).hu.shape == (3, 16, 16)
    assert load_source(by_kind["nifti"]).hu.shape == (6, 16, 16)
    with pytest.raises(ValueError, match="unknown source kind"):
        load_source(VolumeSource("png", extra_tree, "png-x"))


# --- caching -----------------------------------------------------------------------------

CONFIG = PreprocessConfig(shapes=((8, 32, 32),))


def mtimes(paths: list[Path]) -> list[int]:
    return [os.stat(p).st_mtime_ns for p in paths]


def test_cache_extra_sources_caches_resumes_and_records_failures(
    extra_tree: Path, tmp_path: Path
) -> None:
    broken = extra_tree / "broken.nii.gz"
    broken.write_bytes(os.urandom(300))
    sources = find_volume_sources([extra_tree])
    assert [s.key for s in sources][-1] == "nifti-broken"
    cache_dir = tmp_path / "cache"

    first = cache_extra_sources(sources, cache_dir, CONFIG, progress=False)
    assert [v.key for v in first] == [s.key for s in sources]
    ok = [v for v in first if v.status == "ok"]
    assert len(ok) == 3
    for volume in ok:
        path = volume.volumes[(8, 32, 32)]
        assert path == cache_dir / "8x32x32" / f"{volume.key}.npy"
        array = np.load(path)
        assert array.dtype == np.uint8
        assert array.shape == (8, 32, 32)
        assert array.max() > 0
        assert volume.error is None
    by_key = {v.key: v for v in first}
    assert by_key["dicom-dicom__series1"].n_slices == 3
    assert by_key["dicom-dicom__series1"].spacing == pytest.approx((2.5, 0.8, 0.8))
    assert by_key["nifti-a__case1"].spacing == pytest.approx((3.0, 1.5, 1.5))

    failed = by_key["nifti-broken"]
    assert failed.status == "failed"
    assert failed.volumes == {}
    assert "broken.nii.gz" in failed.error
    assert "not a readable NIfTI" in failed.error
    record = json.loads((cache_dir / EXTRA_RECORDS_DIR / "nifti-broken.json").read_text())
    assert record["status"] == "failed"
    assert record["error"] == failed.error

    # Second call: nothing cached is rewritten; the failed source is tried again.
    written = [v.volumes[(8, 32, 32)] for v in ok]
    written += [cache_dir / EXTRA_RECORDS_DIR / f"{v.key}.json" for v in ok]
    before = mtimes(written)
    second = cache_extra_sources(sources, cache_dir, CONFIG, progress=False)
    assert mtimes(written) == before
    assert second == first

    # Once repaired, the failed source is cached on the next call.
    tiny_nifti(broken)
    third = cache_extra_sources(sources, cache_dir, CONFIG, progress=False)
    assert all(v.status == "ok" for v in third)
    assert mtimes(written) == before


def test_cache_extra_sources_redoes_volumes_made_with_other_settings(
    extra_tree: Path, tmp_path: Path
) -> None:
    sources = find_volume_sources([extra_tree / "a"])
    cache_dir = tmp_path / "cache"
    cache_extra_sources(sources, cache_dir, CONFIG, progress=False)
    two_windows = PreprocessConfig(shapes=((8, 32, 32),), windows=((50.0, 400.0), (40.0, 1000.0)))
    redone = cache_extra_sources(sources, cache_dir, two_windows, progress=False)
    assert all(v.status == "ok" for v in redone)
    for volume in redone:
        assert np.load(volume.volumes[(8, 32, 32)]).shape == (8, 2, 32, 32)
    # A missing volume file is made again too.
    redone[0].volumes[(8, 32, 32)].unlink()
    again = cache_extra_sources(sources, cache_dir, two_windows, progress=False)
    assert again[0].volumes[(8, 32, 32)].is_file()
