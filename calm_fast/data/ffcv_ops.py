"""FFCV pipeline pieces of calm-fast's loaders: the resize decoder, on-device normalisation, rank sharding.

Imported on use by :mod:`calm_fast.data.ffcv_loader` (importing FFCV costs a few seconds), so that the rest
of calm-fast starts quickly and still works where FFCV is not installed.
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

from calm_fast.data.sampling import shard_order
from calm_fast.modes import DecoderMode, choices

__all__ = ["WSOLImageDecoder", "NormalizeOnDevice", "ShardedOrder"]



class WSOLImageDecoder(SimpleRGBImageDecoder):
    """Decode an ``RGBImageField`` into ``[B, S, S, 3]`` RGB images (S = ``output_size``), one of two ways.

    ``"eval"``: the whole image resized straight to S², aspect not kept, as the WSOL metrics assume.
    ``"reference"``: the whole image resized to ``resize_size``² (aspect not kept), a uniformly random S²
    crop of it, mirrored left-right with probability 1/2 (the reference recipe of CALM.md §3).
    Resizing is OpenCV's INTER_AREA through FFCV's native library, called via ctypes directly: FFCV's
    own decoders wrap it in fresh numba dispatchers per loader, which numba then fails to free cleanly
    ("Exception ignored ... KeyError"). It subclasses FFCV's simple decoder only because FFCV recognises
    a field's decoder by type.

    With ``mean`` and ``std`` (per RGB channel, 0–255 scale) the output is ``(x - mean) / std`` in
    float32, computed while the final window is copied (on a 2-core CPU a separate pass, FFCV's
    NormalizeImage, cost about as much as decoding and resizing; fused it costs ~5 %). Without them the
    output is uint8, for normalising on an accelerator after a 4x smaller copy.

    Crops and flips come from numba's per-thread generators, which FFCV does not seed: they are not
    reproducible from run to run (the sample order is).
    """

    def __init__(self, mode: DecoderMode | str, output_size: int, resize_size: int | None = None,
                 mean: np.ndarray | None = None, std: np.ndarray | None = None):
        super().__init__()
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        if mode not in tuple(DecoderMode):
            raise ValueError(f"mode must be one of {choices(DecoderMode)}, got {mode!r}")
        if mode == "reference" and (resize_size is None or resize_size < output_size):
            raise ValueError(f"resize_size ({resize_size}) must be >= output_size ({output_size})")
        self.mode = DecoderMode(mode)
        self.output_size = int(output_size)
        self.resize_size = int(resize_size) if mode == "reference" else self.output_size
        self.normalize = mean is not None
        self.mean = np.zeros(3, np.float32) if mean is None else np.asarray(mean, np.float32).reshape(3)
        self.inverse_std = np.ones(3, np.float32) if std is None else 1 / np.asarray(std, np.float32).reshape(3)

    @property
    def output_dtype(self) -> np.dtype:
        return np.dtype("f4") if self.normalize else np.dtype("u1")

    def declare_state_and_memory(self, previous_state: State):
        side = self.output_size
        max_pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
        output = AllocationQuery((side, side, 3), self.output_dtype)
        decoded = AllocationQuery((max_pixels * np.uint64(3),), np.dtype("u1"))
        # The resized image, before the crop, flip and normalisation are copied out of it.
        square = AllocationQuery((self.resize_size, self.resize_size, 3), np.dtype("u1"))
        state = replace(previous_state, jit_mode=True, shape=(side, side, 3), dtype=self.output_dtype)
        return state, (output, decoded, square)

    def generate_code(self):
        memory_read = self.memory_read
        parallel_range = Compiler.get_iterator()
        decode_jpeg, resize = ctypes_imdecode, ctypes_resize
        jpeg_mode = IMAGE_MODES["jpg"]
        evaluation = self.mode == DecoderMode.EVAL
        size, resize_size = self.output_size, self.resize_size
        normalize = self.normalize
        # Per-channel constants tiled along an image row, so the unflipped copy is one flat vector loop.
        row_mean = np.tile(self.mean, size)
        row_scale = np.tile(self.inverse_std, size)
        channel_mean, channel_scale = self.mean, self.inverse_std

        def decode(batch_indices, storage, metadata, storage_state):
            output, decoded, square = storage
            for k in parallel_range(len(batch_indices)):
                field = metadata[batch_indices[k]]
                data = memory_read(field["data_ptr"], storage_state)
                height = np.int64(field["height"])
                width = np.int64(field["width"])
                if field["mode"] == jpeg_mode:
                    buffer = decoded[k]
                    # source, its size, height, width, destination, crop height and width, crop offsets,
                    # scale numerator and denominator, crop?, flip?
                    decode_jpeg(data.ctypes.data, data.size, height, width, buffer.ctypes.data,
                                height, width, 0, 0, 1, 1, False, False)
                    image = buffer[: 3 * height * width].reshape(height, width, 3)
                else:
                    image = data.reshape(height, width, 3)

                # The whole image, resized:
                # resize(0, source, its rows and columns, row range, column range, target, its size)
                target = square[k]
                resize(0, image.ctypes.data, height, width, 0, height, 0, width,
                       target.ctypes.data, resize_size, resize_size)
                y, x, flip = 0, 0, False
                if not evaluation:
                    y = np.random.randint(0, resize_size - size + 1)
                    x = np.random.randint(0, resize_size - size + 1)
                    flip = np.random.rand() < 0.5
                if not normalize:
                    window = target[y : y + size, x : x + size]
                    if flip:
                        output[k] = window[:, ::-1]
                    else:
                        output[k] = window
                else:
                    for i in range(size):
                        source_row = target[y + i].reshape(3 * resize_size)
                        out_row = output[k, i].reshape(3 * size)
                        if flip:
                            for j in range(size):
                                start = 3 * (x + size - 1 - j)
                                for c in range(3):
                                    out_row[3 * j + c] = (source_row[start + c] - channel_mean[c]) * channel_scale[c]
                        else:
                            for t in range(3 * size):
                                out_row[t] = (source_row[3 * x + t] - row_mean[t]) * row_scale[t]
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
