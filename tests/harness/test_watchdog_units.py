"""The watchdog's decisions on a fake clock: hung vs stuck, the grace and where it counts from,
the heartbeat's rhythm, and which frame is a collective.

No sleeping and no thread: the watchdog module's ``time`` is a fake clock, its stop event a fake
that advances the clock one tick per poll, and ``_run`` runs on the test's own thread, so each
expected poll count and time below is worked out by hand from the docstring's rules
(test_watchdog.py checks the same rules in real time on a real thread).
"""

from __future__ import annotations

import faulthandler
import importlib.util
import inspect
from pathlib import Path

import pytest

from dtensor_attn.testing.harness import watchdog as watchdog_module
from dtensor_attn.testing.harness.outcome import Outcome
from dtensor_attn.testing.harness.watchdog import PeerEvent, Phase, PhaseWatchdog

START = 1000.0
TIMEOUT_S, GRACE_S = 10.0, 1.5
SITE = "all_reduce (called from t.py:3)"
WHERE = "the call of t.py::t"


class Clock:
    """Stands in for the ``time`` module: ``monotonic()`` returns ``now``."""

    def __init__(self) -> None:
        self.now = START

    def monotonic(self) -> float:
        return self.now


class Ticks:
    """Stands in for the stop event: each ``wait`` is one poll, ``tick`` seconds later; it
    stops the loop after ``limit`` polls so a missed decision fails instead of spinning."""

    def __init__(self, clock: Clock, tick: float, limit: int = 200) -> None:
        self.clock, self.tick, self.limit, self.polls = clock, tick, limit, 0

    def wait(self, timeout: float) -> bool:
        self.polls += 1
        self.clock.now += self.tick
        return self.polls > self.limit


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(watchdog_module, "time", fake)
    yield fake
    faulthandler.cancel_dump_traceback_later()  # begin() arms a real timer


@pytest.fixture
def log(tmp_path):
    with open(tmp_path / "rank0.log", "w+") as file:
        yield file


def make_dog(log, *, peer_event=lambda index: None, heartbeat=lambda: None, beat_s=0.25):
    declared = []
    dog = PhaseWatchdog(timeout_s=TIMEOUT_S, grace_s=GRACE_S, log_file=log, poll_s=0.0,
                        beat_s=beat_s, peer_event=peer_event, heartbeat=heartbeat,
                        declare=lambda phase, outcome, text: declared.append((phase, outcome, text)))
    return dog, declared


# ---------------------------------------------------------------- the decision, one poll
# (elapsed since the phase began, peer event, seconds since it was first seen, collective site)
DECISIONS = [
    ("in-time", 5.0, None, None, None, None),
    ("at-the-timeout-is-not-past-it", 10.0, None, None, None, None),
    ("past-the-timeout-computing", 10.5, None, None, None,
     (Outcome.HUNG, f"hung: {WHERE} ran past the 10 s timeout")),
    ("past-the-timeout-in-a-collective", 10.5, None, None, SITE,
     (Outcome.STUCK, f"stuck: {WHERE} ran past the 10 s timeout waiting in {SITE}, a collective "
                     "another rank did not join")),
    ("the-timeout-beats-a-peer-failure", 11.0, Outcome.FAILED, 5.0, None,
     (Outcome.HUNG, f"hung: {WHERE} ran past the 10 s timeout")),
    ("failed-within-the-grace", 5.0, Outcome.FAILED, 1.5, SITE, None),
    ("failed-past-the-grace-computing", 5.0, Outcome.FAILED, 2.0, None,
     (Outcome.STUCK, f"stuck: still in {WHERE} 1.5 s after rank 3 failed it, probably waiting in "
                     "a collective that rank never joined")),
    ("failed-past-the-grace-in-a-collective", 5.0, Outcome.FAILED, 2.0, SITE,
     (Outcome.STUCK, f"stuck: still in {WHERE} 1.5 s after rank 3 failed it, probably waiting in "
                     f"{SITE} that rank never joined")),
    ("skipped-within-the-grace-in-a-collective", 5.0, Outcome.SKIPPED, 1.0, SITE, None),
    ("skipped-past-the-grace-computing", 5.0, Outcome.SKIPPED, 9.0, None, None),
    ("skipped-past-the-grace-in-a-collective", 5.0, Outcome.SKIPPED, 2.0, SITE,
     (Outcome.STUCK, f"stuck: still in {WHERE} 1.5 s after rank 3 skipped it, waiting in {SITE} "
                     "that rank never joined")),
    ("silent-needs-no-grace-in-a-collective", 5.0, Outcome.SILENT, 0.0, SITE,
     (Outcome.STUCK, f"stuck: still in {WHERE}, waiting in {SITE}, while rank 3 sent no heartbeat "
                     "for 4.0 s (it exited, was killed, or holds the GIL)")),
    ("silent-computing-is-left-to-finish", 5.0, Outcome.SILENT, 9.0, None, None),
]


