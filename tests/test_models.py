from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch

from kaggle_utils.common.backbone import build_backbone, feature_dim, load_state_dict_file
from kaggle_utils.common.engine import cosine_schedule, warmup_cosine
from kaggle_utils.finetune.model import CNNBiLSTM
from kaggle_utils.pretrain.losses import VoCoLoss
from kaggle_utils.pretrain.model import (
    CropEncoder,
    ProjectionHead,
    StudentTeacher,
    update_momentum,
)


def tiny_encoder(slice_mode: str = "average") -> CropEncoder:
    torch.manual_seed(0)
    return CropEncoder(build_backbone("test_efficientnet", 1), 32, 16, slice_mode)  # type: ignore[arg-type]


def test_build_backbone_never_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    model = build_backbone("test_efficientnet", 1)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, feature_dim(model))


@pytest.mark.parametrize("name", ["test_efficientnet", "mobilenetv3_small_050", "resnet10t"])
def test_feature_dim_is_the_width_of_the_pooled_output(name: str) -> None:
    # mobilenetv3 pools, then widens with a head convolution: num_features would be wrong
    model = build_backbone(name, 1)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, feature_dim(model))
    classifier = CNNBiLSTM(model, ("liver",), hidden_size=4, num_layers=1)
    assert classifier(torch.zeros(1, 3, 1, 32, 32))["liver"].shape == (1, 3)


def test_build_backbone_loads_local_weights_and_adapts_channels(tmp_path: Path) -> None:
    rgb = timm.create_model("test_efficientnet", pretrained=False, num_classes=1000, in_chans=3)
    weights = tmp_path / "imagenet.pth"
    torch.save(rgb.state_dict(), weights)
    same = build_backbone("test_efficientnet", 3, weights)
    torch.testing.assert_close(same.conv_stem.weight, rgb.conv_stem.weight)
    grey = build_backbone("test_efficientnet", 1, weights)
    torch.testing.assert_close(grey.conv_stem.weight, rgb.conv_stem.weight.sum(1, keepdim=True))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        build_backbone("test_efficientnet", 1, tmp_path / "missing.pth")


def test_load_state_dict_file_is_weights_only(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_state_dict_file(tmp_path / "ok.pt")["w"], torch.ones(2))

    class Evil:
        def __reduce__(self) -> tuple:
            return (print, ("this would run code",))

    torch.save({"w": Evil()}, tmp_path / "evil.pt", _use_new_zipfile_serialization=True)
    with pytest.raises(Exception, match=r"(?i)weights_only|unsupported|global"):
        load_state_dict_file(tmp_path / "evil.pt")


@pytest.mark.parametrize(("mode", "rows"), [("average", 5), ("per_slice", 15)])
def test_crop_encoder_shapes(mode: str, rows: int) -> None:
    encoder = tiny_encoder(mode)
    out = encoder(torch.randn(5, 3, 1, 24, 24))  # (N, S, C, h, w)
    assert out.shape == (rows, 16)
    with pytest.raises(ValueError, match="slice_mode"):
        CropEncoder(build_backbone("test_efficientnet", 1), slice_mode="other")  # type: ignore[arg-type]


def test_average_mode_averages_backbone_features_over_slices() -> None:
    encoder = tiny_encoder().eval()
    crops = torch.randn(4, 3, 1, 24, 24)
    with torch.no_grad():
        features = encoder.backbone(crops.flatten(0, 1)).view(4, 3, -1).mean(1)
        torch.testing.assert_close(encoder(crops), encoder.projector(features))


