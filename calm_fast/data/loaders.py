"""The one place that decides, for any split, whether it is read by FFCV (its .beton from `calm-fast
convert`) or by the plain torch loader (data.loader for training, data.eval_loader for evaluation and
validation), and that builds the loader: `build_eval_loader` (every sample exactly once across ranks) and
`build_loaders` (training's batches: global batches cut into each rank's micro-batches, see
`calm_fast.data.sampling`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from calm_fast.config import Config, ConfigError
from calm_fast.data import torch_loader
from calm_fast.data.ffcv_convert import ConvertOptions, beton_path_for, is_up_to_date, read_beton_info
from calm_fast.data.ffcv_loader import build_ffcv_loader, ffcv_available
from calm_fast.data.sampling import global_batch_indices
from calm_fast.distributed import World
from calm_fast.modes import Precision


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
    offers these two members can replace it (see build_loaders).

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


def build_loaders(cfg: Config, world: World, train_split, val_split):
    """(training batches, validation loader) for this rank: the one place that picks the loader.

    The validation loader follows data.eval_loader (`build_eval_loader`). data.loader, for the training
    batches: "torch" reads the image files (our global-batch sampler: rank-invariant and bitwise
    resumable); "ffcv" reads the .beton files of `calm-fast convert`; "auto" takes FFCV for each split whose
    .beton exists and matches the metadata, else torch (`loader_kind`).
    """
    data = cfg.data
    val_loader = build_eval_loader(replace(cfg, eval=replace(cfg.eval, batch_size=data.eval_batch_size)),
                                   val_split, world.rank, world.world_size, world.device)
    kind, beton = loader_kind(cfg, train_split)
    if kind == "ffcv":
        micro = data.batch_size // (world.world_size * cfg.train.grad_accum)
        dtype = Precision(cfg.train.precision).dtype if world.device.type == "cuda" else torch.float32
        loader = build_ffcv_loader(beton, train=True, input_size=data.input_size, resize_size=data.resize_size,
                                   batch_size=micro, num_workers=max(1, data.workers), rank=world.rank,
                                   world_size=world.world_size, seed=cfg.train.seed, device=world.device,
                                   dtype=dtype, drop_last=True)
        return FFCVTrainBatches(loader, cfg, len(train_split)), val_loader
    # The sampling is ours (TrainBatches): global batches that do not depend on the number of ranks.
    train_dataset = torch_loader.WSOLDataset(train_split, train=True, input_size=data.input_size,
                                             resize_size=data.resize_size, seed=cfg.train.seed)
    return TrainBatches(train_dataset, cfg, world), val_loader


def build_eval_loader(cfg: Config, split, rank: int = 0, world_size: int = 1,
                      device: torch.device | str = "cpu"):
    """The evaluation loader of `split` for this rank: images resized straight to input_size², ImageNet
    mean/std; rank r takes samples r, r+W, ... (each exactly once, no padding); yields (images, labels,
    indices) with cfg.eval.batch_size images per batch.

    data.eval_loader picks the plain PyTorch loader ("torch", the default: the original file resized with
    PIL bilinear, as the reference) or FFCV: "auto" takes FFCV when the split's .beton (`calm-fast
    convert`) exists and matches the metadata, "ffcv" insists. FFCV's stored images (JPEG q90, at most
    512 px) resized with INTER_AREA are not the reference's pixels: faster, but other numbers.
    """
    data = cfg.data
    kind, beton = loader_kind(cfg, split, "data.eval_loader")
    if kind == "ffcv":
        return build_ffcv_loader(beton, train=False, input_size=data.input_size, batch_size=cfg.eval.batch_size,
                                 num_workers=max(1, data.workers), rank=rank, world_size=world_size,
                                 seed=cfg.train.seed, device=device)
    return torch_loader.build_torch_loader(split, train=False, input_size=data.input_size,
                                           resize_size=data.resize_size, batch_size=cfg.eval.batch_size,
                                           num_workers=data.workers, rank=rank, world_size=world_size,
                                           seed=cfg.train.seed, drop_last=False,
                                           pin_memory=torch.device(device).type == "cuda")


def loader_kind(cfg: Config, split, key: str = "data.loader") -> tuple[str, Path]:
    """("ffcv" or "torch", the split's .beton path) for the setting `key` (data.loader for training,
    data.eval_loader for evaluation): "auto" takes FFCV when the split's .beton exists and matches its
    metadata, "ffcv" insists (a stale file is an error), "torch" never uses it."""
    data = cfg.data
    setting = {"data.loader": data.loader, "data.eval_loader": data.eval_loader}[key]
    beton = beton_path_for(data.beton_dir or Path(data.root) / "ffcv", split.dataset, split.split)
    matches = beton.is_file() and _beton_matches(split, beton)
    if setting == "ffcv" and beton.is_file() and not matches:
        raise FileNotFoundError(f"{beton} does not match {split.metadata_dir} (converted from other metadata "
                                "or options): run `calm-fast convert` again")
    if setting == "torch" or (setting == "auto" and not matches):
        return "torch", beton
    return resolve_loader_kind(setting, [beton], key), beton


def data_repairs(cfg: Config, split) -> dict:
    """{"loader": the kind `build_eval_loader` picks, "repairs": {"metadata": the reader's counts, "images":
    the converter's counts from the .beton sidecar (FFCV), or None: the torch loader converts image modes
    the same way but does not count}}, for results.json."""
    kind, beton = loader_kind(cfg, split, "data.eval_loader")
    images = dict((read_beton_info(beton) or {}).get("repairs", {})) if kind == "ffcv" else None
    return {"loader": kind, "repairs": {"metadata": dict(split.repairs), "images": images}}


def _beton_matches(split, beton: Path) -> bool:
    """The .beton's sidecar says it was converted from this split's current metadata."""
    info = read_beton_info(beton)
    if info is None or not isinstance(info.get("options"), dict):
        return False
    try:
        options = ConvertOptions(**info["options"])
    except TypeError:  # written by another version
        return False
    return is_up_to_date(split, beton, options)


def resolve_loader_kind(kind: str, beton_paths: list[str | Path], key: str = "data.loader") -> str:
    """The loader to use for a loader setting (``key``: data.loader or data.eval_loader): "ffcv" or "torch".

    "auto" picks FFCV when it imports and every .beton in ``beton_paths`` exists, else the plain
    PyTorch loader (``calm_fast.data.torch_loader``), which reads the original image files with the
    same transforms. "ffcv" insists and raises naming what is missing.
    """
    if kind not in ("auto", "ffcv", "torch"):
        raise ValueError(f"{key} must be 'auto', 'ffcv' or 'torch', got {kind!r}")
    if kind == "torch":
        return "torch"
    missing = [str(p) for p in beton_paths if not Path(p).is_file()]
    if kind == "auto":
        return "ffcv" if ffcv_available() and not missing else "torch"
    if not ffcv_available():
        raise ConfigError(f"{key}='ffcv' but FFCV does not import "
                           "(pip install ffcv; it needs libturbojpeg and OpenCV)")
    if missing:
        raise FileNotFoundError(f"{key}='ffcv' but {missing[0]} does not exist: run `calm-fast convert` first")
    return "ffcv"
