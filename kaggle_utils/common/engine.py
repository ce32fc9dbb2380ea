"""The training machinery the three loops (pretraining, fine-tuning, segmentation) share."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler


def cosine_schedule(step: int, max_steps: int, start: float, end: float) -> float:
    """`start` at step 0, `end` at `max_steps` (and after), cosine in between."""
    if max_steps <= 0 or step >= max_steps:
        return end
    return end - (end - start) * (math.cos(math.pi * step / max_steps) + 1.0) / 2.0


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_factor: float = 0.0) -> float:
    """Learning-rate factor: linear warmup from ~0 to 1, then cosine down to `min_factor`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
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
