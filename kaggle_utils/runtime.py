"""Run-time plumbing shared by the training loops: torchrun/DDP set-up, seeding, RNG state
for exact resume, atomic file writes and CSV logs."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import random
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist


def init_distributed() -> bool:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    return True


def device_for(distributed: bool) -> torch.device:
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0")) if distributed else 0
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def mean_over_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    tensor = torch.tensor(list(values.values()), device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    tensor /= dist.get_world_size()
    return dict(zip(values, tensor.tolist(), strict=True))


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


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def append_csv(path: Path, row: dict[str, Any], columns: Sequence[str]) -> None:
    new = not path.is_file()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        if new:
            writer.writeheader()
        writer.writerow(row)


def truncate_csv(path: Path, step: int, columns: Sequence[str], key: str = "step") -> None:
    """Drop log rows past the checkpoint a run resumes from (written before it was killed)."""
    if not path.is_file():
        return
    with open(path, newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if int(r[key]) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def save_torch_atomic(payload: Any, path: Path) -> None:
    """torch.save to a temporary sibling, then rename: a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


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


_Config = TypeVar("_Config", bound="JsonConfig")


class JsonConfig:
    """Mixin for run-setting dataclasses: written to and read from a config.json (what
    `torchrun -m ... --config` reads)."""

    @classmethod
    def from_json(cls: type[_Config], path: str | Path) -> _Config:
        return cls(**json.loads(Path(path).read_text()))

    def to_json(self, path: str | Path) -> None:
        payload = dataclasses.asdict(self)  # type: ignore[call-overload]
        write_text_atomic(Path(path), json.dumps(payload, indent=1))
