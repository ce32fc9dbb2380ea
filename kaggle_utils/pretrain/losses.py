"""2D-VoCo losses: intra (position prediction), inter (cross-volume consistency) and
regularisation (base discrepancy), each in the paper's form and in VoCo's public code's form.

Shapes: B volumes (or slices, in per-slice mode), R random crops and K = grid*grid base crops
each, D-dimensional projections. Similarities are cosines clamped to [0, 1] (VoCo's code applies
a ReLU: a negative cosine means "no overlap"), so every distance d = |a - b| lies in [0, 1] and
every `-log(1 - d + eps)` is finite, including for identical crops, zero vectors and cosines of
+-1.

References: VoCo (Wu et al., CVPR 2024) Eq. 1-5 and its code (Luffy03/VoCo,
`models/voco_head.py`: `ce_loss`, `regularization_loss`); VoCo v2's code
(Luffy03/Large-Scale-Medical, `Self-supervised/models/voco_head.py`: `VoCoHead.inter_volume`);
2D-VoCo (Chiu & Chen, 2026) Eq. 1-3 and its code (tkz05/2D-VoCo-CT-Classifier,
`VoCo/models/voco_head.py`: `VoCoHeadV2`, which `VoCo/voco_train.py` trains).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IntraForm = Literal["voco_code", "paper"]
InterForm = Literal["voco_code", "paper"]
RegForm = Literal["voco_code", "paper"]
LOG_EPS = 1e-6  # as in VoCo's code: -log(1 - d + 1e-6)
NORM_EPS = 1e-8


def similarity(queries: Tensor, keys: Tensor) -> Tensor:
    """Cosine similarities clamped to [0, 1]: (B, R, D) x (B, K, D) -> (B, R, K).

    A zero vector has similarity 0 with everything (no NaN).
    """
    q = F.normalize(queries, dim=-1, eps=NORM_EPS)
    k = F.normalize(keys, dim=-1, eps=NORM_EPS)
    return torch.einsum("brd,bkd->brk", q, k).clamp(0.0, 1.0)


def neg_log_one_minus(distance: Tensor) -> Tensor:
    """-log(1 - d + eps) for d in [0, 1]: 0 at d = 0, -log(eps) ~ 13.8 at d = 1."""
    return -torch.log(1.0 - distance.clamp(0.0, 1.0) + LOG_EPS)


def intra_loss(logits: Tensor, labels: Tensor, form: IntraForm = "voco_code") -> Tensor:
    """Position prediction: drive each similarity l_i towards the overlap label y_i.

    logits, labels: (B, R, K). "paper" (VoCo Eq. 3, 2D-VoCo Eq. 1): the mean over all bases of
    -log(1 - |y_i - l_i|). "voco_code": an overlap-weighted mean of the same term over
    overlapping bases plus the mean of l_i^2 over non-overlapping ones, per volume.
    Returns the mean over the B volumes.
    """
    if logits.shape != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ")
    per_base = neg_log_one_minus((labels - logits).abs())
    if form == "paper":
        return per_base.mean()
    if form != "voco_code":
        raise ValueError(f"intra form must be 'voco_code' or 'paper', not {form!r}")
    dims = (1, 2)
    positive = (labels * per_base).sum(dims) / (labels.sum(dims) + LOG_EPS)
    empty = (labels == 0).to(logits.dtype)
    negative = (empty * logits.square()).sum(dims) / (empty.sum(dims) + LOG_EPS)
    return (positive + negative).mean()


def inter_loss(
    student_logits: Tensor, teacher_logits: Tensor, form: InterForm = "voco_code"
) -> Tensor:
    """Cross-volume consistency: the student's similarities between random crops of volume A
    and bases of volume B follow the teacher's, detached. Both (B, R, K).

    "paper" (2D-VoCo Eq. 2): the mean over all pairs of -log(1 - |t - s|). "voco_code" (the
    official 2D-VoCo code's `inter_volume`, as VoCo v2's): the intra loss of the code form
    with the teacher's similarities as the labels, i.e. -log(1 - |t - s|) weighted by t over
    the pairs the teacher sees overlapping (t > 0), plus the mean of s^2 where t = 0. (VoCo v2's
    `ce_loss` puts -log(1 - s) there instead; the 2D-VoCo code and this project's intra form
    use s^2.) Returns the mean over the B volumes.
    """
    target = teacher_logits.detach()
    if form == "paper":
        return neg_log_one_minus((target - student_logits).abs()).mean()
    if form != "voco_code":
        raise ValueError(f"inter form must be 'voco_code' or 'paper', not {form!r}")
    return intra_loss(student_logits, target, "voco_code")


def regularization_loss(bases: Tensor, form: RegForm = "paper") -> Tensor:
    """Base discrepancy: push the K base projections of each volume apart.

    bases: (B, K, D). "paper" (VoCo Eq. 5, 2D-VoCo Eq. 3): mean over pairs i < j of
    |cos(b_i, b_j)|. "voco_code": mean over pairs of relu(cos(b_i, sg(b_j)))^2, the second
    base detached. Returns the mean over the B volumes.
    """
    n_bases = bases.shape[1]
    if n_bases < 2:
        return bases.sum() * 0.0
    normed = F.normalize(bases, dim=-1, eps=NORM_EPS)
    pairs = torch.triu_indices(n_bases, n_bases, offset=1, device=bases.device)
    if form == "paper":
        cosines = torch.einsum("bkd,bjd->bkj", normed, normed)
        return cosines[:, pairs[0], pairs[1]].abs().mean()
    if form != "voco_code":
        raise ValueError(f"reg form must be 'voco_code' or 'paper', not {form!r}")
    cosines = torch.einsum("bkd,bjd->bkj", normed, normed.detach())
    return F.relu(cosines[:, pairs[0], pairs[1]]).square().mean()


@dataclass
class LossParts:
    """The total and its parts (scalars, the total with a graph)."""

    total: Tensor
    intra: Tensor
    inter: Tensor
    reg: Tensor

    def as_floats(self) -> dict[str, float]:
        return {k: float(getattr(self, k).detach()) for k in ("total", "intra", "inter", "reg")}


class VoCoLoss(nn.Module):
    """total = w_intra * intra + w_inter * inter + w_reg * reg (defaults 1, 1, 1).

    Intra: student random crops against teacher bases of the same volume. Inter: random crops
    of volume b against the bases of volume b + `pair_shift` (mod B), student similarities
    against the teacher's; skipped (0) when B <= pair_shift. Reg: the student's bases.

    Args:
        intra_form: "voco_code" (default, what VoCo's code trains) or "paper".
        reg_form: "paper" (default) or "voco_code".
        inter_form: "voco_code" (default, what the official 2D-VoCo code trains) or "paper".

    Raises:
        ValueError: a negative weight or an unknown form.

    >>> loss = VoCoLoss()
    >>> s_r, s_b, t_r, t_b = (torch.randn(2, n, 8) for n in (2, 9, 2, 9))
    >>> parts = loss(s_r, s_b, t_r, t_b, torch.rand(2, 2, 9))
    >>> bool(torch.isfinite(parts.total))
    True
    """

    def __init__(
        self,
        intra_weight: float = 1.0,
        inter_weight: float = 1.0,
        reg_weight: float = 1.0,
        intra_form: IntraForm = "voco_code",
        reg_form: RegForm = "paper",
        inter_form: InterForm = "voco_code",
    ) -> None:
        super().__init__()
        if min(intra_weight, inter_weight, reg_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        forms = (intra_form, inter_form, reg_form)
        if any(form not in ("voco_code", "paper") for form in forms):
            raise ValueError(
                f"unknown loss form: intra {intra_form!r}, inter {inter_form!r}, reg {reg_form!r}"
            )
        self.weights = (intra_weight, inter_weight, reg_weight)
        self.intra_form: IntraForm = intra_form
        self.inter_form: InterForm = inter_form
        self.reg_form: RegForm = reg_form

    def forward(
        self,
        student_random: Tensor,
        student_bases: Tensor,
        teacher_random: Tensor,
        teacher_bases: Tensor,
        labels: Tensor,
        pair_shift: int = 1,
    ) -> LossParts:
        # student_random, teacher_random: (B, R, D); *_bases: (B, K, D); labels: (B, R, K)
        # The intra loss reaches the teacher's bases: a trained teacher head (the official
        # code's) learns there; an EMA teacher was computed without gradient. The inter loss's
        # teacher similarities are targets, never trained (the official `pred1.detach()`).
        intra = intra_loss(similarity(student_random, teacher_bases), labels, self.intra_form)
        if student_random.shape[0] > pair_shift:
            teacher_random, teacher_bases = teacher_random.detach(), teacher_bases.detach()
            other_student = torch.roll(student_bases, shifts=-pair_shift, dims=0)
            other_teacher = torch.roll(teacher_bases, shifts=-pair_shift, dims=0)
            inter = inter_loss(
                similarity(student_random, other_student),
                similarity(teacher_random, other_teacher),
                self.inter_form,
            )
        else:
            inter = student_random.sum() * 0.0
        reg = regularization_loss(student_bases, self.reg_form)
        w_intra, w_inter, w_reg = self.weights
        total = w_intra * intra + w_inter * inter + w_reg * reg
        return LossParts(total=total, intra=intra, inter=inter, reg=reg)
