"""A per-rank thread that watches the running test phase for hangs and stuck collectives.

The main thread may be blocked inside a collective (C++, GIL released) or asleep, so this
thread decides for it:

- **hung**: the phase ran past the timeout outside any collective (a sleep, a loop, a lock);
- **stuck**: the phase ran past the timeout waiting inside torch.distributed; or, after a grace
  period, this rank is still inside a phase that another rank already left in a way it cannot
  follow: it failed the phase (the rank may be computing or waiting), it skipped the phase, or
  it went silent (no heartbeat: exited, killed, or holding the GIL), and this rank waits in a
  collective that rank will never join. A stuck rank is collateral: the root cause is the rank
  that diverged.

Either way it dumps every thread's stack into the rank log (faulthandler) and hands over to
``declare``, which reports for this rank and ends the process. It also calls ``heartbeat``
every ``beat_s``, phase or not: this thread cannot run while another holds the GIL, so the
other ranks read a stopped heartbeat as this rank's silence. A faulthandler timer armed per
phase dumps the stacks even when this thread cannot run.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import IO

from dtensor_attn.testing.harness.outcome import Outcome

_BACKUP_DUMP_S = 2.0  # after the timeout, in case this thread cannot take the GIL


@dataclasses.dataclass(frozen=True, slots=True)
class Phase:
    index: int
    nodeid: str
    when: str
    started: float  # time.monotonic()


@dataclasses.dataclass(frozen=True, slots=True)
class PeerEvent:
    """Another rank left the phase: ``kind`` FAILED or SKIPPED (it said so), or SILENT (it sent
    no heartbeat for ``silent_s`` seconds and no report: another rank reported for it)."""

    kind: Outcome
    rank: int
    silent_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Outcome(self.kind))  # from the store: a string


class PhaseWatchdog:
    """``peer_event(index)`` asks the store whether another rank left phase ``index`` (a
    PeerEvent or None); ``declare(phase, outcome, text)`` reports this rank as hung or stuck and
    ends the process; ``heartbeat()`` tells the other ranks this process still runs."""

    def __init__(
        self,
        *,
        timeout_s: float,
        grace_s: float,
        log_file: IO[str],
        peer_event: Callable[[int], PeerEvent | None],
        declare: Callable[[Phase, Outcome, str], None],
        heartbeat: Callable[[], None] = lambda: None,
        poll_s: float = 0.1,
        beat_s: float = 0.25,
    ) -> None:
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self._log_file = log_file
        self._peer_event = peer_event
        self._declare = declare
        self._heartbeat = heartbeat
        self._poll_s = poll_s
        self._beat_s = beat_s
        self._lock = threading.Lock()
        self._phase: Phase | None = None
        self._declared: Outcome | None = None
        self._stopping = threading.Event()
        self._main_thread = threading.get_ident()  # built on the thread that runs the tests
        self._thread = threading.Thread(target=self._run, name="dtensor_attn-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float | None = None) -> bool:
        """Stop the thread; waits at most ``timeout_s`` (five polls by default) for it to end.
        Returns whether it ended: one still inside a store call may beat once more."""
        self._stopping.set()
        self._thread.join(timeout=5 * self._poll_s if timeout_s is None else timeout_s)
        return not self._thread.is_alive()

    def begin(self, index: int, nodeid: str, when: str) -> None:
        with self._lock:
            self._phase = Phase(index, nodeid, when, time.monotonic())
        faulthandler.dump_traceback_later(
            self.timeout_s + _BACKUP_DUMP_S, exit=False, file=self._log_file
        )

    def end(self) -> Outcome | None:
        """Close the phase; returns the outcome if this thread already declared this rank."""
        faulthandler.cancel_dump_traceback_later()
        with self._lock:
            self._phase = None
            return self._declared

    def _run(self) -> None:
        watched: Phase | None = None
        first_seen: dict[tuple[str, int], float] = {}  # PeerEvents of the watched phase
        last_beat = -math.inf  # the first poll beats (whatever the machine's uptime)
        while not self._stopping.wait(self._poll_s):
            with self._lock:
                phase = self._phase
            try:
                if time.monotonic() - last_beat >= self._beat_s:
                    last_beat = time.monotonic()
                    self._heartbeat()
                if phase is None:
                    continue
                if phase is not watched:
                    watched, first_seen = phase, {}
                event = self._peer_event(phase.index)
            except Exception as error:  # the launcher's store is gone: nobody can agree
                if phase is not None and self._fire(
                    phase, Outcome.FAILED, f"lost the launcher's store during the {phase.when} of "
                    f"{phase.nodeid}: {error}"
                ):
                    return
                continue
            since = None
            if event is not None:
                since = first_seen.setdefault((event.kind, event.rank), time.monotonic())
            verdict = self._check(phase, event, since)
            if verdict is not None and self._fire(phase, *verdict):
                return

    def _check(
        self, phase: Phase, event: PeerEvent | None, since: float | None
    ) -> tuple[Outcome, str] | None:
        """(outcome, text) if this rank is to be declared hung or stuck now, else None.
        ``since``: when ``event`` began, on this clock."""
        now = time.monotonic()
        where = f"the {phase.when} of {phase.nodeid}"
        if now - phase.started > self.timeout_s:
            site = self._collective_site()
            if site is not None:
                return Outcome.STUCK, (f"stuck: {where} ran past the {self.timeout_s:g} s timeout "
                                       f"waiting in {site}, a collective another rank did not join")
            return Outcome.HUNG, f"hung: {where} ran past the {self.timeout_s:g} s timeout"
        # A silent rank was silent for longer than the grace before it was reported.
        if event is None or (event.kind is not Outcome.SILENT and now - since <= self.grace_s):
            return None
        site = self._collective_site()
        if event.kind is Outcome.FAILED:
            return Outcome.STUCK, (f"stuck: still in {where} {self.grace_s:.3g} s after rank "
                                   f"{event.rank} failed it, probably waiting in "
                                   f"{site or 'a collective'} that rank never joined")
        if site is None:
            return None  # still computing: it may finish the phase itself (the timeout holds)
        if event.kind is Outcome.SKIPPED:
            return Outcome.STUCK, (f"stuck: still in {where} {self.grace_s:.3g} s after rank "
                                   f"{event.rank} skipped it, waiting in {site} that rank never "
                                   "joined")
        assert event.kind is Outcome.SILENT, event
        return Outcome.STUCK, (f"stuck: still in {where}, waiting in {site}, while rank "
                               f"{event.rank} sent no heartbeat for {event.silent_s:.1f} s (it "
                               "exited, was killed, or holds the GIL)")

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

    def _fire(self, phase: Phase, outcome: Outcome, text: str) -> bool:
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
