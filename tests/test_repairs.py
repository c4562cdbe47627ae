"""Repairs are shown, not only counted: a box clipped by one pixel (metadata reader) and image repairs
(converter) appear in the convert table, the .beton sidecar and results.json. With --allow-truncated the
evaluation's overlay grid works from what the loader gave, instead of re-reading the truncated original
and crashing after results.json was written. Non-UTF-8 metadata names its line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from calm_fast.data.metadata import read_split
from calm_fast.data.metadata_files import MetadataError


REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "calm_fast.cli"]
TIMEOUT_S = 300


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", COLUMNS="250")  # wide enough for the convert table's repairs column
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def eval_config(run_dir: Path, data_root: Path, loader: str) -> str:
    return (f"run_dir = {json.dumps(str(run_dir))}\n[data]\nroot = {json.dumps(str(data_root))}\n"
            f'dataset = "SYNTH"\ninput_size = 32\nworkers = 1\neval_loader = "{loader}"\n[eval]\nsplit = "test"\n')


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory) -> Path:
    from calm_fast.data.synthetic import generate

    root = tmp_path_factory.mktemp("clean")
    generate(root, name="SYNTH", seed=0, num_classes=4, sizes={"train": 16, "val": 8, "test": 8}, image_size=48,
             workers=1)
    return root


@pytest.fixture()
def repaired_root(clean_root, tmp_path) -> Path:
    """The test split with one repair of each source: test image 0's box ends one pixel past its right
    border (clipped by the reader), image 1 is grayscale (converted to RGB), image 0 is truncated."""
    root = tmp_path / "data"
    shutil.copytree(clean_root, root)
    metadata = root / "metadata" / "SYNTH" / "test"
    width = int((metadata / "image_sizes.txt").read_text().splitlines()[0].split(",")[1])
    lines = (metadata / "localization.txt").read_text().splitlines()
    image_id, x0, y0, _, y1 = lines[0].split(",")
    lines[0] = ",".join([image_id, x0, y0, str(width), y1])  # x1 = width: one past the last column
    (metadata / "localization.txt").write_text("\n".join(lines) + "\n")
    ids = (metadata / "image_ids.txt").read_text().splitlines()
    second = root / "SYNTH" / ids[1]
    Image.open(second).convert("L").save(second, quality=95)
    first = root / "SYNTH" / ids[0]
    data = first.read_bytes()
    first.write_bytes(data[: len(data) // 2])
    return root


def test_non_utf8_metadata_names_the_line(clean_root, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(clean_root / "metadata", root / "metadata")
    labels = root / "metadata" / "SYNTH" / "test" / "class_labels.txt"
    lines = labels.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b"test/", b"t\xe9st/")  # Latin-1 é
    labels.write_bytes(b"\n".join(lines))
    with pytest.raises(MetadataError, match=rf"{labels}:3: not UTF-8"):
        read_split(root / "metadata", "SYNTH", "test", clean_root / "SYNTH")


@pytest.mark.slow  # calm-fast as a subprocess, end to end
def test_repairs_show_in_the_convert_table_the_sidecar_and_results_json(repaired_root, tmp_path):
    from calm_fast.data import ffcv_convert
    from calm_fast.data.ffcv_loader import ffcv_available

    if not ffcv_available():
        pytest.skip("FFCV does not import here")
    convert = CLI + ["convert", "--data-root", str(repaired_root), "--dataset", "SYNTH", "--split", "test",
                     "--workers", "1", "--allow-truncated"]
    result = run(convert, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    row = next(line for line in result.stderr.splitlines() if "SYNTH_test.beton" in line)
    for shown in ("box_clipped_1px: 1", "converted_from_L: 1", "truncated_filled: 1"):
        assert shown in row, result.stderr
    info = ffcv_convert.read_beton_info(repaired_root / "ffcv" / "SYNTH_test.beton")
    assert info["metadata_repairs"] == {"box_clipped_1px": 1}
    assert info["repairs"] == {"converted_from_L": 1, "truncated_filled": 1}
    # Up to date: the second run converts nothing and still shows them.
    again = run(convert, cwd=tmp_path)
    row = next(line for line in again.stderr.splitlines() if "SYNTH_test.beton" in line)
    assert "up to date" in row and "box_clipped_1px: 1" in row and "truncated_filled: 1" in row

    config = tmp_path / "eval.toml"
    config.write_text(eval_config(tmp_path / "run", repaired_root, "ffcv"))
    out = tmp_path / "out"
    result = run(CLI + ["eval", "--config", str(config), "--baseline", "centre-gaussian", "--out", str(out),
                        "--overlays", "4"], cwd=tmp_path)
    # The overlay grid holds the truncated image 0: drawn from the loader's copy, no re-read, no crash.
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "overlays_centre-gaussian.png").is_file()
    results = json.loads((out / "results.json").read_text())
    assert results["repairs"] == {"metadata": {"box_clipped_1px": 1},
                                  "images": {"converted_from_L": 1, "truncated_filled": 1}}
    assert "box_clipped_1px" in result.stdout  # under the printed results table


@pytest.mark.slow  # calm-fast as a subprocess, end to end
def test_the_torch_loader_names_a_truncated_image_in_one_line(repaired_root, tmp_path):
    config = tmp_path / "eval.toml"
    config.write_text(eval_config(tmp_path / "run", repaired_root, "torch"))
    result = run(CLI + ["eval", "--config", str(config), "--baseline", "centre-gaussian", "--out",
                        str(tmp_path / "out"), "--overlays", "0"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("calm-fast eval: ") and "000000.jpg" in line and "truncated" in line
