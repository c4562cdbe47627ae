"""FFCV conversion and loaders: round trips, sharding, transforms, real-data problems, interrupted conversions.

Each loader compiles its pipeline with numba (seconds), so the tests share a few small converted sets.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calm_fast.cli import main as cli_main
from calm_fast.data import ffcv_convert, ffcv_loader
from calm_fast.data.images import ImageProblem, load_for_storage
from calm_fast.data.metadata import read_split
from calm_fast.data.sampling import ShardSampler, shard_order
from calm_fast.data.torch_loader import IMAGENET_MEAN, IMAGENET_STD, build_torch_loader

MEAN = np.array(IMAGENET_MEAN)
STD = np.array(IMAGENET_STD)
REPO_ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# helpers


def write_split(root: Path, dataset: str, split: str, files: list[tuple[str, bytes, int, tuple[int, int]]]):
    """Write images and WSOL metadata (one whole-image box each); return the WSOLSplit."""
    meta = root / "metadata" / dataset / split
    meta.mkdir(parents=True)
    image_root = root / dataset
    for name, data, _, _ in files:
        (image_root / name).parent.mkdir(parents=True, exist_ok=True)
        (image_root / name).write_bytes(data)
    (meta / "image_ids.txt").write_text("".join(f"{n}\n" for n, _, _, _ in files))
    (meta / "class_labels.txt").write_text("".join(f"{n},{label}\n" for n, _, label, _ in files))
    (meta / "image_sizes.txt").write_text("".join(f"{n},{w},{h}\n" for n, _, _, (w, h) in files))
    (meta / "localization.txt").write_text("".join(f"{n},0,0,{w - 1},{h - 1}\n" for n, _, _, (w, h) in files))
    return read_split(root / "metadata", dataset, split, image_root)


def encode(image: np.ndarray | Image.Image, fmt: str = "JPEG", **options) -> bytes:
    import io

    buffer = io.BytesIO()
    image = image if isinstance(image, Image.Image) else Image.fromarray(image)
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Low-frequency colours, so that JPEG and resampling errors stay small."""
    coarse = Image.fromarray(rng.integers(0, 256, (3, 4, 3), dtype=np.uint8))
    return np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Undo the ImageNet normalisation: [B, 3, S, S] → float [B, S, S, 3] on the 0–255 scale."""
    pixels = images.float().permute(0, 2, 3, 1).numpy()
    return (pixels * STD + MEAN) * 255


def area_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    import cv2

    return cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA).astype(np.float64)


def collect(loader) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    images, labels, indices = [], [], []
    for batch_images, batch_labels, batch_indices in loader:
        images.append(to_uint8(batch_images))
        labels.append(batch_labels.numpy().copy())
        indices.append(batch_indices.numpy().copy())
    return np.concatenate(images), np.concatenate(labels), np.concatenate(indices)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


# ----------------------------------------------------------------------------------------------------
# load_for_storage: one image as it will be stored


def test_load_for_storage_repairs_are_counted_and_faithful(tmp_path):
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    gray = colour[..., 0]
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    cases = {
        "gray.jpg": encode(gray, quality=95),
        "cmyk.jpg": encode(Image.fromarray(colour).convert("CMYK"), quality=95),
        "png.jpg": encode(colour, "PNG"),
        "rotated.jpg": encode(colour, quality=95, exif=exif),
        "palette.png": encode(Image.fromarray(colour).convert("P"), "PNG"),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)

    pixels, repairs, size = load_for_storage(tmp_path / "gray.jpg")
    assert repairs == ["converted_from_L"] and size == (60, 40)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert np.array_equal(pixels[..., 0], np.asarray(Image.open(tmp_path / "gray.jpg")))

    pixels, repairs, _ = load_for_storage(tmp_path / "cmyk.jpg")
    assert repairs == ["converted_from_CMYK"]
    expected = np.asarray(Image.open(tmp_path / "cmyk.jpg").convert("RGB"))
    assert np.array_equal(pixels, expected)

    pixels, repairs, _ = load_for_storage(tmp_path / "png.jpg")
    assert repairs == ["png_named_jpg"] and np.array_equal(pixels, colour)  # PNG is lossless

    pixels, repairs, size = load_for_storage(tmp_path / "rotated.jpg")
    assert repairs == ["exif_orientation_ignored"]
    assert pixels.shape == (40, 60, 3) and size == (60, 40)  # stored frame, not rotated
    assert np.array_equal(pixels, np.asarray(Image.open(tmp_path / "rotated.jpg")))

    pixels, repairs, _ = load_for_storage(tmp_path / "palette.png")
    assert repairs == ["converted_from_P"]
    assert np.array_equal(pixels, np.asarray(Image.open(tmp_path / "palette.png").convert("RGB")))


def test_load_for_storage_downscales_large_images_keeping_aspect(tmp_path):
    rng = np.random.default_rng(1)
    large = smooth_image(rng, 800, 1600)  # twice the cap and more: decoded at a reduced DCT scale first
    (tmp_path / "large.jpg").write_bytes(encode(large, quality=95))
    pixels, repairs, size = load_for_storage(tmp_path / "large.jpg", max_resolution=512)
    assert repairs == ["downscaled"] and size == (1600, 800) and pixels.shape == (256, 512, 3)
    expected = np.asarray(Image.fromarray(large).resize((512, 256), Image.Resampling.BILINEAR))
    assert np.abs(pixels.astype(int) - expected).mean() < 3

    pixels, repairs, _ = load_for_storage(tmp_path / "large.jpg", max_resolution=1600)
    assert repairs == [] and pixels.shape == (800, 1600, 3)


def test_load_for_storage_errors_name_the_file(tmp_path):
    rng = np.random.default_rng(2)
    jpeg = encode(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), quality=90)
    (tmp_path / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "text.jpg").write_text("not an image")
    (tmp_path / "deep.png").write_bytes(encode(rng.integers(0, 60000, (8, 8), dtype=np.uint16), "PNG"))
    (tmp_path / "wide.png").write_bytes(encode(np.zeros((1, 70000), dtype=np.uint8), "PNG"))

    for name, fragment, kwargs in [
        ("missing.jpg", "not found", {}),
        ("text.jpg", "not a readable image", {}),
        ("truncated.jpg", "truncated", {}),
        ("deep.png", "I;16", {}),
        ("wide.png", "65535", {"max_resolution": None}),
    ]:
        with pytest.raises(ImageProblem, match=fragment) as caught:
            load_for_storage(tmp_path / name, **kwargs)
        assert str(tmp_path / name) in str(caught.value)

    pixels, repairs, _ = load_for_storage(tmp_path / "truncated.jpg", allow_truncated=True)
    assert repairs == ["truncated_filled"] and pixels.shape == (64, 64, 3)
    pixels, repairs, _ = load_for_storage(tmp_path / "wide.png", max_resolution=512)
    assert pixels.shape == (1, 512, 3) and repairs == ["converted_from_L", "downscaled"]


# ----------------------------------------------------------------------------------------------------
# A JPEG set converted through the command line; evaluation loaders on two ranks


@pytest.fixture(scope="module")
def jpeg_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpeg_set")
    rng = np.random.default_rng(3)
    files, originals = [], []
    for i in range(11):
        height, width = int(rng.integers(30, 90)), int(rng.integers(30, 90))
        pixels = smooth_image(rng, height, width)
        originals.append(pixels)
        files.append((f"c{i % 3}/img{i:02d}.jpg", encode(pixels, quality=100), i % 3, (width, height)))
    split = write_split(root, "TOY", "val", files)
    status = cli_main(["convert", "--data-root", str(root), "--dataset", "TOY", "--workers", "2"])
    assert status == 0
    return root, split, originals, ffcv_convert.beton_path_for(root / "ffcv", "TOY", "val")


def test_cli_convert_writes_beton_sidecar_and_skips_up_to_date(jpeg_set):
    root, split, _, beton = jpeg_set
    info = ffcv_convert.read_beton_info(beton)
    assert info["num_images"] == 11 and info["dataset"] == "TOY" and info["split"] == "val"
    assert info["repairs"] == {} and info["options"]["write_mode"] == "jpg"
    assert leftovers(beton.parent) == sorted([beton.name, beton.name + ".json"])

    stamp = beton.stat().st_mtime_ns
    assert cli_main(["convert", "--data-root", str(root), "--dataset", "TOY", "--split", "val"]) == 0
    assert beton.stat().st_mtime_ns == stamp  # up to date: not rewritten
    assert ffcv_convert.ensure_beton(split, root / "ffcv").skipped
    # Other options or other labels make the file stale.
    assert not ffcv_convert.is_up_to_date(split, beton, ffcv_convert.ConvertOptions(jpeg_quality=80))
    relabelled = dataclasses.replace(split, labels=split.labels[::-1].copy())
    assert not ffcv_convert.is_up_to_date(relabelled, beton, ffcv_convert.ConvertOptions())


def test_eval_loaders_shard_and_round_trip_within_jpeg_tolerance(jpeg_set):
    _, split, originals, beton = jpeg_set
    size = 48
    shards = []
    for rank in range(2):
        loader = ffcv_loader.build_ffcv_loader(beton, train=False, input_size=size, batch_size=4, num_workers=1,
                                               rank=rank, world_size=2)
        images, labels, indices = collect(loader)
        assert len(loader) == len(range(rank, 11, 2)) // 4 + (len(range(rank, 11, 2)) % 4 > 0)
        assert list(indices) == list(range(rank, 11, 2))  # in order, every world_size-th sample
        shards.append((images, labels, indices))
    indices = np.concatenate([s[2] for s in shards])
    assert sorted(indices) == list(range(11))  # every sample exactly once across the two ranks
    labels = np.concatenate([s[1] for s in shards])
    assert np.array_equal(labels, split.labels[indices])

    images = np.concatenate([s[0] for s in shards])
    for image, index in zip(images, indices):
        expected = area_resize(originals[index], size)  # whole image squashed to size², aspect not kept
        error = np.abs(image - expected)  # stored as JPEG at quality 90, with 4:2:0 chroma
        assert error.mean() < 3.0 and np.percentile(error, 99) < 16, (index, error.mean(), error.max())


def test_eval_loader_matches_the_torch_fallback(jpeg_set):
    _, split, _, beton = jpeg_set
    ffcv_batches = list(ffcv_loader.build_ffcv_loader(beton, train=False, input_size=40, batch_size=11,
                                                      num_workers=1))
    torch_batches = list(build_torch_loader(split, train=False, input_size=40, resize_size=None, batch_size=11,
                                            num_workers=0))
    (ffcv_images, ffcv_labels, ffcv_indices), = ffcv_batches
    (torch_images, torch_labels, torch_indices), = torch_batches
    assert ffcv_images.shape == torch_images.shape == (11, 3, 40, 40)
    assert ffcv_images.dtype == torch_images.dtype == torch.float32
    assert ffcv_images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ffcv_labels, torch_labels) and torch.equal(ffcv_indices, torch_indices)
    assert ffcv_labels.dtype == ffcv_indices.dtype == torch.int64
    # Different resampling (OpenCV area vs PIL bilinear) and a JPEG re-encoding: close, not equal.
    difference = (ffcv_images - torch_images).abs().mul(torch.tensor(STD).view(1, 3, 1, 1) * 255)
    assert difference.mean() < 3.0


# ----------------------------------------------------------------------------------------------------
# A raw set of noise images exactly resize_size² : training crops can be located in the originals


RESIZE, CROP, RAW_COUNT = 40, 32, 20
CONSTANT = np.array([200, 100, 50], dtype=np.uint8)  # sample 0 is one flat colour


@pytest.fixture(scope="module")
def raw_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw_set")
    rng = np.random.default_rng(4)
    originals = [np.broadcast_to(CONSTANT, (RESIZE, RESIZE, 3)).copy()]
    originals += [rng.integers(0, 256, (RESIZE, RESIZE, 3), dtype=np.uint8) for _ in range(RAW_COUNT - 1)]
    labels = rng.integers(0, 5, RAW_COUNT)
    files = [(f"n{i:02d}.png", encode(p, "PNG"), int(labels[i]), (RESIZE, RESIZE)) for i, p in enumerate(originals)]
    split = write_split(root, "NOISE", "train", files)
    options = ffcv_convert.ConvertOptions(write_mode="raw")
    summary = ffcv_convert.convert_split(split, root / "NOISE_train.beton", options, num_workers=1)
    return split, originals, summary.beton_path


def locate_crop(crop: np.ndarray, original: np.ndarray) -> tuple[int, int, bool] | None:
    """(top, left, flipped) of a CROP² window of ``original`` equal to ``crop``, or None."""
    for flipped in (False, True):
        candidate = crop[:, ::-1] if flipped else crop
        for top in range(RESIZE - CROP + 1):
            for left in range(RESIZE - CROP + 1):
                if np.array_equal(original[top : top + CROP, left : left + CROP], candidate):
                    return top, left, flipped
    return None


def test_train_reference_recipe_crops_flips_and_sample_order(raw_set):
    split, originals, beton = raw_set
    loader = ffcv_loader.build_ffcv_loader(beton, train=True, input_size=CROP, resize_size=RESIZE, batch_size=4,
                                           num_workers=2, rank=1, world_size=2, seed=5)
    per_rank = -(-RAW_COUNT // 2)
    assert len(loader) == per_rank // 4
    sampler = ShardSampler(RAW_COUNT, rank=1, world_size=2, shuffle=True, seed=5)
    windows = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        images, labels, indices = collect(loader)
        assert list(indices) == list(sampler.indices()[: per_rank // 4 * 4])  # the torch loader's order
        assert np.array_equal(labels, split.labels[indices])
        for image, index in zip(images, indices):
            crop = np.rint(image).astype(np.uint8)
            assert np.abs(image - crop).max() < 1e-3  # the normalisation is exactly invertible here
            where = locate_crop(crop, originals[index])
            assert where is not None, f"sample {index}: output is no {CROP}² window of its image"
            if index != 0:
                windows.append(where)
    assert len({w[2] for w in windows}) == 2  # both flipped and unflipped crops occur
    assert len({w[:2] for w in windows}) > 3  # crop positions vary

    loader.set_epoch(1, skip_batches=1)  # resuming after the first batch of epoch 1
    sampler.set_epoch(1)
    _, _, indices = collect(loader)
    assert list(indices) == list(sampler.indices()[4 : per_rank // 4 * 4])


def test_train_batches_in_bfloat16_normalise_exactly(raw_set):
    _, _, beton = raw_set
    loader = ffcv_loader.build_ffcv_loader(beton, train=True, input_size=24, resize_size=RESIZE,
                                           batch_size=RAW_COUNT, num_workers=1, dtype=torch.bfloat16,
                                           drop_last=False, seed=1)
    images, labels, indices = next(iter(loader))
    assert images.shape == (RAW_COUNT, 3, 24, 24) and images.dtype == torch.bfloat16
    assert images.is_contiguous(memory_format=torch.channels_last)
    flat = images[list(indices.numpy()).index(0)].float()  # any crop of a flat image is that colour
    expected = torch.tensor((CONSTANT / 255 - MEAN) / STD, dtype=torch.float32).view(3, 1, 1).expand(3, 24, 24)
    torch.testing.assert_close(flat, expected.bfloat16().float(), rtol=0, atol=0)


def test_accelerator_path_normalises_like_the_cpu_path(raw_set):
    """The CUDA pipeline (uint8 decode, then NormalizeOnDevice) run on the CPU against the fused CPU path."""
    from ffcv.loader import Loader, OrderOption
    from ffcv.transforms import ToTensor, ToTorchImage

    from calm_fast.data.ffcv_ops import NormalizeOnDevice, WSOLImageDecoder

    _, originals, beton = raw_set
    mean, std = MEAN * 255, STD * 255
    pipeline = [WSOLImageDecoder("eval", 24), ToTensor(), ToTorchImage(True),
                NormalizeOnDevice(mean, std, torch.float32, torch.contiguous_format)]
    loader = Loader(str(beton), batch_size=RAW_COUNT, num_workers=1, order=OrderOption.SEQUENTIAL,
                    drop_last=False, pipelines={"image": pipeline, "label": None, "index": None})
    (device_images,) = next(iter(loader))
    cpu_images, _, _ = next(iter(ffcv_loader.build_ffcv_loader(beton, train=False, input_size=24,
                                                               batch_size=RAW_COUNT, num_workers=1)))
    assert device_images.is_contiguous() and device_images.dtype == torch.float32
    torch.testing.assert_close(device_images, cpu_images, rtol=0, atol=1e-5)
    expected = (area_resize(originals[5], 24) / 255 - MEAN) / STD  # independent of both paths
    np.testing.assert_allclose(device_images[5].permute(1, 2, 0).numpy(), expected, atol=1e-5)


# ----------------------------------------------------------------------------------------------------
# Real-data problems through a whole conversion


def test_problem_files_are_repaired_counted_and_load(tmp_path):
    rng = np.random.default_rng(5)
    colour = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
    halves = np.zeros((48, 64, 3), dtype=np.uint8)
    halves[:, 32:] = 255  # dark left, bright right in the stored frame
    exif = Image.Exif()
    exif[0x0112] = 8
    truncated = encode(colour, quality=90)
    files = [
        ("gray.jpg", encode(colour[..., 1], quality=95), 0, (64, 48)),
        ("cmyk.jpg", encode(Image.fromarray(colour).convert("CMYK"), quality=95), 1, (64, 48)),
        ("png.jpg", encode(colour, "PNG"), 0, (64, 48)),
        ("rotated.jpg", encode(halves, quality=95, exif=exif), 1, (64, 48)),
        ("big.jpg", encode(smooth_image(rng, 300, 700), quality=95), 0, (700, 300)),
        ("cut.jpg", truncated[: len(truncated) * 2 // 3], 1, (64, 48)),
    ]
    split = write_split(tmp_path, "MIXED", "test", files)
    options = ffcv_convert.ConvertOptions(max_resolution=256, allow_truncated=True)
    summary = ffcv_convert.convert_split(split, tmp_path / "ffcv" / "MIXED_test.beton", options, num_workers=2)
    expected = {"converted_from_L": 1, "converted_from_CMYK": 1, "png_named_jpg": 1,
                "exif_orientation_ignored": 1, "downscaled": 1, "truncated_filled": 1}
    assert summary.repairs == expected
    assert ffcv_convert.read_beton_info(summary.beton_path)["repairs"] == expected

    images, _, indices = collect(ffcv_loader.build_ffcv_loader(summary.beton_path, train=False, input_size=32,
                                                               batch_size=6, num_workers=1))
    assert list(indices) == list(range(6))
    gray = images[0]
    assert np.abs(gray[..., 0] - gray[..., 1]).max() < 1e-3 and np.abs(gray[..., 1] - gray[..., 2]).max() < 1e-3
    rotated = images[3]
    assert rotated[:, :14].mean() < 20 and rotated[:, 18:].mean() > 235  # not rotated


def test_bad_image_stops_conversion_and_leaves_nothing(tmp_path):
    rng = np.random.default_rng(6)
    files = [(f"im{i}.jpg", encode(smooth_image(rng, 32, 32)), 0, (32, 32)) for i in range(6)]
    files[4] = ("im4.jpg", files[4][1], 0, (33, 32))  # image_sizes.txt disagrees with the file
    split = write_split(tmp_path, "BAD", "val", files)
    out = tmp_path / "ffcv"
    with pytest.raises(ffcv_convert.ConversionError, match="image_sizes.txt") as caught:
        ffcv_convert.convert_split(split, out / "BAD_val.beton", num_workers=2)
    assert str(split.image_path(4)) in str(caught.value)
    assert leftovers(out) == []  # no .beton, no sidecar, no temporary file or report folder


@pytest.mark.slow  # conversion worker processes that die
@pytest.mark.parametrize("death", ["exit", "kill"])
def test_crashed_worker_stops_conversion(tmp_path, monkeypatch, death):
    rng = np.random.default_rng(7)
    files = [(f"im{i}.jpg", encode(smooth_image(rng, 32, 32)), 0, (32, 32)) for i in range(6)]
    split = write_split(tmp_path, "CRASH", "val", files)
    real_load = ffcv_convert.load_for_storage

    def dying_load(path, *args, **kwargs):
        if Path(path).name == "im3.jpg":  # as if killed, or crashed in native code: no exception at all
            os._exit(7) if death == "exit" else os.kill(os.getpid(), signal.SIGKILL)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(ffcv_convert, "load_for_storage", dying_load)  # the forked workers inherit it
    expected = "exit code 7" if death == "exit" else "killed by SIGKILL"
    with pytest.raises(ffcv_convert.ConversionError, match=expected):
        ffcv_convert.convert_split(split, tmp_path / "ffcv" / "CRASH_val.beton", num_workers=2)
    assert leftovers(tmp_path / "ffcv") == []


@pytest.mark.slow  # a conversion subprocess, killed
def test_killed_conversion_leaves_no_complete_beton(tmp_path):
    rng = np.random.default_rng(8)
    files = [(f"im{i}.jpg", encode(smooth_image(rng, 32, 32)), i % 2, (32, 32)) for i in range(8)]
    split = write_split(tmp_path, "KILL", "train", files)
    beton = tmp_path / "ffcv" / "KILL_train.beton"
    script = textwrap.dedent(f"""
        import time
        from calm_fast.data import ffcv_convert as F
        from calm_fast.data.metadata import read_split
        real_load = F.load_for_storage
        def slow_load(*args, **kwargs):
            time.sleep(0.5)
            return real_load(*args, **kwargs)
        F.load_for_storage = slow_load
        split = read_split({str(tmp_path / "metadata")!r}, "KILL", "train", {str(tmp_path / "KILL")!r})
        F.convert_split(split, {str(beton)!r}, num_workers=1)
    """)
    log = tmp_path / "convert.log"
    with open(log, "wb") as output:
        process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, start_new_session=True,
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(f".{beton.name}.partial") for p in beton.parent.glob(".*")):
            assert process.poll() is None, f"the conversion failed: {log.read_text()}"
            assert time.monotonic() < deadline, "the conversion never started"
            time.sleep(0.05)
        time.sleep(1.0)  # a couple of images in
        assert process.poll() is None, "the conversion ended before it was killed"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # the main process and its workers
        process.wait()
    assert not beton.exists() and not ffcv_convert.sidecar_path(beton).exists()

    summary = ffcv_convert.ensure_beton(split, tmp_path / "ffcv", num_workers=1)  # starts afresh, cleans the leftovers
    assert not summary.skipped and summary.num_images == 8
    assert leftovers(beton.parent) == sorted([beton.name, beton.name + ".json"])  # temporaries cleaned
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    assert reader.num_samples == 8
    assert reader.field_names == ["image", "label", "index"]
    assert list(reader.metadata["f1"]) == list(split.labels) and list(reader.metadata["f2"]) == list(range(8))


# ----------------------------------------------------------------------------------------------------
# Arguments, sharding rule, loader choice


def test_loader_arguments_are_checked(tmp_path, raw_set):
    _, _, beton = raw_set
    with pytest.raises(FileNotFoundError, match="missing.beton"):
        ffcv_loader.build_ffcv_loader(tmp_path / "missing.beton", train=False)
    (tmp_path / "foreign.beton").write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="foreign.beton"):
        ffcv_loader.build_ffcv_loader(tmp_path / "foreign.beton", train=False)
    for kwargs, fragment in [
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"train": True, "input_size": 64, "resize_size": 32}, "resize_size"),
        ({"drop_last": True}, "drop_last"),
        ({"batch_size": 0}, "batch_size"),
        ({"dtype": torch.int8}, "dtype"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            ffcv_loader.build_ffcv_loader(beton, **{"train": False, **kwargs})
    with pytest.raises(ValueError, match="jpeg_quality"):
        ffcv_convert.ConvertOptions(jpeg_quality=0).validate()
    assert cli_main(["convert", "--data-root", str(tmp_path), "--dataset", "NOPE"]) == 2  # no such metadata


@pytest.mark.parametrize("size,world_size", [(10, 1), (10, 3), (7, 4), (3, 5)])
def test_shard_order_is_the_torch_samplers(size, world_size):
    indices = np.arange(size, dtype=np.uint64)
    train_shards, eval_shards = [], []
    for rank in range(world_size):
        sampler = ShardSampler(size, rank, world_size, shuffle=True, seed=11)
        sampler.set_epoch(3)
        shard = shard_order(indices, rank, world_size, shuffle=True, seed=11, epoch=3, pad=True)
        assert list(shard) == list(sampler.indices())
        train_shards.append(shard)
        eval_shards.append(shard_order(indices, rank, world_size, shuffle=False, seed=0, epoch=0, pad=False))
    assert len({len(s) for s in train_shards}) == 1  # same number of steps on every rank
    assert set(np.concatenate(train_shards)) == set(range(size))
    assert sorted(np.concatenate(eval_shards)) == list(range(size))  # each exactly once
