"""Backbones (timm, offline), the VoCo projection head, the crop encoder and the EMA
student-teacher pair used by 2D-VoCo pretraining.

Nothing here reaches for the network: ImageNet weights come from a local file or not at all,
and every checkpoint is read with `torch.load(..., weights_only=True)` so that a file from a
shared Kaggle dataset can never run code.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import Tensor, nn

from kaggle_utils.common.backbone import feature_dim

SliceMode = Literal["average", "per_slice"]
ProjectorInput = Literal["pooled", "flatten"]


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
