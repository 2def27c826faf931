"""Per-rank JUnit XML stays valid after every test; the summary reads runs that ended badly."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from dtensor_attn.testing.harness.junit import JUnitWriter, case_from_reports
from dtensor_attn.testing.harness.summary import ROOT_CAUSE_PROPERTY, main, read_rank, summarize


def _suite(path):
    return ET.parse(path).getroot().find("testsuite")


def _cases(path):
    """[(nodeid, outcome tag or 'passed', unfinished placeholder?)] of a JUnit file."""
    return [(c.get("nodeid"), next((x.tag for x in c), "passed"), c.get("unfinished") == "true")
            for c in _suite(path).iter("testcase")]


def test_junit_is_valid_after_every_case_and_totals_come_at_close(tmp_path):
    path = tmp_path / "rank1.xml"
    writer = JUnitWriter(path, rank=1, world_size=2)
    # Before any test, the file already says the rank has not finished: never green.
    assert _cases(path) == [("dtensor_attn::rank1_unfinished", "error", True)]
    assert _suite(path).get("complete") is None
    writer.add("tests/a.py::test_ok", outcome="passed", seconds=0.5)
    writer.add("tests/a.py::C::test_bad[x]", outcome="failed", seconds=0.1,
               message="failed in call on rank 1 first", text="trace \x00 <here> & there",
               properties={ROOT_CAUSE_PROPERTY: "1"})
    cases = list(_suite(path).iter("testcase"))  # readable mid-run, as after a SIGKILL
    assert [c.get("name") for c in cases] == ["test_ok", "test_bad[x]", "rank1_unfinished"]
    assert cases[1].get("classname") == "tests.a.C"
    assert cases[1].get("nodeid") == "tests/a.py::C::test_bad[x]"
    assert cases[1].find("failure").text == "trace ? <here> & there"
    writer.add("tests/a.py::test_skip", outcome="skipped", seconds=0.0, message="needs 8 ranks")
    writer.close(collected=4, stop_reason="stopping the run")
    suite = _suite(path)
    assert {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "collected",
                                      "complete", "rank", "world_size", "stop_reason")} == {
        "tests": "3", "failures": "1", "errors": "0", "skipped": "1", "collected": "4",
        "complete": "true", "rank": "1", "world_size": "2", "stop_reason": "stopping the run"}
    assert all(not unfinished for *_, unfinished in _cases(path))
    writer.add("tests/a.py::late", outcome="passed", seconds=0.0)  # ignored after close
    assert len(list(_suite(path).iter("testcase"))) == 3


def test_a_rank_killed_during_a_test_leaves_a_file_naming_that_test_as_an_error(tmp_path):
    path = tmp_path / "rank0.xml"
    writer = JUnitWriter(path, rank=0, world_size=2)
    writer.begin_test("t.py::a")
    writer.add("t.py::a", outcome="passed", seconds=0.1)
    writer.begin_test("t.py::long_name_in_flight[with-a-parameter]")
    # (a SIGKILL here: nothing more is written)
    assert _cases(path) == [("t.py::a", "passed", False),
                            ("t.py::long_name_in_flight[with-a-parameter]", "error", True)]
    error = list(_suite(path).iter("testcase"))[1].find("error")
    assert error.get("message") == ("rank 0 ended during this test without recording its "
                                    "result: killed, exited, or stopped by torchrun (see "
                                    "rank0.log)")
    writer.add("t.py::long_name_in_flight[with-a-parameter]", outcome="passed", seconds=0.1)
    writer.begin_test("t.py::c")
    writer.add("t.py::c", outcome="passed", seconds=0.1)  # a shorter tail than before
    assert _cases(path)[-1] == ("dtensor_attn::rank0_unfinished", "error", True)
    assert read_rank(path)["counts"] == {"passed": 3, "failed": 0, "error": 0, "skipped": 0}


def test_tests_the_stopped_run_never_reached_are_listed_as_not_run(tmp_path):
    path = tmp_path / "rank0.xml"
    writer = JUnitWriter(path, rank=0, world_size=2)
    writer.expect(["t.py::a", "t.py::b", "t.py::c"])
    writer.add("t.py::a", outcome="failed", seconds=0.1, message="failed in call on rank 1")
    writer.close(collected=3, stop_reason="stopping the run after t.py::a (call): rank 1 stuck")
    assert _cases(path) == [("t.py::a", "failure", False), ("t.py::b", "skipped", False),
                            ("t.py::c", "skipped", False)]
    skipped = list(_suite(path).iter("testcase"))[1].find("skipped")
    assert skipped.get("message") == ("not run: the run stopped: stopping the run after t.py::a "
                                      "(call): rank 1 stuck")
    assert _suite(path).get("skipped") == "2" and writer.num_ran == 1


def test_skip_reasons_and_tests_that_ran_are_counted_apart_from_harness_cases(tmp_path):
    writer = JUnitWriter(tmp_path / "rank0.xml", rank=0, world_size=2)
    for name in ("a", "b"):
        writer.add(f"t.py::{name}", outcome="skipped", seconds=0.0,
                   message="Skipped: no mesh marker")
    writer.add("dtensor_attn::no_test_ran", outcome="failed", seconds=0.0, message="no test ran")
    assert writer.num_ran == 0 and writer.skip_reasons == {"no mesh marker": 2}


def _rank_files(out, rank, cases, *, complete=True, log=""):
    writer = JUnitWriter(out / f"rank{rank}.xml", rank=rank, world_size=2)
    for nodeid, outcome, message, root in cases:
        writer.add(nodeid, outcome=outcome, seconds=0.0, message=message,
                   properties={ROOT_CAUSE_PROPERTY: root} if root else None)
    if complete:
        writer.close(collected=len(cases))
    (out / f"rank{rank}.log").write_text(log)


def test_summary_of_a_finished_run(tmp_path):
    for rank in (0, 1):
        _rank_files(tmp_path, rank, [("t.py::a", "passed", "", None),
                                     ("t.py::b", "skipped", "needs 4 ranks", None)])
    text, status = summarize(tmp_path)
    assert status == 0
    assert text.splitlines()[2:] == ["0            1       0       0        1  finished",
                                     "1            1       0       0        1  finished"]


def test_summary_names_the_root_cause_and_the_killed_rank(tmp_path):
    failure = ("t.py::b", "failed", "failed in call on rank 1 first (root cause)", "1")
    _rank_files(tmp_path, 0, [("t.py::a", "passed", "", None), failure])
    _rank_files(tmp_path, 1, [("t.py::a", "passed", "", None)], complete=False,
                log="[dtensor_attn 01:02:03.004 rank 1] start call t.py::c\n")
    (tmp_path / "console.log").write_text(
        "Failures:\n  rank      : 1 (local_rank: 1)\n  exitcode  : -9 (pid: 7)\n")
    text, status = summarize(tmp_path)
    assert status == 1
    assert "1            1       0       0        0  did not finish: ended during t.py::c " \
           "(call), exit signal 9 SIGKILL" in text
    assert "FAILED t.py::b: failed in call on rank 1 first (root cause)" in text
    assert "root cause: rank 1 ended exit signal 9 SIGKILL during t.py::c (call)" in text


def test_summary_without_files_or_tests_fails(tmp_path):
    assert summarize(tmp_path) == (
        f"dtensor_attn summary: no rank<r>.xml in {tmp_path}: no rank started", 1)
    _rank_files(tmp_path, 0, [])
    text, status = summarize(tmp_path)
    assert status == 1
    assert "finished, no tests collected" in text
    assert "1       no JUnit file: the rank never started" in text


def test_summary_of_one_node_of_a_multi_node_run_skips_other_nodes_ranks(tmp_path):
    _rank_files(tmp_path, 1, [("t.py::a", "passed", "", None)])
    text, status = summarize(tmp_path, this_node_only=True)
    assert status == 0 and "never started" not in text
    assert summarize(tmp_path)[1] == 1  # rank 0's file is missing on a single node


def _phase(when, outcome, longrepr=None, properties=()):
    report = pytest.TestReport("t.py::x", ("t.py", 1, "x"), {}, outcome, longrepr, when,
                               user_properties=list(properties))
    report.duration = 0.25
    return report


@pytest.mark.parametrize(
    "phases, outcome, message",
    [
        ([("setup", "passed"), ("call", "passed"), ("teardown", "passed")], "passed", ""),
        ([("setup", "passed"), ("call", "failed", "failed in call on rank 1 first\nmore"),
          ("teardown", "passed")], "failed", "failed in call on rank 1 first"),
        ([("setup", "failed", "fixture boom"), ("teardown", "passed")], "error", "fixture boom"),
        ([("setup", "passed"), ("call", "passed"), ("teardown", "failed", "teardown boom")],
         "error", "teardown boom"),
        ([("setup", "skipped", ("t.py", 1, "Skipped: mesh tp=4 needs 4 ranks")),
          ("teardown", "passed")], "skipped", "Skipped: mesh tp=4 needs 4 ranks"),
    ],
    ids=["passed", "call-failed", "setup-error", "teardown-error", "skipped"],
)
def test_one_junit_case_per_test_from_its_phases(phases, outcome, message):
    reports = [_phase(*phase) for phase in phases]
    reports[-1].user_properties.append((ROOT_CAUSE_PROPERTY, "1"))
    case = case_from_reports(reports)
    assert (case["outcome"], case["message"]) == (outcome, message)
    assert case["seconds"] == 0.25 * len(phases)
    assert case["properties"] == {ROOT_CAUSE_PROPERTY: "1"}
    if outcome in ("failed", "error"):
        assert case["text"].startswith("--- ")


def test_summary_command_line_exit_status(tmp_path, capsys):
    _rank_files(tmp_path, 0, [("t.py::a", "passed", "", None)])
    assert main([str(tmp_path), "--this-node-only"]) == 0
    assert "0            1       0       0        0  finished" in capsys.readouterr().out
    assert main([str(tmp_path)]) == 1  # rank 1 never wrote its file
