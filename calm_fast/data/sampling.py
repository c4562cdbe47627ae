"""Which samples each rank reads, for the torch and FFCV loaders alike: `shard_order` (one epoch's order
for one rank, optionally shuffled from (seed, epoch) and padded so all ranks take the same number of
steps), `ShardSampler` (that order as a torch Sampler) and `global_batch_indices` (training's global
batches cut into each rank's micro-batches, so runs with the same global batch see the same samples
whatever the number of ranks and accumulation steps).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
from torch.utils.data import Sampler

__all__ = ["shard_order", "ShardSampler", "global_batch_indices"]


def shard_order(
    indices: np.ndarray,
    rank: int,
    world_size: int,
    shuffle: bool,
    seed: int,
    epoch: int,
    pad: bool,
) -> np.ndarray:
    """This rank's samples for one epoch.

    ``shuffle``: a permutation of all samples drawn from ``(seed, epoch)``, the same on every rank.
    ``pad``: repeat samples from the start of that order until every rank gets ``ceil(N / world_size)``
    (as torch's DistributedSampler does), so that all ranks take the same number of steps; without it
    every sample goes to exactly one rank and ranks differ in size by at most one.
    Rank ``r`` takes positions ``r, r + world_size, ...``.
    """
    order = np.asarray(indices)
    if shuffle:
        order = np.random.default_rng([seed, epoch]).permutation(order)
    if pad and len(order) % world_size:
        missing = world_size - len(order) % world_size
        order = np.concatenate([order, np.resize(order, missing)])
    return order[rank::world_size]


class ShardSampler(Sampler):
    """This rank's share of a dataset, as ``(index, epoch)`` keys.

    Training (``shuffle=True``): a permutation seeded by ``(seed, epoch)``, padded by wrapping around to a
    multiple of ``world_size`` so every rank runs the same number of steps (a few images appear twice
    per epoch when the size does not divide), then rank ``r`` takes positions ``r, r + W, ...``.
    Evaluation (``shuffle=False``): no padding, rank ``r`` takes indices ``r, r + W, ...``; every image is
    seen exactly once across ranks and shard sizes differ by at most one.
    Call :meth:`set_epoch` before each epoch.
    """

    def __init__(self, size: int, rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0):
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.size, self.rank, self.world_size = size, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        """This rank's dataset indices for the current epoch."""
        return shard_order(np.arange(self.size), self.rank, self.world_size, self.shuffle, self.seed, self.epoch,
                           pad=self.shuffle)

    def __iter__(self):
        epoch = self.epoch
        return iter([(int(i), epoch) for i in self.indices()])

    def __len__(self) -> int:
        if self.shuffle:
            return math.ceil(self.size / self.world_size)
        return len(range(self.rank, self.size, self.world_size))


def global_batch_indices(num_samples: int, global_batch: int, world_size: int, rank: int, grad_accum: int,
                         seed: int, epoch: int, first_step: int = 0) -> Iterator[np.ndarray]:
    """Sample indices of this rank's micro-batches for one epoch, from optimizer step `first_step` on.

    The epoch's order is a permutation seeded by (seed, epoch); optimizer step b takes the global batch
    perm[b·G : (b+1)·G] and cuts it into world_size × grad_accum contiguous micro-batches, micro-step m of
    rank r taking chunk m·world_size + r. One rank with grad_accum = 2 thus sees exactly the micro-batches
    that two ranks see in one step. The incomplete last global batch is dropped.
    """
    micro = global_batch // (world_size * grad_accum)
    order = np.random.default_rng([seed, epoch]).permutation(num_samples)
    for step in range(first_step, num_samples // global_batch):
        for m in range(grad_accum):
            start = step * global_batch + (m * world_size + rank) * micro
            yield order[start:start + micro]
