"""The timm backbone every stage builds (offline: ImageNet weights from a local file or
none), reading a weights file safely, and the backbone's input normalisation.

Every checkpoint is read with `torch.load(..., weights_only=True)` so that a file from a
shared Kaggle dataset can never run code.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import timm
import torch
from torch import Tensor, nn

from kaggle_utils.common import paths


def build_backbone(
    name: str = "efficientnetv2_rw_t",
    in_chans: int = 1,
    weights_file: str | Path | None = None,
    **timm_kwargs: object,
) -> nn.Module:
    """A timm model that maps (N, in_chans, H, W) to pooled features (N, feature_dim).

    `weights_file`: ImageNet weights as a local file (e.g. from a Kaggle dataset); timm adapts
    the first convolution to `in_chans`. Without it the weights are random. Never downloads.

    Raises:
        FileNotFoundError: `weights_file` is given but does not exist (timm would otherwise
            try to download the weights).
    """
    if weights_file:
        found = [p for p in paths.find_inputs(weights_file) if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"weights_file {weights_file} not found (nothing is downloaded)"
            )
        path = found[0]
        return timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay={"file": str(path)},
            num_classes=0,
            in_chans=in_chans,
            **timm_kwargs,
        )
    return timm.create_model(
        name, pretrained=False, num_classes=0, in_chans=in_chans, **timm_kwargs
    )


def feature_dim(backbone: nn.Module) -> int:
    """Width of the pooled features `build_backbone`'s model returns. Not always timm's
    `num_features`: MobileNetV3 and others add a head convolution after pooling, whose width
    timm names `head_hidden_size` (576 vs 1024 for mobilenetv3_small_100)."""
    width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
    return int(width)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict saved by this project (or any plain tensor dict), loaded safely."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def input_normalisation(backbone: nn.Module, device: torch.device) -> tuple[Tensor, Tensor]:
    """The backbone's own mean/std (timm's pretrained_cfg), averaged over RGB for grey CT."""
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    mean = float(np.mean(cfg.get("mean", (0.5,))))
    std = float(np.mean(cfg.get("std", (0.5,))))
    return torch.tensor(mean, device=device), torch.tensor(std, device=device)
