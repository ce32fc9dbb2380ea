"""Pretraining cost per volume: 2D-VoCo against 3D VoCo, one full training step each.

    python benchmarks/pretrain_cost.py [--repeats 2] [--warmup 1] [--threads N] [--skip-3d]
                                       [--bare] [--[no-]swin-checkpoint] [--[no-]2d-checkpoint]
                                       [--volume FILE.npy]

The 2D-VoCo paper's central claim is that slice-level VoCo is far cheaper than 3D VoCo (about
20 minutes against 1 hour per epoch at batch 1 on an RTX 3090, and 3D VoCo's batch of 4 does
not fit in 24 GB). This measures the time and peak memory of ONE training step on ONE volume
(batch 1): forward of student and teacher, loss, backward, optimizer step, EMA teacher update.
Data loading and crop cutting are done before the clock starts, as a DataLoader would.

2d: this project's pretraining step (`kaggle_utils.pretrain.train._forward`, then backward, gradient
    clipping at 1.0, AdamW lr 1e-4 wd 1e-2, `update_teacher(0.9)`) with `PretrainConfig`'s
    defaults: `efficientnetv2_rw_t` (timm, random init, in_chans 1) in `CropEncoder` (projector
    input the flattened feature map, `projector_input="flatten"` as the official code,
    4096-2048-2048; figures measured before that change used the pooled 1024-wide input;
    slice_mode "average"), `StudentTeacher`; one 32 x 192 x 192 uint8 volume
    (random, or `--volume`), a 3 x 3 grid of 64 x 64 base crops plus 2 random crops
    (`sample_voco_crops`, `cut_crops`), i.e. 11 crops x 32 slices = 352 images of 64 x 64
    through the student and again through the teacher; `VoCoLoss` with defaults (at batch 1
    the inter term has no partner volume and is 0). Gradient checkpointing
    (`enable_grad_checkpointing`, timm's: each block's activations recomputed in backward)
    off or on, in the student's backbone only: the teacher runs
    without gradient, where it would change nothing.
3d: VoCo's official pretraining step (Luffy03/VoCo, `models/voco_head.py` and `voco_train.py`),
    rebuilt here: the student is VoCo's `Swin` = MONAI `SwinTransformer` (in_chans 1,
    embed_dim 48, window 7, patch 2, depths [2, 2, 2, 2], heads [3, 6, 12, 24], mlp_ratio 4,
    qkv_bias, no dropout, spatial_dims 3, use_v2=True, gradient checkpointing on as in VoCo's
    `--use_checkpoint` default; `--no-swin-checkpoint` turns it off) plus the five MONAI
    `UnetrBasicBlock`s (kernel 3, stride 1, instance norm, res_block) that VoCo applies to
    the input and to the hidden states 0, 1, 2 and 4 (`encoder1/2/3/4/10`: 1->48 at 64^3,
    48->48 at 32^3, 96->96 at 16^3, 192->192 at 8^3, 768->768 at 2^3); each output is
    global-average-pooled and concatenated (48+48+96+192+768 = 1152) into the projection head
    1152-2048-2048 (`ProjectionHead`, identical to VoCo's `projection_head`). The teacher is a
    copy of the student. One volume gives 18 crops of 1 x 64^3 (a 4 x 4 grid of bases plus 2
    random crops, VoCo's `sw_batch_size` 2; VoCo cuts 96^3 crops of a 384 x 384 x 96 volume and
    resizes them to 64^3, here they are cut at the 64^3 scale of a random 64 x 256 x 256
    volume in [0, 1]). Step as in `VoCoHead.forward`: student forward on all 18 crops, EMA
    update (momentum 0.9), teacher forward without gradient, logits = mean of relu-cosines
    (student random vs teacher bases, teacher random vs student bases), loss = VoCo's
    `ce_loss` (pos + neg, here `intra_loss(form="voco_code")`) + `regularization_loss` over
    the 16 student bases (here `regularization_loss(form="voco_code")`), backward, AdamW
    (lr 1e-4, amsgrad, VoCo's settings; no clipping, as with VoCo's default amp).
    Not included: VoCo's data augmentation and the version of `Swin.forward` that
    concatenates each crop with itself along one axis (128 x 64 x 64 inputs) before the
    encoder, found in one revision of the official file. MONAI's SwinTransformer calls
    `einops.rearrange` only to permute axes; where einops is not installed, `permute_axes`
    (the same permutation with `Tensor.permute`) stands in for it.

Gradient checkpointing trades time for memory, and VoCo turns it on by default while this
project's 2D step does not, so one 3D step against one 2D step is not like for like. By default
each side runs both ways and three pairs are reported: both checkpointed, neither checkpointed,
and VoCo's default against this project's (3D checkpointed, 2D not: the mixed pair that
earlier figures compared). `--[no-]swin-checkpoint` and `--[no-]2d-checkpoint` run one side one
way only (and the pairs that then exist).

`--bare` adds, for context, forward+backward of the bare 2D backbone on the 352 images and of
the bare 3D encoder (Swin + the five blocks, pooled) on the 18 crops, without head, teacher or
optimizer, once each: checkpointed as the option says, by default as in its codebase (3D on,
2D off).

Each case runs in a fresh subprocess, one after the other, so its peak memory is its own: the
child's peak RSS (`ru_maxrss`) on CPU, `torch.cuda.max_memory_allocated` on CUDA (where both
cases run at the training loops' precision, `--precision auto`: bf16 on GPUs with native
bf16, fp16 on older ones, as both codebases train with mixed precision). Per case: `--warmup`
untimed steps, then `--repeats` timed steps, the median reported (seconds per step = per
volume). The last line is JSON with every figure, for scripts; `time_ratio` and
`memory_ratio` are 3D / 2D for the mixed pair, `checkpointed_...`, `unchecked_...` and
`bare_...` for the others.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kaggle_utils.common.backbone import (
    build_backbone,
    enable_grad_checkpointing,
    input_normalisation,
)
from kaggle_utils.common.runtime import PRECISIONS, Precision, resolve_precision
from kaggle_utils.pretrain.crops import cut_crops, sample_voco_crops
from kaggle_utils.pretrain.data import load_volume
from kaggle_utils.pretrain.losses import intra_loss, regularization_loss, similarity
from kaggle_utils.pretrain.model import ProjectionHead, update_momentum
from kaggle_utils.pretrain.train import PretrainConfig, _forward, build_voco

CASES = ("2d", "3d")
BARE_CASES = ("2d-backbone", "3d-encoder")
GRID_3D, CROP_3D, RANDOM_3D, FEATURE_SIZE = 4, 64, 2, 48
MONAI_HINT = 'monai is needed for the 3D case: pip install "monai>=1.3" (or use --skip-3d)'

Step = Callable[[], float]


def device_and_precision(precision: str) -> tuple[torch.device, Precision]:
    """The GPU if there is one, with the training loops' own precision choice (timing only:
    the steps below skip fp16's gradient scaler, which costs little)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, resolve_precision(precision, device)