def test_ema_teacher_head_is_an_ema_of_the_whole_student() -> None:
    pair = StudentTeacher(tiny_encoder(), teacher_head="ema")
    assert all(not p.requires_grad for p in pair.teacher.parameters())
    for t, s in zip(
        pair.teacher.state_dict().values(), pair.student.state_dict().values(), strict=True
    ):
        assert torch.equal(t, s)  # starts as a copy
    with torch.no_grad():
        for p in pair.student.parameters():
            p.add_(1.0)
        pair.student.backbone.bn1.running_mean.fill_(3.0)
    before = [p.clone() for p in pair.teacher.parameters()]
    pair.update_teacher(0.9)
    for old, new, s in zip(
        before, pair.teacher.parameters(), pair.student.parameters(), strict=True
    ):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s)
    assert torch.equal(
        pair.teacher.backbone.bn1.running_mean, pair.student.backbone.bn1.running_mean
    )
    # the projector is averaged too
    torch.testing.assert_close(
        pair.teacher.projector.layers[0].weight,
        0.9 * before[-6] + 0.1 * pair.student.projector.layers[0].weight,
    )


def test_trained_teacher_head_gets_gradients_and_only_its_backbone_is_averaged() -> None:
    """The official code: the teacher's backbone is an EMA of the student's and never gets a
    gradient; its projector is a head of its own, trained through the intra loss."""
    pair = StudentTeacher(tiny_encoder(), teacher_head="trained")
    trainable = dict(pair.trainable_parameters())
    assert all(not p.requires_grad for p in pair.teacher.backbone.parameters())
    assert all(p.requires_grad for p in pair.teacher.projector.parameters())
    assert set(trainable) == {f"student.{n}" for n, _ in pair.student.named_parameters()} | {
        f"teacher.projector.{n}" for n, _ in pair.teacher.projector.named_parameters()
    }
    loss_fn = VoCoLoss()
    crops = torch.randn(3, 4, 2, 1, 24, 24)  # (B, R + K, S, C, h, w), R = 1, K = 3
    student_out = pair.student(crops)
    with torch.no_grad():
        features = pair.teacher.crop_features(crops)
    teacher_out = pair.teacher.project(features, 2)
    parts = loss_fn(
        student_out[:, :1], student_out[:, 1:], teacher_out[:, :1], teacher_out[:, 1:],
        torch.rand(3, 1, 3),
    )  # fmt: skip
    parts.intra.backward(retain_graph=True)
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0
        for p in pair.teacher.projector.parameters()
        if p.dim() > 1
    )
    assert all(p.grad is None for p in pair.teacher.backbone.parameters())
    # the inter loss's teacher similarities are targets: no gradient reaches the head there
    pair.teacher.projector.zero_grad(set_to_none=True)
    parts.inter.backward()
    assert all(p.grad is None for p in pair.teacher.projector.parameters())

    projector_before = [p.clone() for p in pair.teacher.projector.parameters()]
    backbone_before = [p.clone() for p in pair.teacher.backbone.parameters()]
    with torch.no_grad():
        for p in pair.student.parameters():
            p.add_(1.0)
    pair.update_teacher(0.9)
    for old, new, s in zip(
        backbone_before, pair.teacher.backbone.parameters(), pair.student.backbone.parameters(),
        strict=True,
    ):  # fmt: skip
        torch.testing.assert_close(new, 0.9 * old + 0.1 * s)
    for old, new in zip(projector_before, pair.teacher.projector.parameters(), strict=True):
        assert torch.equal(old, new)  # never averaged
    with pytest.raises(ValueError, match="teacher_head"):
        StudentTeacher(tiny_encoder(), teacher_head="other")  # type: ignore[arg-type]


class ConstantBackbone(torch.nn.Module):
    """Pooled features of ones for every image, whatever it shows."""

    num_features = 4096

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.ones(images.shape[0], self.num_features)


