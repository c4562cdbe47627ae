"""Checkpoints that cannot hurt: no code runs from a crafted file, and a damaged newest checkpoint is skipped.

A crafted pickle (its __reduce__ runs a shell command that creates a marker file) is put where calm-fast
reads: DeepSpeed's model and optimizer files, the per-rank trainer file, model.pt, ImageNet weights.
Every entry point (`train --resume`, `train --export`, `eval --checkpoint`, `eval --run`, pretrained
loading) must refuse it with one line naming the file, and the marker must not exist. A checkpoint's
manifest (sizes and SHA-256 of its files) is resealed after the tampering, as an attacker would: the
safe loading, not the manifest, has to stop the code. Then: a truncated file in the newest checkpoint
makes `--resume` skip it, saying so, and continue from the previous one with the exact loss sequence of
an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from calm_fast.errors import CheckpointError
from calm_fast.models import weights
from calm_fast.safe_load import check_torch_files, safe_torch_load
from calm_fast.train import checkpoint as ckpt

REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "calm_fast.cli"]
RUN_TIMEOUT_S = 300


class _RunsAShellCommand:
    """Unpickling this calls os.system(command): what a malicious checkpoint would do."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_crafted(path: Path, marker: Path, torch_format: bool = True) -> None:
    payload = {"module": _RunsAShellCommand(f"touch {marker}")}
    path.parent.mkdir(parents=True, exist_ok=True)
    if torch_format:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))


def reseal(folder: Path) -> None:
    """Rewrite the manifests of a checkpoint folder to match its files, as an attacker could."""
    for manifest in folder.glob("manifest_*.json"):
        data = json.loads(manifest.read_text())
        for relative in data["files"]:
            content = (folder / relative).read_bytes()
            data["files"][relative] = {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}
        manifest.write_text(json.dumps(data))


