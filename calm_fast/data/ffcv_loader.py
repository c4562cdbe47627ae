"""FFCV loading: `build_ffcv_loader` builds FFCV's Loader over a converted split (calm-fast's decoder,
rank sharding and normalisation, from `ffcv_ops`) and wraps it in `FFCVLoader`, which yields the same
`(images, labels, indices)` batches as the plain torch loader, can start an epoch part-way (resuming) and
fails instead of hanging when FFCV's loading thread dies. Which loader a split gets is decided in
`calm_fast.data.loaders`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numba
import numpy as np
import torch

from calm_fast.data.torch_loader import IMAGENET_MEAN, IMAGENET_STD  # one normalisation for both loaders
from calm_fast.modes import DecoderMode

__all__ = ["FFCVLoader", "build_ffcv_loader", "ffcv_available"]


def ffcv_available() -> bool:
    """True when FFCV and its compiled parts import. Importing FFCV sets torch's and numba's thread counts
    to 1 (its pipeline compiler does so once, at import); the counts the process had are put back, or a
    run whose loader policy merely asked about FFCV would train and evaluate on one thread."""
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    try:
        import ffcv.loader  # noqa: F401  (the check itself: FFCV stays optional)
    except Exception:  # ImportError, or OSError from a missing shared library
        return False
    finally:
        torch.set_num_threads(torch_threads)
        numba.set_num_threads(numba_threads)
    return True


class FFCVLoader:
    """Iterable over ``(images, labels, indices)`` batches of one rank, built by :func:`build_ffcv_loader`.

    ``images``: ``[B, 3, S, S]`` normalised, in ``dtype``, on ``device``, channels-last memory format
    when asked; ``labels``: int64 ``[B]`` on ``device``; ``indices``: int64 ``[B]`` on the CPU (they
    address the WSOLSplit: boxes, masks, ``image_sizes``). Batches live in FFCV's ring of
    ``batches_ahead + 2`` buffers: clone what you keep longer than that.
    """

    def __init__(self, loader, order):
        self._loader = loader
        self._order = order

    def __len__(self) -> int:
        """Batches in a full epoch of this rank (also when the next epoch skips some)."""
        return len(self._loader)

    def __iter__(self):
        epoch_iterator = iter(self._loader)
        try:
            while True:
                _wait_for_batch(epoch_iterator)
                try:
                    batch = next(epoch_iterator)
                except StopIteration:
                    return
                yield batch
        finally:
            epoch_iterator.close()  # stops FFCV's loading thread when the consumer leaves early

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Make the next ``iter()`` run ``epoch``, starting after its first ``skip_batches`` batches (resuming)."""
        if epoch < 0 or skip_batches < 0:
            raise ValueError(f"set_epoch: epoch and skip_batches must be >= 0, got {epoch}, {skip_batches}")
        self._loader.next_epoch = int(epoch)
        self._order.skip_batches = {int(epoch): int(skip_batches)} if skip_batches else {}


def _wait_for_batch(epoch_iterator) -> None:
    """Block until FFCV's loading thread has queued the next batch; raise if that thread died.

    FFCV's iterator waits on its queue without a timeout, so an exception in the loading thread (it
    prints its traceback) would otherwise hang the consumer forever.
    """
    queue = epoch_iterator.output_queue
    with queue.not_empty:
        while not queue._qsize():  # the size without re-taking the lock we hold
            if not epoch_iterator.is_alive():
                raise RuntimeError("FFCV's loading thread stopped with an error (its traceback is printed above)")
            queue.not_empty.wait(timeout=1.0)


