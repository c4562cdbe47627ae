"""The plain PyTorch loader: decoding odd files, transforms, batch shapes, sharding, determinism."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calm_fast.data.images import decode_rgb
from calm_fast.data.metadata import read_split
from calm_fast.data.sampling import ShardSampler
from calm_fast.data.torch_loader import IMAGENET_MEAN, IMAGENET_STD, WSOLDataset, build_torch_loader

MEAN = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
STD = np.array(IMAGENET_STD, np.float32)[:, None, None]


def make_split(root: Path, images: dict[str, Image.Image | bytes], labels: list[int] | None = None):
    """Write images (PIL images saved as PNG, or raw bytes) and minimal metadata; return the split."""
    folder = root / "metadata" / "TOY" / "test"
    folder.mkdir(parents=True)
    ids = list(images)
    labels = labels or [k % 3 for k in range(len(ids))]
    for image_id, image in images.items():
        path = root / "images" / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(image, bytes):
            path.write_bytes(image)
        else:
            image.save(path, format="PNG")
    (folder / "image_ids.txt").write_text("".join(f"{i}\n" for i in ids))
    (folder / "class_labels.txt").write_text("".join(f"{i},{y}\n" for i, y in zip(ids, labels)))
    return read_split(root / "metadata", "TOY", "test", root / "images")


def encoded(image: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def test_odd_files_decode_to_rgb_in_stored_orientation(tmp_path):
    rgb = Image.new("RGB", (6, 4), (200, 100, 50))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    files = {
        "gray.jpg": encoded(Image.new("L", (6, 4), 77), "JPEG"),
        "cmyk.jpg": encoded(Image.new("CMYK", (6, 4), (0, 0, 0, 0)), "JPEG"),
        "png_named.jpg": encoded(rgb, "PNG"),
        "rgba.png": encoded(Image.new("RGBA", (6, 4), (10, 20, 30, 0)), "PNG"),
        "palette.png": encoded(rgb.convert("P"), "PNG"),
        "exif.jpg": encoded(rgb, "JPEG", exif=exif.tobytes()),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        image = decode_rgb(tmp_path / name)
        assert image.mode == "RGB" and image.size == (6, 4), name  # EXIF rotation not applied
    assert np.abs(np.array(decode_rgb(tmp_path / "gray.jpg")).astype(int) - 77).max() <= 2
    assert np.array(decode_rgb(tmp_path / "png_named.jpg"))[0, 0].tolist() == [200, 100, 50]
    assert np.array(decode_rgb(tmp_path / "cmyk.jpg")).min() >= 250  # no ink is white


def test_broken_and_missing_files_are_named(tmp_path):
    data = encoded(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match=r"cut\.jpg: cannot decode"):
        decode_rgb(tmp_path / "cut.jpg")
    with pytest.raises(FileNotFoundError, match=r"gone\.jpg"):
        decode_rgb(tmp_path / "gone.jpg")


def test_eval_batches_are_normalised_resized_images(tmp_path):
    colours = [(255, 0, 0), (0, 128, 255), (30, 60, 90), (9, 9, 9), (200, 200, 0)]
    split = make_split(tmp_path, {f"{k}.png": Image.new("RGB", (30 + k, 20), c) for k, c in enumerate(colours)})
    loader = build_torch_loader(split, train=False, input_size=16, resize_size=None, batch_size=2, num_workers=0)
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [2, 2, 1]  # nothing dropped at evaluation
    images, labels, indices = batches[0]
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and indices.dtype == torch.int64
    seen = torch.cat([b[2] for b in batches]).tolist()
    assert seen == [0, 1, 2, 3, 4]
    for image, index in zip(torch.cat([b[0] for b in batches]), seen):
        expected = (np.array(colours[index], np.float32)[:, None, None] / 255 - MEAN) / STD
        np.testing.assert_allclose(image.numpy(), np.broadcast_to(expected, (3, 16, 16)), atol=1e-5)
    assert torch.cat([b[1] for b in batches]).tolist() == split.labels.tolist()


def test_train_samples_are_flipped_or_plain_crops_of_the_resized_image(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (15, 13, 3), dtype=np.uint8)
    split = make_split(tmp_path, {"noise.png": Image.fromarray(pixels)})
    resized = np.array(Image.fromarray(pixels).resize((12, 12), Image.BILINEAR), np.float32) / 255
    resized = (resized.transpose(2, 0, 1) - MEAN) / STD
    candidates = [
        view[:, top : top + 8, left : left + 8]
        for view in (resized, resized[:, :, ::-1])
        for top in range(5)
        for left in range(5)
    ]
    dataset = WSOLDataset(split, train=True, input_size=8, resize_size=12, seed=5)
    outputs = [dataset[(0, epoch)][0].numpy() for epoch in range(12)]
    for output in outputs:
        distances = [np.abs(output - c).max() for c in candidates]
        assert min(distances) < 0.05  # bilinear resize may differ by a rounding step
    assert len({o.tobytes() for o in outputs}) > 3  # epochs see different crops
    assert np.array_equal(dataset[(0, 7)][0].numpy(), outputs[7])  # a function of (seed, epoch, index)


def test_eval_sharding_covers_every_image_once():
    for size, world in [(10, 3), (7, 4), (3, 5), (12, 2)]:
        shards = [ShardSampler(size, rank, world).indices().tolist() for rank in range(world)]
        assert sorted(i for s in shards for i in s) == list(range(size))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        assert [len(ShardSampler(size, r, world)) for r in range(world)] == list(map(len, shards))


def test_train_sharding_pads_to_equal_shards_and_reshuffles_each_epoch():
    size, world = 10, 4
    samplers = [ShardSampler(size, rank, world, shuffle=True, seed=1) for rank in range(world)]
    shards = [s.indices().tolist() for s in samplers]
    assert all(len(s) == 3 for s in shards) and all(len(s) == 3 for s in samplers)
    assert set(i for s in shards for i in s) == set(range(size))  # 12 slots: every image, two twice
    for s in samplers:
        s.set_epoch(1)
    assert [s.indices().tolist() for s in samplers] != shards
    assert [ShardSampler(size, r, world, shuffle=True, seed=1).indices().tolist() for r in range(world)] == shards
    keys = list(samplers[0])
    assert all(epoch == 1 for _, epoch in keys)


def test_loader_output_does_not_depend_on_worker_count(tmp_path):
    rng = np.random.default_rng(1)
    images = {f"{k}.png": Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for k in range(6)}
    split = make_split(tmp_path, images)
    runs = []
    for workers in (0, 2):
        loader = build_torch_loader(split, True, 8, 12, batch_size=2, num_workers=workers, rank=1, world_size=2, seed=3)
        loader.sampler.set_epoch(2)
        runs.append([tuple(t.clone() for t in batch) for batch in loader])
    assert len(runs[0]) == len(runs[1]) == 1  # 3 images on this rank, batches of 2, drop_last for training
    for a, b in zip(*runs):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_bad_loader_arguments(tmp_path):
    split = make_split(tmp_path, {"a.png": Image.new("RGB", (4, 4))})
    with pytest.raises(ValueError, match="drop_last"):
        build_torch_loader(split, False, 8, None, batch_size=2, num_workers=0, drop_last=True)
    with pytest.raises(ValueError, match="resize_size"):
        build_torch_loader(split, True, 8, 4, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match="rank"):
        build_torch_loader(split, False, 8, None, batch_size=2, num_workers=0, rank=2, world_size=2)


@pytest.mark.parametrize("train", [True, False])
def test_an_image_whose_size_differs_from_image_sizes_txt_is_refused(tmp_path, train):
    """As `calm-fast convert` refuses it: the boxes, given in the listed frame, would be misplaced."""
    from calm_fast.data.metadata_files import MetadataError

    split = make_split(tmp_path, {"a.png": Image.new("RGB", (8, 6)), "b.png": Image.new("RGB", (9, 7))})
    (split.metadata_dir / "image_sizes.txt").write_text("a.png,8,6\nb.png,7,9\n")  # b is 9x7, not 7x9
    split = read_split(tmp_path / "metadata", "TOY", "test", tmp_path / "images")
    dataset = WSOLDataset(split, train=train, input_size=4, resize_size=5)
    assert dataset[0][0].shape == (3, 4, 4)
    with pytest.raises(MetadataError) as error:
        dataset[1]
    assert "b.png: image is 9x7" in str(error.value) and "image_sizes.txt:2 says 7x9" in str(error.value)
