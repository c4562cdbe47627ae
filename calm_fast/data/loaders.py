"""The one place that decides whether a split is read by FFCV (its .beton from `calm-fast convert`) or
by the plain torch loader, for training (data.loader) and evaluation and validation (data.eval_loader)
by one rule (`choose_loader`), and that builds the loaders: `build_eval_loader` (every sample exactly
once across ranks, eval.batch_size per batch) and `build_train_batches` (global batches cut into each
rank's micro-batches, see `calm_fast.data.sampling`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from calm_fast.config import Config, ConfigError
from calm_fast.data import torch_loader
from calm_fast.data.ffcv_convert import beton_matches, beton_path_for, read_beton_info
from calm_fast.data.ffcv_loader import FFCVLoader, build_ffcv_loader, ffcv_available
from calm_fast.data.metadata import WSOLSplit
from calm_fast.data.sampling import global_batch_indices
from calm_fast.distributed import World
from calm_fast.modes import LoaderKind, Precision, parse


LOADER_KEYS = ("data.loader", "data.eval_loader")  # training's setting, evaluation's and validation's


def choose_loader(cfg: Config, split: WSOLSplit, key: str = "data.loader") -> tuple[LoaderKind, Path]:
    """(LoaderKind.FFCV or LoaderKind.TORCH, the split's .beton path) for this split under the setting
    `key` (data.loader for training, data.eval_loader for evaluation and validation).

    "torch" never reads a .beton (data.eval_loader's default: the original files, as the reference).
    "auto" takes FFCV when it imports and the split's .beton was converted from the split's current
    metadata (`beton_matches`: its sidecar's fingerprint), else the torch loader, which reads the original
    image files with the same transforms. "ffcv" insists: a missing FFCV, a missing .beton or one
    converted from other metadata is an error that says what to do.
    """
    if key not in LOADER_KEYS:
        raise ValueError(f"key={key!r}: expected one of {', '.join(LOADER_KEYS)}")
    kind = parse(LoaderKind, getattr(cfg.data, key.split(".")[1]), key)
    beton = beton_path_for(cfg.data.beton_dir or Path(cfg.data.root) / "ffcv", split.dataset, split.split)
    if kind == LoaderKind.TORCH:
        return LoaderKind.TORCH, beton
    if kind == LoaderKind.AUTO:
        return (LoaderKind.FFCV if ffcv_available() and beton_matches(split, beton) else LoaderKind.TORCH), beton
    if not ffcv_available():
        raise ConfigError(f"{key}='ffcv' but FFCV does not import (pip install ffcv; it needs libturbojpeg "
                          "and OpenCV)")
    if not beton.is_file():
        raise FileNotFoundError(f"{key}='ffcv' but {beton} does not exist: run `calm-fast convert` first")
    if not beton_matches(split, beton):
        raise FileNotFoundError(f"{beton} does not match {split.metadata_dir} (converted from other metadata, "
                                "or its sidecar is missing): run `calm-fast convert` again")
    return LoaderKind.FFCV, beton


def build_eval_loader(cfg: Config, split: WSOLSplit, rank: int = 0, world_size: int = 1,
                      device: torch.device | str = "cpu") -> FFCVLoader | torch.utils.data.DataLoader:
    """The evaluation loader of `split` for this rank (FFCV or torch by data.eval_loader, see
    `choose_loader`): images resized straight to input_size², ImageNet mean/std; rank r takes samples r,
    r+W, ... (each exactly once, no padding); yields (images, labels, indices) with eval.batch_size images
    per batch. FFCV's stored images (JPEG q90, at most 512 px) resized with INTER_AREA are not the
    reference's pixels: faster, but other numbers."""
    data = cfg.data
    kind, beton = choose_loader(cfg, split, "data.eval_loader")
    if kind == LoaderKind.FFCV:
        return build_ffcv_loader(beton, train=False, input_size=data.input_size, batch_size=cfg.eval.batch_size,
                                 num_workers=max(1, data.workers), rank=rank, world_size=world_size,
                                 seed=cfg.train.seed, device=device)
    return torch_loader.build_torch_loader(split, train=False, input_size=data.input_size,
                                           resize_size=data.resize_size, batch_size=cfg.eval.batch_size,
                                           num_workers=data.workers, rank=rank, world_size=world_size,
                                           seed=cfg.train.seed, drop_last=False,
                                           pin_memory=torch.device(device).type == "cuda")


def build_train_batches(cfg: Config, world: World, train_split: WSOLSplit) -> TrainBatches | FFCVTrainBatches:
    """This rank's training batches, FFCV or torch by data.loader (`choose_loader`). The torch path samples
    with our global-batch order (rank-invariant and bitwise resumable); FFCV reads its .beton."""
    data = cfg.data
    kind, beton = choose_loader(cfg, train_split, "data.loader")
    if kind == LoaderKind.FFCV:
        micro = data.batch_size // (world.world_size * cfg.train.grad_accum)
        dtype = Precision(cfg.train.precision).dtype if world.device.type == "cuda" else torch.float32
        loader = build_ffcv_loader(beton, train=True, input_size=data.input_size, resize_size=data.resize_size,
                                   batch_size=micro, num_workers=max(1, data.workers), rank=world.rank,
                                   world_size=world.world_size, seed=cfg.train.seed, device=world.device,
                                   dtype=dtype, drop_last=True)
        return FFCVTrainBatches(loader, cfg, len(train_split))
    train_dataset = torch_loader.WSOLDataset(train_split, train=True, input_size=data.input_size,
                                             resize_size=data.resize_size, seed=cfg.train.seed)
    return TrainBatches(train_dataset, cfg, world)


def steps_per_epoch(num_samples: int, cfg: Config) -> int:
    """Optimizer steps per epoch: whole global batches only."""
    steps = num_samples // cfg.data.batch_size
    if steps == 0:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} is larger than the training split "
                          f"({num_samples} images)")
    return steps


class TrainBatches:
    """The training data of one rank: `steps_per_epoch` and `micro_batches(epoch, first_step)`, which
    yields (images, labels, indices) for the optimizer steps first_step.. of the epoch. Any loader that
    offers these two members can replace it (see build_train_batches).

    `dataset[(index, epoch)]` must return one sample whose augmentation depends on (seed, epoch, index)
    only (calm_fast.data.torch_loader.WSOLDataset does): then a sample looks the same whatever the number
    of ranks or workers, and a resumed run continues exactly.
    """

    def __init__(self, dataset, cfg: Config, world: World):
        self.dataset = dataset
        self.num_samples = len(dataset)
        self.cfg, self.world = cfg, world
        self.steps_per_epoch = steps_per_epoch(self.num_samples, cfg)

    def micro_batches(self, epoch: int, first_step: int = 0):
        cfg, world = self.cfg, self.world
        batches = [[(int(i), epoch) for i in indices]
                   for indices in global_batch_indices(self.num_samples, cfg.data.batch_size, world.world_size,
                                                       world.rank, cfg.train.grad_accum, cfg.train.seed, epoch,
                                                       first_step)]
        workers = cfg.data.workers
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=workers,
                                             pin_memory=world.device.type == "cuda",
                                             prefetch_factor=4 if workers else None)
        return iter(loader)


