"""The side channel's pieces: heartbeats as values, first-writer-wins reports, and the report a
live rank writes for a silent one (a real TCPStore in this process; no torchrun)."""

from __future__ import annotations

import datetime

import pytest
import torch.distributed as dist

from dtensor_attn.testing.harness.agreement import RankReport
from dtensor_attn.testing.harness.outcome import Outcome
from dtensor_attn.testing.harness.sidechannel import (
    Heartbeats, SideChannel, beat_value, parse_beat, read_divergence, report_silent_peers,
)


def test_heartbeats_measure_silence_on_the_observers_clock():
    beats = Heartbeats()
    assert beats.silent_for(1, now=50.0) == 0.0 and beats.last(1) is None  # never seen
    beats.observe(1, beat_value(3, 1000.5).encode(), now=10.0)
    beats.observe(1, beat_value(3, 1000.5).encode(), now=12.0)  # the same value: no beat
    assert beats.silent_for(1, now=13.0) == 3.0
    beats.observe(1, beat_value(4, 1001.0).encode(), now=13.5)  # a new phase: it lives
    assert beats.silent_for(1, now=14.0) == 0.5 and beats.last(1) == (4, 1001.0)
    assert parse_beat("7 12.250") == (7, 12.25)


@pytest.fixture
def channel():
    server = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=10))
    lost = []
    yield SideChannel.connect("localhost", server.port, "t/", 10.0, lost.append)
    assert lost == []
    del server


def test_the_first_report_of_a_phase_stays(channel):
    assert channel.post_first("phase/1/0", "mine") == b"mine"
    assert channel.post_first("phase/1/0", "written for me") == b"mine"
    assert channel.gather("phase/1", [0, 1], timeout_s=0.1) == {0: b"mine", 1: None}


def test_a_peer_silent_past_the_limit_is_reported_for_once(channel):
    beats = Heartbeats()
    beats.observe(1, beat_value(5, 1000.0).encode(), now=0.0)  # rank 1 began phase 5...
    beats.observe(2, beat_value(4, 999.0).encode(), now=0.0)   # ...rank 2 only phase 4
    channel.post_first("phase/5/2", "rank 2's own report")
    reported: set[tuple[int, int]] = set()
    phase = (5, "t.py::x", "call")
    # Not silent long enough yet (the clock is the monotonic one: beats seen at 0 are old).
    assert report_silent_peers(channel, beats, [1, 2], phase, 1e9, reported) == []
    assert report_silent_peers(channel, beats, [1, 2], phase, 2.0, reported) == [1]
    written = RankReport.from_json(channel.get("phase/5/1"))
    assert (written.rank, written.outcome, written.at) == (1, Outcome.SILENT, 1000.0)
    assert written.text.startswith("went silent during the call of t.py::x: no report and no "
                                   "heartbeat for ")
    assert channel.get("phase/5/2") == b"rank 2's own report"  # it had reported: left alone
    outcome, rank, silent_s = read_divergence(channel, 5)
    assert (outcome, rank) == (Outcome.SILENT, 1) and silent_s > 2.0
    assert report_silent_peers(channel, beats, [1, 2], phase, 2.0, reported) == []  # once
    assert read_divergence(channel, 6) is None


def test_a_divergence_keeps_the_first_rank_that_left(channel):
    channel.post_first("diverged/3", "skipped 1")
    channel.post_first("diverged/3", "failed 0")
    assert read_divergence(channel, 3) == ("skipped", 1, 0.0)
