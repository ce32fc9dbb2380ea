"""The real shapes on a GPU: one training step of each loop and inference per patient, at fp16
and bf16, with a projected budget for a full Kaggle run.

    python benchmarks/gpu_shapes.py [--precisions fp16 bf16] [--repeats 3] [--warmup 2]

Cases, each with this project's code and notebook defaults (random weights: timing only):
- finetune: one optimizer step of notebook 03 (`efficientnetv2_rw_t` CNN-BiLSTM, hidden 256,
  2 layers, attention pooling, bowel and extravasation slice heads) on a batch of 2 volumes of
  96 x 256 x 256: forward, `weighted_loss` + `slice_loss`, scaled backward, clipping, AdamW.
- pretrain: one optimizer step of notebook 02 (`PretrainConfig` defaults: batch 4 volumes of
  32 x 192 x 192, a 3 x 3 grid of 64-pixel bases and 2 random crops per volume, student and
  teacher, flattened projector input): `pretrain._forward`, scaled backward, clipping, AdamW,
  EMA update of the teacher.
- inference: one patient of notebook 04 = two 300-slice 512 x 512 series, each cropped and
  resampled to 96 x 256 x 256 on the GPU (`crop_and_resample`, device "cuda"), windowed, and
  predicted by 5 fold models (the default `n_folds`). DICOM decoding is not included: it runs on
  the CPU in worker processes while the GPU predicts (README: notebook 01's per-core figures).

`--rehearse` runs the same code on the CPU at toy sizes (fp32, `test_efficientnet`): a check of
the script before a GPU's time is spent on it, not a measurement.

Per case and precision: `--warmup` untimed steps, then the median of `--repeats` timed ones
(`torch.cuda.synchronize` around each), volumes per second, and the peak of
`torch.cuda.max_memory_allocated` since the case started. The last stdout line is JSON.

The projection multiplies these medians by the work of a full run with the notebooks' defaults
on the competition data (250,000 pretraining steps; 5 folds x 10 epochs over the ~3,769
training series of a fold at batch 2; ~1,100 hidden test patients) and divides by the number of
GPUs. It is a projection for THIS GPU; on another the step times scale with it (README says how
the figures were read for Kaggle's T4s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kaggle_utils.cache.volume import apply_window, crop_and_resample
from kaggle_utils.common.backbone import input_normalisation
from kaggle_utils.common.runtime import Precision, resolve_precision
from kaggle_utils.finetune.losses import slice_loss, weighted_loss
from kaggle_utils.finetune.model import build_classifier
from kaggle_utils.metric import ALL_TARGETS, CLASS_WEIGHTS
from kaggle_utils.pretrain.crops import cut_crops, sample_voco_crops
from kaggle_utils.pretrain.train import PretrainConfig, _forward, build_voco


@dataclass(frozen=True)
class Sizes:
    backbone: str = "efficientnetv2_rw_t"
    finetune_shape: tuple[int, int, int] = (96, 256, 256)
    finetune_batch: int = 2
    pretrain_shape: tuple[int, int, int] = (32, 192, 192)
    pretrain_batch: int = PretrainConfig().batch_size
    crop_size: int = PretrainConfig().crop_size
    series_shape: tuple[int, int, int] = (300, 512, 512)


REAL = Sizes()
TOY = Sizes("test_efficientnet", (8, 64, 64), 2, (8, 96, 96), 2, 32, (20, 80, 80))
SERIES_PER_PATIENT, FOLDS = 2, 5
# A full run with the notebooks' defaults on the competition's training data (SPEC sec. 2)
PRETRAIN_STEPS = 250_000
TRAIN_SERIES, N_FOLDS, EPOCHS, TEST_PATIENTS = 4_711, 5, 10, 1_100

Step = Callable[[], None]


def timed(step: Step, warmup: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median seconds per step, peak MB allocated on the GPU; 0 on the CPU) after `warmup`
    untimed steps."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else 0.0
    return statistics.median(times), peak


def finetune_step(sizes: Sizes, precision: Precision, device: torch.device) -> Step:
    slice_targets = ("bowel", "extravasation")
    model = build_classifier(sizes.backbone, 1, "random", slice_targets=slice_targets).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
    scaler = precision.grad_scaler()
    mean, std = input_normalisation(model.backbone, device)
    generator = torch.Generator().manual_seed(0)
    batch, (depth, height, width) = sizes.finetune_batch, sizes.finetune_shape
    volumes = torch.randint(0, 256, (batch, depth, 1, height, width), generator=generator,
                            dtype=torch.uint8)  # fmt: skip
    labels = torch.zeros(batch, len(ALL_TARGETS), dtype=torch.long, device=device)
    any_injury = torch.zeros(batch, device=device)
    slice_labels = torch.zeros(batch, depth, len(slice_targets), device=device)
    weights = {t: torch.tensor(CLASS_WEIGHTS[t], device=device) for t in ALL_TARGETS}

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        images = (volumes.to(device, non_blocking=True).float() / 255.0 - mean) / std
        with precision.autocast():
            logits, slice_logits = model(images, with_slices=True)
        loss = weighted_loss(logits, labels, any_injury, weights) + slice_loss(
            slice_logits, slice_labels
        )
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()

    return step


def pretrain_step(sizes: Sizes, precision: Precision, device: torch.device) -> Step:
    config = PretrainConfig(
        backbone=sizes.backbone, batch_size=sizes.pretrain_batch, crop_size=sizes.crop_size
    )
    model, loss_fn, optimizer = build_voco(config, 1, device)
    model.train()
    scaler = precision.grad_scaler()
    mean, std = input_normalisation(model.student.backbone, device)
    rng = np.random.default_rng(0)
    randoms, bases, labels = [], [], []
    for _ in range(config.batch_size):
        depth, height, width = sizes.pretrain_shape
        volume = torch.from_numpy(rng.integers(0, 256, (depth, 1, height, width), dtype=np.uint8))
        crops = sample_voco_crops(
            (height, width), config.grid, config.n_random, rng,
            config.label_mode, config.crop_size,  # type: ignore[arg-type]
        )  # fmt: skip
        randoms.append(cut_crops(volume, crops.random_boxes))
        bases.append(cut_crops(volume, crops.base_boxes))
        labels.append(torch.from_numpy(crops.labels.astype(np.float32)))
    batch = {
        "random": torch.stack(randoms),
        "base": torch.stack(bases),
        "labels": torch.stack(labels),
    }

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        parts = _forward(model.student, model.teacher, loss_fn, batch, mean, std, config, precision)
        scaler.scale(parts.total).backward()
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.student.parameters(), config.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        model.update_teacher(config.momentum)

    return step


def inference_patient(sizes: Sizes, precision: Precision, device: torch.device) -> Step:
    model = build_classifier(sizes.backbone, 1, "random").to(device).eval()
    mean, std = input_normalisation(model.backbone, device)
    rng = np.random.default_rng(0)
    shape = sizes.series_shape
    series = [rng.normal(0.0, 300.0, shape).astype(np.float32) for _ in range(SERIES_PER_PATIENT)]
    margin = shape[1] // 12
    box = (2 * margin, shape[1] - 2 * margin, margin, shape[2] - margin)
    target = sizes.finetune_shape

    @torch.no_grad()
    def step() -> None:
        for hu in series:
            resampled = crop_and_resample(hu, box, [target], device=str(device))
            volume = torch.from_numpy(apply_window(resampled[target], 50.0, 400.0))
            images = (volume[None, :, None].to(device).float() / 255.0 - mean) / std
            for _ in range(FOLDS):  # the fold models share the architecture: the cost is the same
                with precision.autocast():
                    model(images)

    return step


CASES: dict[str, Callable[[Sizes, Precision, torch.device], Step]] = {
    "finetune": finetune_step,
    "pretrain": pretrain_step,
    "inference": inference_patient,
}


def volumes_per_step(case: str, sizes: Sizes) -> int:
    """Fine-tuning and pretraining: the batch; inference: the forward passes of a patient."""
    return {"finetune": sizes.finetune_batch, "pretrain": sizes.pretrain_batch}.get(
        case, SERIES_PER_PATIENT * FOLDS
    )


def projection(seconds: dict[str, float], n_gpus: int) -> dict[str, float]:
    """GPU hours of a full run on this kind of GPU, `n_gpus` of them (DDP, ideal scaling)."""
    train_series = TRAIN_SERIES * (N_FOLDS - 1) / N_FOLDS
    finetune_steps = N_FOLDS * EPOCHS * train_series / REAL.finetune_batch
    return {
        "pretrain_hours": round(PRETRAIN_STEPS * seconds["pretrain"] / n_gpus / 3600, 2),
        "finetune_hours": round(finetune_steps * seconds["finetune"] / n_gpus / 3600, 2),
        "submission_hours": round(TEST_PATIENTS * seconds["inference"] / 3600, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rehearse", action="store_true", help="toy sizes on the CPU, fp32")
    args = parser.parse_args()
    sizes, precisions = REAL, args.precisions
    if args.rehearse:
        device, sizes, precisions = torch.device("cpu"), TOY, ["fp32"]
    elif torch.cuda.is_available():
        device = torch.device("cuda", 0)
        torch.backends.cudnn.benchmark = True  # fixed shapes: cuDNN picks its fastest kernels
    else:
        raise SystemExit("gpu_shapes.py measures a GPU and there is none (--rehearse: the CPU)")
    report: dict[str, Any] = {"torch": torch.__version__, "sizes": str(sizes), "results": {}}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        report |= {
            "gpu": torch.cuda.get_device_name(device), "capability": f"{major}.{minor}",
            "arch_list": torch.cuda.get_arch_list(),
        }  # fmt: skip
    report["projection"] = {}
    for precision_name in precisions:
        precision = resolve_precision(precision_name, device)
        seconds = {}
        for case in args.cases:
            step = CASES[case](sizes, precision, device)
            step_s, peak_mb = timed(step, args.warmup, args.repeats, device)
            seconds[case] = step_s
            entry = {
                "seconds": round(step_s, 4),
                "volumes_per_s": round(volumes_per_step(case, sizes) / step_s, 2),
                "peak_mb": round(peak_mb),
            }
            report["results"][f"{case}_{precision_name}"] = entry
            print(f"{case} {precision_name}: {json.dumps(entry)}", flush=True)
        if set(seconds) == set(CASES):
            report["projection"][precision_name] = {
                "1 gpu": projection(seconds, 1), "2 gpus": projection(seconds, 2)
            }  # fmt: skip
    print(json.dumps(report))


if __name__ == "__main__":
    main()
