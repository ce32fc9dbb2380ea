"""Volume operations shared by every CT source (DICOM series, NIfTI): windowing to uint8,
in-plane body crop, resampling to a fixed shape.

Volumes are (slices, H, W) float32 Hounsfield units, slices in ascending z. Windowed volumes are
uint8: (slices, H, W) for one window, (slices, channels, H, W) for several, so a 2D CNN can
take each slice as one multi-channel image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

# (level, width) in HU. Soft tissue is the DICOMs' own window in this data set.
NAMED_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (50.0, 400.0),
    "liver": (80.0, 150.0),
    "bone": (400.0, 1800.0),
    "wide": (40.0, 1000.0),
}
DEFAULT_WINDOWS: tuple[tuple[float, float], ...] = (NAMED_WINDOWS["soft_tissue"],)
AIR_HU = -1024.0


def parse_windows(
    windows: Sequence[str | Sequence[float]] | None,
) -> tuple[tuple[float, float], ...]:
    """Windows given as names ("soft_tissue") or [level, width] pairs, as (level, width) tuples.

    Raises:
        ValueError: an unknown name, a pair that is not two numbers, or a width <= 0.
    """
    if not windows:
        return DEFAULT_WINDOWS
    parsed: list[tuple[float, float]] = []
    for window in windows:
        if isinstance(window, str):
            if window not in NAMED_WINDOWS:
                known = ", ".join(NAMED_WINDOWS)
                raise ValueError(f"unknown window {window!r}; use one of {known} or [level, width]")
            parsed.append(NAMED_WINDOWS[window])
            continue
        values = tuple(float(v) for v in window)
        if len(values) != 2 or values[1] <= 0:
            raise ValueError(f"a window is [level, width] with width > 0, not {list(window)!r}")
        parsed.append((values[0], values[1]))
    return tuple(parsed)


def apply_window(hu: np.ndarray, level: float = 50.0, width: float = 400.0) -> np.ndarray:
    """HU to uint8: level - width/2 maps to 0, level + width/2 to 255, linear in between."""
    low = level - width / 2.0
    scaled = (hu.astype(np.float32, copy=False) - np.float32(low)) * np.float32(255.0 / width)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.rint(scaled, out=scaled).astype(np.uint8)


def window_volume(
    hu: np.ndarray, windows: Sequence[tuple[float, float]] = DEFAULT_WINDOWS
) -> np.ndarray:
    """(slices, H, W) HU to uint8: (slices, H, W) for one window, else (slices, C, H, W)."""
    if len(windows) == 1:
        return apply_window(hu, *windows[0])
    return np.stack([apply_window(hu, *window) for window in windows], axis=1)


def body_bbox(
    hu: np.ndarray, threshold: float = -500.0, margin: int = 4
) -> tuple[int, int, int, int]:
    """In-plane box (y0, y1, x0, x1), end exclusive, around the body in any slice.

    The body is the largest connected component of the slices' union of voxels above
    `threshold` HU, after an opening that cuts thin links to the table and to noise. A volume
    with no such voxel keeps its full extent.
    """
    height, width = hu.shape[-2:]
    foreground = (hu > threshold).any(axis=0)
    radius = max(1, min(height, width) // 100)
    structure = ndimage.generate_binary_structure(2, 1)
    opened = ndimage.binary_opening(foreground, structure, iterations=radius)
    labels, n_components = ndimage.label(opened if opened.any() else foreground)
    if n_components == 0:
        return 0, height, 0, width
    sizes = np.bincount(labels.ravel())[1:]
    ys, xs = np.nonzero(labels == 1 + int(np.argmax(sizes)))
    return (
        max(0, int(ys.min()) - margin),
        min(height, int(ys.max()) + 1 + margin),
        max(0, int(xs.min()) - margin),
        min(width, int(xs.max()) + 1 + margin),
    )


def crop_to_box(
    hu: np.ndarray,
    box: tuple[int, int, int, int],
    square: bool = True,
    fill: float = AIR_HU,
) -> np.ndarray:
    """Cut `box` from every slice; with `square`, grow the short side around its centre first,
    padding with `fill` (air) where the square leaves the image, so anatomy keeps its aspect
    ratio when the crop is resized. Returns a view of `hu` when no padding is needed."""
    y0, y1, x0, x1 = square_box(box) if square else box
    height, width = hu.shape[-2:]
    if y0 >= 0 and x0 >= 0 and y1 <= height and x1 <= width:
        return hu[..., y0:y1, x0:x1]  # a view: copying a whole series costs real time
    out = np.full((*hu.shape[:-2], y1 - y0, x1 - x0), fill, dtype=hu.dtype)
    src_y0, src_y1 = max(y0, 0), min(y1, height)
    src_x0, src_x1 = max(x0, 0), min(x1, width)
    out[..., src_y0 - y0 : src_y1 - y0, src_x0 - x0 : src_x1 - x0] = hu[
        ..., src_y0:src_y1, src_x0:src_x1
    ]
    return out


def resample_volume(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize a (slices, H, W) volume to `shape`: area averaging along axes that shrink (no
    aliasing when 600 slices become 32), trilinear interpolation along axes that grow.

    The reference for `crop_and_resample`, which notebook 01 uses on whole series."""
    import torch

    target = _check_shape(shape)
    if volume.ndim != 3:
        raise ValueError(f"expected a (slices, H, W) volume, got shape {volume.shape}")
    if tuple(volume.shape) == target:
        return volume.astype(np.float32, copy=True)
    tensor = torch.from_numpy(volume.astype(np.float32, copy=False))[None, None]
    return _resample_tensor(tensor, target)[0, 0].numpy()


