"""FFCV pipeline pieces of calm-fast's loaders: the resize decoder, on-device normalisation, rank sharding.

Imported lazily by :mod:`calm_fast.data.ffcv` (importing FFCV costs a few seconds), so that the rest of
calm-fast starts quickly and still works where FFCV is not installed.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from ffcv.fields.rgb_image import IMAGE_MODES, SimpleRGBImageDecoder
from ffcv.libffcv import ctypes_imdecode, ctypes_resize
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State
from ffcv.traversal_order.base import TraversalOrder

__all__ = ["SquashResizeDecoder", "NormalizeOnDevice", "ShardedOrder", "shard_order"]


class SquashResizeDecoder(SimpleRGBImageDecoder):
    """Decode an ``RGBImageField`` and resize the whole image to a square, aspect not kept.

    Evaluation (``crop_size=None``): resize straight to ``resize_size``², as the WSOL metrics assume.
    Training (``crop_size=S``): resize to ``resize_size``², then a uniformly random ``S``×``S`` crop,
    mirrored left-right with probability 1/2 (the reference recipe of CALM.md §3). The resize is OpenCV's
    INTER_AREA (FFCV's ``resize_crop``). Output: uint8 ``[B, S, S, 3]`` RGB. It subclasses FFCV's simple
    decoder only so that FFCV takes it as the field's decoder (it checks the type).

    The crop and flip are drawn from numba's per-thread generators, which FFCV does not seed: they are not
    reproducible from run to run (the sample order is).
    """

    def __init__(self, resize_size: int, crop_size: int | None = None):
        super().__init__()
        self.resize_size = int(resize_size)
        self.crop_size = None if crop_size is None else int(crop_size)

    def declare_state_and_memory(self, previous_state: State):
        out_side = self.resize_size if self.crop_size is None else self.crop_size
        max_pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
        output = AllocationQuery((out_side, out_side, 3), np.dtype("u1"))
        decoded = AllocationQuery((max_pixels * np.uint64(3),), np.dtype("u1"))
        # Evaluation never uses the square buffer; one pixel keeps the allocation tuple uniform.
        square_side = self.resize_size if self.crop_size is not None else 1
        square = AllocationQuery((square_side, square_side, 3), np.dtype("u1"))
        state = replace(previous_state, jit_mode=True, shape=(out_side, out_side, 3), dtype=np.dtype("u1"))
        return state, (output, decoded, square)

    def generate_code(self):
        memory_read = self.memory_read
        parallel_range = Compiler.get_iterator()
        # FFCV's native functions are called through ctypes directly: wrapping them in a numba dispatcher
        # per loader (as FFCV's decoders do) makes numba report KeyErrors when those dispatchers are freed.
        decode_jpeg, resize = ctypes_imdecode, ctypes_resize
        jpeg_mode = IMAGE_MODES["jpg"]
        resize_size = self.resize_size
        crop_size = -1 if self.crop_size is None else self.crop_size
        random_crop = self.crop_size is not None

        def decode(batch_indices, storage, metadata, storage_state):
            output, decoded, square = storage
            for k in parallel_range(len(batch_indices)):
                field = metadata[batch_indices[k]]
                data = memory_read(field["data_ptr"], storage_state)
                height = np.uint32(field["height"])
                width = np.uint32(field["width"])
                if field["mode"] == jpeg_mode:
                    buffer = decoded[k]
                    # source, its size, its height and width, destination, crop height and width, crop
                    # offsets, scale numerator and denominator, crop?, flip?
                    decode_jpeg(data.ctypes.data, data.size, height, width, buffer.ctypes.data,
                                height, width, 0, 0, 1, 1, False, False)
                    image = buffer[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)
                # resize(0, source, its rows and columns, source row range, column range, target, its size)
                target = square[k] if random_crop else output[k]
                resize(0, image.ctypes.data, height, width, 0, height, 0, width,
                       target.ctypes.data, target.shape[0], target.shape[1])
                if random_crop:
                    top = np.random.randint(0, resize_size - crop_size + 1)
                    left = np.random.randint(0, resize_size - crop_size + 1)
                    window = square[k, top : top + crop_size, left : left + crop_size]
                    if np.random.rand() < 0.5:
                        output[k] = window[:, ::-1]
                    else:
                        output[k] = window
            return output[: len(batch_indices)]

        decode.is_parallel = True
        return decode


class NormalizeOnDevice(Operation):
    """uint8 ``[B, 3, H, W]`` tensor on an accelerator → ``(x - mean) / std`` in ``dtype`` and ``memory_format``.

    FFCV's own ``NormalizeImage`` needs CuPy on the GPU; this is the same arithmetic in plain PyTorch,
    done in fp32 and cast once, so bf16/fp16 batches round only at the end. ``mean`` and ``std`` are on
    the 0–255 scale.
    """

    def __init__(self, mean: np.ndarray, std: np.ndarray, dtype: torch.dtype,
                 memory_format: torch.memory_format = torch.channels_last):
        super().__init__()
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.dtype = dtype
        self.memory_format = memory_format
        self.device = None

    def declare_state_and_memory(self, previous_state: State):
        self.device = previous_state.device
        return replace(previous_state, dtype=self.dtype), None

    def generate_code(self):
        mean = torch.from_numpy(self.mean).view(1, 3, 1, 1).to(self.device)
        inverse_std = torch.from_numpy(1.0 / self.std).view(1, 3, 1, 1).to(self.device)
        dtype, memory_format = self.dtype, self.memory_format

        def normalize(images, _):
            return ((images.float() - mean) * inverse_std).to(dtype=dtype, memory_format=memory_format)

        return normalize


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


class ShardedOrder(TraversalOrder):
    """FFCV traversal order for one rank, with the rank and world size given, not read from torch.distributed.

    FFCV's own ``distributed=True`` builds a torch DistributedSampler, which needs an initialised process
    group and pads the evaluation split with duplicates. This order shards as :func:`shard_order` says,
    keeps whole batches only when ``drop_last`` and can skip the first batches of an epoch (resuming).

    FFCV's Loader instantiates a custom order by calling it with the loader, so the instance is built
    first with its own settings and bound to the loader by :meth:`__call__`.
    """

    def __init__(self, rank: int, world_size: int, shuffle: bool, seed: int, pad: bool, batch_size: int,
                 drop_last: bool):
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.seed = seed
        self.pad = pad
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.indices = None
        self.skip_batches = {}  # epoch -> number of batches to skip at its start

    def __call__(self, loader) -> "ShardedOrder":
        self.loader = loader
        self.indices = np.asarray(loader.indices)
        return self

    def sample_order(self, epoch: int) -> np.ndarray:
        order = shard_order(self.indices, self.rank, self.world_size, self.shuffle, self.seed, epoch, self.pad)
        if self.drop_last:
            order = order[: len(order) // self.batch_size * self.batch_size]
        return order[self.skip_batches.get(epoch, 0) * self.batch_size :]