def student_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def volume_2d(path: str, seed: int) -> Tensor:
    """(32, 1, 192, 192) uint8: a cached volume, or uniform random values."""
    if path:
        return torch.from_numpy(load_volume(Path(path)))
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (32, 1, 192, 192), dtype=np.uint8))


def build_2d(
    args: argparse.Namespace, device: torch.device, precision: Precision
) -> tuple[Step, int]:
    config = PretrainConfig()
    volume = volume_2d(args.volume, args.seed)
    model, loss_fn, optimizer = build_voco(config, volume.shape[1], device)
    if args.checkpoint_2d:
        enable_grad_checkpointing(model.student.backbone)  # the teacher runs without grad
    model.train()
    mean, std = input_normalisation(model.student.backbone, device)
    rng = np.random.default_rng(args.seed)
    crops = sample_voco_crops(
        tuple(volume.shape[-2:]), config.grid, config.n_random, rng,
        config.label_mode, config.crop_size,  # type: ignore[arg-type]
    )  # fmt: skip
    batch = {
        "random": cut_crops(volume, crops.random_boxes)[None],  # (1, R, S, C, h, w)
        "base": cut_crops(volume, crops.base_boxes)[None],  # (1, K, S, C, h, w)
        "labels": torch.from_numpy(crops.labels.astype(np.float32))[None],  # (1, R, K)
    }

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        parts = _forward(model.student, model.teacher, loss_fn, batch, mean, std, config, precision)
        parts.total.backward()
        nn.utils.clip_grad_norm_(model.student.parameters(), config.grad_clip)
        optimizer.step()
        model.update_teacher(config.momentum)
        return float(parts.total.detach())

    return step, student_params(model.student)


