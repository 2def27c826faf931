"""The side channel's pieces (sidechannel.py) on an in-process store: the key values, bounded
gathers, first-writer-wins reports, heartbeats, and a store that is gone."""

from __future__ import annotations

import datetime
import time
import types

import pytest
import torch.distributed as dist

from dtensor_attn.testing.harness.agreement import RankReport
from dtensor_attn.testing.harness.outcome import Outcome
from dtensor_attn.testing.harness.sidechannel import (
    Heartbeats, OwnBeat, SideChannel, beat_value, parse_beat, read_divergence, read_phase_reports,
)


@pytest.fixture
def chan():
    store = dist.HashStore()
    store.set_timeout(datetime.timedelta(seconds=5))
    lost = []
    channel = SideChannel(store, on_lost=lost.append)
    channel.lost = lost
    return channel


@pytest.mark.parametrize("index,at", [(0, 0.0), (7, 1700000000.1234567), (123456, 5.5)])
def test_a_heartbeat_value_reads_back_to_the_microsecond(index, at):
    value = beat_value(index, at)
    assert value == f"{index} {at:.6f}"
    read_index, read_at = parse_beat(value.encode())
    assert read_index == index and abs(read_at - at) < 5e-6
    assert parse_beat(value) == (read_index, read_at)  # str or bytes alike


def test_heartbeats_time_silence_from_the_last_change_only():
    beats = Heartbeats()
    assert (beats.silent_for(1, 100.0), beats.last(1)) == (0.0, None)  # never seen: not judged
    beats.observe(1, b"3 10.000", now=100.0)
    beats.observe(1, b"3 10.000", now=104.0)  # the same value again is no sign of life
    assert beats.silent_for(1, 105.0) == 5.0
    beats.observe(1, b"4 11.000", now=106.0)
    assert beats.silent_for(1, 107.5) == 1.5 and beats.last(1) == (4, 11.0)
    assert beats.silent_for(2, 107.5) == 0.0


def test_post_get_has_and_the_first_writer_wins(chan):
    assert not chan.has("k")
    chan.post("k", "v1")
    assert chan.has("k") and chan.get("k") == b"v1"
    assert chan.post_first("r", "mine") == b"mine"
    assert chan.post_first("r", "theirs") == b"mine"  # the first report stands
    assert chan.lost == []


def test_a_gather_returns_what_was_posted_and_none_for_the_rest(chan):
    for rank in (0, 2):
        chan.post(f"phase/3/{rank}", f"r{rank}")
    assert chan.gather("phase/3", [2, 0, 1], timeout_s=0.05) == {0: b"r0", 1: None, 2: b"r2"}
    assert chan.gather("phase/3", [], timeout_s=0.05) == {}
    # the store's own timeout is restored after the bounded wait
    assert chan._store.timeout == datetime.timedelta(seconds=5)


def test_phase_reports_are_read_as_rank_reports(chan):
    report = RankReport(rank=1, outcome=Outcome.FAILED, at=2.0, text="boom")
    chan.post("phase/4/1", report.to_json())
    got = read_phase_reports(chan, 4, frozenset({0, 1}), timeout_s=0.05)
    assert got == {0: None, 1: report}


@pytest.mark.parametrize("value,expected", [
    ("failed 3", (Outcome.FAILED, 3, 0.0)),
    ("skipped 0", (Outcome.SKIPPED, 0, 0.0)),
    ("silent 2 4.5", (Outcome.SILENT, 2, 4.5)),
], ids=["failed", "skipped", "silent"])
def test_a_divergence_is_read_with_its_typed_outcome(chan, value, expected):
    assert read_divergence(chan, 9) is None
    chan.post("diverged/9", value)
    assert read_divergence(chan, 9) == expected


def test_beats_are_observed_for_the_ranks_that_have_one(chan):
    chan.post("beat/1", beat_value(2, 50.0))
    beats = Heartbeats()
    chan.observe_beats([1, 3], beats)
    assert beats.last(1) == (2, 50.0) and beats.last(3) is None
    chan.observe_beats([], beats)  # nothing to read


def test_own_reports_are_plain_sets_while_beating_and_first_wins_after_a_gap(chan):
    own = OwnBeat(rank=1, silence_s=1000.0)
    own.beat(chan, 4)
    assert parse_beat(chan.get("beat/1"))[0] == 4
    # the first beat follows no earlier one: a gap, so the first report is a first-writer set
    chan.post("phase/4/1", "written for it")
    assert own.post_report(chan, 4, "own") == "written for it"
    own.beat(chan, 5)
    chan.post("phase/5/1", "written for it")
    # steady beats: this rank's own report is a plain set (nobody may have written one)
    assert own.post_report(chan, 5, "own") == "own" and chan.get("phase/5/1") == b"own"
    own._sent -= 10_000.0  # a gap longer than half the silence: the rank may look silent
    chan.post("phase/6/1", "written for it")
    assert own.post_report(chan, 6, "own") == "written for it"  # the first report stands
    assert own.post_report(chan, 7, "own") == "own"  # the gap is spent: plain sets again


def test_the_first_report_follows_a_gap_on_a_machine_booted_seconds_ago(chan, monkeypatch):
    """The monotonic clock counts from boot: on a fresh machine it is smaller than a gap, and
    the first report must still be a first-writer set (found on a just-started GPU machine)."""
    import dtensor_attn.testing.harness.sidechannel as sidechannel

    # this module's clock only: time.monotonic itself stays real for pytest and other threads
    clock = types.SimpleNamespace(monotonic=lambda: 3.0, time=time.time)
    monkeypatch.setattr(sidechannel, "time", clock)
    own = OwnBeat(rank=1, silence_s=10.0)
    own.beat(chan, 1)
    chan.post("phase/1/1", "written for it")
    assert own.post_report(chan, 1, "own") == "written for it"


class GoneStore:
    """A store whose launcher died: every call raises torch's DistError."""

    timeout = datetime.timedelta(seconds=1)

    def __getattr__(self, name):
        def fail(*args, **kwargs):
            raise dist.DistError(f"{name}: connection reset")
        return fail


@pytest.mark.parametrize("call,fallback", [
    (lambda c: c.post("k", "v"), None),
    (lambda c: c.has("k"), False),
    (lambda c: c.get("k"), b""),
    (lambda c: c.post_first("k", "v"), b""),
    (lambda c: c.gather("p", [0, 1], 0.01), {0: None, 1: None}),
    (lambda c: c.observe_beats([0], Heartbeats()), None),
], ids=["post", "has", "get", "post_first", "gather", "observe_beats"])
def test_a_lost_store_is_handed_to_on_lost_once_per_call(call, fallback):
    lost = []
    channel = SideChannel(GoneStore(), on_lost=lost.append)
    assert call(channel) == fallback
    assert len(lost) == 1 and "connection reset" in str(lost[0])
