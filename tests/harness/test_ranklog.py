"""Per-rank logs: ranks other than 0 print into theirs; events are timestamped lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from dtensor_attn.testing.harness.ranklog import RankLog, log_path

PRINTS = """
import os, sys
from pathlib import Path
from dtensor_attn.testing.harness.ranklog import RankLog, log_path, start_rank_log
rank = int(sys.argv[2])
start_rank_log(Path(sys.argv[1]), rank)
print("pytest output of rank", rank, flush=True)
os.write(2, b"C++ warning on fd 2\\n")
RankLog(log_path(Path(sys.argv[1]), rank), rank).event("an event")
"""


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_keeps_the_console(tmp_path, rank):
    log = log_path(tmp_path, rank)
    log.write_text("a previous run's log\n")
    # Python warnings off (torch warns at import where numpy is missing): they are not output of
    # the rank; anything else rank 1 printed to the console would still fail the test.
    proc = subprocess.run([sys.executable, "-c", PRINTS, str(tmp_path), str(rank)],
                          env={**os.environ, "PYTHONWARNINGS": "ignore"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    text = log.read_text()
    assert "a previous run's log" not in text  # a fresh log per run
    assert text.startswith(f"rank {rank} log, pid ")
    assert re.search(rf"\[dtensor_attn \d\d:\d\d:\d\d\.\d\d\d rank {rank}\] an event\n", text)
    console = proc.stdout + proc.stderr
    if rank == 0:
        assert "pytest output of rank 0" in console and "C++ warning" in console
        assert "pytest output" not in text
    else:
        assert console == ""
        assert "pytest output of rank 1" in text and "C++ warning on fd 2" in text


def test_events_are_flushed_line_by_line(tmp_path):
    log = RankLog(tmp_path / "rank3.log", 3)
    log.event("first\nsecond line of the same event")
    assert (tmp_path / "rank3.log").read_text().endswith(
        "rank 3] first\nsecond line of the same event\n")  # readable before close (a crash)
    log.close()
