"""A per-rank thread that watches the running test phase for hangs and stuck collectives.

The main thread may be blocked inside a collective (C++, GIL released) or asleep, so this
thread decides for it:

- **hung**: the phase ran past the timeout outside any collective (a sleep, a loop, a lock);
- **stuck**: the phase ran past the timeout waiting inside torch.distributed, or another rank
  already failed this phase (it says so through the store) and this rank is still inside it
  after a grace period: typically waiting in a collective that a failed rank never joined.
  A stuck rank is collateral: the root cause is the rank that failed or hung elsewhere.

Either way it dumps every thread's stack into the rank log (faulthandler) and hands over to
``declare``, which reports for this rank and ends the process. A faulthandler timer armed per
phase dumps the stacks even when this thread cannot run (a C call holding the GIL).
"""

from __future__ import annotations

import dataclasses
import faulthandler
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

from dtensor_attn.testing.agreement import FAILED, HUNG, STUCK

_BACKUP_DUMP_S = 2.0  # after the timeout, in case this thread cannot take the GIL


@dataclasses.dataclass(frozen=True, slots=True)
class Phase:
    index: int
    nodeid: str
    when: str
    started: float  # time.monotonic()


class PhaseWatchdog:
    """``peer_failed(index)`` asks the store whether another rank failed phase ``index``;
    ``declare(phase, outcome, text)`` reports this rank as hung or stuck and ends the process."""

    def __init__(
        self,
        *,
        timeout_s: float,
        grace_s: float,
        log_file: IO[str],
        peer_failed: Callable[[int], bool],
        declare: Callable[[Phase, str, str], None],
        poll_s: float = 0.1,
    ) -> None:
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self._log_file = log_file
        self._peer_failed = peer_failed
        self._declare = declare
        self._poll_s = poll_s
        self._lock = threading.Lock()
        self._phase: Phase | None = None
        self._declared: str | None = None
        self._stopping = threading.Event()
        self._main_thread = threading.get_ident()  # built on the thread that runs the tests
        self._thread = threading.Thread(target=self._run, name="dtensor_attn-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5 * self._poll_s)

    def begin(self, index: int, nodeid: str, when: str) -> None:
        with self._lock:
            self._phase = Phase(index, nodeid, when, time.monotonic())
        faulthandler.dump_traceback_later(
            self.timeout_s + _BACKUP_DUMP_S, exit=False, file=self._log_file
        )

    def end(self) -> str | None:
        """Close the phase; returns the outcome if this thread already declared this rank."""
        faulthandler.cancel_dump_traceback_later()
        with self._lock:
            self._phase = None
            return self._declared

    def _run(self) -> None:
        watched: Phase | None = None
        peer_failed_at: float | None = None
        while not self._stopping.wait(self._poll_s):
            with self._lock:
                phase = self._phase
            if phase is None:
                continue
            if phase is not watched:
                watched, peer_failed_at = phase, None
            if peer_failed_at is None:
                try:
                    if self._peer_failed(phase.index):
                        peer_failed_at = time.monotonic()
                except Exception as error:  # the launcher's store is gone: nobody can agree
                    if self._fire(phase, FAILED, f"lost the launcher's store during the "
                                  f"{phase.when} of {phase.nodeid}: {error}"):
                        return
                    continue
            verdict = self._check(phase, peer_failed_at)
            if verdict is not None and self._fire(phase, *verdict):
                return

    def _check(self, phase: Phase, peer_failed_at: float | None) -> tuple[str, str] | None:
        """(outcome, text) if this rank is to be declared hung or stuck now, else None."""
        now = time.monotonic()
        where = f"the {phase.when} of {phase.nodeid}"
        if now - phase.started > self.timeout_s:
            site = self._collective_site()
            if site is not None:
                return STUCK, (f"stuck: {where} ran past the {self.timeout_s:g} s timeout "
                               f"waiting in {site}, a collective another rank did not join")
            return HUNG, f"hung: {where} ran past the {self.timeout_s:g} s timeout"
        if peer_failed_at is not None and now - peer_failed_at > self.grace_s:
            site = self._collective_site() or "a collective"
            return STUCK, (f"stuck: still in {where} {self.grace_s:.3g} s after another rank "
                           f"failed it, probably waiting in {site} that rank never joined")
        return None

    def _collective_site(self) -> str | None:
        """``all_reduce called from test_x.py:12`` if the test thread is inside
        torch.distributed (a collective, or DTensor code that runs one), else None."""
        frame = sys._current_frames().get(self._main_thread)
        op, caller = None, None
        while frame is not None and caller is None:
            path = frame.f_code.co_filename.replace(os.sep, "/")
            if "/torch/distributed/" in path:
                op = op or frame.f_code.co_name
            elif op is not None:
                caller = f"{os.path.basename(path)}:{frame.f_lineno}"
            frame = frame.f_back
        if op is None:
            return None
        return f"{op} (called from {caller})" if caller else op

    def _fire(self, phase: Phase, outcome: str, text: str) -> bool:
        with self._lock:
            if self._phase is not phase:
                return False  # the phase ended while we looked
            self._declared = outcome
        faulthandler.cancel_dump_traceback_later()
        self._log_file.write(f"\n[dtensor_attn] {text}; stacks of every thread:\n")
        self._log_file.flush()
        faulthandler.dump_traceback(file=self._log_file, all_threads=True)
        self._declare(phase, outcome, text)
        return True
