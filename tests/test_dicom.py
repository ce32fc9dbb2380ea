from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless

from kaggle_utils.cache.dicom import (
    DICOMSDL_SYNTAXES,
    DicomReadError,
    SeriesReadError,
    load_series,
    read_hu,
    read_slice,
    stored_to_hu,
)

from conftest import pydicom_reference_hu, pydicom_test_file, write_ct_dicom

# Real files from pydicom-data: every transfer syntax family, both pixel representations,
# BitsStored 12/14/16, slopes != 1, a JPEG 2000 codestream that disagrees with its header.
REFERENCE_FILES = [
    "CT_small.dcm",  # explicit VR LE, signed 16 bit, intercept -1024
    "MR_small_implicit.dcm",  # implicit VR LE
    "MR_small_bigendian.dcm",  # explicit VR big endian (pydicom path)
    "693_UNCR.dcm",  # CT, signed, BitsStored 14
    "693_J2KR.dcm",  # JPEG 2000 lossless CT
    "693_J2KI.dcm",  # JPEG 2000 lossy CT, BitsStored 14
    "J2K_pixelrep_mismatch.dcm",  # J2K codestream unsigned, header signed 13 bit
    "MR_small_RLE.dcm",  # RLE lossless
    "MR_small_jp2klossless.dcm",
    "JPEG-LL.dcm",  # JPEG lossless process 14
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "MR2_UNCR.dcm",  # unsigned 12 bit, slope 3.77
    "MR2_J2KR.dcm",
    "bad_sequence.dcm",  # JPEG lossless CT, unsigned 12 bit
    "examples_overlay.dcm",  # overlay bits above BitsStored
    "explicit_VR-UN.dcm",  # dicomsdl raises on its header: pydicom fallback
]