def build_2d_backbone(
    args: argparse.Namespace, device: torch.device, precision: Precision
) -> tuple[Step, int]:
    config = PretrainConfig()
    volume = volume_2d(args.volume, args.seed)
    backbone = build_backbone(config.backbone, volume.shape[1]).to(device)
    if args.checkpoint_2d:
        enable_grad_checkpointing(backbone)
    backbone.train()
    mean, std = input_normalisation(backbone, device)
    rng = np.random.default_rng(args.seed)
    crops = sample_voco_crops(
        tuple(volume.shape[-2:]), config.grid, config.n_random, rng,
        config.label_mode, config.crop_size,  # type: ignore[arg-type]
    )  # fmt: skip
    boxes = np.concatenate([crops.random_boxes, crops.base_boxes])
    images = cut_crops(volume, boxes).flatten(0, 1).to(device)  # (11 * 32, C, h, w)
    images = (images.float() / 255.0 - mean) / std

    def step() -> float:
        backbone.zero_grad(set_to_none=True)
        with precision.autocast():
            out = backbone(images).float().mean()
        out.backward()
        return float(out.detach())

    return step, student_params(backbone)


def permute_axes(x: Tensor, pattern: str) -> Tensor:
    """`einops.rearrange` for pure axis permutations ("b c d h w -> b d h w c"), the only kind
    MONAI's SwinTransformer uses; stands in for it where einops is not installed."""
    source, target = (side.split() for side in pattern.split("->"))
    if sorted(source) != sorted(target) or len(set(source)) != len(source):
        raise ValueError(f"not a plain permutation: {pattern!r}")
    return x.permute(*(source.index(axis) for axis in target))


def swin_transformer_class() -> type[nn.Module]:
    """MONAI's SwinTransformer, with `permute_axes` for einops where that is missing."""
    from monai.networks.nets import swin_unetr

    try:
        import einops  # noqa: F401
    except ImportError:
        swin_unetr.rearrange = permute_axes  # type: ignore[attr-defined]
    return swin_unetr.SwinTransformer


class VoCoSwin(nn.Module):
    """VoCo's `Swin`: MONAI SwinTransformer, five UNETR encoder blocks, pooled, projected."""

    def __init__(self, use_checkpoint: bool, with_head: bool = True) -> None:
        super().__init__()
        from monai.networks.blocks import UnetrBasicBlock

        f = FEATURE_SIZE
        self.swin_vit = swin_transformer_class()(
            in_chans=1,
            embed_dim=f,
            window_size=(7, 7, 7),
            patch_size=(2, 2, 2),
            depths=(2, 2, 2, 2),
            num_heads=(3, 6, 12, 24),
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=0.0,
            norm_layer=nn.LayerNorm,
            use_checkpoint=use_checkpoint,
            spatial_dims=3,
            use_v2=True,
        )
        # encoder1 (input), encoder2/3/4 (hidden states 0, 1, 2), encoder10 (hidden state 4)
        channels = (1, f), (f, f), (2 * f, 2 * f), (4 * f, 4 * f), (16 * f, 16 * f)
        self.encoders = nn.ModuleList(
            UnetrBasicBlock(3, c_in, c_out, 3, 1, norm_name="instance", res_block=True)
            for c_in, c_out in channels
        )
        pooled = f + f + 2 * f + 4 * f + 16 * f  # 1152
        self.proj_head = ProjectionHead(pooled, 2048, 2048) if with_head else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        # x: (N, 1, 64, 64, 64) -> (N, 2048), or (N, 1152) without the head
        hidden = self.swin_vit(x)
        inputs = (x, hidden[0], hidden[1], hidden[2], hidden[4])
        pooled = [
            F.adaptive_avg_pool3d(encoder(h), 1).flatten(1)
            for encoder, h in zip(self.encoders, inputs, strict=True)
        ]
        return self.proj_head(torch.cat(pooled, dim=1))


def crops_3d(seed: int) -> tuple[Tensor, Tensor]:
    """18 crops (2 random, then the 4 x 4 bases) of 1 x 64^3 and the (1, 2, 16) labels."""
    rng = np.random.default_rng(seed)
    side = GRID_3D * CROP_3D
    volume = torch.from_numpy(rng.random((1, CROP_3D, side, side), dtype=np.float32))
    crops = sample_voco_crops((side, side), GRID_3D, RANDOM_3D, rng, "area", CROP_3D)
    boxes = np.concatenate([crops.random_boxes, crops.base_boxes])
    inputs = cut_crops(volume, boxes).contiguous()  # (18, 1, 64, 64, 64)
    return inputs, torch.from_numpy(crops.labels.astype(np.float32))[None]


