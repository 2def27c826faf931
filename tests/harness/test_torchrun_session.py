"""The torchrun session's store protocol without torchrun: ranks are threads of this process
sharing a TCPStore, phases are pytest TestReports. (The planted torchrun suites check the same
end to end; these show each rule apart, in a second.)"""

from __future__ import annotations

import datetime
import threading
import time
import types
import xml.etree.ElementTree as ET

import pytest
import torch.distributed as dist

from dtensor_attn.testing.harness.summary import ROOT_CAUSE_PROPERTY
from dtensor_attn.testing.harness.torchrun_env import RunSettings, TorchrunEnv
from dtensor_attn.testing.harness.torchrun_session import TorchrunSession

NODE = "t.py::test_x"


@pytest.fixture
def make_sessions(tmp_path):
    """make_sessions(timeout_s): two ranks' sessions on one store (a master TCPStore on a free
    port), closed after the test. A test that expects every rank to report uses the generous
    default: a short timeout would turn a loaded machine's stall into a verdict."""
    server = dist.TCPStore("localhost", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=30))
    made = []

    def make(timeout_s=12.0):  # waits 15 s; silence is 4 s
        settings = RunSettings(out_dir=tmp_path, timeout_s=timeout_s)
        for rank in (0, 1):
            env = TorchrunEnv(rank=rank, world_size=2, local_rank=rank, local_world_size=2,
                              master_addr="localhost", master_port=server.port, run_id="t",
                              attempt="0")
            session = TorchrunSession(env, settings)
            session.open_side_channel()
            made.append(session)
        return made, settings

    yield make
    for session in made:
        session.watchdog.stop()
        session.log.close()
    del server


@pytest.fixture
def sessions(make_sessions):
    return make_sessions()[0]


def _report(outcome, when="call", text=""):
    longrepr = None
    if outcome == "failed":
        longrepr = text
    elif outcome == "skipped":
        longrepr = ("t.py", 1, f"Skipped: {text}")
    return pytest.TestReport(NODE, ("t.py", 1, "test_x"), {}, outcome, longrepr, when)


