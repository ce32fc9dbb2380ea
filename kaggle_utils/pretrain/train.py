"""The 2D-VoCo pretraining loop: notebook 02 calls `pretrain(config)`; `torchrun` runs the same
function on several GPUs (or CPU processes) through `python -m kaggle_utils.pretrain.train`.

    torchrun --nproc_per_node 2 -m kaggle_utils.pretrain.train --config outputs/pretrain/config.json

What a run writes to `output_dir`:
    config.json         the settings (also the input of the command line above)
    log.csv             one row per optimizer step: lr, momentum, loss and its parts, probe
    checkpoint.pt       everything needed to resume exactly (written atomically every N steps)
    encoder.pt          the student backbone's state dict, what fine-tuning loads
    encoder.json        the settings that made it, and the final probe accuracy
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader

from kaggle_utils.cache.preprocess import (
    CacheDirs,
    PreprocessConfig,
    cache_settings,
    resolve_cache_dirs,
    shape_name,
)
from kaggle_utils.cache.sources import ExtraVolume, cache_extra_sources, find_volume_sources
from kaggle_utils.common import runtime
from kaggle_utils.common.backbone import (
    build_backbone,
    enable_grad_checkpointing,
    feature_dim,
    input_normalisation,
    resolve_weights,
)
from kaggle_utils.common.config import JsonConfig
from kaggle_utils.common.engine import (
    OptimizerStep,
    ResumableSampler,
    cosine_schedule,
    load_checkpoint,
    parameter_groups,
    save_checkpoint,
    warmup_cosine,
)
from kaggle_utils.common.io import (
    append_csv,
    save_torch_atomic,
    truncate_csv,
    write_parquet_atomic,
    write_text_atomic,
)
from kaggle_utils.common.progress import progress_bar
from kaggle_utils.common.provenance import provenance
from kaggle_utils.pretrain.crops import cut_crops, sample_voco_crops
from kaggle_utils.pretrain.data import (
    AugmentConfig,
    VoCoCropDataset,
    exclude_patient_volumes,
    load_volume,
    split_probe_volumes,
    volume_files,
)
from kaggle_utils.pretrain.losses import LossParts, VoCoLoss, similarity
from kaggle_utils.pretrain.model import CropEncoder, StudentTeacher
from kaggle_utils.pretrain.recipe import RECIPES

LOG_COLUMNS = (
    "step", "epoch", "lr", "momentum", "loss", "intra", "inter", "reg", "probe_accuracy",
    "cross_probe_accuracy", "seconds",
)  # fmt: skip


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the message names the step and the parts."""