@pytest.mark.parametrize("name", REFERENCE_FILES)
def test_read_hu_matches_pydicom_reference(name: str) -> None:
    path = pydicom_test_file(name)
    hu = read_hu(path)
    assert hu.dtype == np.float32
    np.testing.assert_allclose(hu, pydicom_reference_hu(path), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize(
    "name", ["CT_small.dcm", "MR_small_RLE.dcm", "693_J2KR.dcm", "J2K_pixelrep_mismatch.dcm"]
)
def test_fast_path_is_dicomsdl_and_agrees_with_pydicom_path(name: str) -> None:
    path = pydicom_test_file(name)
    fast = read_slice(path, decoder="dicomsdl")
    slow = read_slice(path, decoder="pydicom")
    assert (fast.decoder, slow.decoder) == ("dicomsdl", "pydicom")
    assert read_slice(path).decoder == "dicomsdl"
    np.testing.assert_array_equal(fast.hu, slow.hu)
    assert fast.position == slow.position
    assert fast.instance_number == slow.instance_number
    assert fast.pixel_spacing == slow.pixel_spacing


def test_real_j2k_series_both_decoders_match_reference(real_dicom_series: Path) -> None:
    for path in sorted(real_dicom_series.iterdir()):
        reference = pydicom_reference_hu(path)
        np.testing.assert_array_equal(read_hu(path, decoder="dicomsdl"), reference)
        np.testing.assert_array_equal(read_hu(path, decoder="pydicom"), reference)


def test_big_endian_goes_to_pydicom() -> None:
    path = pydicom_test_file("MR_small_bigendian.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID not in DICOMSDL_SYNTAXES
    assert read_slice(path).decoder == "pydicom"
    with pytest.raises(DicomReadError, match="not verified for dicomsdl"):
        read_slice(path, decoder="dicomsdl")


def slow_stored_to_hu(
    stored: np.ndarray, bits: int, signed: bool, slope: float, intercept: float
) -> np.ndarray:
    """Per-pixel reference written from the DICOM standard's definitions."""
    out = np.empty(stored.shape, dtype=np.float64)
    for index, value in np.ndenumerate(stored):
        field = int(value) % (1 << bits)  # the BitsStored low bits, as an unsigned number
        if signed and field >= 1 << (bits - 1):
            field -= 1 << bits  # two's complement
        out[index] = field * slope + intercept
    return out


@pytest.mark.parametrize("bits", [8, 10, 12, 13, 14, 15, 16])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("container", [np.uint16, np.int16])
def test_stored_to_hu_matches_slow_reference(bits: int, signed: bool, container: type) -> None:
    rng = np.random.default_rng(bits)
    raw = rng.integers(0, 1 << 16, size=(9, 11), dtype=np.uint16)
    raw[0, :4] = [0, 0xFFFF, 1 << (bits - 1), (1 << bits) - 1]
    stored = raw.view(container)
    slope, intercept = 0.5, -8192.0
    expected = slow_stored_to_hu(stored, bits, signed, slope, intercept)
    actual = stored_to_hu(stored, bits, signed, slope, intercept)
    np.testing.assert_array_equal(actual, expected.astype(np.float32))


def test_stored_to_hu_known_values() -> None:
    twelve_bit_negative_one_high_bits_zero = np.array([0x0FFF, 0x0800, 0x07FF], dtype=np.uint16)
    hu = stored_to_hu(twelve_bit_negative_one_high_bits_zero, 12, signed=True)
    np.testing.assert_array_equal(hu, [-1.0, -2048.0, 2047.0])
    unsigned_overlay_bit = np.array([0xF000 | 100], dtype=np.uint16)
    np.testing.assert_array_equal(stored_to_hu(unsigned_overlay_bit, 12, False, 1, -1024), [-924])


HU_SAMPLE = np.array([[-1000, -1, 0, 40], [300, 1200, -2048, 2047]], dtype=np.int16)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
@pytest.mark.parametrize("bits", [12, 13, 14])
@pytest.mark.parametrize("high_bits", ["zero", "sign"])
def test_signed_short_bits_stored_is_sign_extended(
    tmp_path: Path, syntax: str, bits: int, high_bits: str
) -> None:
    values = np.tile(HU_SAMPLE, (32, 16))  # JPEG 2000 encoders refuse tiny images
    raw = values.view(np.uint16)
    if high_bits == "zero":
        raw = raw & np.uint16((1 << bits) - 1)
    path = write_ct_dicom(
        tmp_path / "slice.dcm",
        raw,
        bits_stored=bits,
        pixel_representation=1,
        intercept=0,
        transfer_syntax=syntax,
    )
    for decoder in ("auto", "dicomsdl", "pydicom"):
        np.testing.assert_array_equal(read_hu(path, decoder), values.astype(np.float32))


def test_j2k_unsigned_codestream_with_signed_header_follows_header(tmp_path: Path) -> None:
    values = np.tile(HU_SAMPLE, (32, 16))
    raw = values.view(np.uint16) & np.uint16(0x0FFF)  # fits an unsigned 12-bit codestream
    path = write_ct_dicom(
        tmp_path / "j2k.dcm", raw, bits_stored=12, pixel_representation=1,
        transfer_syntax=JPEG2000Lossless,
    )  # fmt: skip
    np.testing.assert_array_equal(read_hu(path), values.astype(np.float32))
    np.testing.assert_array_equal(read_hu(path), pydicom_reference_hu(path))


@pytest.mark.parametrize(
    ("intercept", "slope"), [(-1024, 1), (0, 1), (-8192, 1), (-32768, 1), (-1024, 0.5)]
)
def test_rescale_is_always_applied(tmp_path: Path, intercept: float, slope: float) -> None:
    stored = np.array([[0, 1, 1024, 40000]], dtype=np.uint16)
    path = write_ct_dicom(
        tmp_path / "r.dcm", stored, pixel_representation=0, intercept=intercept, slope=slope
    )
    expected = stored.astype(np.float64) * slope + intercept
    np.testing.assert_array_equal(read_hu(path), expected.astype(np.float32))


def test_missing_rescale_means_identity(tmp_path: Path) -> None:
    stored = np.array([[-5, 7]], dtype=np.int16)
    path = write_ct_dicom(tmp_path / "r.dcm", stored, intercept=None, slope=None)
    np.testing.assert_array_equal(read_hu(path), [[-5.0, 7.0]])


@pytest.mark.parametrize("pixel_representation", [0, 1])
def test_monochrome1_is_rescaled_as_stored_like_pydicom(
    tmp_path: Path, pixel_representation: int
) -> None:
    """MONOCHROME1 only says how to display: the Modality LUT gives HU from the stored values,
    so air stays at -1024 + 0 and nothing is inverted (PS3.3 C.7.6.3.1.2)."""
    values = np.array([[0, 100, 2047, 1500]], dtype=np.int16)
    mono1 = write_ct_dicom(
        tmp_path / "m1.dcm", values, bits_stored=12,
        pixel_representation=pixel_representation, intercept=-1024, photometric="MONOCHROME1",
    )  # fmt: skip
    dataset = pydicom.dcmread(mono1)
    reference = apply_modality_lut(dataset.pixel_array, dataset)
    np.testing.assert_array_equal(reference, [[-1024, -924, 1023, 476]])
    for decoder in ("dicomsdl", "pydicom"):
        np.testing.assert_array_equal(read_hu(mono1, decoder), reference)


def test_unreadable_inputs_raise_dicom_read_error(tmp_path: Path) -> None:
    (tmp_path / "empty.dcm").write_bytes(b"")
    (tmp_path / "text.dcm").write_text("not a dicom file\n" * 20)
    for name in ("empty.dcm", "text.dcm", "missing.dcm"):
        with pytest.raises(DicomReadError, match=name):
            read_hu(tmp_path / name)
    with pytest.raises(DicomReadError, match="truncated"):
        read_hu(pydicom_test_file("MR_truncated.dcm"))
    with pytest.raises(DicomReadError, match="frames"):
        read_hu(pydicom_test_file("emri_small_jpeg_2k_lossless.dcm"))


def test_truncated_files_never_crash_the_process(tmp_path: Path) -> None:
    """dicomsdl segfaults on truncated files; cut real files everywhere and read them in a
    child process, which must survive and report every cut file as unreadable or complete."""
    sources = [pydicom_test_file(n) for n in ("CT_small.dcm", "MR_small_RLE.dcm", "693_J2KR.dcm")]
    script = textwrap.dedent(
        f"""
        import numpy as np
        from pathlib import Path
        from kaggle_utils.cache.dicom import DicomReadError, read_hu
        rng = np.random.default_rng(0)
        sources = {[str(s) for s in sources]!r}
        out = Path({str(tmp_path)!r}) / "cut.dcm"
        errors = 0
        for source in sources:
            data = Path(source).read_bytes()
            cuts = set(rng.integers(0, len(data), 80).tolist()) | {{0, 131, 132, len(data) - 1}}
            for cut in sorted(cuts):
                out.write_bytes(data[:cut])
                try:
                    read_hu(out)
                except DicomReadError:
                    errors += 1
        print("errors", errors)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert int(result.stdout.split()[-1]) > 200


def write_series(
    folder: Path,
    z_positions: list[float],
    instance_numbers: list[int],
    shape: tuple[int, int] = (16, 16),
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
) -> None:
    """One file per slice named by instance number; pixel value = 10 * z so order is visible."""
    normal = np.cross(orientation[:3], orientation[3:])
    for z, number in zip(z_positions, instance_numbers, strict=True):
        stored = np.full(shape, round(10 * z), dtype=np.int16)
        position = tuple(float(v) for v in np.array([5.0, -3.0, 0.0]) + z * normal)
        write_ct_dicom(
            folder / f"{number}.dcm",
            stored,
            instance_number=number,
            position=position,
            orientation=orientation,
            pixel_spacing=(0.7, 0.8),
        )


def test_load_series_orders_by_position_not_name_or_instance(tmp_path: Path) -> None:
    z = [7.5, 0.0, 5.0, 2.5, 10.0]
    numbers = [3, 40, 1, 12, 2]  # unrelated to z, and file names sort differently again
    write_series(tmp_path, z, numbers)
    series = load_series(tmp_path)
    np.testing.assert_array_equal(series.hu[:, 0, 0], [0, 25, 50, 75, 100])
    np.testing.assert_array_equal(series.instance_numbers, [40, 12, 1, 3, 2])
    np.testing.assert_allclose(series.z_positions, [0, 2.5, 5, 7.5, 10])
    assert series.spacing == pytest.approx((2.5, 0.7, 0.8))
    assert series.ordered_by == "position"
    assert series.z_index_of_instance(3) == 3
    assert series.skipped == []
    assert series.decoder == "dicomsdl"


def test_load_series_projects_position_on_the_slice_normal(tmp_path: Path) -> None:
    flipped = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)  # normal points to -z in patient space
    write_series(tmp_path, [2.0, 0.0, 4.0], [1, 2, 3], orientation=flipped)  # z = -2, 0, -4
    series = load_series(tmp_path)
    np.testing.assert_array_equal(series.instance_numbers, [3, 1, 2])  # ascending patient z
    np.testing.assert_allclose(series.z_positions, [-4.0, -2.0, 0.0])
    assert series.spacing[0] == pytest.approx(2.0)
    assert series.geometry.normal_to_feet and series.geometry.flipped_rows


def test_load_series_skips_and_reports_bad_files(tmp_path: Path) -> None:
    write_series(tmp_path, [0.0, 1.0, 2.0, 3.0], [1, 2, 3, 4])
    data = (tmp_path / "3.dcm").read_bytes()
    (tmp_path / "3.dcm").write_bytes(data[: len(data) // 2])
    write_series(tmp_path / "tmp_odd", [9.0], [9], shape=(12, 16))
    (tmp_path / "tmp_odd" / "9.dcm").rename(tmp_path / "9.dcm")
    (tmp_path / "tmp_odd").rmdir()
    write_series(tmp_path / "tmp_tilt", [8.0], [8], orientation=(1.0, 0, 0, 0, 0, -1.0))
    (tmp_path / "tmp_tilt" / "8.dcm").rename(tmp_path / "8.dcm")
    (tmp_path / "tmp_tilt").rmdir()
    series = load_series(tmp_path)
    assert series.hu.shape == (3, 16, 16)
    np.testing.assert_array_equal(series.instance_numbers, [1, 2, 4])
    reasons = {s.name: s.reason for s in series.skipped}
    assert set(reasons) == {"3.dcm", "8.dcm", "9.dcm"}
    assert "truncated" in reasons["3.dcm"]
    assert "size 12x16" in reasons["9.dcm"]
    assert "orientation" in reasons["8.dcm"]
    assert series.n_files == 6


def test_load_series_without_positions_falls_back_to_instance_number(tmp_path: Path) -> None:
    for number, value in [(3, 30), (1, 10), (2, 20)]:
        stored = np.full((8, 8), value, dtype=np.int16)
        write_ct_dicom(tmp_path / f"x{value}.dcm", stored, instance_number=number, position=None)
    series = load_series(tmp_path)
    assert series.ordered_by == "instance_number"
    np.testing.assert_array_equal(series.hu[:, 0, 0], [10, 20, 30])
    assert series.spacing[0] == pytest.approx(2.5)  # SliceThickness


@pytest.mark.parametrize("flipped", [False, True], ids=["normal_to_head", "normal_to_feet"])
def test_load_series_without_positions_orders_by_slice_location(
    tmp_path: Path, flipped: bool
) -> None:
    """SliceLocation is the position along the stored normal (row x column cosines): ascending
    z from it whatever InstanceNumber says, and when the normal points to the feet (rows
    flipped) its sign turns. The values are 10 * the height, so the order shows."""
    orientation = (1.0, 0.0, 0.0, 0.0, -1.0, 0.0) if flipped else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    heights = [4.0, 0.0, 8.0, 2.0, 6.0]
    for k, height in enumerate(heights):
        path = write_ct_dicom(
            tmp_path / f"{k}.dcm", np.full((8, 8), int(10 * height), dtype=np.int16),
            instance_number=100 - int(height), position=None, orientation=orientation,
        )  # fmt: skip
        dataset = pydicom.dcmread(path)
        dataset.SliceLocation = -height if flipped else height
        dataset.save_as(path)
    series = load_series(tmp_path)
    assert series.ordered_by == "slice_location"
    np.testing.assert_array_equal(series.hu[:, 0, 0], [0, 20, 40, 60, 80])
    np.testing.assert_allclose(series.z_positions, [0, 2, 4, 6, 8])
    assert series.spacing[0] == pytest.approx(2.0)


def test_constant_slice_locations_fall_back_to_instance_number(tmp_path: Path) -> None:
    """A SliceLocation that does not tell the slices apart (constant, or rounded coarser than
    the spacing) would merge them as duplicates: InstanceNumber orders them instead."""
    for number in (3, 1, 2):
        path = write_ct_dicom(
            tmp_path / f"{number}.dcm", np.full((8, 8), 10 * number, dtype=np.int16),
            instance_number=number, position=None,
        )  # fmt: skip
        dataset = pydicom.dcmread(path)
        dataset.SliceLocation = 0.0
        dataset.save_as(path)
    series = load_series(tmp_path)
    assert series.ordered_by == "instance_number" and series.skipped == []
    np.testing.assert_array_equal(series.hu[:, 0, 0], [10, 20, 30])


def test_native_pixel_data_of_undefined_length_never_reaches_dicomsdl(tmp_path: Path) -> None:
    """Encapsulated (undefined-length) pixel data under a native transfer syntax: a corrupt
    file dicomsdl must not see."""
    from kaggle_utils.cache.dicom import _dicomsdl_can_decode

    rle = write_ct_dicom(
        tmp_path / "rle.dcm", np.zeros((8, 8), np.int16), transfer_syntax=RLELossless
    )
    data = rle.read_bytes().replace(b"1.2.840.10008.1.2.5\x00", b"1.2.840.10008.1.2.1\x00")
    assert _dicomsdl_can_decode(rle.read_bytes()) == (True, "")
    assert _dicomsdl_can_decode(data)[0] is False


def test_segmentations_are_not_images_even_when_pydicom_does_not_know_the_class() -> None:
    from kaggle_utils.cache.dicom import _is_image_class

    assert _is_image_class("1.2.840.10008.5.1.4.1.1.2")  # CT Image Storage
    assert _is_image_class("1.2.840.10008.5.1.4.1.1.2.1")  # Enhanced CT Image Storage
    assert _is_image_class("")  # no class: the pixel data decides
    assert _is_image_class("1.3.12.2.1107.5.9.1.99")  # private: the pixel data decides
    assert not _is_image_class("1.2.840.10008.5.1.4.1.1.66.4")  # Segmentation Storage
    assert not _is_image_class("1.2.840.10008.5.1.4.1.1.66.7")  # Label Map Segmentation
    assert not _is_image_class("1.2.840.10008.5.1.4.1.1.481.2")  # RT Dose Storage
    assert not _is_image_class("1.2.840.10008.1.3.10")  # a DICOMDIR


def test_a_file_without_the_dicom_preamble_is_refused_with_the_reason(tmp_path: Path) -> None:
    """A bare data set (no 128-byte preamble and 'DICM'), as some old exports write."""
    from kaggle_utils.cache.dicom import _dataset_start

    data = pydicom_test_file("CT_small.dcm").read_bytes()
    (tmp_path / "bare.dcm").write_bytes(data[_dataset_start(data) :])  # no preamble, no meta
    with pytest.raises(DicomReadError, match=r"not a DICOM Part 10 file.*DICM"):
        read_hu(tmp_path / "bare.dcm")


def test_multi_frame_files_read_frames_and_read_slice_says_so() -> None:
    from kaggle_utils.cache.dicom import read_frames

    path = pydicom_test_file("eCT_Supplemental.dcm")  # Enhanced CT Image Storage, 2 frames
    dataset = pydicom.dcmread(path)
    frames = read_frames(path)
    assert [f.frame for f in frames] == [1, 2]
    for frame, group in zip(frames, dataset.PerFrameFunctionalGroupsSequence, strict=True):
        position = group.PlanePositionSequence[0].ImagePositionPatient
        assert frame.position == pytest.approx([float(v) for v in position])
        assert frame.orientation is not None and frame.pixel_spacing is not None
    with pytest.raises(DicomReadError, match="2 frames \\(an enhanced multi-frame image\\)"):
        read_slice(path)
    # Several frames and nothing to place them by: refused with the reason.
    with pytest.raises(DicomReadError, match="10 frames without Per-Frame Functional Groups"):
        read_frames(pydicom_test_file("emri_small.dcm"))
    # Pixel data that is not an image (a segmentation) is not read as slices.
    with pytest.raises(DicomReadError, match="not an image: Segmentation Storage"):
        read_frames(pydicom_test_file("liver.dcm"))


def test_the_pixel_data_found_is_the_top_level_element() -> None:
    """Before dicomsdl sees a file its (7FE0,0010) is found by walking the top-level elements:
    its declared length is pydicom's, on every pydicom test file in a dicomsdl syntax, those
    whose overlay or private data holds the tag's bytes earlier included."""
    import warnings

    from pydicom.data import get_testdata_files

    from kaggle_utils.cache.dicom import _pixel_element, _transfer_syntax

    undefined = 0xFFFFFFFF
    checked = 0
    for file in map(Path, get_testdata_files()):
        data = file.read_bytes() if file.is_file() else b""
        syntax = _transfer_syntax(data) if data[128:132] == b"DICM" else None
        if syntax not in DICOMSDL_SYNTAXES:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                dataset = pydicom.dcmread(file)
            except Exception:
                continue
        element = _pixel_element(data, syntax)
        if "PixelData" not in dataset:  # none, or too short for pydicom to show it
            continue
        assert element is not None, file.name
        raw = dataset["PixelData"]
        expected = undefined if raw.is_undefined_length else len(raw.value)
        truncated = element[0] != undefined and element[1] + element[0] > len(data)
        assert element[0] == expected or truncated, file.name
        checked += 1
    assert checked > 100


def test_load_series_errors_name_the_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_series(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SeriesReadError, match="empty: no files"):
        load_series(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(3):
        (bad / f"{i}.dcm").write_bytes(b"\0" * 50)
    with pytest.raises(SeriesReadError, match=r"bad: no readable DICOM slices \(3 files"):
        load_series(bad)


def test_real_series_is_ascending_z_with_instance_mapping(real_dicom_series: Path) -> None:
    series = load_series(real_dicom_series)
    assert series.hu.shape == (20, 512, 512)
    assert np.all(np.diff(series.z_positions) > 0)
    # In this series InstanceNumber increases as z decreases (see its README).
    assert np.all(np.diff(series.instance_numbers) < 0)
    assert series.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))
    for index in (0, 7, 19):
        number = int(series.instance_numbers[index])
        path = next(
            p for p in real_dicom_series.iterdir() if pydicom.dcmread(p).InstanceNumber == number
        )
        np.testing.assert_array_equal(series.hu[index], pydicom_reference_hu(path))
    air, soft_tissue = series.hu[:, 5, 5].mean(), series.hu[:, 256, 256].mean()
    assert air < -900 and -200 < soft_tissue < 200


# --------------------------------------------------------------------------- decoders


def test_decoder_report_lists_every_decoder_and_syntax() -> None:
    from kaggle_utils.cache import dicom

    text, problems = dicom.decoder_report()
    versions = dicom.decoder_versions()
    assert set(versions) == set(dicom.DECODER_PACKAGES)
    for package, version in versions.items():
        if version:
            assert f"{package} {version}" in text
    for name in dicom.REPORTED_SYNTAXES.values():
        assert name in text
    # this environment installs every required decoder (requirements.txt)
    assert problems == []


def test_without_dicomsdl_everything_goes_to_pydicom_and_the_report_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kaggle_utils.cache import dicom

    monkeypatch.setattr(dicom, "dicomsdl_available", lambda: False)
    real_version = dicom.importlib.metadata.version

    def version(package: str) -> str:
        if package == "dicomsdl":
            raise dicom.importlib.metadata.PackageNotFoundError(package)
        return real_version(package)

    monkeypatch.setattr(dicom.importlib.metadata, "version", version)
    stored = np.arange(16, dtype=np.int16).reshape(4, 4)
    path = write_ct_dicom(tmp_path / "1.dcm", stored, transfer_syntax=RLELossless)
    assert read_slice(path).decoder == "pydicom"
    text, problems = dicom.decoder_report()
    assert "RLE Lossless (every competition file): pydicom" in text
    assert any(p.startswith("dicomsdl is not installed") for p in problems)
    assert not dicom.syntax_support(str(RLELossless)).dicomsdl


def test_a_syntax_no_decoder_reads_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    from kaggle_utils.cache import dicom

    monkeypatch.setattr(dicom, "dicomsdl_available", lambda: False)
    # a made-up UID: no decoder exists for it anywhere
    text, problems = dicom.decoder_report({"1.2.3.4.5": "Made-up syntax"})
    assert "Made-up syntax: NO DECODER" in text
    assert any("no installed decoder reads Made-up syntax" in p for p in problems)


def test_series_transfer_syntax_reads_one_header(tmp_path: Path) -> None:
    from kaggle_utils.cache.dicom import series_transfer_syntax

    stored = np.zeros((4, 4), dtype=np.int16)
    write_ct_dicom(tmp_path / "s" / "2.dcm", stored, transfer_syntax=RLELossless)
    write_ct_dicom(tmp_path / "s" / "10.dcm", stored)
    assert series_transfer_syntax(tmp_path / "s") == str(RLELossless)
    (tmp_path / "empty").mkdir()
    assert series_transfer_syntax(tmp_path / "empty") is None
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "1.dcm").write_bytes(b"not dicom")
    assert series_transfer_syntax(tmp_path / "junk") is None