@pytest.mark.parametrize(("where", "slices"), [("slice", 32), ("mean", 32), ("slice", 8)])
def test_feature_dropout_noise_on_the_slice_mean(where: str, slices: int) -> None:
    """Dropout p on each of S slices before the mean leaves the mean's elements with relative
    standard deviation sqrt(p / (1 - p) / S) (0.09 for p 0.2 and 32 slices: the official
    code); after the mean, sqrt(p / (1 - p)) = 0.5."""
    torch.manual_seed(0)
    p = 0.2
    encoder = CropEncoder(
        ConstantBackbone(),
        8,
        8,
        feature_dropout=p,
        feature_dropout_at=where,  # type: ignore[arg-type]
    ).train()
    features = encoder.crop_features(torch.zeros(2, 3, slices, 1, 4, 4))  # (B, M, F)
    assert features.shape == (2, 3, 4096)
    expected = math.sqrt(p / (1 - p) / (slices if where == "slice" else 1))
    assert features.mean().item() == pytest.approx(1.0, abs=0.02)
    assert features.std().item() == pytest.approx(expected, rel=0.05)
    # reference: the slow form, one slice at a time
    torch.manual_seed(1)
    fast = encoder.crop_features(torch.zeros(1, 1, slices, 1, 4, 4))
    torch.manual_seed(1)
    ones = torch.ones(slices, 4096)
    if where == "slice":
        slow = torch.stack([encoder.feature_dropout(row) for row in ones.split(1)]).mean(0)
    else:
        slow = encoder.feature_dropout(ones.mean(0, keepdim=True))
    torch.testing.assert_close(fast.view(-1), slow.view(-1))
    assert torch.equal(
        encoder.eval().crop_features(torch.zeros(1, 1, slices, 1, 4, 4)), torch.ones(1, 1, 4096)
    )


@pytest.mark.parametrize("norm", ["crops", "features"])
def test_projector_norm_axis_against_a_slow_reference(norm: str) -> None:
    """ "crops": each crop position normalised over the volumes and the hidden features (what
    nn.BatchNorm1d does to the official code's [B, crops, D] tensor); "features": each hidden
    feature over every crop of every volume."""
    torch.manual_seed(0)
    head = ProjectionHead(6, 16, 5, norm)  # type: ignore[arg-type]
    x = torch.randn(3, 4, 6)  # (B, M, F)

    def normalise(h: torch.Tensor) -> torch.Tensor:
        axes = (0, 2) if norm == "crops" else (0, 1)
        mean = h.mean(axes, keepdim=True)
        var = h.var(axes, unbiased=False, keepdim=True)
        return (h - mean) / torch.sqrt(var + 1e-5)

    linear_1, _, _, linear_2, _, _, linear_3 = head.layers
    h = torch.relu(normalise(linear_1(x)))
    h = torch.relu(normalise(linear_2(h)))
    torch.testing.assert_close(head(x), linear_3(h))
    # an ungrouped (M, F) input is one volume's crops
    torch.testing.assert_close(head(x[0]), head(x[:1])[0])
    with pytest.raises(ValueError, match="norm"):
        ProjectionHead(6, 16, 5, "other")  # type: ignore[arg-type]


def test_update_momentum_extremes() -> None:
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    kept = b.weight.detach().clone()
    update_momentum(a, b, 1.0)
    assert torch.equal(b.weight, kept)
    update_momentum(a, b, 0.0)
    assert torch.equal(b.weight, a.weight)
    with pytest.raises(ValueError, match="momentum"):
        update_momentum(a, b, 1.5)


def test_schedules() -> None:
    assert cosine_schedule(0, 100, 0.9, 1.0) == pytest.approx(0.9)
    assert cosine_schedule(50, 100, 0.9, 1.0) == pytest.approx(0.95)
    assert cosine_schedule(100, 100, 0.9, 1.0) == 1.0
    assert cosine_schedule(500, 100, 0.9, 1.0) == 1.0
    assert warmup_cosine(0, 10, 110) == pytest.approx(0.1)
    assert warmup_cosine(9, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(10, 10, 110) == pytest.approx(1.0)
    assert warmup_cosine(60, 10, 110) == pytest.approx(0.5)
    assert warmup_cosine(110, 10, 110, min_factor=0.01) == pytest.approx(0.01)
    assert 0 < warmup_cosine(35, 10, 110) < 1 and math.isfinite(warmup_cosine(5, 0, 0))
