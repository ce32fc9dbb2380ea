"""Gradient checkpointing of the timm backbone (`enable_grad_checkpointing`): the same outputs
and gradients as without it, through torch.utils.checkpoint (blocks run again in backward),
nothing recomputed without grad, and a clear error for a backbone that cannot do it."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import timm
import torch
import torch.utils.checkpoint
from torch import Tensor, nn

from kaggle_utils.common.backbone import build_backbone, enable_grad_checkpointing
from kaggle_utils.pretrain.model import CropEncoder

TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def twin_backbones() -> tuple[nn.Module, nn.Module]:
    """timm's tiny test_efficientnet (in_chans 1, num_classes 0) and an identical copy with
    checkpointing on."""
    torch.manual_seed(0)
    plain = build_backbone("test_efficientnet", 1)
    checkpointed = copy.deepcopy(plain)
    enable_grad_checkpointing(checkpointed)
    return plain, checkpointed


def output_and_gradients(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1.0, 1.0, out.shape[-1])).square().sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), "a parameter got no gradient"
    assert x.grad is not None
    return out.detach(), x.grad, grads  # type: ignore[return-value]


@pytest.fixture
def segment_runs(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Spy on torch.utils.checkpoint.checkpoint (what timm's checkpoint_seq calls): one entry
    per run of a checkpointed segment, forward or recomputation in backward, recording
    whether grad was enabled."""
    runs: list[bool] = []
    original = torch.utils.checkpoint.checkpoint

    def spy(function: Callable[..., Tensor], *args: object, **kwargs: object) -> Tensor:
        def counted(*inner: object, **inner_kwargs: object) -> Tensor:
            runs.append(torch.is_grad_enabled())
            return function(*inner, **inner_kwargs)

        return original(counted, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", spy)
    return runs


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_same_output_and_gradients(train: bool) -> None:
    plain, checkpointed = twin_backbones()
    plain.train(train)
    checkpointed.train(train)
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    out, x_grad, grads = output_and_gradients(plain, x)
    out_c, x_grad_c, grads_c = output_and_gradients(checkpointed, x)
    torch.testing.assert_close(out_c, out, **TOLERANCE)
    torch.testing.assert_close(x_grad_c, x_grad, **TOLERANCE)
    for (name, _), g, g_c in zip(plain.named_parameters(), grads, grads_c, strict=True):
        torch.testing.assert_close(g_c, g, **TOLERANCE, msg=f"gradient of {name} differs")


def test_checkpointing_recomputes_blocks_in_backward(segment_runs: list[bool]) -> None:
    plain, checkpointed = twin_backbones()
    x = torch.randn(2, 1, 32, 32)
    plain(x).sum().backward()
    assert segment_runs == [], "checkpointing is on without enable_grad_checkpointing"
    out = checkpointed(x)
    n_segments = len(segment_runs)
    assert n_segments > 0, "timm did not call torch.utils.checkpoint"
    out.sum().backward()
    assert len(segment_runs) == 2 * n_segments  # every segment ran again for its gradients


def test_no_grad_recomputes_nothing(segment_runs: list[bool]) -> None:
    # an EMA teacher runs under torch.no_grad: the same output, nothing kept to recompute
    plain, checkpointed = twin_backbones()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        out, out_c = plain(x), checkpointed(x)
    torch.testing.assert_close(out_c, out, **TOLERANCE)
    assert not out_c.requires_grad
    assert segment_runs and not any(segment_runs)  # each segment ran once, without grad


def test_unsupported_backbone_raises_a_clear_error() -> None:
    # timm refuses with a bare AssertionError for dla, cspnet, vgg and others
    dla = timm.create_model("dla46_c", pretrained=False, num_classes=0, in_chans=1)
    with pytest.raises(ValueError, match="dla46_c does not support gradient checkpointing"):
        enable_grad_checkpointing(dla)
    with pytest.raises(ValueError, match="Conv2d does not support gradient checkpointing"):
        enable_grad_checkpointing(nn.Conv2d(1, 4, 3))


@pytest.mark.parametrize("projector_input", ["pooled", "flatten"])
def test_crop_encoder_same_output_and_gradients(
    projector_input: str, segment_runs: list[bool]
) -> None:
    torch.manual_seed(0)
    encoder = CropEncoder(
        backbone=build_backbone("test_efficientnet", 1),
        hidden_dim=32,
        out_dim=16,
        slice_mode="average",
        feature_dropout=0.0,
        projector_input=projector_input,  # type: ignore[arg-type]
        crop_shape=(1, 32, 32),
    )
    checkpointed = copy.deepcopy(encoder)
    enable_grad_checkpointing(checkpointed.backbone)
    encoder.train()
    checkpointed.train()
    crops = torch.randn(3, 4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    out, crops_grad, grads = output_and_gradients(encoder, crops)
    assert segment_runs == []
    out_c, crops_grad_c, grads_c = output_and_gradients(checkpointed, crops)
    assert segment_runs, "the encoder's backbone was not checkpointed"
    torch.testing.assert_close(out_c, out, **TOLERANCE)
    torch.testing.assert_close(crops_grad_c, crops_grad, **TOLERANCE)
    for (name, _), g, g_c in zip(encoder.named_parameters(), grads, grads_c, strict=True):
        torch.testing.assert_close(g_c, g, **TOLERANCE, msg=f"gradient of {name} differs")
