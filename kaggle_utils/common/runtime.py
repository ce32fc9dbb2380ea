"""Run-time plumbing shared by the training loops: torchrun/DDP set-up, seeding, RNG state
for exact resume, and the choice of device and numeric precision."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import random
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from kaggle_utils.common import paths
from kaggle_utils.common.config import JsonConfig
from kaggle_utils.common.io import copy_file_atomic

logger = logging.getLogger(__name__)


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if usable_gpu() else "gloo"
        dist.init_process_group(backend=backend)
    return True


def device_for(distributed: bool) -> torch.device:
    """The training loops' device: this rank's GPU when torch can run on it, else the CPU
    (`pick_device`'s warning says why)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0
    device = pick_device("auto", local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


# --------------------------------------------------------------------------- device


def gpu_unsupported_reason(index: int = 0) -> str:
    """'' when this torch build has kernels for GPU `index`, else why not. A GPU torch was not
    compiled for still shows up in `torch.cuda.is_available()` (Kaggle's P100, compute
    capability 6.0, under a torch built for 7.0 and up), and its first kernel fails with "no
    kernel image is available": the compiled architectures (`torch.cuda.get_arch_list()`) must
    cover it. A cubin `sm_XY` runs on the same major version with a minor of at least Y; PTX
    (`compute_XY`) is compiled for any GPU of at least X.Y; arch-specific targets (`sm_90a`)
    only on that GPU."""
    major, minor = torch.cuda.get_device_capability(index)
    arches = torch.cuda.get_arch_list()
    for arch in arches:
        kind, _, number = arch.partition("_")
        digits = number.rstrip("abcdefghijklmnopqrstuvwxyz")
        if not digits.isdigit():
            continue
        arch_major, arch_minor = int(digits[:-1]), int(digits[-1])
        specific = digits != number
        if (
            kind == "sm"
            and arch_major == major
            and (arch_minor == minor if specific else arch_minor <= minor)
        ):
            return ""
        if kind == "compute" and not specific and (arch_major, arch_minor) <= (major, minor):
            return ""
    name = torch.cuda.get_device_name(index)
    return (
        f"{name} (compute capability {major}.{minor}) is not supported by this torch "
        f"{torch.__version__}, which was built for {' '.join(arches) or 'no GPU'}"
    )


@functools.cache
def _warn_once(message: str) -> None:
    """Loud (the log and stderr), once per process: every fold asks for the device."""
    logger.warning(message)
    print(message, file=sys.stderr, flush=True)


def usable_gpu(index: int = 0) -> bool:
    return torch.cuda.is_available() and not gpu_unsupported_reason(index)


def pick_device(device: str | torch.device = "auto", index: int = 0) -> torch.device:
    """ "auto": GPU `index` when there is one this torch can run on, else the CPU, with a loud
    warning when a GPU is there but unusable (on Kaggle: choose "GPU T4 x2" in the notebook's
    settings). "cpu", "cuda" or "cuda:N" are taken as asked.

    Raises:
        ValueError: a GPU is asked for, but there is none or this torch cannot run on it.
    """
    if str(device) == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        reason = gpu_unsupported_reason(index)
        if not reason:
            return torch.device("cuda", index)
        _warn_once(
            f"!!! {reason}: running on the CPU instead, many times slower. On Kaggle, choose "
            'the accelerator "GPU T4 x2" (Settings > Accelerator; `machine_shape: '
            '"NvidiaTeslaT4"` in kernel-metadata.json) or an L4 or RTX Pro 6000.'
        )
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available: use 'auto'")
        reason = gpu_unsupported_reason(resolved.index or 0)
        if reason:
            raise ValueError(f"device {device!r}: {reason}; use 'auto' to fall back to the CPU")
    return resolved


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    tensor = torch.tensor(list(values.values()), device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(values, tensor.tolist(), strict=True))


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Each gradient averaged over the ranks, in place: for parameters trained outside
    DistributedDataParallel."""
    world_size = dist.get_world_size()
    for param in parameters:
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= world_size


def agree(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any (so all ranks stop at the same step)."""
    tensor = torch.tensor([int(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - for third-party code; ours uses Generators
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Global RNG states. This project draws from seeded Generators, but third-party code
    (timm, torch ops) may use the global ones; saved as tensors and plain types so that
    `torch.load(weights_only=True)` reads them back."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), gauss],
        "python": json.dumps(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, gauss = state["numpy"]
    numpy_state = (name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss)
    np.random.set_state(numpy_state)  # noqa: NPY002
    version, internal, gauss_next = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def copy_previous_run(
    source: str | Path,
    output_dir: Path,
    resume_points: Sequence[str] = ("checkpoint.pt", "fold*/last.pt", "fold*/done.json"),
) -> bool:
    """Copy an earlier run folder into `output_dir` unless that already holds a resume point
    (`resume_points`: notebook 02's checkpoint, notebook 03's per-fold files), so that the
    usual resume takes over. On Kaggle a new session starts with an empty /kaggle/working and
    the previous session's output is read-only under /kaggle/input. Every file goes to a
    temporary name and is renamed, the resume points last, so a copy cut short is redone by
    the next call. Prints what it copied; returns whether it copied anything.

    Raises:
        FileNotFoundError: `source` is not a folder, or holds no resume point.
    """
    output_dir = Path(output_dir)

    def resume_files(folder: Path) -> set[Path]:
        return {path for pattern in resume_points for path in folder.glob(pattern)}

    found = [p for p in paths.find_inputs(source) if p.is_dir()]
    source = next((p for p in found if resume_files(p)), found[0] if found else Path(source))

    if not source.is_dir():
        raise FileNotFoundError(f"resume_from {source} is not a folder: give the earlier run's")
    points = resume_files(source)
    if not points:
        raise FileNotFoundError(
            f"resume_from {source} holds no resume point ({', '.join(resume_points)}): give "
            "the earlier run's folder itself (on Kaggle /kaggle/input/<dataset>/<run folder>)"
        )
    if resume_files(output_dir):
        print(f"{output_dir} already holds a resume point: resume_from {source} not copied")
        return False
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.name.endswith(".tmp"))
    for path in [p for p in files if p not in points] + [p for p in files if p in points]:
        copy_file_atomic(path, output_dir / path.relative_to(source))
    size = sum(p.stat().st_size for p in files)
    entries = sorted({p.relative_to(source).parts[0] for p in files})
    print(
        f"copied {len(files)} files ({size / 1e6:.1f} MB) from {source} to {output_dir}: "
        f"{', '.join(entries)}"
    )
    return True


def run_torchrun(
    module: str, config: JsonConfig, output_dir: Path, nproc_per_node: int = 0
) -> None:
    """Write `config` to `output_dir/config.json`, then run `torchrun --standalone
    --nproc_per_node N -m <module> --config <that file>` in a child process (one process per
    GPU by default), its output streamed; for notebooks.

    Raises:
        RuntimeError: torchrun exited with an error (its last lines are in the message).
    """
    config_file = Path(output_dir) / "config.json"
    config.to_json(config_file)
    n_procs = nproc_per_node or max(1, torch.cuda.device_count())
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={n_procs}", "-m", module, "--config", str(config_file),
    ]  # fmt: skip
    tail: list[str] = []
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            print(line, end="", flush=True)
            tail = [*tail[-40:], line]
    if process.returncode != 0:
        raise RuntimeError(f"torchrun exited with {process.returncode}:\n{''.join(tail)}")


# --------------------------------------------------------------------------- precision

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclasses.dataclass(frozen=True)
class Precision:
    """How a loop computes on its device: autocast to bf16 or fp16, or plain fp32. fp16 needs
    the gradient scaler (its range underflows small gradients); bf16 and fp32 do not."""

    name: str  # "bf16", "fp16" or "fp32"
    device_type: str  # "cuda" or "cpu"

    @property
    def dtype(self) -> torch.dtype | None:
        return _DTYPES[self.name]

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    @property
    def uses_grad_scaler(self) -> bool:
        return self.name == "fp16"  # resolve_precision allows fp16 on CUDA only

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is a no-op unless fp16 on CUDA needs it (so loops call it always)."""
        return torch.amp.GradScaler("cuda", enabled=self.uses_grad_scaler)


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes bf16 in hardware (compute capability 8.0 and up: Ampere, Ada,
    Hopper). `torch.cuda.is_bf16_supported` is also true on a T4 (7.5) or a P100 (6.0),
    where bf16 is emulated and slower than fp16, so it is not the test."""
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_precision(precision: str, device: torch.device) -> Precision:
    """The one decision of pretraining, fine-tuning and inference: "auto" is bf16 on a GPU
    with native bf16, fp16 with the gradient scaler on an older GPU (Kaggle's T4 and P100),
    fp32 on the CPU; "bf16", "fp16" and "fp32" force that choice.

    Raises:
        ValueError: an unknown name, or fp16 on the CPU (CPU autocast has no gradient scaler;
            use "bf16" or "fp32" there).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, not {precision!r}")
    device = torch.device(device)
    if device.type != "cuda":
        if precision == "fp16":
            raise ValueError('precision "fp16" needs a GPU: use "auto", "bf16" or "fp32"')
        return Precision("fp32" if precision == "auto" else precision, device.type)
    if precision == "auto":
        precision = "bf16" if native_bf16(device) else "fp16"
    elif precision == "bf16" and not native_bf16(device):
        major, minor = torch.cuda.get_device_capability(device)
        logger.warning(
            "bf16 asked for on a GPU of compute capability %d.%d: it is emulated there (slow); "
            '"auto" would pick fp16', major, minor,
        )  # fmt: skip
    return Precision(precision, "cuda")