class FFCVTrainBatches:
    """The training data of one rank from an FFCV .beton, with TrainBatches' two members.

    Each rank reads its own shard (the order of calm_fast.data.sampling.ShardSampler for (seed, epoch))
    in micro-batches of global_batch / (world_size × grad_accum). Resuming skips the batches already
    consumed in the epoch, so a resumed run continues at the same samples; FFCV does not seed its crops and
    flips, so unlike TrainBatches it is not bitwise identical, and N ranks see another partition of each
    global batch than 1 rank does.
    """

    def __init__(self, loader, cfg: Config, num_samples: int):
        self.loader = loader
        self.grad_accum = cfg.train.grad_accum
        self.steps_per_epoch = steps_per_epoch(num_samples, cfg)

    def micro_batches(self, epoch: int, first_step: int = 0):
        self.loader.set_epoch(epoch, skip_batches=first_step * self.grad_accum)
        wanted = (self.steps_per_epoch - first_step) * self.grad_accum
        for count, batch in enumerate(self.loader):
            if count == wanted:
                break
            yield batch


def data_repairs(cfg: Config, split: WSOLSplit) -> dict:
    """{"loader": the kind `build_eval_loader` picks, "repairs": {"metadata": the reader's counts, "images":
    the converter's counts from the .beton sidecar (FFCV), or None: the torch loader converts image modes
    the same way but does not count}}, for results.json."""
    kind, beton = choose_loader(cfg, split, "data.eval_loader")
    images = dict((read_beton_info(beton) or {}).get("repairs", {})) if kind == LoaderKind.FFCV else None
    return {"loader": kind, "repairs": {"metadata": dict(split.repairs), "images": images}}
