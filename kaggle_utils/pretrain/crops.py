"""VoCo crops: a grid of non-overlapping base crops, random crops of the same size inside the
grid, and each random crop's position label (its overlap with every base).

Boxes are `(y0, x0, y1, x1)` in pixels, end exclusive, as int64 arrays. The grid is a square
region of `grid * crop_size` pixels centred in the image (the whole 192x192 slice for the
paper's 3x3 grid of 64x64 crops); random crops lie entirely inside it, so each random crop
overlaps at most four bases (VoCo, Fig. 4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

LabelMode = Literal["area", "iou"]


@dataclass(frozen=True)
class VocoCrops:
    """Base boxes (grid*grid, 4), random boxes (n_random, 4), labels (n_random, grid*grid)."""

    base_boxes: np.ndarray
    random_boxes: np.ndarray
    labels: np.ndarray


def base_grid(image_shape: tuple[int, int], grid: int, crop_size: int | None = None) -> np.ndarray:
    """The grid*grid base boxes, row-major, tiling a square centred in the image.

    Raises:
        ValueError: the grid does not fit in the image.
    """
    height, width = image_shape
    if grid < 1:
        raise ValueError(f"grid must be >= 1, not {grid}")
    size = crop_size if crop_size is not None else min(height, width) // grid
    if size < 1 or grid * size > min(height, width):
        raise ValueError(
            f"a {grid}x{grid} grid of {size}-pixel crops does not fit in a {height}x{width} image"
        )
    top, left = (height - grid * size) // 2, (width - grid * size) // 2
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    y0, x0 = top + rows * size, left + cols * size
    return np.stack([y0, x0, y0 + size, x0 + size], axis=1).astype(np.int64)


def overlap_labels(
    random_boxes: np.ndarray, base_boxes: np.ndarray, label: LabelMode = "area"
) -> np.ndarray:
    """(n_random, n_bases) overlap of each random box with each base box.

    "area": intersection / random-crop area (VoCo's code; rows sum to 1 when the random crop
    lies inside the grid). "iou": intersection over union (the 2D-VoCo paper's wording).
    """
    if label not in ("area", "iou"):
        raise ValueError(f"label must be 'area' or 'iou', not {label!r}")
    r = random_boxes[:, None, :].astype(np.float64)
    b = base_boxes[None, :, :].astype(np.float64)
    inter_h = np.clip(np.minimum(r[..., 2], b[..., 2]) - np.maximum(r[..., 0], b[..., 0]), 0, None)
    inter_w = np.clip(np.minimum(r[..., 3], b[..., 3]) - np.maximum(r[..., 1], b[..., 1]), 0, None)
    intersection = inter_h * inter_w
    area_r = (r[..., 2] - r[..., 0]) * (r[..., 3] - r[..., 1])
    if label == "area":
        return intersection / area_r
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    return intersection / (area_r + area_b - intersection)


def sample_voco_crops(
    image_shape: tuple[int, int],
    grid: int,
    n_random: int,
    rng: np.random.Generator,
    label: LabelMode = "area",
    crop_size: int | None = None,
) -> VocoCrops:
    """Base grid, `n_random` random crops of the base size uniformly placed inside the grid's
    region (integer pixel offsets), and their position labels."""
    base_boxes = base_grid(image_shape, grid, crop_size)
    size = int(base_boxes[0, 2] - base_boxes[0, 0])
    top, left = int(base_boxes[0, 0]), int(base_boxes[0, 1])
    span = grid * size - size  # the last valid offset inside the region
    y0 = top + rng.integers(0, span + 1, size=n_random)
    x0 = left + rng.integers(0, span + 1, size=n_random)
    random_boxes = np.stack([y0, x0, y0 + size, x0 + size], axis=1).astype(np.int64)
    return VocoCrops(base_boxes, random_boxes, overlap_labels(random_boxes, base_boxes, label))


def cut_crops(images: torch.Tensor, boxes: np.ndarray) -> torch.Tensor:
    """Cut equal-size boxes from a stack of images.

    images: (..., H, W), e.g. (slices, channels, H, W); boxes: (n, 4) of one size.
    Returns (n, ..., h, w).
    """
    heights = boxes[:, 2] - boxes[:, 0]
    widths = boxes[:, 3] - boxes[:, 1]
    if len(boxes) == 0 or len(set(heights)) != 1 or len(set(widths)) != 1:
        raise ValueError("cut_crops needs at least one box, all of the same size")
    return torch.stack([images[..., y0:y1, x0:x1] for y0, x0, y1, x1 in boxes.tolist()])
