"""The WSOL metadata reader: valid layouts, every error case (naming file and line), the counted repair."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calm_fast.data.metadata import default_image_root, default_metadata_root, read_split
from calm_fast.data.metadata_files import MetadataError

IDS = ["a/1.jpg", "a/2.jpg", "b/3.jpg"]
SIZES = {"a/1.jpg": (40, 30), "a/2.jpg": (50, 60), "b/3.jpg": (20, 20)}
LOC_HEAD = "a/1.jpg,1,2,30,20\na/2.jpg,0,0,49,59\n"  # valid boxes of the first two images


def write_split(root: Path, files: dict[str, str], dataset: str = "TOY", split: str = "test") -> Path:
    folder = root / "metadata" / dataset / split
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def box_files(**overrides: str) -> dict[str, str]:
    files = {
        "image_ids.txt": "".join(f"{i}\n" for i in IDS),
        "class_labels.txt": "a/1.jpg,0\na/2.jpg,2\nb/3.jpg,1\n",
        "image_sizes.txt": "".join(f"{i},{w},{h}\n" for i, (w, h) in SIZES.items()),
        "localization.txt": "a/1.jpg,1,2,30,20\na/2.jpg,0,0,49,59\na/2.jpg,5,6,7,8\nb/3.jpg,3,4,10,12\n",
    }
    files.update(overrides)
    return files


def read(root: Path, **kwargs):
    return read_split(root / "metadata", "TOY", "test", root / "images", **kwargs)


def error_of(root: Path, files: dict[str, str], **kwargs) -> str:
    write_split(root, files)
    with pytest.raises(MetadataError) as info:
        read(root, **kwargs)
    return str(info.value)


def write_images(root: Path, sizes=SIZES) -> None:
    for image_id, (w, h) in sizes.items():
        path = root / "images" / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (w, h), (10, 20, 30)).save(path, format="JPEG")


def test_reads_a_box_split(tmp_path):
    write_split(tmp_path, box_files())
    split = read(tmp_path)
    assert len(split) == 3 and split.image_ids == IDS
    assert split.labels.dtype == np.int64 and split.labels.tolist() == [0, 2, 1]
    assert split.num_classes == 3
    assert split.image_sizes.tolist() == [[40, 30], [50, 60], [20, 20]]
    assert split.boxes[1].dtype == np.int64 and split.boxes[1].tolist() == [[0, 0, 49, 59], [5, 6, 7, 8]]
    assert split.masks is None and split.parts is None and split.repairs == {}
    assert split.image_path(2) == tmp_path / "images" / "b/3.jpg"


def test_lines_in_another_order_are_matched_by_path(tmp_path):
    labels = "b/3.jpg,1\na/1.jpg,0\na/2.jpg,2\n"
    write_split(tmp_path, box_files(**{"class_labels.txt": labels}))
    assert read(tmp_path).labels.tolist() == [0, 2, 1]


def test_fractional_boxes_are_kept_as_floats(tmp_path):
    loc = "a/1.jpg,1.5,2,30,20\na/2.jpg,0,0,4,4\nb/3.jpg,3,4,10,12\n"
    write_split(tmp_path, box_files(**{"localization.txt": loc}))
    boxes = read(tmp_path).boxes
    assert boxes[0].dtype == np.float64 and boxes[0].tolist() == [[1.5, 2.0, 30.0, 20.0]]


def test_one_pixel_overhang_is_clipped_and_counted(tmp_path):
    # a/1.jpg is 40x30: x1 = 40 and y1 = 30 are one past the last pixel; -1 is one before the first.
    loc = "a/1.jpg,-1,2,40,30\na/2.jpg,0,0,50,59\nb/3.jpg,3,4,10,12\n"
    write_split(tmp_path, box_files(**{"localization.txt": loc}))
    split = read(tmp_path)
    assert split.boxes[0].tolist() == [[0, 2, 39, 29]]
    assert split.boxes[1].tolist() == [[0, 0, 49, 59]]
    assert split.repairs == {"box_clipped_1px": 2}


@pytest.mark.parametrize(
    "file, text, expected",
    [
        ("class_labels.txt", "a/1.jpg,0\na/2.jpg\nb/3.jpg,1\n", "class_labels.txt:2: expected 'path,label'"),
        ("class_labels.txt", "a/1.jpg,0\na/2.jpg,two\nb/3.jpg,1\n", "class_labels.txt:2: label is not an integer"),
        ("class_labels.txt", "a/1.jpg,0\na/2.jpg,-1\nb/3.jpg,1\n", "class_labels.txt:2: label -1"),
        ("class_labels.txt", "a/1.jpg,0\na/2.jpg,2\na/2.jpg,2\nb/3.jpg,1\n", "class_labels.txt:3: second label"),
        ("image_sizes.txt", "a/1.jpg,40,30\na/2.jpg,50\nb/3.jpg,20,20\n", "image_sizes.txt:2: expected"),
        ("image_sizes.txt", "a/1.jpg,40,30\na/2.jpg,50,0\nb/3.jpg,20,20\n", "image_sizes.txt:2: image size 50x0"),
        ("localization.txt", LOC_HEAD + "b/3.jpg,3,4,x,12\n", "localization.txt:3: x1 is not a number"),
        ("localization.txt", "a/1.jpg,1,2,30,20\na/2.jpg,9,0,8,59\nb/3.jpg,3,4,10,12\n",
         "localization.txt:2: box of 'a/2.jpg' has x1<x0"),
        ("localization.txt", LOC_HEAD + "b/3.jpg,3,4,10,22\n", "localization.txt:3: box"),
        ("localization.txt", "a/1.jpg,1,2,30\n", "localization.txt:1: expected boxes"),
        ("localization.txt", "a/1.jpg,1,2,30,20\na/2.jpg,0,0,49\nb/3.jpg,3,4,10,12\n",
         "localization.txt:2: expected 'path,x0,y0,x1,y1'"),
        ("image_ids.txt", "a/1.jpg\n\na/2.jpg\nb/3.jpg\n", "image_ids.txt:2: empty line"),
        ("image_ids.txt", "a/1.jpg\na/2.jpg\nb/3.jpg\na/2.jpg\n",
         "image_ids.txt:4: duplicated image id 'a/2.jpg' (first on line 2)"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, file, text, expected):
    assert expected in error_of(tmp_path, box_files(**{file: text}))


def test_box_far_outside_the_image_is_an_error_not_a_repair(tmp_path):
    loc = "a/1.jpg,1,2,41,20\na/2.jpg,0,0,49,59\nb/3.jpg,3,4,10,12\n"  # 2 px past a 40-px-wide image
    message = error_of(tmp_path, box_files(**{"localization.txt": loc}))
    assert "localization.txt:1" in message and "40x30" in message and "more than one pixel" in message


def test_label_out_of_range_with_num_classes(tmp_path):
    message = error_of(tmp_path, box_files(), num_classes=2)
    assert "class_labels.txt:2: label 2 of 'a/2.jpg' out of range [0, 2)" in message


def test_image_missing_from_another_file_names_both_files_and_the_path(tmp_path):
    labels = "a/1.jpg,0\nb/3.jpg,1\n"
    message = error_of(tmp_path, box_files(**{"class_labels.txt": labels}))
    assert "image_ids.txt:2: image 'a/2.jpg'" in message and "class_labels.txt" in message

    loc = "a/1.jpg,1,2,30,20\nb/3.jpg,3,4,10,12\n"
    message = error_of(tmp_path, box_files(**{"localization.txt": loc}))
    assert "image_ids.txt:2: image 'a/2.jpg'" in message and "localization.txt" in message


def test_unknown_image_in_another_file_names_both_files(tmp_path):
    labels = "a/1.jpg,0\na/2.jpg,2\nb/3.jpg,1\nc/4.jpg,0\n"
    message = error_of(tmp_path, box_files(**{"class_labels.txt": labels}))
    assert "class_labels.txt:4: image 'c/4.jpg' is not listed in" in message and "image_ids.txt" in message


def test_missing_files_and_folders(tmp_path):
    files = box_files()
    del files["class_labels.txt"]
    message = error_of(tmp_path, files)
    assert "class_labels.txt: required metadata file is missing" in message
    with pytest.raises(MetadataError, match="metadata folder not found"):
        read_split(tmp_path / "metadata", "TOY", "val", tmp_path)


def test_missing_sizes_are_read_from_image_headers(tmp_path):
    files = box_files(**{"image_sizes.txt": ""})
    del files["localization.txt"]
    write_split(tmp_path, files)
    write_images(tmp_path)
    split = read(tmp_path)
    assert split.boxes is None
    assert split.image_sizes.tolist() == [[40, 30], [50, 60], [20, 20]]


def test_boxes_without_sizes_are_checked_against_the_image_headers(tmp_path):
    files = box_files()
    del files["image_sizes.txt"]
    write_split(tmp_path, files)
    write_images(tmp_path, {**SIZES, "b/3.jpg": (11, 12)})  # box 3,4,10,12 overhangs y by one pixel
    split = read(tmp_path)
    assert split.image_sizes.tolist() == [[40, 30], [50, 60], [11, 12]]
    assert split.boxes[2].tolist() == [[3, 4, 10, 11]] and split.repairs == {"box_clipped_1px": 1}


def test_mask_split_groups_instances_and_keeps_the_first_ignore(tmp_path):
    masks = "a/1.jpg,a/1_m0.png,a/1_ignore.png\na/1.jpg,a/1_m1.png,\na/2.jpg,a/2_m0.png,\nb/3.jpg,b/3_m.png,b/3_i.png\n"
    write_split(tmp_path, box_files(**{"localization.txt": masks, "image_sizes.txt": ""}))
    split = read(tmp_path, mask_root=tmp_path / "masks")
    root = tmp_path / "masks"
    assert split.boxes is None
    assert split.masks[0].paths == [root / "a/1_m0.png", root / "a/1_m1.png"]
    assert split.masks[0].ignore_path == root / "a/1_ignore.png"
    assert split.masks[1].ignore_path is None
    assert split.masks[2].paths == [root / "b/3_m.png"]
    # The default mask root is the image root (OpenImages keeps masks beside the images).
    assert read(tmp_path).masks[2].paths == [tmp_path / "images" / "b/3_m.png"]


def test_a_later_line_with_another_ignore_path_is_an_error(tmp_path):
    masks = "a/1.jpg,m0.png,i0.png\na/1.jpg,m1.png,i9.png\na/2.jpg,m2.png,\nb/3.jpg,m3.png,\n"
    message = error_of(tmp_path, box_files(**{"localization.txt": masks}))
    assert "localization.txt:2: ignore path of 'a/1.jpg'" in message


def test_box_and_mask_files_together(tmp_path):
    masks = "a/1.jpg,m0.png,i0.png\na/2.jpg,m2.png,\nb/3.jpg,m3.png,\n"
    write_split(tmp_path, box_files(**{"localization_masks.txt": masks}))
    split = read(tmp_path)
    assert split.boxes is not None and len(split.masks) == 3


def test_check_images_names_missing_and_unreadable_files(tmp_path):
    write_split(tmp_path, box_files())
    write_images(tmp_path)
    assert len(read(tmp_path, check_images=True)) == 3

    (tmp_path / "images" / "a/2.jpg").unlink()
    with pytest.raises(MetadataError, match=r"a/2\.jpg.*missing"):
        read(tmp_path, check_images=True)

    good = (tmp_path / "images" / "a/1.jpg").read_bytes()
    (tmp_path / "images" / "a/2.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    with pytest.raises(MetadataError, match=r"a/2\.jpg: unreadable image"):
        read(tmp_path, check_images=True)


def test_proxy_ids_select_a_subset(tmp_path):
    write_split(tmp_path, box_files(**{"image_ids_proxy.txt": "b/3.jpg\na/1.jpg\n"}))
    split = read(tmp_path, proxy=True)
    assert split.image_ids == ["b/3.jpg", "a/1.jpg"] and split.labels.tolist() == [1, 0]
    assert split.boxes[0].tolist() == [[3, 4, 10, 12]]


def test_parts_file_errors(tmp_path):
    good = "a/1.jpg,0,body,1,1,5,5,0,p/1.png\na/2.jpg,0,body,1,1,5,5,1,p/2.png\nb/3.jpg,0,head,1,1,5,5,0,p/3.png\n"
    write_split(tmp_path, box_files(**{"parts.txt": good}))
    parts = read(tmp_path).parts
    assert parts[1].names == ["body"] and parts[1].discriminative.tolist() == [True]
    assert parts[2].mask_path == tmp_path / "images" / "p/3.png"

    skipped = good.replace("a/2.jpg,0,", "a/2.jpg,1,")
    assert "parts.txt:2: part_index 1" in error_of(tmp_path, box_files(**{"parts.txt": skipped}))
    bad_flag = good.replace("5,5,1,", "5,5,yes,")
    assert "parts.txt:2: discriminative must be 0 or 1" in error_of(tmp_path, box_files(**{"parts.txt": bad_flag}))


def test_default_roots():
    root = Path("data")
    assert default_metadata_root(root) == root / "metadata"
    assert default_image_root(root, "CUB", "train") == root / "CUB/images"
    assert default_image_root(root, "CUB", "val") == root / "CUBV2"
    assert default_image_root(root, "ILSVRC", "test") == root / "ILSVRC"
    assert default_image_root(root, "ILSVRC", "val") == root / "ImageNetV2"
    assert default_image_root(root, "OpenImages", "val") == root / "OpenImages"
    assert default_image_root(root, "SYNTH", "train") == root / "SYNTH"
    with pytest.raises(ValueError, match="split"):
        default_image_root(root, "CUB", "dev")


# ---- paths must stay inside their root (an id or mask path never reaches a file outside the dataset)


@pytest.mark.parametrize("bad_id", ["../../outside/secret.jpg", "a/../../secret.jpg", "/etc/passwd", "a/..", ".."])
def test_an_image_id_outside_the_image_root_names_file_and_line(tmp_path, bad_id):
    ids = f"a/1.jpg\n{bad_id}\nb/3.jpg\n"
    labels = f"a/1.jpg,0\n{bad_id},2\nb/3.jpg,1\n"
    files = {"image_ids.txt": ids, "class_labels.txt": labels}
    message = error_of(tmp_path, files)
    assert "image_ids.txt:2" in message and repr(bad_id) in message and "inside" in message


@pytest.mark.parametrize("column", [1, 2])
@pytest.mark.parametrize("bad_path", ["../outside.png", "/tmp/mask.png", "m/../../x.png"])
def test_a_mask_path_outside_the_mask_root_names_file_and_line(tmp_path, column, bad_path):
    lines = [["a/1.jpg", "m0.png", "i0.png"], ["a/2.jpg", "m2.png", ""], ["b/3.jpg", "m3.png", "i3.png"]]
    lines[2][column] = bad_path
    masks = "".join(",".join(line) + "\n" for line in lines)
    for file in ("localization.txt", "localization_masks.txt"):
        message = error_of(tmp_path, box_files(**{file: masks}))
        assert f"{file}:3" in message and repr(bad_path) in message
        (tmp_path / "metadata" / "TOY" / "test" / file).unlink()


def test_a_part_mask_path_outside_the_image_root_names_file_and_line(tmp_path):
    parts = "a/1.jpg,0,body,1,1,5,5,0,p/1.png\na/2.jpg,0,body,1,1,5,5,1,../../p/2.png\nb/3.jpg,0,head,1,1,5,5,0,p/3.png\n"
    message = error_of(tmp_path, box_files(**{"parts.txt": parts}))
    assert "parts.txt:2" in message and "'../../p/2.png'" in message


def test_paths_inside_the_root_with_dots_in_names_are_fine(tmp_path):
    ids = ["a/1..jpg", "./a/2.jpg", "b/..3.jpg"]
    files = {"image_ids.txt": "".join(f"{i}\n" for i in ids),
             "class_labels.txt": "".join(f"{i},0\n" for i in ids)}
    write_split(tmp_path, files)
    assert read(tmp_path).image_ids == ids


# ---- the class count: labels are bounded by the count the dataset declares, not inferred from them


def test_a_synthetic_dataset_bounds_labels_by_its_declared_class_count(tmp_path):
    folder = write_split(tmp_path, box_files())  # labels 0, 2, 1
    (folder.parent / "synthetic.json").write_text(json.dumps({"options": {"num_classes": 2}}))
    assert "class_labels.txt:2: label 2 of 'a/2.jpg' out of range [0, 2)" in error_of(tmp_path, box_files())
    (folder.parent / "synthetic.json").write_text(json.dumps({"options": {"num_classes": 5}}))
    assert read(tmp_path).num_classes == 5  # not 3, the largest label + 1
    assert read(tmp_path, num_classes=4).num_classes == 4  # an explicit count wins


def test_a_malformed_class_declaration_names_the_file(tmp_path):
    folder = write_split(tmp_path, box_files())
    for text in ("{", json.dumps({"options": {"num_classes": 0}}), json.dumps({"options": {}})):
        (folder.parent / "synthetic.json").write_text(text)
        assert "synthetic.json" in error_of(tmp_path, box_files())


def test_check_image_size_compares_a_decoded_size_with_image_sizes_txt(tmp_path):
    write_split(tmp_path, box_files())
    split = read(tmp_path)
    split.check_image_size(1, (50, 60))  # as image_sizes.txt says
    with pytest.raises(MetadataError) as error:
        split.check_image_size(1, (60, 50))
    message = str(error.value)
    assert str(split.image_path(1)) in message and "60x50" in message and "image_sizes.txt:2" in message
    assert "50x60" in message


# ---- read_configured_split: every split of a run is bounded by one configured class count


def test_a_configured_split_bounds_every_split_by_the_configured_class_count(tmp_path):
    from calm_fast.config import ConfigError, load_config
    from calm_fast.data.splits import read_configured_split

    for split in ("train", "val"):
        write_split(tmp_path, box_files(), split=split)  # labels 0, 2, 1
    cfg = load_config(None, [f"data.root={tmp_path}", "data.dataset=TOY", f"data.train_image_root={tmp_path}",
                             f"data.val_image_root={tmp_path}", "data.num_classes=2"])
    for split in ("train", "val"):  # the training split too: a typo must not build a bigger model
        with pytest.raises(MetadataError, match=rf"{split}/class_labels.txt:2: label 2 of 'a/2.jpg' out of range"):
            read_configured_split(cfg, split)
    # Without data.num_classes and without a count the dataset declares, the count is not guessed.
    cfg = load_config(None, [f"data.root={tmp_path}", "data.dataset=TOY", f"data.train_image_root={tmp_path}"])
    with pytest.raises(ConfigError, match="data.num_classes"):
        read_configured_split(cfg, "train")
    (tmp_path / "metadata" / "TOY" / "synthetic.json").write_text(json.dumps({"options": {"num_classes": 3}}))
    assert read_configured_split(cfg, "train").num_classes == 3
