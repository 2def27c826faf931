"""Per-rank log files under torchrun: ``<out>/rank<r>.log``.

Each rank's log gets the harness's events (each phase started, each verdict, the reason a run
stopped) and faulthandler stack dumps. Ranks other than 0 also send their whole console output
there (their stdout and stderr file descriptors point at the log), so the terminal shows rank 0
only and nothing another rank printed is lost.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


def log_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"rank{rank}.log"


def start_rank_log(out_dir: Path, rank: int) -> Path:
    """Create (truncate) this rank's log; ranks other than 0 redirect fds 1 and 2 into it.

    Runs before pytest starts capturing output, so pytest's own "original" stdout is the log.
    """
    path = log_path(out_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        f.write(f"rank {rank} log, pid {os.getpid()}, started {started}\n")
    if rank != 0:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
    return path


class RankLog:
    """Timestamped harness events, appended and flushed line by line (a crash loses nothing)."""

    def __init__(self, path: Path, rank: int) -> None:
        self.path = Path(path)
        self.rank = rank
        self._lock = threading.Lock()
        self.file = open(self.path, "a", buffering=1)

    def event(self, message: str) -> None:
        stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
        with self._lock:
            self.file.write(f"[dtensor_attn {stamp} rank {self.rank}] {message}\n")
            self.file.flush()

    def close(self) -> None:
        with self._lock:
            self.file.close()
