"""Plain PyTorch data loading for a WSOL split (the fallback when FFCV is not used).

Transforms follow the reference recipe (CALM.md §3):

- train: resize to ``resize_size``² (aspect not kept), random ``input_size``² crop, random horizontal
  flip, ImageNet mean/std;
- eval: resize straight to ``input_size``², ImageNet mean/std.

Each sample is ``(image float32 [3, S, S], label int64, index int64)``; ``index`` addresses the
boxes, masks and sizes of the :class:`~calm_fast.data.metadata.WSOLSplit`.

Random augmentation is a pure function of ``(seed, epoch, index)``, so a sample looks the same whatever
the number of workers or ranks, and a resumed run sees exactly the images an uninterrupted run would.

Images are decoded with PIL and converted to RGB (grayscale, palette, CMYK and RGBA files alike; PIL
recognises a PNG named ``.jpg`` by its content). EXIF orientation is **not** applied: the boxes of the
WSOL datasets and the reference loader use the stored pixel frame, and rotating the image would move
it away from its boxes. A truncated or unreadable file raises an error naming it.
"""

from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from calm_fast.data.images import decode_rgb
from calm_fast.data.metadata import WSOLSplit
from calm_fast.data.sampling import ShardSampler

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "WSOLDataset", "build_torch_loader"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WSOLDataset(Dataset):
    """Images of a split with the reference transforms.

    Keys are an index or ``(index, epoch)`` pairs (as ``calm_fast.data.sampling.ShardSampler`` yields them); the epoch and
    ``seed`` choose the random crop and flip of training samples.
    """

    def __init__(self, split: WSOLSplit, train: bool, input_size: int, resize_size: int | None = None, seed: int = 0):
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        if train and (resize_size is None or resize_size < input_size):
            raise ValueError(f"resize_size ({resize_size}) must be >= input_size ({input_size}) for training")
        self.split = split
        self.train = train
        self.input_size = input_size
        self.resize_size = resize_size
        self.seed = seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key) -> tuple[torch.Tensor, int, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image = decode_rgb(self.split.image_path(index))
        self.split.check_image_size(index, image.size)  # as `calm-fast convert` checks it
        if self.train:
            image = self._augment(image, index, epoch)
        else:
            image = TF.resize(image, [self.input_size, self.input_size], interpolation=TF.InterpolationMode.BILINEAR)
        tensor = TF.normalize(TF.to_tensor(image), IMAGENET_MEAN, IMAGENET_STD)
        return tensor, int(self.split.labels[index]), int(index)

    def _augment(self, image: Image.Image, index: int, epoch: int) -> Image.Image:
        rng = np.random.default_rng([self.seed, epoch, index])
        size, crop = self.resize_size, self.input_size
        image = TF.resize(image, [size, size], interpolation=TF.InterpolationMode.BILINEAR)
        top, left = (int(v) for v in rng.integers(0, size - crop + 1, size=2))
        image = TF.crop(image, top, left, crop, crop)
        if rng.integers(2):
            image = TF.hflip(image)
        return image


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)  # the workers decode; the main process computes


def build_torch_loader(
    split: WSOLSplit,
    train: bool,
    input_size: int,
    resize_size: int | None,
    batch_size: int,
    num_workers: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    drop_last: bool | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader yielding ``(images float32 [B, 3, S, S], labels int64 [B], indices int64 [B])``.

    ``drop_last`` defaults to True for training (equal batch sizes) and False for evaluation; evaluation
    refuses True, since skipped images would bias the metrics. Call ``loader.sampler.set_epoch(epoch)``
    before each training epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if drop_last is None:
        drop_last = train
    if drop_last and not train:
        raise ValueError("drop_last=True would leave evaluation images out; use it for training only")
    dataset = WSOLDataset(split, train, input_size, resize_size, seed=seed)
    sampler = ShardSampler(len(split), rank, world_size, shuffle=train, seed=seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=pin_memory,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
    )