def _phase(sessions, outcomes, when="call"):
    """Run one phase on every rank concurrently; returns the reports after agreement."""
    item = types.SimpleNamespace(nodeid=NODE, session=types.SimpleNamespace(shouldfail=False))
    call = types.SimpleNamespace(when=when)
    reports = {}

    def rank_main(session, outcome):
        session.begin_phase(NODE, when)
        session.end_phase()
        if outcome is None:
            return  # this rank never reports: it died
        reports[session.rank] = report = _report(*outcome) if isinstance(outcome, tuple) \
            else _report(outcome, when)
        session.agree(item, call, report)

    threads = [threading.Thread(target=rank_main, args=(s, o)) for s, o in zip(sessions, outcomes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return reports, item


def test_all_pass_stays_passed(sessions):
    reports, item = _phase(sessions, ["passed", "passed"])
    assert [reports[r].outcome for r in (0, 1)] == ["passed", "passed"]
    assert item.session.shouldfail is False


def test_one_rank_failing_fails_both_with_the_root_cause_text(sessions):
    reports, item = _phase(sessions, ["passed", ("failed", "call", "AssertionError: planted")])
    for rank in (0, 1):
        assert reports[rank].outcome == "failed"
        assert reports[rank].longreprtext.startswith(
            "failed in call on rank 1 first (root cause); every rank fails it.")
        assert "AssertionError: planted" in reports[rank].longreprtext
        assert (ROOT_CAUSE_PROPERTY, "1") in reports[rank].user_properties
    assert item.session.shouldfail is False  # both reported, in step: the run goes on
    assert sessions[0].failures[0][:2] == (NODE, "call")


def test_a_rank_that_never_reports_stops_the_run(make_sessions):
    sessions, _ = make_sessions(timeout_s=1.0)  # waits 3 s
    reports, item = _phase(sessions, ["passed", None])
    assert reports[0].outcome == "failed"
    assert "rank 1: no report within 3 s: it died or hung" in reports[0].longreprtext
    assert item.session.shouldfail.startswith("dtensor_attn stopping the run after t.py::test_x")
    assert sessions[0].live_ranks == {0}


def test_a_rank_dependent_skip_is_a_failure(sessions):
    reports, _ = _phase(sessions, [("skipped", "setup", "only here"), "passed"], when="setup")
    assert reports[0].outcome == reports[1].outcome == "failed"
    assert "skipped on ranks [0] (Skipped: only here), not skipped on ranks [1]" in \
        reports[1].longreprtext


def _on_every_rank(sessions, fn):
    """{rank: fn(session)}, the ranks running concurrently (each waits for the others)."""
    results = {}
    threads = [threading.Thread(target=lambda s=s: results.__setitem__(s.rank, fn(s)))
               for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_collection_lists_are_compared_through_the_store(sessions):
    lists = {0: ["t.py::a", "t.py::b"], 1: ["t.py::a", "t.py::b", "t.py::c"]}
    results = _on_every_rank(sessions, lambda s: s.check_collection(lists[s.rank]))
    assert results[0] == results[1]
    assert "rank 1 collected 3 tests, rank 0 2; only on rank 1: t.py::c" in results[0]


def test_junit_gets_one_case_per_test_after_teardown(sessions, tmp_path):
    for when in ("setup", "call", "teardown"):
        outcomes = ["passed", ("failed", "call", "boom")] if when == "call" else ["passed"] * 2
        _phase(sessions, outcomes, when=when)
    statuses = _on_every_rank(sessions, lambda session: session.finish(1, exitstatus=1))
    assert statuses == {0: 1, 1: 1}
    assert sessions[0].rank_summaries == {
        r: {"failed": 1, "stop_reason": ""} for r in (0, 1)}
    suite = ET.parse(tmp_path / "rank0.xml").getroot().find("testsuite")
    (case,) = suite.iter("testcase")
    assert case.get("nodeid") == NODE and case.find("failure") is not None
    assert suite.get("failures") == "1" and suite.get("complete") == "true"
    log = (tmp_path / "rank0.log").read_text()
    assert "start call t.py::test_x" in log and "call t.py::test_x FAILED on every rank" in log


def test_a_rank_that_went_silent_is_reported_for_and_named_root_cause(make_sessions, tmp_path):
    """Rank 1's heartbeat stops (as when it exits, is killed or holds the GIL) after it began
    the phase: rank 0's watchdog writes rank 1's report for it, well before the wait's end."""
    sessions, settings = make_sessions()
    sessions[1].begin_phase(NODE, "setup")  # announces phase 1, then falls silent
    # Its watchdog thread must be gone before rank 0's phase starts: a beat it posts late
    # would date rank 1's silence after rank 0's failure (a flake on a loaded machine).
    assert sessions[1].watchdog.stop(timeout_s=30.0), "rank 1's watchdog thread never ended"
    started = time.monotonic()
    reports, item = _phase(sessions[:1], ["failed"], when="setup")
    seconds = time.monotonic() - started
    assert sessions[0].watchdog.stop(timeout_s=30.0)  # it logs after it writes rank 1's report
    text = reports[0].longreprtext
    assert text.startswith("failed in setup on rank 1 first (root cause)"), text
    assert f"rank 1: went silent during the setup of {NODE}: no report and no heartbeat for " \
        in text
    assert "rank 1 silent" in item.session.shouldfail
    assert settings.silence_s < seconds < settings.wait_timeout_s - 3, seconds
    assert "rank 1 went silent in phase 1: reported for it" in (tmp_path / "rank0.log").read_text()


def test_a_collection_difference_is_a_failure_in_junit_and_the_lists_are_written(sessions,
                                                                                 tmp_path):
    lists = {0: ["t.py::a"], 1: ["t.py::a", "t.py::b"]}
    _on_every_rank(sessions, lambda s: s.check_collection(lists[s.rank]))
    assert (tmp_path / "rank1.collected.txt").read_text() == "t.py::a\nt.py::b\n"
    _on_every_rank(sessions, lambda s: s.finish(len(lists[s.rank]), exitstatus=2))
    suite = ET.parse(tmp_path / "rank1.xml").getroot().find("testsuite")
    cases = {c.get("nodeid"): c[0].tag for c in suite.iter("testcase")}
    assert cases == {"dtensor_attn::collection": "failure", "t.py::a": "skipped",
                     "t.py::b": "skipped"}
    assert suite.get("failures") == "1"


def test_a_run_in_which_every_test_skipped_exits_5_naming_the_option(sessions, tmp_path):
    _on_every_rank(sessions, lambda s: s.check_collection([NODE]))
    for when in ("setup", "teardown"):
        _phase(sessions, [("skipped", when, "no mesh marker")] * 2, when=when)
    statuses = _on_every_rank(sessions, lambda s: s.finish(1, exitstatus=0))
    assert statuses == {0: 5, 1: 5}
    assert "--dtensor-unmarked=run" in sessions[0].no_test_ran
    assert "  1 skipped: no mesh marker" in sessions[0].no_test_ran
    suite = ET.parse(tmp_path / "rank0.xml").getroot().find("testsuite")
    assert [c.get("nodeid") for c in suite.iter("testcase")] == [NODE, "dtensor_attn::no_test_ran"]


@pytest.mark.parametrize("beat_first", [False, True], ids=["report-first", "beat-first"])
def test_a_late_report_does_not_overwrite_the_one_written_for_a_silent_rank(sessions,
                                                                             beat_first):
    """Rank 1 stalled (its heartbeat stopped, as when a call holds the GIL) long enough for
    rank 0 to report it silent; when rank 1 resumes, its own report must not replace that one,
    whether its watchdog beats before the report is posted or not: both ranks apply the same
    verdict."""
    from dtensor_attn.testing.harness.agreement import silent_report

    item = types.SimpleNamespace(nodeid=NODE, session=types.SimpleNamespace(shouldfail=False))
    call = types.SimpleNamespace(when="call")
    written = silent_report(1, nodeid=NODE, when="call", began_phase=True, last_beat_at=1.0,
                            silent_s=9.0)
    reports = {}
    # Rank 0's watchdog wrote it, here before the threads start: a store client serves one thread.
    sessions[0]._chan.post_first("phase/1/1", written.to_json())

    def rank_main(session):
        session.begin_phase(NODE, "call")
        session.end_phase()
        if session.rank == 1:
            session._own_beat._sent -= 100.0  # rank 1's heartbeat had stopped, then it resumes
            if beat_first:
                session._beat(session._chan)  # its watchdog runs again first
        reports[session.rank] = report = _report("passed")
        session.agree(item, call, report)

    threads = [threading.Thread(target=rank_main, args=(s,)) for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert reports[0].longreprtext == reports[1].longreprtext
    assert "rank 1: went silent during the call of t.py::test_x" in reports[1].longreprtext
