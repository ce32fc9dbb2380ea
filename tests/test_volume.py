from __future__ import annotations

import numpy as np
import pytest

from kaggle_utils.cache.volume import (
    AIR_HU,
    apply_window,
    body_bbox,
    crop_to_box,
    parse_windows,
    resample_volume,
    window_volume,
)


def slow_window(hu: np.ndarray, level: float, width: float) -> np.ndarray:
    out = np.empty(hu.shape, dtype=np.uint8)
    low, high = level - width / 2, level + width / 2
    for index, value in np.ndenumerate(hu):
        if value <= low:
            out[index] = 0
        elif value >= high:
            out[index] = 255
        else:
            out[index] = round((value - low) / width * 255)
    return out


@pytest.mark.parametrize(("level", "width"), [(50, 400), (80, 150), (400, 1800), (-600, 1500)])
def test_apply_window_matches_slow_reference(level: float, width: float) -> None:
    hu = np.random.default_rng(0).uniform(-1500, 2500, size=(7, 9)).astype(np.float32)
    hu[0, :3] = [level - width / 2, level + width / 2, level]
    actual = apply_window(hu, level, width)
    assert actual.dtype == np.uint8
    # Rounding of exact .5 cases may differ by one grey level between the two.
    assert np.abs(actual.astype(int) - slow_window(hu, level, width).astype(int)).max() <= 1
    assert list(actual[0, :2]) == [0, 255]


def test_soft_tissue_window_known_values() -> None:
    hu = np.array([-1000.0, -150.0, 50.0, 250.0, 1000.0])
    np.testing.assert_array_equal(apply_window(hu), [0, 0, 128, 255, 255])


def test_window_volume_channels() -> None:
    hu = np.zeros((3, 4, 5), dtype=np.float32)
    assert window_volume(hu).shape == (3, 4, 5)
    several = window_volume(hu, parse_windows(["soft_tissue", "bone", [0, 100]]))
    assert several.shape == (3, 3, 4, 5)
    np.testing.assert_array_equal(several[0, 2], apply_window(hu[0], 0, 100))


def test_parse_windows() -> None:
    assert parse_windows(None) == ((50.0, 400.0),)
    assert parse_windows(["liver", [10, 20]]) == ((80.0, 150.0), (10.0, 20.0))
    with pytest.raises(ValueError, match="unknown window 'lung'"):
        parse_windows(["lung"])
    with pytest.raises(ValueError, match="width > 0"):
        parse_windows([[50, 0]])


def phantom_with_table(n_slices: int = 4, size: int = 128) -> np.ndarray:
    """Air, an elliptical body, a table below it separated by air, and noise."""
    y, x = np.mgrid[:size, :size]
    body = ((y - 50) / 30) ** 2 + ((x - 60) / 40) ** 2 <= 1
    table = (y >= 90) & (y < 94) & (x > 5) & (x < 120)
    rng = np.random.default_rng(0)
    hu = np.full((n_slices, size, size), -1000.0, dtype=np.float32)
    hu[:, body] = 40.0
    hu[:, table] = 0.0
    hu[1, 3, 3] = 500.0  # a single hot pixel must not grow the box
    return hu + rng.normal(0, 10, hu.shape).astype(np.float32)


def test_body_bbox_finds_body_not_table_or_noise() -> None:
    y0, y1, x0, x1 = body_bbox(phantom_with_table(), margin=0)
    assert (y0, y1) == pytest.approx((20, 81), abs=2)
    assert (x0, x1) == pytest.approx((20, 101), abs=2)


def test_body_bbox_of_empty_volume_is_full_extent() -> None:
    assert body_bbox(np.full((2, 10, 12), -1000.0)) == (0, 10, 0, 12)


def test_crop_to_box_square_pads_with_air() -> None:
    hu = np.arange(2 * 6 * 8, dtype=np.float32).reshape(2, 6, 8)
    crop = crop_to_box(hu, (0, 6, 1, 3), square=True)  # 6 tall, 2 wide -> 6 x 6
    assert crop.shape == (2, 6, 6)
    np.testing.assert_array_equal(crop[:, :, 1:5], hu[:, :, 0:4])
    np.testing.assert_array_equal(crop[:, :, 0], AIR_HU)  # left of the image
    np.testing.assert_array_equal(crop_to_box(hu, (1, 3, 2, 5), square=False), hu[:, 1:3, 2:5])


