"""calm_fast.data.sampling: each training step's global batch of the epoch's permutation, split over ranks
and micro-batches, and the requests that TrainBatches (calm_fast.data.loaders) makes from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calm_fast.config import load_config
from calm_fast.data.loaders import TrainBatches
from calm_fast.data.sampling import global_batch_indices


def _micro_batches(n, g, world, rank, accum, epoch, first_step=0):
    return [b.tolist() for b in global_batch_indices(n, g, world, rank, accum, seed=5, epoch=epoch,
                                                     first_step=first_step)]


@pytest.mark.parametrize("world, accum", [(1, 1), (1, 4), (2, 1), (2, 2), (4, 1)])
def test_each_step_consumes_one_global_batch_of_the_epoch_permutation(world, accum):
    n, g = 70, 16  # 4 full global batches, 6 samples dropped
    order = np.random.default_rng([5, 3]).permutation(n)
    per_rank = [_micro_batches(n, g, world, r, accum, epoch=3) for r in range(world)]
    assert all(len(batches) == 4 * accum for batches in per_rank)
    for step in range(4):
        taken = [i for r in range(world) for b in per_rank[r][step * accum:(step + 1) * accum] for i in b]
        assert sorted(taken) == sorted(order[step * g:(step + 1) * g].tolist())


def test_one_rank_with_accumulation_sees_the_micro_batches_of_two_ranks():
    one = _micro_batches(64, 16, world=1, rank=0, accum=2, epoch=0)
    two = [_micro_batches(64, 16, world=2, rank=r, accum=1, epoch=0) for r in range(2)]
    for step in range(4):
        assert one[2 * step] == two[0][step] and one[2 * step + 1] == two[1][step]


def test_first_step_skips_whole_global_batches_and_epochs_differ():
    full = _micro_batches(64, 8, world=2, rank=1, accum=1, epoch=2)
    assert _micro_batches(64, 8, world=2, rank=1, accum=1, epoch=2, first_step=5) == full[5:]
    assert _micro_batches(64, 8, world=2, rank=1, accum=1, epoch=3) != full


class _KeyDataset(torch.utils.data.Dataset):
    """Returns the key it was asked for, so the test sees what TrainBatches requests."""

    def __len__(self):
        return 40

    def __getitem__(self, key):
        index, epoch = key
        return torch.zeros(1), epoch, index


def test_train_batches_request_this_ranks_samples_with_the_epoch():
    from calm_fast.distributed import World

    cfg = load_config(None, ["data.batch_size=8", "train.grad_accum=2", "data.workers=0", "train.seed=5"])
    world = World(rank=1, local_rank=1, world_size=2, local_world_size=2, device=torch.device("cpu"))
    batches = TrainBatches(_KeyDataset(), cfg, world)
    assert batches.steps_per_epoch == 5
    got = [(epochs.tolist(), indices.tolist()) for _, epochs, indices in batches.micro_batches(epoch=3, first_step=2)]
    expected = _micro_batches(40, 8, world=2, rank=1, accum=2, epoch=3, first_step=2)
    assert [indices for _, indices in got] == expected and len(got) == 3 * 2
    assert all(epochs == [3, 3] for epochs, _ in got)
