"""Backbones (timm, offline), the VoCo projection head, the crop encoder and the EMA
student-teacher pair used by 2D-VoCo pretraining.

Nothing here reaches for the network: ImageNet weights come from a local file or not at all,
and every checkpoint is read with `torch.load(..., weights_only=True)` so that a file from a
shared Kaggle dataset can never run code.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Literal

import numpy as np
import timm
import torch
from torch import Tensor, nn

from kaggle_utils import paths

SliceMode = Literal["average", "per_slice"]
ProjectorInput = Literal["pooled", "flatten"]


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


def flattened_feature_dim(backbone: nn.Module, crop_shape: tuple[int, int, int]) -> int:
    """Length of the backbone's final feature map, flattened, for one crop of `crop_shape`
    (channels, height, width). It depends on the crop size and the backbone's stride, so it
    comes from a dummy forward, in eval mode so that it leaves BatchNorm's running statistics
    as they were (and a 1 x 1 map of one image is legal): 1024 x 2 x 2 = 4096 for
    efficientnetv2_rw_t on 64 x 64, as the official 2D-VoCo code's projector input."""
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            feature_map = backbone.forward_features(torch.zeros(1, *crop_shape))  # type: ignore[operator]
    finally:
        backbone.train(was_training)
    return int(feature_map[0].numel())


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """A state dict saved by this project (or any plain tensor dict), loaded safely."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


class ProjectionHead(nn.Module):
    """VoCo's projector: Linear-BN-ReLU, Linear-BN-ReLU, Linear (2048-2048-2048 by default).

    BatchNorm without affine parameters or running statistics, as in VoCo's code: it always
    normalises with the current batch, so it needs more than one row per call.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, in_dim) -> (N, out_dim)
        return self.layers(x)


class CropEncoder(nn.Module):
    """Backbone + projector for stacks of crops.

    forward((N, S, C, h, w)) -> "average": (N, D), the backbone features averaged over the S
    slices of each crop before projection (the official 2D-VoCo code); "per_slice":
    (N * S, D), one projection per slice. `feature_dropout` drops backbone features before the
    projector in training mode (the student's, in the official code: p = 0.2).

    `projector_input`: "pooled", the backbone's globally pooled features (what fine-tuning
    uses); "flatten", its final feature map flattened (`forward_features`, C x h x w values:
    the official 2D-VoCo code), which needs `crop_shape` (channels, height, width) to size
    the projector. Either way `self.backbone` is the same timm model, so its state dict (what
    fine-tuning loads) does not depend on it.
    """

    def __init__(
        self,
        backbone: nn.Module,
        hidden_dim: int = 2048,
        out_dim: int = 2048,
        slice_mode: SliceMode = "average",
        feature_dropout: float = 0.0,
        projector_input: ProjectorInput = "pooled",
        crop_shape: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        if slice_mode not in ("average", "per_slice"):
            raise ValueError(f"slice_mode must be 'average' or 'per_slice', not {slice_mode!r}")
        if not 0.0 <= feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must be in [0, 1), not {feature_dropout}")
        if projector_input == "pooled":
            in_dim = feature_dim(backbone)
        elif projector_input == "flatten":
            if crop_shape is None:
                raise ValueError("projector_input='flatten' needs crop_shape (channels, h, w)")
            in_dim = flattened_feature_dim(backbone, crop_shape)
        else:
            raise ValueError(
                f"projector_input must be 'pooled' or 'flatten', not {projector_input!r}"
            )
        self.backbone = backbone
        self.feature_dropout = nn.Dropout(feature_dropout)
        self.projector = ProjectionHead(in_dim, hidden_dim, out_dim)
        self.slice_mode: SliceMode = slice_mode
        self.projector_input: ProjectorInput = projector_input

    def backbone_features(self, images: Tensor) -> Tensor:
        """(M, C, h, w) -> (M, F): what the projector gets (see `projector_input`)."""
        if self.projector_input == "flatten":
            return self.backbone.forward_features(images).flatten(1)  # type: ignore[operator]
        return self.backbone(images)

    def forward(self, crops: Tensor) -> Tensor:
        # crops: (N, S, C, h, w)
        n, s = crops.shape[:2]
        features = self.backbone_features(crops.flatten(0, 1))  # (N * S, F)
        if self.slice_mode == "average":
            features = features.view(n, s, -1).mean(dim=1)  # (N, F)
        return self.projector(self.feature_dropout(features))


class StudentTeacher(nn.Module):
    """A student and its EMA teacher: the whole encoder (backbone and projector), parameters
    averaged, buffers (BatchNorm statistics) copied; the teacher never gets a gradient and
    never drops features, so that with the student's dropout the two differ from step 1 (as
    in the official code; without it the teacher is only a lagged copy of the student and the
    inter loss starts at exactly 0)."""

    def __init__(self, student: CropEncoder) -> None:
        super().__init__()
        self.student = student
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.teacher.feature_dropout.p = 0.0

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student; buffers copied."""
        update_momentum(self.student, self.teacher, momentum)


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, momentum: float) -> None:
    """EMA of parameters (in place) and a copy of buffers, module by module."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], not {momentum}")
    for param, param_ema in zip(model.parameters(), model_ema.parameters(), strict=True):
        param_ema.mul_(momentum).add_(param.detach(), alpha=1.0 - momentum)
    for buffer, buffer_ema in zip(model.buffers(), model_ema.buffers(), strict=True):
        buffer_ema.copy_(buffer)


def cosine_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """`start` at step 0, `end` at `max_steps` (and after), cosine in between."""
    if max_steps <= 0 or step >= max_steps:
        return end
    return end - (end - start) * (math.cos(math.pi * step / max_steps) + 1.0) / 2.0


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_factor: float = 0.0) -> float:
    """Learning-rate factor: linear warmup from ~0 to 1, then cosine down to `min_factor`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    return cosine_schedule(step - warmup_steps, decay_steps, 1.0, min_factor)


def input_normalisation(backbone: nn.Module, device: torch.device) -> tuple[Tensor, Tensor]:
    """The backbone's own mean/std (timm's pretrained_cfg), averaged over RGB for grey CT."""
    cfg = getattr(backbone, "pretrained_cfg", {}) or {}
    mean = float(np.mean(cfg.get("mean", (0.5,))))
    std = float(np.mean(cfg.get("std", (0.5,))))
    return torch.tensor(mean, device=device), torch.tensor(std, device=device)
