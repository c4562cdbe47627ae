"""calm_fast.distributed without a process group: the watchdog, and the message of a failed rank (a real
dead rank: test_train_distributed.py)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from calm_fast.distributed import report_rank_failure


@pytest.mark.slow  # a subprocess left to hang
def test_watchdog_stops_a_stuck_process_with_a_message():
    script = textwrap.dedent("""
        import time
        from calm_fast.distributed import Watchdog
        dog = Watchdog(timeout_s=0.5, rank=7, poll_s=0.05).start()
        dog.beat("step 3")
        time.sleep(30)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3
    assert "rank 7: no progress" in result.stderr and "after step 3" in result.stderr


@pytest.mark.slow  # a subprocess beating for 1.5 s
def test_watchdog_stays_quiet_while_beats_arrive():
    script = textwrap.dedent("""
        import time
        from calm_fast.distributed import Watchdog
        dog = Watchdog(timeout_s=1.0, rank=0, poll_s=0.02).start()
        for _ in range(30):  # 1.5 s in all, never 1 s without a beat
            dog.beat("step")
            time.sleep(0.05)
        dog.stop()
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_a_failed_rank_says_which_rank_and_why(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "3")
    try:
        raise ConnectionError("peer closed")
    except ConnectionError as error:
        status = report_rank_failure("train", error)
    err = capsys.readouterr().err
    assert status == 1
    assert "Traceback" in err and "train rank 3 failed: ConnectionError: peer closed" in err
    assert "another rank probably died first" in err