@pytest.mark.parametrize("elapsed,kind,waited,site,expected", [d[1:] for d in DECISIONS],
                         ids=[d[0] for d in DECISIONS])
def test_one_poll_decides_hung_stuck_or_wait(clock, log, elapsed, kind, waited, site, expected):
    dog, _ = make_dog(log)
    dog._collective_site = lambda: site  # where the test thread waits, as the frame walk would say
    clock.now = START + elapsed
    event = None if kind is None else PeerEvent(kind, 3, silent_s=4.0)
    since = None if waited is None else clock.now - waited
    assert dog._check(Phase(0, "t.py::t", "call", START), event, since) == expected


def test_a_peer_event_from_the_store_is_read_as_an_outcome():
    event = PeerEvent("skipped", 2)
    assert event.kind is Outcome.SKIPPED and event.silent_s == 0.0
    with pytest.raises(ValueError):
        PeerEvent("vanished", 2)


# ---------------------------------------------------------------- the loop, poll by poll
def run_loop(dog, clock, tick, limit=200):
    ticks = Ticks(clock, tick, limit)
    dog._stopping = ticks
    dog._run()
    return ticks.polls


def test_the_grace_counts_from_the_first_poll_that_saw_the_failure(clock, log):
    # Phase at 1000; polls every 0.5 s see rank 3's failure from 1000.5 on: 1002.5 is the first
    # poll more than 1.5 s later, the 5th (1002.0 is exactly 1.5 s: not past the grace).
    # Counted from the phase's start it would be the 4th.
    dog, declared = make_dog(log, peer_event=lambda index: PeerEvent(Outcome.FAILED, 3))
    dog.begin(0, "t.py::t", "call")
    assert run_loop(dog, clock, tick=0.5) == 5
    ((phase, outcome, _),) = declared
    assert (phase.index, outcome, clock.now) == (0, Outcome.STUCK, 1002.5)
    assert dog.end() is Outcome.STUCK


def test_a_new_phase_forgets_what_the_last_one_saw(clock, log):
    # Rank 3 failed phases 0 and 1. Phase 0 ends at the 3rd poll (1001.5, seen since 1000.5);
    # phase 1's first poll (1002.0) sees it anew, so it is declared at 1004.0, the 8th poll,
    # not at 1002.5 as it would be if phase 0's sighting carried over.
    calls = []

    def peer_event(index):
        calls.append(index)
        if len(calls) == 3:
            dog.end()
            dog.begin(1, "t.py::t", "teardown")
        return PeerEvent(Outcome.FAILED, 3)

    dog, declared = make_dog(log, peer_event=peer_event)
    dog.begin(0, "t.py::t", "call")
    assert run_loop(dog, clock, tick=0.5) == 8
    assert calls == [0, 0, 0, 1, 1, 1, 1, 1]
    ((phase, outcome, text),) = declared
    assert (phase.index, phase.when, phase.started, clock.now) == (1, "teardown", 1001.5, 1004.0)
    assert text.startswith("stuck: still in the teardown of t.py::t 1.5 s after rank 3 failed it")


def test_a_phase_past_the_timeout_is_declared_once_with_the_stacks(clock, log):
    # Begun at 1000 with a 10 s timeout, polled every 0.5 s: 1010.5 (poll 21) is the first past it.
    dog, declared = make_dog(log)
    dog.begin(4, "t.py::slow", "setup")
    assert run_loop(dog, clock, tick=0.5) == 21
    assert [(p.index, o, t) for p, o, t in declared] == [
        (4, Outcome.HUNG, "hung: the setup of t.py::slow ran past the 10 s timeout")]
    log.seek(0)
    text = log.read()
    assert text.startswith("\n[dtensor_attn] hung: the setup of t.py::slow ran past the 10 s "
                           "timeout; stacks of every thread:\n")
    assert "test_a_phase_past_the_timeout_is_declared_once" in text  # this thread's stack