def check_resample_device(device: str) -> None:
    """Fail early, with what to do, when `device` cannot resample here.

    Raises:
        ValueError: not "cpu" or a CUDA device, or CUDA asked for on a machine without it (or
            with a GPU this torch has no kernels for).
    """
    import torch

    from kaggle_utils.common.runtime import pick_device

    if device == "cpu":
        return
    if not device.startswith("cuda"):
        raise ValueError(f"resample_device must be 'cpu' or 'cuda[:N]', not {device!r}")
    if not torch.cuda.is_available():
        raise ValueError(
            f"resample_device={device!r} but torch sees no CUDA GPU here: use 'cpu' (on Kaggle, "
            "turn a GPU accelerator on in the notebook's settings)"
        )
    pick_device(device)  # raises where this torch has no kernels for the GPU


def square_box(box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """`box` grown on its short side around its centre to a square (it may leave the image)."""
    y0, y1, x0, x1 = box
    side = max(y1 - y0, x1 - x0)
    y0, x0 = (y0 + y1 - side) // 2, (x0 + x1 - side) // 2
    return y0, y0 + side, x0, x0 + side


def crop_and_resample(
    hu: np.ndarray,
    box: tuple[int, int, int, int],
    shapes: Sequence[Sequence[int]],
    square: bool = True,
    fill: float = AIR_HU,
    device: str = "cpu",
) -> dict[tuple[int, int, int], np.ndarray]:
    """`resample_volume(crop_to_box(hu, box, square, fill), shape)` for every shape (that is the
    reference, tested), without copying the whole series into a padded crop first.

    Area averaging and linear interpolation are separable, so the z axis is resampled first on
    the part of the box inside the image (a view: 600 slices become 32 or 96 in one pass), then
    the few slices left are padded with `fill` and resampled in plane. Up to float rounding
    (~1e-3 HU) this is the reference. `device` "cuda" does the same on the GPU, with torch.
    """
    y0, y1, x0, x1 = square_box(box) if square else box
    height, width = hu.shape[-2:]
    inside = (slice(None), slice(max(y0, 0), min(y1, height)), slice(max(x0, 0), min(x1, width)))
    region = hu[inside]
    pad = (max(y0, 0) - y0, y1 - min(y1, height), max(x0, 0) - x0, x1 - min(x1, width))
    if device != "cpu":
        return _crop_and_resample_torch(region, pad, shapes, fill, device)
    by_depth: dict[int, np.ndarray] = {}
    out: dict[tuple[int, int, int], np.ndarray] = {}
    for shape in shapes:
        target = _check_shape(shape)
        if target[0] not in by_depth:
            by_depth[target[0]] = _pad(resample_z(region, target[0]), pad, fill)
        out[target] = resample_volume(by_depth[target[0]], target)
    return out


def resample_z(volume: np.ndarray, depth: int) -> np.ndarray:
    """`volume` (slices, H, W), any strides, resampled along axis 0 to `depth` slices as
    `resample_volume` does it: adaptive average pooling's windows when shrinking, linear
    interpolation (align_corners=False) when growing. One slice at a time, float32 out."""
    n = volume.shape[0]
    out = np.empty((depth, *volume.shape[1:]), dtype=np.float32)
    if n == depth:
        out[...] = volume
    elif n > depth:
        for i in range(depth):
            start, stop = (i * n) // depth, -((-(i + 1) * n) // depth)
            np.add.reduce(volume[start:stop], axis=0, dtype=np.float32, out=out[i])
            out[i] *= np.float32(1.0 / (stop - start))
    else:
        for i in range(depth):
            source = max((i + 0.5) * n / depth - 0.5, 0.0)
            lower = int(source)
            upper, weight = min(lower + 1, n - 1), np.float32(source - lower)
            np.multiply(volume[lower], np.float32(1.0) - weight, out=out[i])
            out[i] += weight * volume[upper]
    return out


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    target = tuple(int(s) for s in shape)
    if len(target) != 3 or min(target) < 1:
        raise ValueError(f"shape must be three positive ints (slices, H, W), not {shape!r}")
    return target  # type: ignore[return-value]


def _pad(volume: np.ndarray, pad: tuple[int, int, int, int], fill: float) -> np.ndarray:
    """`volume` with (top, bottom, left, right) pixels of `fill` around every slice."""
    top, bottom, left, right = pad
    if not any(pad):
        return volume
    depth, height, width = volume.shape
    out = np.full((depth, top + height + bottom, left + width + right), fill, dtype=volume.dtype)
    out[:, top : top + height, left : left + width] = volume
    return out


def _crop_and_resample_torch(
    region: np.ndarray,
    pad: tuple[int, int, int, int],
    shapes: Sequence[Sequence[int]],
    fill: float,
    device: str,
) -> dict[tuple[int, int, int], np.ndarray]:
    """The reference operations (pad, then `resample_volume`'s pooling and interpolation) on a
    torch device: the series goes over once, every shape is made there."""
    import torch
    import torch.nn.functional as F

    top, bottom, left, right = pad
    tensor = torch.from_numpy(np.ascontiguousarray(region, dtype=np.float32)).to(device)
    tensor = F.pad(tensor[None, None], (left, right, top, bottom), value=fill)
    out = {}
    for shape in shapes:
        target = _check_shape(shape)
        out[target] = _resample_tensor(tensor, target)[0, 0].cpu().numpy()
    return out


def _resample_tensor(tensor: Any, target: tuple[int, int, int]) -> Any:
    """(1, 1, slices, H, W) to `target`: area averaging where an axis shrinks, trilinear where
    it grows (`resample_volume`)."""
    import torch.nn.functional as F

    size = tuple(tensor.shape[2:])
    shrunk = tuple(min(s, t) for s, t in zip(size, target, strict=True))
    if shrunk != size:
        tensor = F.adaptive_avg_pool3d(tensor, shrunk)
    if shrunk != target:
        tensor = F.interpolate(tensor, size=target, mode="trilinear", align_corners=False)
    return tensor