def test_resample_identity_and_constant() -> None:
    volume = np.random.default_rng(0).normal(size=(4, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(resample_volume(volume, (4, 6, 6)), volume)
    constant = np.full((30, 50, 40), 7.0, dtype=np.float32)
    for shape in [(8, 16, 16), (40, 64, 64), (8, 64, 20)]:
        out = resample_volume(constant, shape)
        assert out.shape == shape and out.dtype == np.float32
        np.testing.assert_allclose(out, 7.0, rtol=1e-6)


def test_resample_downsampling_averages_blocks() -> None:
    volume = np.random.default_rng(1).normal(size=(12, 8, 6)).astype(np.float32)
    expected = np.zeros((4, 4, 3))
    for k, i, j in np.ndindex(expected.shape):  # slow reference: mean of each 3x2x2 block
        expected[k, i, j] = volume[3 * k : 3 * k + 3, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].mean()
    np.testing.assert_allclose(resample_volume(volume, (4, 4, 3)), expected, atol=1e-5)


def test_resample_upsampling_keeps_a_linear_ramp_linear() -> None:
    ramp = np.broadcast_to(np.arange(5, dtype=np.float32)[:, None, None], (5, 4, 4)).copy()
    out = resample_volume(ramp, (10, 4, 4))[:, 0, 0]
    # align_corners=False: output slice k samples input position (k + 0.5) / 2 - 0.5.
    positions = np.clip((np.arange(10) + 0.5) / 2 - 0.5, 0, 4)
    np.testing.assert_allclose(out, positions, atol=1e-6)


def test_resample_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="three positive ints"):
        resample_volume(np.zeros((2, 2, 2), dtype=np.float32), (2, 2))
    with pytest.raises(ValueError, match="volume"):
        resample_volume(np.zeros((2, 2), dtype=np.float32), (2, 2, 2))


# --- crop_and_resample: the fast path notebook 01 uses, against the reference ------------

CASES = [  # (slices, box): z shrinks, grows and stays; the square leaves the image or not
    (60, (10, 50, 5, 60)),
    (20, (0, 64, 0, 64)),
    (32, (3, 40, 10, 30)),
    (7, (0, 30, 2, 64)),
    (45, (30, 64, 0, 20)),
]
SHAPES = [(32, 24, 24), (10, 80, 80), (7, 16, 40), (32, 48, 48)]


@pytest.mark.parametrize(("n_slices", "box"), CASES)
def test_crop_and_resample_is_the_reference_for_every_shape(
    n_slices: int, box: tuple[int, int, int, int]
) -> None:
    from kaggle_utils.cache.volume import _crop_and_resample_torch, crop_and_resample, square_box

    hu = np.random.default_rng(n_slices).normal(0, 400, (n_slices, 64, 64)).astype(np.float32)
    hu = hu[:, :, ::-1]  # any strides: a flipped view, as a series may be
    fast = crop_and_resample(hu, box, SHAPES)
    y0, y1, x0, x1 = square_box(box)
    pad = (max(-y0, 0), max(y1 - 64, 0), max(-x0, 0), max(x1 - 64, 0))
    inside = hu[:, max(y0, 0) : min(y1, 64), max(x0, 0) : min(x1, 64)]
    on_torch = _crop_and_resample_torch(inside, pad, SHAPES, AIR_HU, "cpu")  # the GPU's code
    for shape in SHAPES:
        reference = resample_volume(crop_to_box(hu.copy(), box, square=True), shape)
        assert fast[shape].shape == shape and fast[shape].dtype == np.float32
        np.testing.assert_allclose(fast[shape], reference, atol=2e-3)
        np.testing.assert_allclose(on_torch[shape], reference, atol=2e-3)
        windowed = [window_volume(v).astype(int) for v in (fast[shape], reference)]
        assert np.abs(windowed[0] - windowed[1]).max() <= 1


def test_crop_and_resample_without_square_keeps_the_box() -> None:
    from kaggle_utils.cache.volume import crop_and_resample

    hu = np.random.default_rng(1).normal(0, 400, (12, 40, 50)).astype(np.float32)
    box = (5, 35, 0, 50)
    fast = crop_and_resample(hu, box, [(6, 15, 25)], square=False)[(6, 15, 25)]
    reference = resample_volume(crop_to_box(hu, box, square=False), (6, 15, 25))
    np.testing.assert_allclose(fast, reference, atol=2e-3)


def test_resample_z_matches_the_slow_definition() -> None:
    """Adaptive pooling's windows [floor(i n / d), ceil((i + 1) n / d)) when shrinking; linear
    interpolation at (i + 0.5) n / d - 0.5, clamped, when growing."""
    from kaggle_utils.cache.volume import resample_z

    volume = np.random.default_rng(2).normal(size=(11, 3, 4)).astype(np.float32)
    for depth in (1, 4, 11, 17):
        expected = np.empty((depth, 3, 4))
        for i in range(depth):
            if depth <= 11:
                start, stop = int(np.floor(i * 11 / depth)), int(np.ceil((i + 1) * 11 / depth))
                expected[i] = volume[start:stop].astype(np.float64).mean(axis=0)
            else:
                source = max((i + 0.5) * 11 / depth - 0.5, 0.0)
                lower = int(np.floor(source))
                upper = min(lower + 1, 10)
                expected[i] = (1 - (source - lower)) * volume[lower] + (source - lower) * volume[
                    upper
                ]
        np.testing.assert_allclose(resample_z(volume, depth), expected, atol=1e-5)


def test_a_gpu_resample_device_fails_early_without_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from kaggle_utils.cache.volume import check_resample_device

    check_resample_device("cpu")
    with pytest.raises(ValueError, match="'cpu' or 'cuda"):
        check_resample_device("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        check_resample_device("cuda")


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_crop_and_resample_on_the_gpu_is_the_cpu_reference() -> None:
    from kaggle_utils.cache.volume import crop_and_resample

    hu = np.random.default_rng(3).normal(0, 400, (70, 64, 64)).astype(np.float32)
    on_gpu = crop_and_resample(hu, (10, 50, 5, 60), SHAPES, device="cuda")
    on_cpu = crop_and_resample(hu, (10, 50, 5, 60), SHAPES)
    for shape in SHAPES:
        np.testing.assert_allclose(on_gpu[shape], on_cpu[shape], atol=2e-3)
