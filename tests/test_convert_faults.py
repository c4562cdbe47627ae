"""`calm-fast convert` under faults: a killed worker ends the conversion within seconds, a killed conversion
leaves no process behind, and a rerun removes what a killed conversion left, even when nothing is to do.

Each test runs the command line in a session of its own and follows its processes through /proc (Linux).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from calm_fast.data import ffcv_convert as F
from calm_fast.data.metadata import read_split

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="follows processes through /proc")

REPO_ROOT = Path(__file__).resolve().parents[1]
# Enough images that FFCV's work queue (chunks of 100 indices) overfills its pipe: then a conversion whose
# worker died used to hang at exit, its queue's feeder thread blocked on a pipe nobody reads.
NUM_IMAGES = 16000


@pytest.fixture(scope="module")
def big_split(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    meta = root / "metadata" / "FAULT" / "train"
    meta.mkdir(parents=True)
    (root / "FAULT").mkdir()
    buffer = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 120, np.uint8)).save(buffer, format="JPEG")
    names = [f"im{i:05d}.jpg" for i in range(NUM_IMAGES)]
    for name in names:
        (root / "FAULT" / name).write_bytes(buffer.getvalue())
    (meta / "image_ids.txt").write_text("".join(f"{n}\n" for n in names))
    (meta / "class_labels.txt").write_text("".join(f"{n},{i % 2}\n" for i, n in enumerate(names)))
    (meta / "image_sizes.txt").write_text("".join(f"{n},8,8\n" for n in names))
    return root


def session_processes(session: int) -> list[int]:
    """Live (not zombie) processes of a session."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def start_convert(root: Path, out: Path, log: Path) -> subprocess.Popen:
    """`calm-fast convert` with every image read slowed down, in a new session, its output in `log`."""
    script = textwrap.dedent(f"""
        import sys, time
        from calm_fast.data import ffcv_convert as F
        real_load = F.load_for_storage
        def slow_load(*args, **kwargs):
            time.sleep(0.002)
            return real_load(*args, **kwargs)
        F.load_for_storage = slow_load
        from calm_fast.cli import main
        sys.exit(main(["convert", "--data-root", {str(root)!r}, "--dataset", "FAULT", "--split", "train",
                       "--image-root", {str(root / "FAULT")!r}, "--out-dir", {str(out)!r}, "--workers", "2"]))
    """)
    with open(log, "wb") as output:
        return subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, start_new_session=True,
                                stdout=output, stderr=subprocess.STDOUT)


def first_worker(out: Path, process: subprocess.Popen, log: Path) -> int:
    """The pid of a conversion worker, once it has read images (workers register in the report folder)."""
    deadline = time.monotonic() + 120
    while True:
        registered = [int(p.name) for p in out.glob(".*.reports-*/workers/*")]
        if registered:
            time.sleep(1.0)  # well into the conversion
            return registered[0]
        assert process.poll() is None, f"the conversion ended early: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, "no conversion worker started"
        time.sleep(0.05)


def wait_until_gone(session: int, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while session_processes(session) and time.monotonic() < deadline:
        time.sleep(0.1)
    return session_processes(session)


def kill_session(session: int) -> None:
    for pid in session_processes(session):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
def test_a_killed_worker_ends_convert_non_zero_within_10_s_leaving_no_process(big_split, tmp_path):
    out, log = tmp_path / "ffcv", tmp_path / "convert.log"
    process = start_convert(big_split, out, log)
    try:
        os.kill(first_worker(out, process, log), signal.SIGKILL)
        killed_at = time.monotonic()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"convert still running 10 s after its worker was killed: {log.read_text()[-1500:]}")
        assert time.monotonic() - killed_at < 10
        assert process.returncode != 0
        assert "killed by SIGKILL" in log.read_text()
        assert wait_until_gone(process.pid, 5) == [], "processes left behind"
    finally:
        kill_session(process.pid)
        process.wait()
    assert not (out / "FAULT_train.beton").exists()


@pytest.mark.slow
def test_a_killed_convert_leaves_no_worker_behind(big_split, tmp_path):
    out, log = tmp_path / "ffcv", tmp_path / "convert.log"
    process = start_convert(big_split, out, log)
    try:
        first_worker(out, process, log)
        os.kill(process.pid, signal.SIGKILL)  # the main process only, as an OOM killer or `kill -9` would
        process.wait()
        assert wait_until_gone(process.pid, 5) == [], "workers outlived the conversion"
    finally:
        kill_session(process.pid)
        process.wait()


def test_a_rerun_removes_stale_partials_even_when_the_beton_is_up_to_date(tmp_path):
    folder = tmp_path / "metadata" / "SMALL" / "val"
    folder.mkdir(parents=True)
    (tmp_path / "SMALL").mkdir()
    Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(tmp_path / "SMALL" / "a.jpg")
    (folder / "image_ids.txt").write_text("a.jpg\n")
    (folder / "class_labels.txt").write_text("a.jpg,0\n")
    split = read_split(tmp_path / "metadata", "SMALL", "val", tmp_path / "SMALL")
    out = tmp_path / "ffcv"
    beton = F.ensure_beton(split, out, num_workers=1).beton_path
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs: a conversion killed earlier
    (out / f".{beton.name}.partial-{dead.pid}").write_bytes(b"x" * 1000)
    (out / f".{beton.name}.reports-{dead.pid}" / "workers").mkdir(parents=True)
    summary = F.ensure_beton(split, out, num_workers=1)
    assert summary.skipped
    assert sorted(p.name for p in out.iterdir()) == sorted([beton.name, beton.name + ".json"])
