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
ProjectorNorm = Literal["features", "crops"]
DropoutAt = Literal["slice", "mean"]
TeacherHead = Literal["trained", "ema"]


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
    normalises with the current batch. Input (N, in_dim) or grouped (B, M, in_dim): the M
    crops of each of B volumes. `norm` says over what each hidden value is normalised:
    "features" (each feature over all N or B x M rows; needs more than one row) or "crops"
    (what the official 2D-VoCo code does: `nn.BatchNorm1d` applied to its [B, crops, D]
    tensor takes the crop axis for channels, so each crop position is normalised over the
    batch and the features; a 2-D input counts as one volume's crops).
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int = 2048,
        out_dim: int = 2048,
        norm: ProjectorNorm = "features",
    ) -> None:
        super().__init__()
        if norm not in ("features", "crops"):
            raise ValueError(f"norm must be 'features' or 'crops', not {norm!r}")
        self.norm: ProjectorNorm = norm
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
        # x: (N, in_dim) -> (N, out_dim); (B, M, in_dim) -> (B, M, out_dim)
        grouped = x.dim() == 3
        if self.norm == "features":
            return (
                self.layers(x.flatten(0, 1)).view(*x.shape[:2], -1) if grouped else self.layers(x)
            )
        # nn.BatchNorm1d on (B, M, hidden) takes axis 1, the crops, for its channels
        out = self.layers(x if grouped else x[None])
        return out if grouped else out[0]


class CropEncoder(nn.Module):
    """Backbone + projector for stacks of crops.

    forward((B, M, S, C, h, w)), the M crops of S slices of each of B volumes, ->
    "average": (B, M, D), the backbone features averaged over each crop's S slices before
    projection (the official 2D-VoCo code); "per_slice": (B, M, S, D), one projection per
    slice. An ungrouped (N, S, C, h, w) stack counts as one volume's crops and gives (N, D),
    or (N * S, D) per slice.

    `feature_dropout` drops backbone features in training mode (the student's, in the
    official code: p = 0.2), `feature_dropout_at`: "slice" (each slice's features before the
    mean over slices, the official code: the mean of S slices then carries about
    sqrt(p / (1 - p) / S) relative noise, 0.09 for p = 0.2 and 32 slices) or "mean" (after
    it: sqrt(p / (1 - p)) = 0.5, this project's first form).

    `projector_input`: "pooled", the backbone's globally pooled features (what fine-tuning
    uses); "flatten", its final feature map flattened (`forward_features`, C x h x w values:
    the official 2D-VoCo code), which needs `crop_shape` (channels, height, width) to size
    the projector. `projector_norm`: see `ProjectionHead`. Either way `self.backbone` is the
    same timm model, so its state dict (what fine-tuning loads) does not depend on them.
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
        feature_dropout_at: DropoutAt = "slice",
        projector_norm: ProjectorNorm = "features",
    ) -> None:
        super().__init__()
        if slice_mode not in ("average", "per_slice"):
            raise ValueError(f"slice_mode must be 'average' or 'per_slice', not {slice_mode!r}")
        if not 0.0 <= feature_dropout < 1.0:
            raise ValueError(f"feature_dropout must be in [0, 1), not {feature_dropout}")
        if feature_dropout_at not in ("slice", "mean"):
            raise ValueError(
                f"feature_dropout_at must be 'slice' or 'mean', not {feature_dropout_at!r}"
            )
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
        self.projector = ProjectionHead(in_dim, hidden_dim, out_dim, projector_norm)
        self.slice_mode: SliceMode = slice_mode
        self.projector_input: ProjectorInput = projector_input
        self.feature_dropout_at: DropoutAt = feature_dropout_at

    def backbone_features(self, images: Tensor) -> Tensor:
        """(M, C, h, w) -> (M, F): what the projector gets (see `projector_input`)."""
        if self.projector_input == "flatten":
            return self.backbone.forward_features(images).flatten(1)  # type: ignore[operator]
        return self.backbone(images)

    def crop_features(self, crops: Tensor) -> Tensor:
        """(B, M, S, C, h, w) -> the projector's input: (B, M, F) averaged over slices, or
        (B, M * S, F) per slice; dropout applied where `feature_dropout_at` says."""
        b, m, s = crops.shape[:3]
        features = self.backbone_features(crops.flatten(0, 2))  # (B * M * S, F)
        if self.feature_dropout_at == "slice":
            features = self.feature_dropout(features)
        if self.slice_mode == "average":
            features = features.view(b, m, s, -1).mean(dim=2)
        else:
            features = features.view(b, m * s, -1)
        if self.feature_dropout_at == "mean":
            features = self.feature_dropout(features)
        return features

    def project(self, features: Tensor, n_slices: int) -> Tensor:
        """`crop_features`' output -> (B, M, D), or (B, M, S, D) per slice."""
        out = self.projector(features)
        if self.slice_mode == "per_slice":
            out = out.view(out.shape[0], -1, n_slices, out.shape[-1])
        return out

    def forward(self, crops: Tensor) -> Tensor:
        grouped = crops.dim() == 6
        stack = crops if grouped else crops[None]
        out = self.project(self.crop_features(stack), stack.shape[2])
        if grouped:
            return out
        return out[0] if self.slice_mode == "average" else out[0].flatten(0, 1)


class StudentTeacher(nn.Module):
    """A student and its teacher. The teacher's backbone is an EMA of the student's
    (parameters averaged, buffers copied) and never gets a gradient; it never drops features,
    so that with the student's dropout the two differ from step 1 (as in the official code;
    without it the teacher is only a lagged copy and the inter loss starts at exactly 0).

    `teacher_head`: "trained" (the official 2D-VoCo code: the teacher's projector is a head of
    its own, started as a copy of the student's and trained by gradient, through the intra
    loss, with the student; `trainable_parameters` includes it) or "ema" (the whole teacher,
    projector too, an EMA of the student: VoCo's 3D form, and this project's first).
    """

    def __init__(self, student: CropEncoder, teacher_head: TeacherHead = "trained") -> None:
        super().__init__()
        if teacher_head not in ("trained", "ema"):
            raise ValueError(f"teacher_head must be 'trained' or 'ema', not {teacher_head!r}")
        self.student = student
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.teacher.feature_dropout.p = 0.0
        self.teacher_head: TeacherHead = teacher_head
        if teacher_head == "trained":
            self.teacher.projector.requires_grad_(True)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything the optimizer updates."""
        named = [(f"student.{n}", p) for n, p in self.student.named_parameters()]
        if self.teacher_head == "trained":
            named += [
                (f"teacher.projector.{n}", p) for n, p in self.teacher.projector.named_parameters()
            ]
        return named

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """teacher = momentum * teacher + (1 - momentum) * student (its backbone only with a
        trained teacher head); buffers copied."""
        if self.teacher_head == "trained":
            update_momentum(self.student.backbone, self.teacher.backbone, momentum)
        else:
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