@dataclass
class PretrainConfig(JsonConfig):
    """Every choice of a 2D-VoCo run. Defaults reproduce the paper's setting (EfficientNetV2-T,
    32 x 192 x 192 volumes, a 3 x 3 grid of 64 x 64 base crops, 2 random crops, AdamW 1e-4,
    weight decay 1e-2, EMA momentum 0.9, all loss weights 1) and, where the paper is silent or
    differs, the official 2D-VoCo code (each such choice a field that says so).
    `PretrainConfig.from_recipe("official")` is the authors' code throughout."""

    RECIPES: ClassVar[Mapping[str, Mapping[str, Any]]] = RECIPES

    volume_dirs: list[str] = field(default_factory=list)  # folders of cached .npy volumes
    output_dir: str = "outputs/pretrain"
    # "project" (these defaults) or "official" (the authors' code: `pretrain.recipe`); the
    # recipe a config was made from (`from_recipe`, or a notebook's `recipe` parameter)
    recipe: str = "project"
    backbone: str = "efficientnetv2_rw_t"
    # "imagenet": student and teacher start from ImageNet weights (the official code's;
    # `weights_file`, or found among Kaggle's attached inputs by the backbone's name), an
    # error when there are none; "auto": ImageNet where weights are given or found, else
    # random; "random": random init
    init: str = "auto"
    # local ImageNet weights: a file, or a timm / Hugging Face model folder; nothing is
    # downloaded
    weights_file: str = ""
    # patients whose volumes are left out of pretraining and of its probe: the held-out
    # test patients of the fine-tuning runs compared on them (notebook 02's `holdout`)
    exclude_patients: list[int] = field(default_factory=list)
    grid: int = 3
    crop_size: int = 64
    n_random: int = 2
    label_mode: str = "area"  # "area" (VoCo's code) or "iou" (the 2D-VoCo paper)
    slice_mode: str = "average"  # "average" (official code) or "per_slice"
    # the projector's input: "flatten" (default, the official 2D-VoCo code: the backbone's
    # final feature map flattened, 1024 x 2 x 2 for efficientnetv2_rw_t on 64 x 64 crops) or
    # "pooled" (its globally pooled feature, what fine-tuning sees; this project's first form)
    projector_input: str = "flatten"
    hidden_dim: int = 2048
    out_dim: int = 2048
    # dropout on the student's backbone features before the projector (the official 2D-VoCo
    # and VoCo v2 code: 0.2); 0 makes the teacher a lagged copy of the student
    feature_dropout: float = 0.2
    # where: "slice" (each slice's features, before the mean over the crop's slices: the
    # official code) or "mean" (after the mean: 5.7x the noise at 32 slices; the first form)
    feature_dropout_at: str = "slice"
    # "trained" (the official code: the teacher's projector is its own head, trained by
    # gradient; only its backbone is an EMA) or "ema" (the whole teacher an EMA: VoCo 3D's)
    teacher_head: str = "trained"
    # the projector's BatchNorm: "crops" (the official code: over the crop axis of its
    # [volumes, crops, features] tensor) or "features" (each feature over every crop)
    projector_norm: str = "crops"
    momentum: float = 0.9  # teacher EMA momentum
    momentum_end: float | None = None  # cosine ramp to this value (e.g. 1.0); None = constant
    intra_weight: float = 1.0
    inter_weight: float = 1.0
    reg_weight: float = 1.0
    intra_form: str = "voco_code"  # "voco_code" or "paper"
    # "voco_code" (default, the official 2D-VoCo code's and VoCo v2's inter_volume: the code's
    # intra form with the teacher's similarities as labels, so pairs are weighted by them) or
    # "paper" (2D-VoCo Eq. 2: the plain mean of -log(1 - |t - s|))
    inter_form: str = "voco_code"
    reg_form: str = "paper"  # "paper" or "voco_code"
    # optimizer steps and warmup: 250,000 and 5,000 as the official 2D-VoCo code (and VoCo's
    # code; the VoCo paper trains 100k steps); demos and tests pass far fewer
    steps: int = 250_000
    batch_size: int = 4  # volumes per step and process (before accumulation)
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-2
    # True: norm scales and shifts and biases are decayed too (every loop here did, before);
    # default: weights only, as timm's param_groups_weight_decay
    decay_norm_and_bias: bool = False
    amsgrad: bool = False  # AdamW's AMSGrad variant (the official code's)
    warmup_steps: int = 5_000
    min_lr_factor: float = 0.01
    grad_clip: float = 1.0  # max gradient norm; 0 = off
    # recompute the student backbone's activations in the backward pass (timm's
    # set_grad_checkpointing): half the memory of a 2D step on the CPU (docs/benchmarks.md),
    # slower; BatchNorm's running statistics then move twice per step
    grad_checkpointing: bool = False
    # "auto" (bf16 where the GPU has it natively, else fp16; CPU fp32), "bf16", "fp16", "fp32"
    precision: str = "auto"
    flip_prob: float = 0.0
    rot90_prob: float = 0.0
    intensity: float = 0.1
    num_workers: int = 2
    checkpoint_every: int = 200
    probe_every: int = 200
    n_probe_volumes: int = 8  # held out from training for the position probe
    probe_random: int = 16  # random crops per probe volume
    seed: int = 0
    resume: bool = True  # continue from output_dir/checkpoint.pt when it exists
    time_limit_s: float = 0.0  # stop cleanly (checkpoint + export) after this long; 0 = off
    stop_after: int = 0  # stop cleanly after this many steps in this call (resume later); 0 = off

    def __post_init__(self) -> None:
        choices = {
            "recipe": tuple(self.RECIPES),
            "init": ("auto", "imagenet", "random"),
            "feature_dropout_at": ("slice", "mean"),
            "teacher_head": ("trained", "ema"),
            "projector_norm": ("crops", "features"),
            "label_mode": ("area", "iou"),
            "slice_mode": ("average", "per_slice"),
            "intra_form": ("voco_code", "paper"),
            "inter_form": ("voco_code", "paper"),
            "reg_form": ("paper", "voco_code"),
            "projector_input": ("flatten", "pooled"),
        }
        choices["precision"] = runtime.PRECISIONS
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")
        for name in ("steps", "batch_size", "grad_accum", "grid", "crop_size", "n_random"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, not {getattr(self, name)}")


@dataclass
class PretrainResult:
    output_dir: Path
    steps_done: int
    encoder_file: Path
    probe: dict[str, float | None] | None  # {"same": ..., "cross": ...} at the last probe
    initial_probe: dict[str, float | None] | None  # the same before any training
    chance: float
    finished: bool  # False when stop_after or time_limit_s ended the run early


def pretrain(config: PretrainConfig, progress: bool = True) -> PretrainResult:
    """Run (or resume) 2D-VoCo pretraining; works alone or under torchrun (DDP)."""
    distributed = runtime.init_distributed()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = runtime.device_for(distributed)
    output_dir = Path(config.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        config.to_json(output_dir / "config.json")
    runtime.seed_everything(config.seed + rank)

    files, volumes = exclude_patient_volumes(
        volume_files([Path(d) for d in config.volume_dirs]), config.exclude_patients
    )
    train_files, probe_files = split_probe_volumes(files, config.n_probe_volumes, config.seed)
    if rank == 0:
        probe_names = {f.name for f in probe_files}
        volumes = volumes.with_columns(
            pl.when(pl.col("volume").is_in(list(probe_names)))
            .then(pl.lit("probe"))
            .otherwise(pl.lit("train"))
            .alias("role")
        )
        write_parquet_atomic(volumes, output_dir / "volumes.parquet")
    in_chans = load_volume(train_files[0]).shape[1]
    model, loss_fn, optimizer = build_voco(config, in_chans, device)
    backbone = model.student.backbone
    student: nn.Module = model.student
    if distributed:
        ddp_ids = [device.index] if device.type == "cuda" else None
        student = nn.parallel.DistributedDataParallel(model.student, device_ids=ddp_ids)
    mean, std = input_normalisation(backbone, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, config.warmup_steps, config.steps, config.min_lr_factor),
    )
    precision = runtime.resolve_precision(config.precision, device)
    step = OptimizerStep(
        optimizer, scheduler, precision, config.grad_accum, config.grad_clip,
        clip_parameters=[p for _, p in model.trainable_parameters()],
        ddp_model=student if distributed else None,
    )  # fmt: skip
    modules = {"student": model.student, "teacher": model.teacher}

    dataset = VoCoCropDataset(
        train_files,
        config.grid,
        config.n_random,
        config.crop_size,
        config.label_mode,  # type: ignore[arg-type]
        AugmentConfig(config.flip_prob, config.rot90_prob, config.intensity),
        config.seed,
    )
    sampler = ResumableSampler(len(dataset), config.seed, rank, world_size)
    state = TrainState()
    checkpoint_file = output_dir / "checkpoint.pt"
    if config.resume and checkpoint_file.is_file():
        state = TrainState(**load_checkpoint(checkpoint_file, modules, step, device))
    if rank == 0:
        truncate_csv(output_dir / "log.csv", state.step, LOG_COLUMNS)

    started = time.monotonic()
    if state.step == 0 and probe_files and rank == 0 and config.probe_every > 0:
        state.initial_probe = dataclasses.asdict(
            position_probe(model.student, probe_files, config, mean, std, device)
        )
        append_csv(
            output_dir / "log.csv", _probe_row(0, state, state.initial_probe, started), LOG_COLUMNS
        )
    bar = progress_bar(
        total=config.steps, initial=state.step, desc="pretrain", unit="step",
        disable=not progress or rank != 0,
    )  # fmt: skip
    batches = _batches(dataset, sampler, state, config, device)
    steps_this_run = 0
    stop = False
    while state.step < config.steps and not stop:
        model.train()
        sums = {"total": 0.0, "intra": 0.0, "inter": 0.0, "reg": 0.0}
        for micro in range(config.grad_accum):
            batch = next(batches)
            # The student's dropout masks depend only on (seed, rank, step, micro-batch), so a
            # resumed run draws what the uninterrupted one would have (seeded after the batch:
            # a new DataLoader iterator draws from the global generator).
            step_seed = ((config.seed * 10_007 + rank) * 1_000_003 + state.step) * 64 + micro
            torch.manual_seed(step_seed)
            with step.sync(last=step.is_last(micro)):
                parts = _forward(
                    student, model.teacher, loss_fn, batch, mean, std, config, precision
                )
                if not torch.isfinite(parts.total):
                    raise NonFiniteLossError(
                        f"step {state.step + 1}: the loss is not finite ({_describe(parts)}); "
                        f"the last good state is {checkpoint_file}. Lower lr or use "
                        "precision='fp32'."
                    )
                step.backward(parts.total)
            for key, value in parts.as_floats().items():
                sums[key] += value / config.grad_accum
        if distributed and config.teacher_head == "trained":
            # the teacher's head trains outside DDP: average its gradients as DDP does
            runtime.average_gradients(model.teacher.projector.parameters())
        step.step()
        momentum = _momentum(config, state.step)
        model.update_teacher(momentum)
        state.step += 1
        steps_this_run += 1
        sums = runtime.mean_over_ranks(sums, device) if distributed else sums

        finished = state.step == config.steps
        probe: dict[str, float | None] | None = None
        if probe_files and rank == 0 and config.probe_every > 0:
            if state.step % config.probe_every == 0 or finished:
                probe = dataclasses.asdict(
                    position_probe(model.student, probe_files, config, mean, std, device)
                )
                state.last_probe = probe
        stop = (config.stop_after > 0 and steps_this_run >= config.stop_after) or (
            config.time_limit_s > 0 and time.monotonic() - started > config.time_limit_s
        )
        stop = runtime.agree(stop, device) if distributed else stop
        if rank == 0:
            row = _probe_row(state.step, state, probe, started)
            row.update(lr=scheduler.get_last_lr()[0], momentum=momentum, loss=sums["total"])
            row.update(intra=sums["intra"], inter=sums["inter"], reg=sums["reg"])
            append_csv(output_dir / "log.csv", row, LOG_COLUMNS)
            bar.update()
            bar.set_postfix(loss=f"{sums['total']:.4f}", refresh=False)
            if finished or stop or state.step % config.checkpoint_every == 0:
                save_checkpoint(checkpoint_file, modules, step, dataclasses.asdict(state))
    bar.close()

    encoder_file = output_dir / "encoder.pt"
    if rank == 0:
        export_encoder(model.student.backbone, encoder_file, config, in_chans, state)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return PretrainResult(
        output_dir=output_dir,
        steps_done=state.step,
        encoder_file=encoder_file,
        probe=state.last_probe,
        initial_probe=state.initial_probe,
        chance=1.0 / config.grid**2,
        finished=state.step >= config.steps,
    )


def build_voco(
    config: PretrainConfig, in_chans: int, device: torch.device
) -> tuple[StudentTeacher, VoCoLoss, torch.optim.Optimizer]:
    """The student-teacher pair on `device`, the loss and the student's AdamW, from a config."""
    # The teacher is a deep copy of this student, so both start from the same weights.
    weights = resolve_weights(config.weights_file, config.backbone, config.init)
    backbone = build_backbone(config.backbone, in_chans, weights or None)
    encoder = CropEncoder(
        backbone, config.hidden_dim, config.out_dim, config.slice_mode,  # type: ignore[arg-type]
        config.feature_dropout, config.projector_input,  # type: ignore[arg-type]
        crop_shape=(in_chans, config.crop_size, config.crop_size),
        feature_dropout_at=config.feature_dropout_at,  # type: ignore[arg-type]
        projector_norm=config.projector_norm,  # type: ignore[arg-type]
    )  # fmt: skip
    model = StudentTeacher(encoder, config.teacher_head).to(device)  # type: ignore[arg-type]
    if config.grad_checkpointing:  # the student only: the teacher's backbone runs without grad
        enable_grad_checkpointing(model.student.backbone)
    loss_fn = VoCoLoss(
        config.intra_weight, config.inter_weight, config.reg_weight,
        intra_form=config.intra_form, reg_form=config.reg_form,  # type: ignore[arg-type]
        inter_form=config.inter_form,  # type: ignore[arg-type]
    )  # fmt: skip
    groups = parameter_groups(
        model.trainable_parameters(), config.weight_decay, config.decay_norm_and_bias
    )
    optimizer = torch.optim.AdamW(groups, lr=config.lr, amsgrad=config.amsgrad)
    return model, loss_fn, optimizer


@dataclass
class TrainState:
    """Where the run is: optimizer steps done, epoch, micro-batches consumed in the epoch,
    and the probe results so far ({"same": ..., "cross": ...})."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    last_probe: dict[str, float | None] | None = None
    initial_probe: dict[str, float | None] | None = None


def _probe_row(
    step: int, state: TrainState, probe: dict[str, float | None] | None, started: float
) -> dict[str, Any]:
    return {
        "step": step,
        "epoch": state.epoch,
        "probe_accuracy": "" if probe is None else probe["same"],
        "cross_probe_accuracy": "" if probe is None or probe["cross"] is None else probe["cross"],
        "seconds": round(time.monotonic() - started, 3),
    }


def _batches(
    dataset: VoCoCropDataset,
    sampler: ResumableSampler,
    state: TrainState,
    config: PretrainConfig,
    device: torch.device,
) -> Iterator[dict[str, Any]]:
    """Endless micro-batches; `state.epoch` and `state.position` always say what comes next."""
    while True:
        sampler.set_position(state.epoch, state.position * config.batch_size)
        dataset.set_epoch(state.epoch)
        loader = DataLoader(
            dataset,
            batch_size=config.batch_size,
            sampler=sampler,
            num_workers=config.num_workers,
            pin_memory=device.type == "cuda",
            drop_last=False,
        )
        for batch in loader:
            state.position += 1
            yield batch
        state.epoch += 1
        state.position = 0


def _forward(
    student: nn.Module,
    teacher: nn.Module,
    loss_fn: VoCoLoss,
    batch: dict[str, Any],
    mean: Tensor,
    std: Tensor,
    config: PretrainConfig,
    precision: runtime.Precision,
) -> LossParts:
    device = mean.device
    random_crops = batch["random"].to(device, non_blocking=True)  # (B, R, S, C, h, w)
    base_crops = batch["base"].to(device, non_blocking=True)  # (B, K, S, C, h, w)
    labels = batch["labels"].to(device, non_blocking=True)  # (B, R, K)
    n_random, n_slices = random_crops.shape[1:3]
    crops = torch.cat([random_crops, base_crops], dim=1)  # each volume's crops together
    crops = (crops.float() / 255.0 - mean) / std  # (B, R + K, S, C, h, w)
    teacher_encoder: CropEncoder = teacher  # type: ignore[assignment]
    with precision.autocast():
        student_out = student(crops)
        with torch.no_grad():
            teacher_features = teacher_encoder.crop_features(crops)
        # a trained teacher head learns from the intra loss; an EMA one gets no gradient
        with torch.set_grad_enabled(config.teacher_head == "trained" and torch.is_grad_enabled()):
            teacher_out = teacher_encoder.project(teacher_features, n_slices)
    student_out, teacher_out = student_out.float(), teacher_out.float()
    if config.slice_mode == "average":
        # (B, R + K, D) -> (B, R, D) and (B, K, D)
        return loss_fn(
            student_out[:, :n_random], student_out[:, n_random:],
            teacher_out[:, :n_random], teacher_out[:, n_random:], labels, pair_shift=1,
        )  # fmt: skip

    def per_slice(out: Tensor, rows: slice) -> Tensor:
        # (B, R + K, S, D) -> every (volume, slice) its own sample: (B * S, count, D)
        return out[:, rows].transpose(1, 2).flatten(0, 1)

    head, tail = slice(0, n_random), slice(n_random, None)
    return loss_fn(
        per_slice(student_out, head),
        per_slice(student_out, tail),
        per_slice(teacher_out, head),
        per_slice(teacher_out, tail),
        labels.repeat_interleave(n_slices, dim=0),
        pair_shift=n_slices,  # slice s of volume b pairs with slice s of volume b + 1
    )


@dataclass(frozen=True)
class ProbeResult:
    """Position accuracy on held-out volumes (chance: 1 / grid^2).

    same: a random crop against the bases of its own volume (pixel overlap alone already
    helps here, so an untrained encoder scores well above chance). cross: a random crop of
    one volume against the bases of another, where only anatomical position can tell.
    """

    same: float
    cross: float | None


@torch.no_grad()
def position_probe(
    encoder: nn.Module,
    files: list[Path],
    config: PretrainConfig,
    mean: Tensor,
    std: Tensor,
    device: torch.device,
) -> ProbeResult:
    """How often the base most similar to a random crop is (one of) the base(s) it overlaps
    most, over `config.probe_random` fixed random crops per held-out volume."""
    encoder.eval()
    embeddings, labels = [], []
    for index, path in enumerate(files):
        volume = torch.from_numpy(load_volume(path))
        rng = np.random.default_rng([config.seed, 10_000_019, index])
        crops = sample_voco_crops(
            tuple(volume.shape[-2:]), config.grid, config.probe_random, rng,
            config.label_mode, config.crop_size,  # type: ignore[arg-type]
        )  # fmt: skip
        stack = torch.cat(
            [cut_crops(volume, crops.random_boxes), cut_crops(volume, crops.base_boxes)]
        )
        stack = (stack.to(device).float() / 255.0 - mean) / std  # (R + K, S, C, h, w)
        out = encoder(stack)
        if config.slice_mode == "per_slice":
            out = out.view(stack.shape[0], stack.shape[1], -1).mean(dim=1)
        embeddings.append((out[: config.probe_random], out[config.probe_random :]))
        labels.append(crops.labels)

    def accuracy(pairs: list[tuple[int, int]]) -> float:
        hits = total = 0
        for a, b in pairs:
            logits = similarity(embeddings[a][0][None], embeddings[b][1][None])[0]
            chosen = logits.argmax(dim=1).cpu().numpy()
            best = labels[a].max(axis=1)
            hits += int((labels[a][np.arange(len(chosen)), chosen] >= best - 1e-9).sum())
            total += len(chosen)
        return hits / max(total, 1)

    n = len(files)
    same = accuracy([(i, i) for i in range(n)])
    cross = accuracy([(i, (i + 1) % n) for i in range(n)]) if n > 1 else None
    return ProbeResult(same, cross)


def export_encoder(
    backbone: nn.Module,
    path: Path,
    config: PretrainConfig,
    in_chans: int,
    state: TrainState,
) -> None:
    """The student backbone for fine-tuning, plus a JSON of what made it."""
    save_torch_atomic(backbone.state_dict(), path)
    meta = {
        "backbone": config.backbone,
        "in_chans": in_chans,
        "num_features": feature_dim(backbone),
        "steps": state.step,
        "probe": state.last_probe,
        "initial_probe": state.initial_probe,
        "chance": 1.0 / config.grid**2,
        "settings": dataclasses.asdict(config),
        "provenance": provenance(),
    }
    write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=1))


def _momentum(config: PretrainConfig, step: int) -> float:
    if config.momentum_end is None:
        return config.momentum
    return cosine_schedule(step, config.steps, config.momentum, config.momentum_end)


def _describe(parts: LossParts) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in parts.as_floats().items())


def pretraining_volume_dirs(
    cache_dir: CacheDirs,
    volume_shape: tuple[int, int, int],
    extra_dirs: list[str] | None = None,
    extra_cache_dir: Path | None = None,
    progress: bool = True,
) -> tuple[list[str], list[ExtraVolume]]:
    """The folders of cached volumes to pretrain on: notebook 01's cache (or several, e.g. its
    shards: `preprocess.resolve_cache_dirs`) at `volume_shape`, plus extra unlabeled CT (NIfTI
    files, DICOM series folders) cached with the same windows and body crop into
    `extra_cache_dir` (default: `extra/` in the first cache). Returns the folders and one entry
    per extra source (failed ones say why).

    Raises:
        FileNotFoundError: a cache has no volumes of that shape.
        ValueError: the caches were made with different windows or body crop.
    """
    caches = resolve_cache_dirs(cache_dir)
    folders = []
    for cache in caches:
        shape_dir = cache / shape_name(volume_shape)
        if not any(shape_dir.glob("*.npy")):
            raise FileNotFoundError(
                f"{shape_dir} holds no volumes: run notebook 01 with shapes including "
                f"{list(volume_shape)}"
            )
        folders.append(str(shape_dir))
    settings = cache_settings(caches)  # several caches must have been made alike
    extras: list[ExtraVolume] = []
    if extra_dirs:
        config = PreprocessConfig((volume_shape,), settings.windows, settings.body_crop)
        target = Path(extra_cache_dir or caches[0] / "extra")
        extras = cache_extra_sources(find_volume_sources(extra_dirs), target, config, progress)
        if any(e.status == "ok" for e in extras):
            folders.append(str(target / shape_name(volume_shape)))
    return folders, extras


def launch_torchrun(config: PretrainConfig, nproc_per_node: int = 0) -> PretrainResult:
    """`pretrain(config)` under torchrun (one process per GPU by default); for notebooks."""
    runtime.run_torchrun(
        "kaggle_utils.pretrain.train", config, Path(config.output_dir), nproc_per_node
    )
    return read_result(Path(config.output_dir))


def read_result(output_dir: Path) -> PretrainResult:
    """The result of a finished (or stopped) run, from its encoder.json."""
    meta = json.loads((Path(output_dir) / "encoder.json").read_text())
    settings = meta["settings"]
    return PretrainResult(
        output_dir=Path(output_dir),
        steps_done=meta["steps"],
        encoder_file=Path(output_dir) / "encoder.pt",
        probe=meta["probe"],
        initial_probe=meta["initial_probe"],
        chance=meta["chance"],
        finished=meta["steps"] >= settings["steps"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="2D-VoCo pretraining (single process or torchrun)")
    parser.add_argument("--config", required=True, help="a config.json written by PretrainConfig")
    args = parser.parse_args()
    result = pretrain(PretrainConfig.from_json(args.config))
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: str(v) for k, v in dataclasses.asdict(result).items()}))


if __name__ == "__main__":
    main()
