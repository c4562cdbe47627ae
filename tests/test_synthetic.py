"""The synthetic WSOL generator: layout, consistency of boxes/masks/parts, determinism, atomicity, design."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calm_fast.data import synthetic
from calm_fast.data.metadata import read_split
from calm_fast.data.scenes import CLASS_SLOTS, PALETTE, PART_NAMES, VARIANTS, SynthOptions, class_table, render_scene
from calm_fast.data.scenes import _object_variants as object_variants
from calm_fast.data.synthetic import generate

SMALL = {"train": 16, "val": 8, "test": 12}


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, name="TOY", seed=3, num_classes=8, sizes=SMALL, image_size=64, workers=0)
    return root


def read(root: Path, split: str, name: str = "TOY"):
    return read_split(root / "metadata", name, split, root / name, check_images=True)


def test_layout_reads_back_as_box_and_mask_dataset(dataset):
    for split, count in SMALL.items():
        data = read(dataset, split)
        assert len(data) == count and data.num_classes == 8
        assert data.boxes is not None and data.masks is not None and data.parts is not None
        assert all(len(b) == 1 for b in data.boxes) and all(len(m.paths) == 1 for m in data.masks)
        # Balanced labels: counts differ by at most one.
        counts = np.bincount(data.labels, minlength=8)
        assert counts.max() - counts.min() <= 1
        for i in range(len(data)):
            with Image.open(data.image_path(i)) as image:
                assert image.format == "JPEG" and image.mode == "RGB"
                assert tuple(data.image_sizes[i]) == image.size
    manifest = json.loads((dataset / "metadata" / "TOY" / "synthetic.json").read_text())
    assert manifest["sizes"] == SMALL and len(manifest["classes"]) == 8 and manifest["seed"] == 3


def extent(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max(), ys.max()]


def test_boxes_masks_and_parts_agree(dataset):
    data = read(dataset, "test")
    for i in range(len(data)):
        mask = np.array(Image.open(data.masks[i].paths[0])) > 127
        ignore = np.array(Image.open(data.masks[i].ignore_path)) > 127
        part_map = np.array(Image.open(data.parts[i].mask_path))
        box = data.boxes[i][0].tolist()
        assert box == extent(mask)  # the box is the mask's extent (inclusive ends)
        assert not (ignore & mask).any() and ignore.any()
        assert np.array_equal(part_map > 0, mask)  # the parts tile the object exactly
        parts = data.parts[i]
        assert parts.names == list(PART_NAMES)
        for j, part_box in enumerate(parts.boxes.tolist()):
            assert part_box == extent(part_map == j + 1)
            x0, y0, x1, y1 = part_box
            assert box[0] <= x0 <= x1 <= box[2] and box[1] <= y0 <= y1 <= box[3]
        # head, tail and crest tell the 8 classes apart; body and legs are shared by all.
        assert parts.discriminative.tolist() == [name in CLASS_SLOTS for name in PART_NAMES]


def test_same_seed_same_bytes_whatever_the_worker_count(dataset, tmp_path):
    generate(tmp_path, name="TOY", seed=3, num_classes=8, sizes=SMALL, image_size=64, workers=2)
    assert tree_digest(tmp_path) == tree_digest(dataset)


def test_another_seed_gives_other_images(dataset, tmp_path):
    generate(tmp_path, name="TOY", seed=4, num_classes=8, sizes={"test": 4}, image_size=64, workers=0)
    other = (tmp_path / "TOY" / "test" / "000000.jpg").read_bytes()
    assert other != (dataset / "TOY" / "test" / "000000.jpg").read_bytes()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = synthetic.render_scene

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt  # like a user's Ctrl-C in the middle of the run
        return real(*args)

    monkeypatch.setattr(synthetic, "render_scene", failing)
    with pytest.raises(KeyboardInterrupt):
        generate(tmp_path, name="TOY", sizes={"train": 8}, image_size=48, workers=0)
    assert list(tmp_path.iterdir()) == []  # no final folder and no staging folder left


def test_existing_dataset_is_kept_unless_overwrite(tmp_path):
    generate(tmp_path, name="TOY", sizes={"test": 2}, image_size=48, workers=0)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate(tmp_path, name="TOY", sizes={"test": 3}, image_size=48, workers=0)
    generate(tmp_path, name="TOY", sizes={"test": 3}, image_size=48, workers=0, overwrite=True)
    assert len(read(tmp_path, "test")) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TOY", "metadata"]


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_classes": 1}, "num_classes"),
        ({"image_size": 8}, "image_size"),
        ({"object_scale": (0.6, 0.3)}, "object_scale"),
        ({"distractors": -1}, "distractors"),
        ({"sizes": {"dev": 3}}, "dev"),
        ({"sizes": {"train": 0}}, "train"),
        ({"name": "a/b"}, "name"),
    ],
)
def test_bad_arguments_are_named(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=name):
        generate(tmp_path, workers=0, **kwargs)


def test_class_table():
    eight = class_table(8)
    assert sorted(eight) == sorted({(a, b, c) for a in (0, 1) for b in (0, 1) for c in (0, 1)})
    # Each class differs from exactly 3, 3 and 1 others in 1, 2 and 3 parts (the cue-localization groups).
    for c in eight:
        differences = [sum(x != y for x, y in zip(c, d)) for d in eight if d != c]
        assert sorted(differences) == [1, 1, 1, 2, 2, 2, 3]
    ten = class_table(10)
    assert len(set(ten)) == 10 and max(max(c) for c in ten) == 2
    assert class_table(10) == ten  # independent of any dataset seed
    with pytest.raises(ValueError):
        class_table(len(VARIANTS["head"]) ** 3 + 1)


def scenes(count: int, **knobs):
    options = SynthOptions(**knobs)
    classes = class_table(options.num_classes)
    labels = [k % options.num_classes for k in range(count)]
    return [render_scene(options, classes, y, np.random.default_rng([11, k])) for k, y in enumerate(labels)]


def test_objects_vary_in_position_scale_and_aspect():
    centres, sides, aspects = [], [], []
    for scene in scenes(150):
        h, w = scene.object_mask.shape
        x0, y0, x1, y1 = scene.box
        centres.append(((x0 + x1) / 2 / w, (y0 + y1) / 2 / h))
        sides.append(np.sqrt((x1 - x0 + 1) / w * (y1 - y0 + 1) / h))  # object side: geometric mean
        aspects.append((x1 - x0 + 1) / (y1 - y0 + 1))
    centres = np.array(centres)
    # Not centred on average: the centres spread over the image (uniform on [0.3, 0.7] has std 0.115).
    assert centres.std(axis=0).min() > 0.1
    assert (np.abs(centres - 0.5).max(axis=1) > 0.2).mean() > 0.2
    assert 0.2 <= min(sides) < 0.3 and 0.5 < max(sides) <= 0.55
    assert np.ptp(aspects) > 0.5


def test_object_colours_also_appear_outside_the_object():
    """Shared colours: the object's part colours are found in the background or distractors too."""
    shared = 0
    found = 0
    for scene, label in zip(scenes(40, noise=0, num_classes=8), range(40)):
        variants = object_variants(class_table(8), label % 8)
        outside = scene.image[~scene.object_mask & ~scene.ignore_mask]
        for slot in CLASS_SLOTS:
            colour = np.array(PALETTE[variants[slot][1]], np.uint8)
            found += 1
            shared += bool((outside == colour).all(axis=1).any())
    assert shared / found > 0.5


def test_distractors_knob_changes_only_the_surroundings():
    with_distractors = scenes(20, distractors=6, clutter=0)
    without = scenes(20, distractors=0, clutter=0)
    for a, b in zip(with_distractors, without):
        assert a.box == b.box and np.array_equal(a.part_map, b.part_map)
    assert any(not np.array_equal(a.image, b.image) for a, b in zip(with_distractors, without))


def test_command_line(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    synthetic.add_arguments(parser)
    args = parser.parse_args(
        ["--out", str(tmp_path), "--name", "CLI", "--sizes", "train=3,test=2", "--image-size", "48", "--workers", "0",
         "--num-classes", "4", "--object-scale", "0.3", "0.5"]
    )
    assert synthetic.main(args) == 0
    assert "wrote CLI" in capsys.readouterr().out
    data = read_split(tmp_path / "metadata", "CLI", "train", tmp_path / "CLI", num_classes=4)
    assert len(data) == 3 and set(data.labels.tolist()) == {0, 1, 2}  # balanced: 3 images, 3 classes
    options = json.loads((tmp_path / "metadata" / "CLI" / "synthetic.json").read_text())["options"]
    assert options["object_scale"] == [0.3, 0.5]
