"""The ranks' side channel: the launcher's TCPStore, bounded waits, and heartbeats.

No pending collective can block the store, so ranks agree through it even when their process
group is wedged. Keys (under ``dtensor_attn/<run id>/<attempt>/``):

- ``collect/<rank>``: the test ids the rank collected;
- ``beat/<rank>``: ``"<phase index> <wall time>"``, rewritten by the rank at the start of each
  phase and by its watchdog thread every ``BEAT_S``. A rank that stops beating has exited, was
  killed, or holds the GIL in a call that never returns (its watchdog cannot run). The index
  says whether it had begun the phase being judged;
- ``phase/<n>/<rank>``: the rank's RankReport of phase n (its "phase done" record), first
  writer wins: the watchdog of another rank writes a SILENT report for a rank that stopped
  beating without one, so every rank reads the same report and nobody waits for the dead;
- ``diverged/<n>``: ``"<outcome> <rank> [<seconds silent>]"`` of a rank that failed, skipped
  or went silent in phase n, read by the watchdogs of ranks still inside it;
- ``summary/<rank>``, ``done/<rank>``: the end of the session.

Every wait has a timeout.
"""

from __future__ import annotations

import datetime
import math
import threading
import time
from collections.abc import Callable, Iterable

import torch.distributed as dist

from dtensor_attn.testing.harness.agreement import RankReport, silent_report
from dtensor_attn.testing.harness.outcome import Outcome

BEAT_S = 0.25  # heartbeat period; silence is judged over many (RunSettings.silence_s)


def beat_value(index: int, at: float) -> str:
    """To the microsecond: a silent rank's last beat is ordered against another rank's failure
    (the root cause), which may follow it by less than a millisecond on one host."""
    return f"{index} {at:.6f}"


def parse_beat(value: bytes | str) -> tuple[int, float]:
    """(phase index, wall time) of a heartbeat value."""
    index, at = (value.decode() if isinstance(value, bytes) else value).split()
    return int(index), float(at)


class Heartbeats:
    """When each rank's heartbeat last changed, on this rank's monotonic clock (clock skew
    between nodes does not matter). Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[int, tuple[bytes, float]] = {}

    def observe(self, rank: int, value: bytes, now: float) -> None:
        with self._lock:
            old = self._seen.get(rank)
            if old is None or old[0] != value:
                self._seen[rank] = (value, now)

    def silent_for(self, rank: int, now: float) -> float:
        """Seconds since rank's heartbeat last changed (0 if never seen: not judged yet)."""
        with self._lock:
            seen = self._seen.get(rank)
        return 0.0 if seen is None else now - seen[1]

    def last(self, rank: int) -> tuple[int, float] | None:
        """(phase index, wall time) of rank's last heartbeat seen, or None."""
        with self._lock:
            seen = self._seen.get(rank)
        return None if seen is None else parse_beat(seen[0])


class SideChannel:
    """One client of the launcher's store (one per thread: clients are not shared).
    ``on_lost(error)`` is called when the store is gone (the launcher died); it must not return."""

    def __init__(self, store: dist.Store, *, on_lost: Callable[[Exception], None]) -> None:
        self._store = store
        self._timeout = store.timeout
        self._on_lost = on_lost

    @classmethod
    def connect(cls, host: str, port: int, prefix: str, timeout_s: float,
                on_lost: Callable[[Exception], None]) -> SideChannel:
        store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        return cls(dist.PrefixStore(prefix, store), on_lost=on_lost)

    def post(self, key: str, value: str) -> None:
        try:
            self._store.set(key, value)
        except dist.DistError as error:
            self._on_lost(error)

    def has(self, key: str) -> bool:
        try:
            return self._store.check([key])
        except dist.DistError as error:
            self._on_lost(error)
            return False

    def get(self, key: str) -> bytes:
        try:
            return self._store.get(key)
        except dist.DistError as error:
            self._on_lost(error)
            return b""

    def post_first(self, key: str, value: str) -> bytes:
        """Set ``key`` unless a value is there already; returns the value that stays (the first
        writer's). Phase reports go through here: a report written for a silent rank and the
        rank's own, late one cannot both be read."""
        try:
            return self._store.compare_set(key, "", value)
        except dist.DistError as error:
            self._on_lost(error)
            return b""

    def observe_beats(self, ranks: Iterable[int], heartbeats: Heartbeats) -> None:
        """Read the heartbeats of ``ranks`` (those that have one) into ``heartbeats``."""
        keys = {r: f"beat/{r}" for r in ranks}
        try:
            if keys and self._store.check(list(keys.values())):  # one round trip, as a rule
                present = keys
            else:
                present = {r: key for r, key in keys.items() if self._store.check([key])}
            if not present:
                return
            values = self._store.multi_get(list(present.values()))
        except dist.DistError as error:
            self._on_lost(error)
            return
        now = time.monotonic()
        for rank, value in zip(present, values):
            heartbeats.observe(rank, value, now)

    def gather(
        self, prefix: str, ranks: Iterable[int], timeout_s: float
    ) -> dict[int, bytes | None]:
        """{rank: value of <prefix>/<rank>} for ``ranks``, None for keys missing after the wait."""
        keys = {r: f"{prefix}/{r}" for r in sorted(ranks)}
        if not keys:
            return {}
        try:
            # multi_get waits for every key itself (with the store's timeout): one call, not a
            # wait and then a get, on the path every phase of every test takes.
            self._store.set_timeout(datetime.timedelta(seconds=max(timeout_s, 0.001)))
            try:
                return dict(zip(keys, self._store.multi_get(list(keys.values()))))
            except dist.DistStoreError:  # the timeout: some rank did not post
                present = {r: key for r, key in keys.items() if self._store.check([key])}
                got = dict(zip(present, self._store.multi_get(list(present.values()))
                               if present else []))
                return {r: got.get(r) for r in keys}
            finally:
                self._store.set_timeout(self._timeout)
        except dist.DistError as error:
            self._on_lost(error)
            return {r: None for r in keys}