def build_3d(
    args: argparse.Namespace, device: torch.device, precision: Precision
) -> tuple[Step, int]:
    student = VoCoSwin(args.swin_checkpoint).to(device)
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    student.train()
    teacher.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, amsgrad=True)
    inputs, labels = (t.to(device) for t in crops_3d(args.seed))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            students = student(inputs).float()
        update_momentum(student, teacher, 0.9)  # VoCo updates the teacher before its forward
        with torch.no_grad(), precision.autocast():
            teachers = teacher(inputs).float()
        x_stu, bases_stu = students[:RANDOM_3D][None], students[RANDOM_3D:][None]
        x_tea, bases_tea = teachers[:RANDOM_3D][None], teachers[RANDOM_3D:][None]
        logits = (similarity(x_stu, bases_tea) + similarity(x_tea, bases_stu)) / 2
        loss = intra_loss(logits, labels, "voco_code") + regularization_loss(bases_stu, "voco_code")
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step, student_params(student)


def build_3d_encoder(
    args: argparse.Namespace, device: torch.device, precision: Precision
) -> tuple[Step, int]:
    encoder = VoCoSwin(args.swin_checkpoint, with_head=False).to(device)
    encoder.train()
    inputs, _ = crops_3d(args.seed)
    inputs = inputs.to(device)

    def step() -> float:
        encoder.zero_grad(set_to_none=True)
        with precision.autocast():
            out = encoder(inputs).float().mean()
        out.backward()
        return float(out.detach())

    return step, student_params(encoder)


BUILDERS: dict[str, Callable[[argparse.Namespace, torch.device, Precision], tuple[Step, int]]] = {
    "2d": build_2d,
    "3d": build_3d,
    "2d-backbone": build_2d_backbone,
    "3d-encoder": build_3d_encoder,
}


def peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def checkpointed(args: argparse.Namespace, case: str) -> bool:
    """Whether `case` runs with gradient checkpointing (both options set in a child)."""
    return bool(args.swin_checkpoint if case.startswith("3d") else args.checkpoint_2d)