def test_no_phase_means_no_verdict_and_no_store_reads(clock, log):
    reads = []
    dog, declared = make_dog(log, peer_event=lambda index: reads.append(index))
    assert run_loop(dog, clock, tick=5.0, limit=10) == 11  # 50 s idle: stopped by the limit
    assert declared == [] and reads == [] and dog.end() is None


@pytest.mark.parametrize("beat_s,expected", [
    (0.25, [1000.125, 1000.375, 1000.625, 1000.875]),  # every second poll
    (0.125, [1000.125 + 0.125 * i for i in range(8)]),  # every poll
    (0.5, [1000.125, 1000.625]),  # every fourth
], ids=["every-2nd-poll", "every-poll", "every-4th-poll"])
def test_the_heartbeat_keeps_its_rhythm_with_or_without_a_phase(clock, log, beat_s, expected):
    for with_phase in (False, True):
        clock.now, beats = START, []
        dog, declared = make_dog(log, heartbeat=lambda: beats.append(clock.now), beat_s=beat_s)
        if with_phase:
            dog.begin(0, "t.py::t", "call")
        run_loop(dog, clock, tick=0.125, limit=8)
        assert beats == expected and declared == []
        dog.end()


@pytest.mark.parametrize("with_phase", [False, True], ids=["between-phases", "in-a-phase"])
def test_a_heartbeat_that_cannot_reach_the_store(clock, log, with_phase):
    # Between phases nothing waits on the store: the beat is retried; in a phase, the rank
    # cannot agree with the others any more and is declared failed at once.
    attempts = []

    def heartbeat():
        attempts.append(clock.now)
        raise ConnectionError("store closed")

    dog, declared = make_dog(log, heartbeat=heartbeat, beat_s=1.0)
    if with_phase:
        dog.begin(2, "t.py::t", "call")
    polls = run_loop(dog, clock, tick=0.5, limit=6)
    if with_phase:
        assert polls == 1 and attempts == [1000.5]
        assert [(o, t) for _, o, t in declared] == [
            (Outcome.FAILED, "lost the launcher's store during the call of t.py::t: store closed")]
    else:
        assert attempts == [1000.5, 1001.5, 1002.5] and declared == []


def test_a_verdict_for_a_phase_that_already_ended_is_dropped(clock, log):
    dog, declared = make_dog(log)
    dog.begin(0, "t.py::t", "call")
    ended = dog._phase
    assert dog.end() is None
    assert dog._fire(ended, Outcome.HUNG, "hung: too late") is False
    dog.begin(1, "t.py::t", "call")  # another phase is running now: still not the ended one
    assert dog._fire(ended, Outcome.HUNG, "hung: too late") is False
    log.seek(0)
    assert declared == [] and log.read() == "" and dog.end() is None


# ---------------------------------------------------------------- where the test thread waits
FAKE_C10D = '''\
def all_gather(probe):
    return probe()


def barrier(probe):
    return _wait(probe)


def _wait(probe):
    return probe()
'''


@pytest.fixture
def fake_c10d(tmp_path):
    """Functions in a file under torch/distributed/, where the watchdog looks for collectives."""
    path = tmp_path / "torch" / "distributed" / "fake_c10d.py"
    path.parent.mkdir(parents=True)
    path.write_text(FAKE_C10D)
    spec = importlib.util.spec_from_file_location("fake_c10d_units", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_collective_is_the_innermost_torch_frame_and_the_caller_the_first_outside(
        clock, log, fake_c10d):
    dog, _ = make_dog(log)  # built on this thread: it watches this thread
    here = Path(__file__).name
    line = inspect.currentframe().f_lineno + 1
    assert fake_c10d.all_gather(dog._collective_site) == f"all_gather (called from {here}:{line})"
    line = inspect.currentframe().f_lineno + 1
    assert fake_c10d.barrier(dog._collective_site) == f"_wait (called from {here}:{line})"
    assert dog._collective_site() is None  # not inside torch.distributed