def build_ffcv_loader(
    beton_path: str | Path,
    train: bool,
    input_size: int = 224,
    resize_size: int = 256,
    batch_size: int = 64,
    num_workers: int = 2,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    drop_last: bool | None = None,
    channels_last: bool = True,
    batches_ahead: int = 3,
) -> FFCVLoader:
    """An FFCV loader over a converted split, yielding the same triple as the torch loader.

    Training (``train=True``): the reference recipe (CALM.md §3): the whole image resized to
    ``resize_size``² (aspect not kept), a random ``input_size``² crop, half the images flipped. Each
    epoch visits a permutation of all samples drawn from ``(seed, epoch)``; rank ``r`` of ``world_size``
    takes every ``world_size``-th sample of it, padded by repeating samples so all ranks have
    ``ceil(N / world_size)`` samples (the same number of steps); ``drop_last`` (default True) drops a
    final partial batch. ``FFCVLoader.set_epoch`` picks
    the epoch and can skip its first batches when resuming.
    Evaluation (``train=False``): the whole image resized to ``input_size``², in index order; rank
    ``r`` takes samples ``r, r + world_size, ...``: every sample exactly once across ranks, no padding;
    ``drop_last=True`` is refused; ``resize_size`` is ignored.
    Sample orders and shards are those of ``calm_fast.data.sampling.ShardSampler`` for the same
    seed and epoch; crops and flips are drawn independently (FFCV does not seed them).

    ``num_workers`` is FFCV's thread count (numba and, as a side effect of FFCV, torch's intra-op
    threads), capped at the threads numba may use. On a CUDA ``device`` the uint8 batch is copied
    asynchronously and normalised there; on the CPU the decoder writes normalised fp32 (then a cast when
    ``dtype`` differs).
    """
    # FFCV is imported on use: it takes seconds to import, and calm-fast runs without it (torch loader).
    from ffcv.fields.basics import IntDecoder
    from ffcv.loader import Loader
    from ffcv.transforms import Convert, Squeeze, ToDevice, ToTensor, ToTorchImage

    from calm_fast.data.ffcv_ops import NormalizeOnDevice, ShardedOrder, WSOLImageDecoder

    beton_path = Path(beton_path)
    if not beton_path.is_file():
        raise FileNotFoundError(f"{beton_path}: no such .beton (run `calm-fast convert` first)")
    _check_loader_arguments(train, input_size, resize_size, batch_size, num_workers, rank, world_size, batches_ahead)
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be a CPU or CUDA device, got {device}")
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be torch.float32, bfloat16 or float16, got {dtype}")
    drop_last = train if drop_last is None else bool(drop_last)
    if drop_last and not train:
        raise ValueError("drop_last=True would leave evaluation images out; use it for training only")
    _check_fields(beton_path)
    num_workers = _cap_threads(num_workers)

    mode = DecoderMode.REFERENCE if train else DecoderMode.EVAL
    mean = np.array(IMAGENET_MEAN) * 255
    std = np.array(IMAGENET_STD) * 255
    if device.type == "cuda":
        decoder = WSOLImageDecoder(mode, input_size, resize_size)
        # ToTorchImage(channels_last=False) would allocate its copy on the CPU: permute only, and let the
        # normalisation write the requested memory format on the device.
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        image_pipeline = [decoder, ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(True),
                          NormalizeOnDevice(mean, std, dtype, memory_format)]
        label_pipeline = [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]
    else:
        decoder = WSOLImageDecoder(mode, input_size, resize_size, mean=mean, std=std)  # normalises too
        image_pipeline = [decoder, ToTensor(), ToTorchImage(channels_last)]
        if dtype != torch.float32:
            image_pipeline.append(Convert(dtype))
        label_pipeline = [IntDecoder(), ToTensor(), Squeeze(1)]
    index_pipeline = [IntDecoder(), ToTensor(), Squeeze(1)]

    order = ShardedOrder(rank, world_size, shuffle=train, seed=seed, pad=train, batch_size=batch_size,
                         drop_last=drop_last)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # FFCV imports distutils
        loader = Loader(
            str(beton_path),
            batch_size=batch_size,
            num_workers=num_workers,
            order=order,
            seed=seed,
            drop_last=drop_last,
            batches_ahead=batches_ahead,
            pipelines={"image": image_pipeline, "label": label_pipeline, "index": index_pipeline},
        )
    return FFCVLoader(loader, order)


def _check_fields(beton_path: Path) -> None:
    from ffcv.reader import Reader  # FFCV on use (see build_ffcv_loader)

    try:
        fields = list(Reader(str(beton_path)).handlers)
    except Exception as error:  # FFCV raises AssertionError, ValueError, ... for foreign files
        raise ValueError(f"{beton_path}: not a readable FFCV file ({type(error).__name__}: {error})") from None
    if fields != ["image", "label", "index"]:
        raise ValueError(f"{beton_path}: fields {fields} are not calm-fast's ['image', 'label', 'index'] "
                         f"(write it with `calm-fast convert`)")


def _check_loader_arguments(train, input_size, resize_size, batch_size, num_workers, rank, world_size,
                            batches_ahead) -> None:
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    if train and resize_size < input_size:
        raise ValueError(f"resize_size ({resize_size}) must be >= input_size ({input_size}) for the reference recipe")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if batches_ahead < 1:
        raise ValueError(f"batches_ahead must be >= 1, got {batches_ahead}")


def _cap_threads(num_workers: int) -> int:
    limit = numba.config.NUMBA_NUM_THREADS
    if num_workers > limit:
        warnings.warn(f"num_workers={num_workers} exceeds the {limit} threads numba may use here; using {limit}",
                      stacklevel=3)
        return limit
    return num_workers