# ------------------------------------------------------------------------------------ safe loading


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch.save", "raw-pickle"])
def test_a_crafted_pickle_is_refused_naming_the_file(tmp_path, torch_format):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "weights.pt"
    write_crafted(evil, marker, torch_format)
    with pytest.raises(CheckpointError, match=r"weights\.pt: refused.*posix\.system|weights\.pt: refused"):
        safe_torch_load(evil)
    (tmp_path / "ds").mkdir()
    shutil.copy(evil, tmp_path / "ds" / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states\.pt: refused"):
        check_torch_files(tmp_path / "ds")
    assert not marker.exists()


def test_our_own_trainer_state_and_plain_state_dicts_load(tmp_path):
    state = {"rank": 0, "rng": ckpt.capture_rng()}
    torch.save(state, tmp_path / "trainer.pt")
    loaded = safe_torch_load(tmp_path / "trainer.pt")
    assert loaded["rng"]["python"] == state["rng"]["python"]
    assert (loaded["rng"]["numpy"][1] == state["rng"]["numpy"][1]).all()
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    torch.save({"w": torch.arange(3.0)}, tmp_path / "plain.pt")
    assert torch.equal(safe_torch_load(tmp_path / "plain.pt")["w"], torch.arange(3.0))


def test_a_truncated_file_is_unreadable_naming_it(tmp_path):
    torch.save({"w": torch.zeros(1000)}, tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"w\.pt: unreadable"):
        safe_torch_load(tmp_path / "w.pt")


# ---------------------------------------------------------------------------------------- manifests


def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    folder = weights.checkpoint_root(run_dir) / weights.step_dir_name(step)
    (folder / "ds").mkdir(parents=True)
    torch.save({"w": torch.full((100,), float(step))}, folder / "ds" / "mp_rank_00_model_states.pt")
    torch.save({"rank": 0}, folder / ckpt.trainer_file(0))
    (folder / "config.toml").write_text(f"# step {step}\n")
    ckpt.write_manifest(folder, rank=0)
    return folder


def test_manifest_detects_truncation_corruption_and_loss(tmp_path):
    folder = _fake_checkpoint(tmp_path, 4)
    assert weights.checkpoint_problem(folder) is None
    model = folder / "ds" / "mp_rank_00_model_states.pt"
    original = model.read_bytes()

    model.write_bytes(original[:100])
    problem = weights.checkpoint_problem(folder)
    assert "ds/mp_rank_00_model_states.pt" in problem and f"{len(original)}" in problem and "100" in problem

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    model.write_bytes(bytes(flipped))
    assert "checksum" in weights.checkpoint_problem(folder)

    model.write_bytes(original)
    (folder / "config.toml").unlink()
    assert "config.toml" in weights.checkpoint_problem(folder) and "missing" in weights.checkpoint_problem(folder)


def test_the_newest_checkpoint_that_verifies_is_chosen_and_the_skip_is_said(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    newest = weights.checkpoint_root(tmp_path) / weights.step_dir_name(6)
    victim = newest / ckpt.trainer_file(0)
    victim.write_bytes(victim.read_bytes()[:10])
    said = []
    chosen = weights.usable_checkpoint(tmp_path, say=said.append)
    assert chosen == weights.checkpoint_root(tmp_path) / weights.step_dir_name(4)
    assert len(said) == 1 and str(newest) in said[0] and victim.name in said[0] and "\n" not in said[0]

    for step in (2, 4):
        (weights.checkpoint_root(tmp_path) / weights.step_dir_name(step) / "config.toml").write_text("changed\n")
    said.clear()
    assert weights.usable_checkpoint(tmp_path, say=said.append) is None and len(said) == 3


# ------------------------------------------------------------------------------ through the commands


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def calm_fast(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)


def overrides(data_root: Path, run_dir: Path, *extra: str) -> list[str]:
    """A tiny run: 64 images, global batch 16 (4 steps an epoch), a checkpoint every 2 steps, 3 kept; the
    step schedule, so that the number of steps asked for does not change the learning rates."""
    return [f"data.root={data_root}", "data.dataset=SYNTH", f"run_dir={run_dir}", "model.backbone=tiny_resnet",
            "model.method=calm-em", "model.batch_norm=false", "data.input_size=32", "data.resize_size=40",
            "data.batch_size=16", "eval.batch_size=8", "data.workers=0", "data.loader=torch",
            "train.log_every=1", "train.checkpoint_every=2", "train.keep_last=3", "train.tensorboard=false",
            "train.progress=false", "train.val_every=0", "train.grad_accum=2", "train.zero_stage=1",
            "train.precision=fp32", "optim.lr=0.05", "optim.schedule=step", "optim.warmup_steps=0", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "train"}


def succeed(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = calm_fast(args, cwd)
    assert result.returncode == 0, f"{' '.join(args[:3])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    from calm_fast.data.synthetic import generate

    root = tmp_path_factory.mktemp("data")
    generate(root, name="SYNTH", seed=0, num_classes=4, sizes={"train": 64, "val": 16, "test": 16}, image_size=48,
             workers=1)
    return root


@pytest.fixture(scope="module")
def six_steps(data_root, tmp_path_factory) -> Path:
    """A finished run of 6 steps: checkpoints 2, 4, 6 and model.pt."""
    run_dir = tmp_path_factory.mktemp("runs") / "six"
    succeed(["train", *overrides(data_root, run_dir, "train.max_steps=6")], cwd=run_dir.parent)
    return run_dir


@pytest.fixture(scope="module")
def eight_steps(data_root, tmp_path_factory) -> Path:
    """The uninterrupted reference: the same run for 8 steps."""
    run_dir = tmp_path_factory.mktemp("runs") / "eight"
    succeed(["train", *overrides(data_root, run_dir, "train.max_steps=8")], cwd=run_dir.parent)
    return run_dir


NEWEST = f"checkpoints/{weights.step_dir_name(6)}"
# (where the crafted file goes, relative to the run folder; the command, with RUN and DATA filled in)
ENTRY_POINTS = {
    "resume/ds-model": (f"{NEWEST}/ds/mp_rank_00_model_states.pt", ["train", "--resume"]),
    "resume/ds-optimizer": (f"{NEWEST}/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt", ["train", "--resume"]),
    "resume/trainer-file": (f"{NEWEST}/{ckpt.trainer_file(0)}", ["train", "--resume"]),
    "export/ds-model": (f"{NEWEST}/ds/mp_rank_00_model_states.pt", ["train", "--export"]),
    "eval-checkpoint/ds-model": (f"{NEWEST}/ds/mp_rank_00_model_states.pt", ["eval", "--checkpoint", f"RUN/{NEWEST}"]),
    "eval-run-without-model.pt/ds-optimizer": (f"{NEWEST}/ds/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                               ["eval", "--run", "RUN"]),
    "eval-run/model.pt": ("model.pt", ["eval", "--run", "RUN"]),
    "pretrained": ("imagenet.pth", ["train", "model.backbone=resnet50", "model.pretrained=RUN/imagenet.pth",
                                    "run_dir=RUN/fresh"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_no_entry_point_runs_code_from_a_crafted_checkpoint(entry, six_steps, data_root, tmp_path):
    placement, command = ENTRY_POINTS[entry]
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps, run_dir)
    marker = tmp_path / "code-ran"
    target = run_dir / placement
    write_crafted(target, marker)
    if "without-model.pt" in entry:
        (run_dir / "model.pt").unlink()
    reseal(run_dir / NEWEST)
    args = [a.replace("RUN", str(run_dir)) for a in command]
    if args[0] == "train":
        args = ["train", *overrides(data_root, run_dir, "train.max_steps=8"), *args[1:]]
    result = calm_fast(args, cwd=tmp_path)
    assert not marker.exists(), f"{entry}: the crafted pickle ran a command"
    assert result.returncode == 2, f"{entry}: exit {result.returncode}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if "refused" in line]
    assert len(message) == 1 and str(target) in message[0], result.stderr[-3000:]


@pytest.mark.slow
def test_a_truncated_newest_checkpoint_is_skipped_and_the_run_continues_exactly(data_root, eight_steps, tmp_path):
    run_dir = tmp_path / "truncated"
    succeed(["train", *overrides(data_root, run_dir, "train.max_steps=6")], cwd=tmp_path)
    newest = run_dir / NEWEST
    victim = newest / "ds" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])

    result = succeed(["train", *overrides(data_root, run_dir, "train.max_steps=8"), "--resume"], cwd=tmp_path)
    skipped = [line for line in result.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and str(newest) in skipped[0] and victim.name in skipped[0], result.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / weights.step_dir_name(4)}" in result.stderr
    assert losses(run_dir) == losses(eight_steps)  # steps 1-4 kept, 5-8 redone: all exactly the reference's
    assert weights.checkpoint_problem(run_dir / "checkpoints" / weights.step_dir_name(8)) is None


@pytest.mark.slow
def test_resume_with_no_usable_checkpoint_is_one_line_naming_each(data_root, six_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps, run_dir)
    for _, folder in weights.list_checkpoints(run_dir):
        (folder / "config.toml").write_text("damaged\n")
    result = calm_fast(["train", *overrides(data_root, run_dir, "train.max_steps=8"), "--resume"], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no usable checkpoint" in result.stderr.splitlines()[-1]
    assert len([line for line in result.stderr.splitlines() if "skipped" in line]) == 3