def label(case: str, checkpoint: bool) -> str:
    return f"{case}+ckpt" if checkpoint else case


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """Build one case, warm up, time `repeats` steps; runs in the child process."""
    load_before = os.getloadavg()[0]  # other work on the machine skews the timings
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device, precision = device_and_precision(args.precision)
    step, params = BUILDERS[args.case](args, device, precision)
    for _ in range(args.warmup):
        step()
    times, loss = [], float("nan")
    for _ in range(args.repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result: dict[str, Any] = {
        "case": args.case,
        "grad_checkpointing": checkpointed(args, args.case),
        "device": device.type,
        "precision": precision.name,
        "threads": torch.get_num_threads(),
        "seconds_per_volume": round(statistics.median(times), 3),
        "step_seconds": [round(t, 3) for t in times],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "params": params,
        "loss": round(loss, 5),
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        result["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result["peak_mb"] = result.get("peak_cuda_mb", result["peak_rss_mb"])
    return result


def child_command(args: argparse.Namespace, case: str, checkpoint: bool) -> list[str]:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--case", case,
        "--repeats", str(args.repeats), "--warmup", str(args.warmup),
        "--threads", str(args.threads), "--seed", str(args.seed), "--precision", args.precision,
    ]  # fmt: skip
    if args.volume:
        command += ["--volume", args.volume]
    side = "swin" if case.startswith("3d") else "2d"
    command.append(f"--{side}-checkpoint" if checkpoint else f"--no-{side}-checkpoint")
    return command


def run_child(args: argparse.Namespace, case: str, checkpoint: bool) -> dict[str, Any]:
    """One case in a fresh interpreter; its last stdout line is its JSON result."""
    name = label(case, checkpoint)
    print(f"running {name} ...", flush=True)
    start = time.perf_counter()
    completed = subprocess.run(
        child_command(args, case, checkpoint), stdout=subprocess.PIPE, text=True, check=False
    )
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        reason = "killed (out of memory?)" if completed.returncode < 0 else "failed"
        print(f"  {name} {reason}: exit status {completed.returncode}", flush=True)
        return {"case": case, "error": f"exit status {completed.returncode}"}
    result = json.loads(lines[-1])
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    print(f"  {json.dumps(result)}", flush=True)
    return result


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    described = f"{cpu}, {os.cpu_count()} logical CPUs"
    if torch.cuda.is_available():
        described = f"{torch.cuda.get_device_name(0)} (CUDA); host {described}"
    return described


def ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    if key in a and key in b and b[key]:
        return round(a[key] / b[key], 2)
    return None


def report(
    args: argparse.Namespace,
    results: dict[str, dict[str, Any]],
    pairs: dict[str, tuple[str, str]],
) -> None:
    memory_kind = "peak CUDA MB" if torch.cuda.is_available() else "peak RSS MB"
    print(f"\nmachine: {machine()}; torch {torch.__version__}, {args.threads} threads")
    print(f"{'case':<16} {'s/volume':>9} {memory_kind:>13} {'params':>12}")
    for case, result in results.items():
        if "error" in result:
            print(f"{case:<16} {result['error']}")
            continue
        print(
            f"{case:<16} {result['seconds_per_volume']:>9.2f} {result['peak_mb']:>13.0f} "
            f"{result['params']:>12,}"
        )
    summary: dict[str, Any] = {
        "machine": machine(),
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "swin_checkpoint": args.swin_checkpoint,
        "2d_checkpoint": args.checkpoint_2d,
        "memory": "cuda_max_memory_allocated" if torch.cuda.is_available() else "peak_rss",
        "results": results,
    }
    for prefix, (three, two) in pairs.items():
        if three in results and two in results:
            time_ratio = ratio(results[three], results[two], "seconds_per_volume")
            memory_ratio = ratio(results[three], results[two], "peak_mb")
            summary[f"{prefix}time_ratio"] = time_ratio
            summary[f"{prefix}memory_ratio"] = memory_ratio
            print(f"{three} / {two}: time x{time_ratio}, memory x{memory_ratio}")
    summary.setdefault("time_ratio", None)
    summary.setdefault("memory_ratio", None)
    print(json.dumps(summary))


def monai_available() -> bool:
    try:
        import monai  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", choices=CASES + BARE_CASES, help="run one case (child mode)")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads"
    )
    parser.add_argument("--skip-3d", action="store_true", help="only the 2D case(s)")
    parser.add_argument("--bare", action="store_true", help="also the bare backbone/encoder")
    parser.add_argument(
        "--swin-checkpoint",
        action=argparse.BooleanOptionalAction,
        help="gradient checkpointing in the 3D Swin (VoCo's default: on); default: both ways",
    )
    parser.add_argument(
        "--2d-checkpoint",
        dest="checkpoint_2d",
        action=argparse.BooleanOptionalAction,
        help="gradient checkpointing in the 2D student's backbone; default: both ways",
    )
    parser.add_argument("--volume", default="", help="a cached (32, [C,] 192, 192) uint8 .npy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--precision", choices=PRECISIONS, default="auto",
        help="as the training loops: auto = bf16 on native-bf16 GPUs, fp16 on older, fp32 on CPU",
    )  # fmt: skip
    args = parser.parse_args()
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1, --warmup >= 0")

    wants_3d = (args.case or "").startswith("3d") or (args.case is None and not args.skip_3d)
    if wants_3d and not monai_available():
        print(MONAI_HINT, file=sys.stderr)
        sys.exit(2)
    if args.case:
        args.swin_checkpoint = args.swin_checkpoint is not False  # VoCo's default: on
        args.checkpoint_2d = bool(args.checkpoint_2d)
        print(json.dumps(run_case(args)))
        return

    # each side both ways unless its option says one, VoCo's and this project's default first
    ways_3d = [True, False] if args.swin_checkpoint is None else [args.swin_checkpoint]
    ways_2d = [False, True] if args.checkpoint_2d is None else [args.checkpoint_2d]
    args.swin_checkpoint, args.checkpoint_2d = ways_3d, ways_2d  # for the summary
    runs = [("2d", way) for way in ways_2d]
    if not args.skip_3d:
        runs += [("3d", way) for way in ways_3d]
    pairs = {  # summary key prefix: (3D case, 2D case), 3D / 2D
        "checkpointed_": ("3d+ckpt", "2d+ckpt"),
        "unchecked_": ("3d", "2d"),
        "": ("3d+ckpt", "2d"),  # mixed: VoCo's default against this project's
    }
    if args.bare:
        runs.append(("2d-backbone", ways_2d[0]))
        if not args.skip_3d:
            runs.append(("3d-encoder", ways_3d[0]))
        pairs["bare_"] = (label("3d-encoder", ways_3d[0]), label("2d-backbone", ways_2d[0]))
    results = {  # one after the other
        label(case, way): run_child(args, case, way) for case, way in runs
    }
    report(args, results, pairs)


if __name__ == "__main__":
    main()
