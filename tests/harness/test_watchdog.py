"""The per-rank watchdog: hung vs stuck, stack dumps, and no false alarm for a phase that ends.

The test thread plays the rank's main thread; it waits for the watchdog's verdict with a
deadline instead of sleeping a fixed time, so a loaded machine slows these tests, not breaks them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time

import pytest

from dtensor_attn.testing.harness.outcome import Outcome
from dtensor_attn.testing.harness.watchdog import PeerEvent, PhaseWatchdog

DEADLINE_S = 20.0


@contextlib.contextmanager
def watchdog(tmp_path, *, timeout_s, grace_s=0.1, peer_event=lambda index: None,
             heartbeat=lambda: None):
    """(watchdog, declared calls, log path); the watchdog runs for the block."""
    declared = []
    log_path = tmp_path / "rank0.log"
    with open(log_path, "w") as log:
        dog = PhaseWatchdog(timeout_s=timeout_s, grace_s=grace_s, log_file=log, poll_s=0.02,
                            peer_event=peer_event, heartbeat=heartbeat, beat_s=0.05,
                            declare=lambda *args: declared.append(args))
        dog.start()
        try:
            yield dog, declared, log_path
        finally:
            dog.stop()


def wait_until(condition) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        assert time.monotonic() < deadline, "the watchdog did not decide in time"
        time.sleep(0.01)


def test_a_phase_that_ends_in_time_is_never_declared(tmp_path):
    with watchdog(tmp_path, timeout_s=5.0) as (dog, declared, _):
        for index in range(3):
            dog.begin(index, "t.py::fast", "call")
            time.sleep(0.05)
            assert dog.end() is None
        time.sleep(0.2)
        assert declared == []


def test_a_phase_past_the_timeout_is_hung_with_a_stack_dump(tmp_path):
    with watchdog(tmp_path, timeout_s=0.3) as (dog, declared, log_path):
        dog.begin(7, "t.py::slow", "call")
        wait_until(lambda: declared)
        assert dog.end() == Outcome.HUNG
    ((phase, outcome, text),) = declared
    assert (phase.index, phase.nodeid, outcome) == (7, "t.py::slow", Outcome.HUNG)
    assert text == "hung: the call of t.py::slow ran past the 0.3 s timeout"
    log = log_path.read_text()
    assert "stacks of every thread" in log
    assert "in wait_until" in log and "in test_a_phase_past_the_timeout_is_hung" in log


def test_a_phase_another_rank_failed_is_stuck_after_the_grace(tmp_path):
    failed = lambda index: PeerEvent(Outcome.FAILED, 3) if index == 1 else None  # noqa: E731
    with watchdog(tmp_path, timeout_s=60.0, peer_event=failed) as (dog, declared, _):
        dog.begin(0, "t.py::t", "setup")  # nobody failed phase 0
        time.sleep(0.3)
        assert dog.end() is None
        dog.begin(1, "t.py::t", "call")
        wait_until(lambda: declared)
        assert dog.end() == Outcome.STUCK
    ((_, outcome, text),) = declared
    assert text == ("stuck: still in the call of t.py::t 0.1 s after rank 3 failed it, "
                    "probably waiting in a collective that rank never joined")


def test_losing_the_store_ends_the_rank(tmp_path):
    def store_gone(index):
        raise RuntimeError("connection reset")

    with watchdog(tmp_path, timeout_s=60.0, peer_event=store_gone) as (dog, declared, _):
        dog.begin(1, "t.py::t", "call")
        wait_until(lambda: declared)
        dog.end()
    assert declared[0][1] == Outcome.FAILED
    assert declared[0][2] == "lost the launcher's store during the call of t.py::t: connection " \
                             "reset"


@pytest.fixture
def fake_collective(tmp_path):
    """A stand-in for a blocked collective: ``all_reduce(done)`` waits until done() is true, in
    a file under torch/distributed/ (where the watchdog looks for collectives)."""
    fake = tmp_path / "torch" / "distributed" / "fake_c10d.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("import time\n\n\ndef all_reduce(done):\n    while not done():\n"
                    "        time.sleep(0.01)\n")
    spec = importlib.util.spec_from_file_location("fake_c10d", fake)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.all_reduce


def _wait_in_collective(all_reduce, declared, for_s=DEADLINE_S):
    deadline = time.monotonic() + for_s
    all_reduce(lambda: declared or time.monotonic() > deadline)


def test_waiting_inside_torch_distributed_past_the_timeout_is_stuck(tmp_path, fake_collective):
    with watchdog(tmp_path, timeout_s=0.3) as (dog, declared, _):
        dog.begin(2, "t.py::t", "call")
        _wait_in_collective(fake_collective, declared)
        assert dog.end() == Outcome.STUCK
    assert declared[0][2].startswith("stuck: the call of t.py::t ran past the 0.3 s timeout "
                                     "waiting in all_reduce (called from test_watchdog.py:")


def test_waiting_in_a_collective_after_a_peer_skipped_the_phase_is_stuck(tmp_path,
                                                                         fake_collective):
    skipped = lambda index: PeerEvent(Outcome.SKIPPED, 1)  # noqa: E731
    with watchdog(tmp_path, timeout_s=60.0, peer_event=skipped) as (dog, declared, _):
        dog.begin(4, "t.py::t", "call")
        _wait_in_collective(fake_collective, declared)
        assert dog.end() == Outcome.STUCK
    assert declared[0][2].startswith("stuck: still in the call of t.py::t 0.1 s after rank 1 "
                                     "skipped it, waiting in all_reduce (called from "
                                     "test_watchdog.py:")


def test_computing_after_a_peer_skipped_or_went_silent_is_left_to_finish(tmp_path):
    # A skip is legitimate and a silent peer may be far behind: only a rank waiting in a
    # collective is stuck; one still computing finishes its phase (the timeout holds).
    events = iter([PeerEvent(Outcome.SKIPPED, 1), PeerEvent(Outcome.SILENT, 1, silent_s=5.0)])
    for event in events:
        with watchdog(tmp_path, timeout_s=60.0, peer_event=lambda index: event) as (
            dog, declared, _,
        ):
            dog.begin(5, "t.py::t", "call")
            time.sleep(0.4)  # 4 x the grace
            assert dog.end() is None and declared == []


def test_waiting_in_a_collective_while_a_peer_is_silent_is_stuck(tmp_path, fake_collective):
    # The peer's heartbeat stopped 3 s ago (it died, or holds the GIL): it will never join.
    silent = lambda index: PeerEvent(Outcome.SILENT, 1, silent_s=3.0)  # noqa: E731
    with watchdog(tmp_path, timeout_s=60.0, peer_event=silent) as (dog, declared, _):
        dog.begin(6, "t.py::t", "call")
        _wait_in_collective(fake_collective, declared)
        assert dog.end() == Outcome.STUCK
    text = declared[0][2]
    assert text.startswith("stuck: still in the call of t.py::t, waiting in all_reduce (called "
                           "from test_watchdog.py:")
    assert text.endswith(", while rank 1 sent no heartbeat for 3.0 s (it exited, was killed, "
                         "or holds the GIL)")


def test_the_heartbeat_goes_on_between_phases_and_during_them(tmp_path):
    beats = []
    with watchdog(tmp_path, timeout_s=60.0, heartbeat=lambda: beats.append(time.monotonic())):
        wait_until(lambda: len(beats) >= 3)  # no phase running
    assert all(later - earlier >= 0.04 for earlier, later in zip(beats, beats[1:]))
