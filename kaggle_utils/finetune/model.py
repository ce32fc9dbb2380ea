"""The fine-tuning model: a 2D backbone on every slice, a bidirectional LSTM over the slice
sequence, pooling over slices, and one head per organ target (2D-VoCo, section 2.2)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, overload

import torch
from torch import Tensor, nn

from kaggle_utils.common import paths
from kaggle_utils.common.backbone import build_backbone, feature_dim, load_state_dict_file
from kaggle_utils.metric import ALL_TARGETS, TARGET_CLASSES, TARGET_GROUPS

Pooling = Literal["max", "mean", "attention"]
EncoderInit = Literal["voco", "imagenet", "random"]


class CNNBiLSTM(nn.Module):
    """forward((B, S, C, H, W)) -> {target: logits (B, n_classes)}.

    The backbone maps each slice to a pooled feature vector (B, S, F); the BiLSTM reads the
    sequence in both directions (B, S, 2H); pooling over slices ("max", "mean" or
    "attention": a learned softmax weight per slice) gives (B, 2H); each target has a linear
    head.
    """

    def __init__(
        self,
        backbone: nn.Module,
        targets: Sequence[str] = ALL_TARGETS,
        hidden_size: int = 256,
        num_layers: int = 2,
        dropout: float = 0.2,
        pooling: Pooling = "attention",
        slice_targets: Sequence[str] = (),
    ) -> None:
        super().__init__()
        unknown = set(targets) - set(TARGET_CLASSES)
        if unknown or not targets:
            raise ValueError(f"targets must be a non-empty subset of {ALL_TARGETS}, not {targets}")
        if pooling not in ("max", "mean", "attention"):
            raise ValueError(f"pooling must be 'max', 'mean' or 'attention', not {pooling!r}")
        self.targets = tuple(targets)
        self.backbone = backbone
        self.lstm = nn.LSTM(
            feature_dim(backbone),
            hidden_size,
            num_layers=num_layers,
            batch_first=True,
            bidirectional=True,
            dropout=dropout if num_layers > 1 else 0.0,
        )
        self.pooling: Pooling = pooling
        self.attention = nn.Linear(2 * hidden_size, 1) if pooling == "attention" else None
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict(
            {t: nn.Linear(2 * hidden_size, len(TARGET_CLASSES[t])) for t in self.targets}
        )
        self.slice_targets = tuple(slice_targets)
        # One logit per slice per target: trained on image_level_labels.csv, it only shapes
        # the shared features (SPEC sec. 5); predictions come from the volume heads.
        self.slice_head = (
            nn.Linear(2 * hidden_size, len(self.slice_targets)) if self.slice_targets else None
        )

    @overload
    def forward(
        self, volumes: Tensor, with_slices: Literal[False] = False
    ) -> dict[str, Tensor]: ...

    @overload
    def forward(
        self, volumes: Tensor, with_slices: Literal[True]
    ) -> tuple[dict[str, Tensor], Tensor | None]: ...

    def forward(
        self, volumes: Tensor, with_slices: bool = False
    ) -> dict[str, Tensor] | tuple[dict[str, Tensor], Tensor | None]:
        """Volume logits per target; with `with_slices`, also the slice logits
        (B, S, n_slice_targets), None without a slice head. A flag, not a second method, so
        that DDP's wrapper (which only calls forward) serves both."""
        sequence = self.lstm(self.slice_features(volumes))[0]  # (B, S, 2H)
        logits = self.heads_of(self.pool(sequence)[0])
        if not with_slices:
            return logits
        slice_logits = self.slice_head(sequence) if self.slice_head is not None else None
        return logits, slice_logits

    def slice_features(self, volumes: Tensor) -> Tensor:
        """(B, S, C, H, W) volumes -> (B, S, F): the backbone's pooled feature of every slice."""
        batch, n_slices = volumes.shape[:2]
        return self.backbone(volumes.flatten(0, 1)).view(batch, n_slices, -1)

    def pool(self, sequence: Tensor) -> tuple[Tensor, Tensor | None]:
        """(B, S, 2H) BiLSTM outputs -> (B, 2H) pooled over slices, and the attention weights
        (B, S) with attention pooling (else None)."""
        if self.pooling == "max":
            return sequence.amax(dim=1), None
        if self.pooling == "mean":
            return sequence.mean(dim=1), None
        assert self.attention is not None
        weights = torch.softmax(self.attention(sequence), dim=1)  # (B, S, 1)
        return (weights * sequence).sum(dim=1), weights[..., 0]

    def heads_of(self, pooled: Tensor) -> dict[str, Tensor]:
        """(B, 2H) pooled features -> {target: logits}, through dropout."""
        pooled = self.dropout(pooled)
        return {target: head(pooled) for target, head in self.heads.items()}

    @torch.no_grad()
    def start_at_prior(self, prior: dict[str, float]) -> None:
        """Make every head predict exactly the prior, whatever the input: weights 0 and
        bias = log p_c. Trained with the metric-weighted cross-entropy, the best constant is
        the metric's best-constant prediction, so the model starts where the prior ends and
        only has to learn the rest. With random head weights it would instead start at the
        prior plus input-dependent noise, which costs log loss on every patient before
        anything is learned; a zero bias would first spend epochs
        learning the class balance. The weights still get gradients (the features are
        non-zero), and through them the rest of the network."""
        for target, head in self.heads.items():
            probabilities = torch.tensor([prior[c] for c in TARGET_GROUPS[target]])
            head.weight.zero_()
            head.bias.copy_(torch.log(probabilities.clamp_min(1e-6)))

    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (False) or unfreeze the backbone; frozen, it also keeps its BN statistics."""
        self.backbone.requires_grad_(trainable)
        self.backbone.train(trainable and self.training)

    def train(self, mode: bool = True) -> CNNBiLSTM:
        super().train(mode)
        frozen = not any(p.requires_grad for p in self.backbone.parameters())
        if frozen:
            self.backbone.eval()
        return self


def build_classifier(
    backbone_name: str,
    in_chans: int,
    init: EncoderInit = "voco",
    encoder_file: str | Path | None = None,
    weights_file: str | Path | None = None,
    targets: Sequence[str] = ALL_TARGETS,
    hidden_size: int = 256,
    num_layers: int = 2,
    dropout: float = 0.2,
    pooling: Pooling = "attention",
    global_pool: str = "avg",
    slice_targets: Sequence[str] = (),
) -> CNNBiLSTM:
    """A CNN-BiLSTM whose backbone starts from a 2D-VoCo encoder (notebook 02's encoder.pt),
    ImageNet weights from a local file, or random weights.

    `global_pool` is timm's in-slice pooling of the backbone's feature map: "avg" (timm's
    default), "max" or "avgmax"; max keeps a small lesion's response from being averaged away
    over the whole slice. It has no weights, so any choice loads any encoder.

    Raises:
        ValueError: the encoder was pretrained with another backbone or channel count.
        FileNotFoundError: a needed file is missing.
    """
    if init == "voco":
        if not encoder_file:
            raise ValueError("init='voco' needs encoder_file (notebook 02's encoder.pt)")
        backbone = build_backbone(backbone_name, in_chans, global_pool=global_pool)
        load_voco_encoder(backbone, encoder_file, backbone_name, in_chans)
    elif init == "imagenet":
        if not weights_file:
            raise ValueError("init='imagenet' needs weights_file (a local timm weights file)")
        backbone = build_backbone(backbone_name, in_chans, weights_file, global_pool=global_pool)
    elif init == "random":
        backbone = build_backbone(backbone_name, in_chans, global_pool=global_pool)
    else:
        raise ValueError(f"init must be 'voco', 'imagenet' or 'random', not {init!r}")
    return CNNBiLSTM(backbone, targets, hidden_size, num_layers, dropout, pooling, slice_targets)


def load_voco_encoder(
    backbone: nn.Module, encoder_file: str | Path, backbone_name: str, in_chans: int
) -> None:
    """Load notebook 02's encoder.pt into `backbone`, checking its encoder.json first.

    A backbone that takes a multiple of the encoder's channels (2.5D input: neighbour slices
    as channels) gets the pretrained first convolution adapted by `adapt_input_conv`."""
    encoder_file = paths.find_input(encoder_file, "encoder_file", "file")
    meta_file = encoder_file.with_suffix(".json")
    state = load_state_dict_file(encoder_file)
    pretrained_chans = in_chans
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        pretrained_chans = int(meta.get("in_chans", in_chans))
        if meta.get("backbone") != backbone_name or in_chans % pretrained_chans:
            raise ValueError(
                f"{encoder_file} was pretrained as {meta.get('backbone')} with "
                f"{pretrained_chans} channel(s), not {backbone_name} with {in_chans} (or a "
                "multiple of it, for neighbour slices): pass the same backbone and windows as "
                "notebook 02"
            )
    if pretrained_chans != in_chans:
        key = f"{first_conv_name(backbone)}.weight"
        state[key] = adapt_input_conv(state[key], in_chans)
    backbone.load_state_dict(state)


def first_conv_name(backbone: nn.Module) -> str:
    """The module name of a timm model's first convolution (its `pretrained_cfg`)."""
    name = getattr(backbone, "pretrained_cfg", {}).get("first_conv")
    if not name:
        raise ValueError(f"{type(backbone).__name__} does not name its first convolution")
    return str(name)


def adapt_input_conv(weight: Tensor, in_chans: int) -> Tensor:
    """A first convolution's (out, c, kh, kw) weight for `in_chans` input channels, by timm's
    rule for ImageNet weights (`timm.models.adapt_input_conv`, which only starts from 3): the
    pretrained channels repeated to fill `in_chans` and scaled by c / in_chans, so that an
    input whose extra channels repeat the pretrained ones (neighbour slices of a slowly
    varying scan) gives the pretrained response."""
    source = weight.shape[1]
    if in_chans == source:
        return weight
    repeats = -(-in_chans // source)
    adapted = weight.float().repeat(1, repeats, 1, 1)[:, :in_chans] * (source / in_chans)
    return adapted.to(weight.dtype)
