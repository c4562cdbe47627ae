"""A user's mistake ends `calm-fast train` and `calm-fast eval` with one line naming the file (and line), exit
status 2, no traceback (also under torchrun: one line per rank); `--debug` brings the traceback back; a bug
keeps its traceback. Weights from another model or class count: one line listing what does not match.
Run as subprocesses, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "calm_fast.cli"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "calm_fast.cli"]
TIMEOUT_S = 300
NUM_CLASSES = 4


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=TIMEOUT_S)


def one_error_line(result: subprocess.CompletedProcess, command: str) -> str:
    """The single `calm-fast COMMAND: ...` line of a run stopped by a user error (exit 2, no traceback)."""
    assert result.returncode == 2, f"exit {result.returncode}:\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"calm-fast {command}")]
    assert len(lines) == 1, result.stderr[-4000:]
    assert result.stderr.rstrip().endswith(lines[0])  # nothing after it
    return lines[0]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from calm_fast.data.synthetic import generate

    root = tmp_path_factory.mktemp("data")
    generate(root, name="SYNTH", seed=0, num_classes=NUM_CLASSES, sizes={"train": 32, "val": 8, "test": 8},
             image_size=48, workers=1)
    return root


def train_overrides(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    return [f"data.root={data_root}", "data.dataset=SYNTH", f"run_dir={run_dir}", "model.backbone=tiny_resnet",
            "model.batch_norm=false", "data.input_size=32", "data.resize_size=40", "data.batch_size=8",
            "data.workers=0", "data.loader=torch", "train.max_steps=1", "train.tensorboard=false",
            "train.progress=false", "train.val_every=0", *extra]


@pytest.fixture(scope="module")
def exported(data_root, tmp_path_factory) -> Path:
    """A model.pt as `train --export` writes it: tiny_resnet CALM-EM for 4 classes, with its config."""
    from calm_fast.config import config_to_dict, load_config
    from calm_fast.models import build_model
    from calm_fast.models.weights import EXPORT_FORMAT

    folder = tmp_path_factory.mktemp("exported")
    cfg = load_config(None, [f"data.root={json.dumps(str(data_root))}", "data.dataset=SYNTH", "data.input_size=32",
                             "data.workers=0", "data.loader=torch", "model.backbone=tiny_resnet", "eval.split=test",
                             f"run_dir={json.dumps(str(folder))}"])
    model = build_model("tiny_resnet", NUM_CLASSES, "calm-em")
    torch.save({"format": EXPORT_FORMAT, "state_dict": model.state_dict(), "config": config_to_dict(cfg),
                "step": 1}, folder / "model.pt")
    return folder / "model.pt"


# ------------------------------------------------------------------------------------------------ train


@pytest.mark.slow  # calm-fast as a subprocess, end to end
def test_missing_data_is_one_line(data_root, tmp_path):
    result = run(CLI + ["train", *train_overrides(tmp_path / "nowhere", tmp_path / "run")], cwd=tmp_path)
    line = one_error_line(result, "train")
    assert str(tmp_path / "nowhere" / "metadata" / "SYNTH" / "train") in line and "not found" in line


@pytest.mark.slow  # calm-fast as a subprocess, end to end
def test_bad_metadata_names_file_and_line(data_root, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root, root)
    labels = root / "metadata" / "SYNTH" / "train" / "class_labels.txt"
    lines = labels.read_text().splitlines()
    lines[6] = lines[6].split(",")[0] + ",seven"
    labels.write_text("\n".join(lines) + "\n")
    line = one_error_line(run(CLI + ["train", *train_overrides(root, tmp_path / "run")], cwd=tmp_path), "train")
    assert f"{labels}:7:" in line and "'seven'" in line


@pytest.mark.slow  # calm-fast as a subprocess, end to end
def test_an_unwritable_run_dir_is_one_line(data_root, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder\n")
    result = run(CLI + ["train", *train_overrides(data_root, blocker / "run")], cwd=tmp_path)
    assert str(blocker) in one_error_line(result, "train")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
@pytest.mark.slow  # calm-fast as a subprocess, end to end
def test_a_run_dir_without_permission_is_one_line(data_root, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    result = run(CLI + ["train", *train_overrides(data_root, locked / "run")], cwd=tmp_path)
    line = one_error_line(result, "train")
    assert "Permission denied" in line and str(locked) in line


@pytest.mark.slow  # calm-fast as a subprocess, end to end
def test_debug_shows_the_traceback(data_root, tmp_path):
    for flags in (["--debug", "train"], ["train", "--debug"]):
        result = run(CLI + [*flags, *train_overrides(tmp_path / "nowhere", tmp_path / "run")], cwd=tmp_path)
        assert result.returncode not in (0, 2) and "Traceback" in result.stderr and "MetadataError" in result.stderr


@pytest.mark.slow
def test_under_torchrun_each_rank_says_one_line(data_root, tmp_path):
    result = run(TORCHRUN + ["train", *train_overrides(tmp_path / "nowhere", tmp_path / "run")], cwd=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    for rank in (0, 1):
        lines = [line for line in output.splitlines() if line.startswith(f"calm-fast train (rank {rank}): ")]
        assert len(lines) == 1 and "metadata folder not found" in lines[0], output[-4000:]
    # torchrun's own summary remains (its launcher's traceback); no rank prints one.
    assert not [line for line in output.splitlines() if line.startswith("[rank") and "Traceback" in line]
    assert "MetadataError" not in output


# ------------------------------------------------------------------------------------------------- eval


@pytest.mark.slow  # calm-fast as a subprocess, end to end
def test_weights_of_another_class_count_say_what_differs(exported, tmp_path):
    result = run(CLI + ["eval", "--checkpoint", str(exported), "data.num_classes=7", "--out", str(tmp_path / "o")],
                 cwd=tmp_path)
    line = one_error_line(result, "eval")
    assert str(exported) in line and "4 classes in the file, 7 configured" in line
    assert "class_head.weight (file [4, " in line and "model [7, " in line


@pytest.mark.slow  # calm-fast as a subprocess, end to end
def test_weights_of_another_model_say_what_differs(exported, tmp_path):
    result = run(CLI + ["eval", "--checkpoint", str(exported), "model.backbone=tiny_vgg", "--out", str(tmp_path / "o")],
                 cwd=tmp_path)
    line = one_error_line(result, "eval")
    assert str(exported) in line and "model.backbone='tiny_vgg'" in line
    assert "missing keys (" in line and "unexpected keys (" in line


@pytest.mark.slow  # calm-fast as a subprocess, end to end
def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    line = one_error_line(run(CLI + ["eval", "--checkpoint", str(junk)], cwd=tmp_path), "eval")
    assert str(junk) in line and "unreadable" in line


def test_a_bug_keeps_its_traceback(monkeypatch):
    from calm_fast import cli
    from calm_fast.evaluate import cli as evaluate_cli

    def broken(args):
        raise ZeroDivisionError("a bug, not the user's fault")

    monkeypatch.setattr(evaluate_cli, "main", broken)
    with pytest.raises(ZeroDivisionError):
        cli.main(["eval", "--baseline", "centre-gaussian"])