class OwnBeat:
    """This rank's heartbeat, written by the test thread at each phase start and by the watchdog
    thread between, and the posting of this rank's phase reports. Another rank writes a report
    for this one only after ``silence_s`` without its heartbeat: while this rank beat steadily
    since its last report, a plain set (no reply to wait for) cannot overwrite one; after a gap
    (a call holding the GIL, say) the report written first stands, this rank's or the other's."""

    def __init__(self, rank: int, silence_s: float) -> None:
        self.rank = rank
        self.silence_s = silence_s
        self._lock = threading.Lock()
        # time.monotonic() of the latest beat; none yet is a gap. (Not 0.0: the monotonic clock
        # counts from boot, so on a machine up for less than half the silence 0.0 is no gap.)
        self._sent = -math.inf
        self._gap = False  # a gap since the last report

    def beat(self, chan: SideChannel, index: int) -> None:
        with self._lock:  # the latest phase index wins, whichever thread writes
            chan.post(f"beat/{self.rank}", beat_value(index, time.time()))
            now = time.monotonic()
            self._gap |= now - self._sent > self.silence_s / 2
            self._sent = now

    def post_report(self, chan: SideChannel, n: int, report: str) -> str:
        """Post this rank's report of phase n; returns the report that stands."""
        with self._lock:
            gap = self._gap or time.monotonic() - self._sent > self.silence_s / 2
            self._gap = False
        if not gap:
            chan.post(f"phase/{n}/{self.rank}", report)
            return report
        return chan.post_first(f"phase/{n}/{self.rank}", report).decode() or report


def report_silent_peers(
    chan: SideChannel, heartbeats: Heartbeats, peers: Iterable[int], phase: tuple[int, str, str],
    silence_s: float, reported: set[tuple[int, int]],
) -> list[int]:
    """Write the report of each of ``peers`` that sent no heartbeat for ``silence_s`` and has
    no report of ``phase`` (index, test id, setup/call/teardown), and mark the phase diverged.
    Returns the ranks this call reported for (another rank may have been first)."""
    (n, nodeid, when), now, done = phase, time.monotonic(), []
    for rank in sorted(peers):
        silent_s, last = heartbeats.silent_for(rank, now), heartbeats.last(rank)
        if not n or silent_s <= silence_s or last is None or (rank, n) in reported:
            continue
        reported.add((rank, n))
        report = silent_report(rank, nodeid=nodeid, when=when, began_phase=last[0] >= n,
                               last_beat_at=last[1], silent_s=silent_s).to_json()
        if chan.post_first(f"phase/{n}/{rank}", report).decode() == report:
            chan.post_first(f"diverged/{n}", f"{Outcome.SILENT} {rank} {silent_s:.1f}")
            done.append(rank)
    return done


def read_divergence(chan: SideChannel, index: int) -> tuple[Outcome, int, float] | None:
    """(outcome, rank, seconds silent) of a rank that left phase ``index`` early, or None."""
    if not chan.has(f"diverged/{index}"):
        return None
    outcome, rank, *silent_s = chan.get(f"diverged/{index}").decode().split()
    return Outcome(outcome), int(rank), float(silent_s[0]) if silent_s else 0.0


def read_phase_reports(chan: SideChannel, n: int, ranks: Iterable[int],
                       timeout_s: float) -> dict[int, RankReport | None]:
    """Every rank's report of phase n (a silent rank's written for it), None if missing."""
    raw = chan.gather(f"phase/{n}", ranks, timeout_s)
    return {r: None if v is None else RankReport.from_json(v) for r, v in raw.items()}
