from __future__ import annotations

import numpy as np
import pytest
import torch

from kaggle_utils.pretrain.crops import base_grid, cut_crops, overlap_labels, sample_voco_crops


def box_mask(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    y0, x0, y1, x1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = True
    return mask


def slow_labels(random_boxes: np.ndarray, base_boxes: np.ndarray, shape, label: str) -> np.ndarray:
    """Reference by counting pixels of rasterised boxes."""
    out = np.zeros((len(random_boxes), len(base_boxes)))
    for i, r in enumerate(random_boxes):
        rm = box_mask(r, shape)
        for j, b in enumerate(base_boxes):
            bm = box_mask(b, shape)
            inter = np.logical_and(rm, bm).sum()
            out[i, j] = inter / rm.sum() if label == "area" else inter / np.logical_or(rm, bm).sum()
    return out


@pytest.mark.parametrize(
    ("shape", "grid", "size"), [((192, 192), 3, 64), ((64, 80), 4, 16), ((50, 50), 3, None)]
)
def test_base_grid_tiles_a_centred_square_exactly_once(shape, grid, size) -> None:
    boxes = base_grid(shape, grid, size)
    assert boxes.shape == (grid * grid, 4)
    side = (size or min(shape) // grid) * grid
    coverage = sum(box_mask(b, shape).astype(int) for b in boxes)
    assert coverage.max() == 1 and coverage.sum() == side * side  # no overlap, full square
    ys, xs = np.nonzero(coverage)
    assert ys.min() == (shape[0] - side) // 2 and xs.min() == (shape[1] - side) // 2
    assert np.all(boxes[:, 2] - boxes[:, 0] == side // grid)


def test_base_grid_rejects_a_grid_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        base_grid((100, 100), 3, 40)


@pytest.mark.parametrize("label", ["area", "iou"])
def test_sampled_crops_and_labels_match_pixel_counting(label: str) -> None:
    shape = (70, 64)
    rng = np.random.default_rng(3)
    for _ in range(20):
        crops = sample_voco_crops(shape, 3, 5, rng, label=label, crop_size=20)
        region = sum(box_mask(b, shape).astype(int) for b in crops.base_boxes).astype(bool)
        for box in crops.random_boxes:
            assert box[2] - box[0] == 20 and box[3] - box[1] == 20
            assert region[box_mask(box, shape)].all()  # inside the grid
        expected = slow_labels(crops.random_boxes, crops.base_boxes, shape, label)
        np.testing.assert_allclose(crops.labels, expected, atol=1e-12)
        assert np.all((crops.labels > 0).sum(axis=1) <= 4)
        if label == "area":
            np.testing.assert_allclose(crops.labels.sum(axis=1), 1.0)


def test_known_label_values() -> None:
    bases = base_grid((64, 64), 2, 32)
    aligned = np.array([[0, 0, 32, 32]])
    half = np.array([[0, 16, 32, 48]])
    quarter = np.array([[16, 16, 48, 48]])
    np.testing.assert_allclose(overlap_labels(aligned, bases), [[1, 0, 0, 0]])
    np.testing.assert_allclose(overlap_labels(half, bases), [[0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(overlap_labels(quarter, bases), [[0.25] * 4])
    np.testing.assert_allclose(overlap_labels(half, bases, "iou"), [[1 / 3, 1 / 3, 0, 0]])
    with pytest.raises(ValueError, match="label"):
        overlap_labels(half, bases, "dice")  # type: ignore[arg-type]


def test_sampling_is_deterministic_for_a_seed() -> None:
    a = sample_voco_crops((96, 96), 3, 4, np.random.default_rng(7), crop_size=32)
    b = sample_voco_crops((96, 96), 3, 4, np.random.default_rng(7), crop_size=32)
    c = sample_voco_crops((96, 96), 3, 4, np.random.default_rng(8), crop_size=32)
    np.testing.assert_array_equal(a.random_boxes, b.random_boxes)
    assert not np.array_equal(a.random_boxes, c.random_boxes)


def test_random_crops_cover_the_whole_region_over_many_draws() -> None:
    crops = sample_voco_crops((90, 90), 3, 4000, np.random.default_rng(0), crop_size=30)
    assert crops.random_boxes[:, 0].min() == 0 and crops.random_boxes[:, 2].max() == 90
    assert crops.random_boxes[:, 1].min() == 0 and crops.random_boxes[:, 3].max() == 90


def test_cut_crops_equals_slicing() -> None:
    images = torch.arange(2 * 3 * 10 * 12, dtype=torch.float32).view(2, 3, 10, 12)
    boxes = np.array([[0, 0, 4, 5], [6, 7, 10, 12]])
    out = cut_crops(images, boxes)
    assert out.shape == (2, 2, 3, 4, 5)
    assert torch.equal(out[1], images[..., 6:10, 7:12])
    with pytest.raises(ValueError, match="same size"):
        cut_crops(images, np.array([[0, 0, 4, 5], [0, 0, 3, 5]]))
