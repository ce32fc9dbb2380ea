"""The training machinery the three loops (pretraining, fine-tuning, segmentation) share.

    parameter_groups    AdamW groups: norm and bias parameters without weight decay
    OptimizerStep       one optimizer step over gradient-accumulation micro-batches
    save_checkpoint     everything an exact resume needs, written atomically ...
    load_checkpoint     ... and read back with `weights_only=True`
    warmup_cosine       the learning-rate factor of pretraining and fine-tuning
    ResumableSampler    an epoch's shuffled order that a resumed run continues mid-way

Each loop keeps its own forward pass and loss; everything between the loss and the next batch
(scaling, accumulation, DDP synchronisation, clipping, optimizer, scaler and scheduler steps)
and everything a resume restores is here, once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Sampler

from kaggle_utils.common import runtime
from kaggle_utils.common.io import save_torch_atomic

CHECKPOINT_FORMAT = 2  # the layout `save_checkpoint` writes


def parameter_groups(
    named_parameters: Iterable[tuple[str, nn.Parameter]],
    weight_decay: float,
    decay_norm_and_bias: bool = False,
    **group_options: Any,
) -> list[dict[str, Any]]:
    """AdamW parameter groups that decay weights but not norm scales, norm shifts and biases
    (timm's rule: every 1-D parameter and every `*.bias`), unless `decay_norm_and_bias`.

    Decaying a norm's scale pulls it towards zero for no regularising benefit, which is why
    timm (`param_groups_weight_decay`) and most recipes exempt them. `decay_norm_and_bias=True`
    gives one group with every parameter, as the loops did before. `group_options` (e.g. `lr`)
    go into every group. Frozen parameters are kept: a loop may unfreeze them later.
    """
    named = list(named_parameters)
    if decay_norm_and_bias:
        return [{"params": [p for _, p in named], "weight_decay": weight_decay, **group_options}]
    decay = [p for name, p in named if p.ndim > 1 and not name.endswith(".bias")]
    no_decay = [p for name, p in named if p.ndim <= 1 or name.endswith(".bias")]
    groups = [
        {"params": decay, "weight_decay": weight_decay, **group_options},
        {"params": no_decay, "weight_decay": 0.0, **group_options},
    ]
    return [group for group in groups if group["params"]]


class OptimizerStep:
    """The part of a training step every loop shares, around the loop's own forward and loss:

        step = OptimizerStep(optimizer, scheduler, precision, grad_accum=2, grad_clip=1.0,
                             clip_parameters=model.parameters(), ddp_model=wrapped)
        for micro, batch in enumerate(batches):
            last = step.is_last(micro)
            with step.sync(last):              # DDP reduces gradients on the last one only
                with precision.autocast():
                    loss = ...
                step.backward(loss)            # scaled, divided by grad_accum
            if last:
                step.step()                    # unscale, clip, optimizer, scaler, scheduler

    `scaler` (a no-op unless fp16 on CUDA) belongs to the step and goes into every checkpoint.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        precision: runtime.Precision,
        grad_accum: int = 1,
        grad_clip: float = 0.0,
        clip_parameters: Iterable[nn.Parameter] | None = None,
        ddp_model: nn.Module | None = None,
    ) -> None:
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be at least 1, not {grad_accum}")
        self.optimizer, self.scheduler, self.precision = optimizer, scheduler, precision
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        self.clip_parameters = list(clip_parameters) if clip_parameters is not None else None
        self.ddp_model = ddp_model
        self.scaler = precision.grad_scaler()

    def is_last(self, micro: int, n_batches: int | None = None) -> bool:
        """Whether micro-batch `micro` (0-based, counted over the epoch) closes a step: every
        `grad_accum`-th one, and the epoch's last one."""
        return (micro + 1) % self.grad_accum == 0 or (
            n_batches is not None and micro + 1 == n_batches
        )

    def sync(self, last: bool) -> AbstractContextManager[Any]:
        if self.ddp_model is not None and not last:
            return self.ddp_model.no_sync()  # type: ignore[operator]
        return nullcontext()

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss / self.grad_accum).backward()

    def step(self) -> None:
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            parameters = self.clip_parameters
            if parameters is None:
                parameters = [p for g in self.optimizer.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(parameters, self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


def save_checkpoint(
    path: str | Path,
    modules: Mapping[str, nn.Module],
    step: OptimizerStep,
    state: Mapping[str, Any],
    numpy_rng: np.random.Generator | None = None,
) -> None:
    """Everything an exact resume needs, in one file written atomically: the modules' weights,
    the optimizer, the gradient scaler, the scheduler, the loop's `state` (its step or epoch
    and its sampler position, plain numbers), the global RNG states and the loop's own numpy
    generator. Only tensors and plain types, so `load_checkpoint` reads it with
    `weights_only=True` (a checkpoint from a shared dataset can never run code)."""
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "modules": {name: module.state_dict() for name, module in modules.items()},
        "optimizer": step.optimizer.state_dict(),
        "scaler": step.scaler.state_dict(),
        "scheduler": step.scheduler.state_dict(),
        "state": dict(state),
        "rng": runtime.rng_state(),
    }
    if numpy_rng is not None:  # its state holds 128-bit ints: kept as JSON text
        payload["numpy_rng"] = json.dumps(numpy_rng.bit_generator.state)
    save_torch_atomic(payload, path)


def load_checkpoint(
    path: str | Path,
    modules: Mapping[str, nn.Module],
    step: OptimizerStep,
    device: torch.device | str = "cpu",
    numpy_rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote into the live objects; returns the loop's state.

    Raises:
        ValueError: the file was written by an older version of this code (another layout);
            delete it, or start over with resume=False.
    """
    payload = torch.load(path, map_location=device, weights_only=True)
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} is a checkpoint in an older layout, which this version cannot resume: "
            "delete it (or pass resume=False) to start the run over"
        )
    for name, module in modules.items():
        module.load_state_dict(payload["modules"][name])
    step.optimizer.load_state_dict(payload["optimizer"])
    step.scaler.load_state_dict(payload["scaler"])
    step.scheduler.load_state_dict(payload["scheduler"])
    runtime.set_rng_state(payload["rng"])
    if numpy_rng is not None:
        numpy_rng.bit_generator.state = json.loads(payload["numpy_rng"])
    return dict(payload["state"])


def cosine_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """`start` at step 0, `end` at `max_steps` (and after), cosine in between."""
    if max_steps <= 0 or step >= max_steps:
        return end
    return end - (end - start) * (math.cos(math.pi * step / max_steps) + 1.0) / 2.0


def warmup_cosine(
    step: int, warmup_steps: int, max_steps: int, min_factor: float = 0.0, cycle_steps: int = 0
) -> float:
    """Learning-rate factor: linear warmup from ~0 to 1, then cosine down to `min_factor`
    at `max_steps`; with `cycle_steps` > 0, down to it after `cycle_steps` and back up over
    as many, periodically (PyTorch's CosineAnnealingLR with T_max = cycle_steps)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if cycle_steps > 0:
        phase = math.pi * (step - warmup_steps) / cycle_steps
        return min_factor + (1.0 - min_factor) * (1.0 + math.cos(phase)) / 2.0
    decay_steps = max(1, max_steps - warmup_steps)
    return cosine_schedule(step - warmup_steps, decay_steps, 1.0, min_factor)


class ResumableSampler(Sampler[int]):
    """Shuffled indices of one epoch, this rank's shard, starting at `start`.

    The permutation depends only on (seed, epoch); rank r of w takes positions r, r + w, ...
    (padded by wrapping so every rank gets the same count).
    """

    def __init__(self, n_items: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n_items, self.seed, self.rank, self.world_size = n_items, seed, rank, world_size
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def shard(self) -> list[int]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.n_items)
        per_rank = -(-self.n_items // self.world_size)
        padded = np.resize(order, per_rank * self.world_size)
        return padded[self.rank :: self.world_size].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.shard()[self.start :])

    def __len__(self) -> int:
        return len(self.shard()) - self.start
