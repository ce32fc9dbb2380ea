"""Figures the notebooks show: what a person would rather look at than read."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def first_channel(volume: np.ndarray) -> np.ndarray:
    """(slices, H, W) or (slices, C, H, W) uint8 -> (slices, H, W): the first window."""
    return volume[:, 0] if volume.ndim == 4 else volume


def volume_montage(
    volumes: Mapping[str, np.ndarray],
    axial_fractions: Sequence[float] = (0.25, 0.5, 0.75),
    coronal_aspects: Mapping[str, float] | None = None,
) -> Figure:
    """One row per volume: axial slices at the given fractions of the z range, then the
    coronal slice through the middle (superior at the top).

    `coronal_aspects[name]` is the height/width of one coronal pixel (mm per slice over mm per
    column), so the coronal view is not squashed when 300 slices were resampled to 32.
    """
    if not volumes:
        raise ValueError("no volumes to show")
    n_cols = len(axial_fractions) + 1
    fig, axes = plt.subplots(
        len(volumes), n_cols, figsize=(2.6 * n_cols, 2.6 * len(volumes)), squeeze=False
    )
    for row, (name, volume) in enumerate(volumes.items()):
        stack = first_channel(np.asarray(volume))
        n_slices, height, _ = stack.shape
        for col, fraction in enumerate(axial_fractions):
            index = min(n_slices - 1, round(fraction * (n_slices - 1)))
            axes[row, col].imshow(stack[index], cmap="gray", vmin=0, vmax=255)
            axes[row, col].set_title(f"{name} z={index}/{n_slices}", fontsize=8)
        coronal = stack[::-1, height // 2, :]  # ascending z: flip so superior is up
        aspect = (coronal_aspects or {}).get(name, 1.0)
        axes[row, -1].imshow(coronal, cmap="gray", vmin=0, vmax=255, aspect=aspect)
        axes[row, -1].set_title(f"{name} coronal", fontsize=8)
        for ax in axes[row]:
            ax.set_axis_off()
    fig.tight_layout()
    return fig
