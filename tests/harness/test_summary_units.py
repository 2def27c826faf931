"""The summary's readers (summary.py) and the run-level verdict (run_junit.py) as values:
torchrun's exit codes, the rank logs' phase lines, one rank's JUnit file, and the worst case
ranks that ended early agree on, checked over every pair of kinds."""

from __future__ import annotations

import itertools
import textwrap

import pytest

from dtensor_attn.testing.harness.outcome import CaseKind
from dtensor_attn.testing.harness.run_junit import _worst, run_cases
from dtensor_attn.testing.harness.summary import (
    ROOT_CAUSE_PROPERTY, Case, describe_exit, exit_codes, last_started, rank_files, read_collected,
    read_rank,
)

# torchrun's failure report, as it prints it (one block per failed rank).
CONSOLE = textwrap.dedent("""\
    torch.distributed.elastic.multiprocessing.api: [ERROR] failed (exitcode: -9)
    Failures:
    [1]:
      time      : 2024-01-02_03:04:05
      host      : node0
      rank      : 3 (local_rank: 1)
      exitcode  : -15 (pid: 12)
    Root Cause (first observed failure):
    [0]:
      rank      : 2 (local_rank: 0)
      exitcode  : -9 (pid: 11)
      rank      : 11 (local_rank: 3)
      exitcode  : 1 (pid: 13)
    """)


def test_exit_codes_are_read_from_torchruns_report(tmp_path):
    (tmp_path / "console.log").write_text(CONSOLE)
    assert exit_codes(tmp_path / "console.log") == {3: -15, 2: -9, 11: 1}
    assert exit_codes(tmp_path / "missing.log") == {}


@pytest.mark.parametrize("code,text", [
    (None, ""), (0, ", exit code 0"), (1, ", exit code 1"), (-9, ", exit signal 9 SIGKILL"),
    (-15, ", exit signal 15 SIGTERM (torchrun stops the rest once one fails)"),
    (-6, ", exit signal 6"), (-11, ", exit signal 11"),
], ids=["none", "zero", "one", "sigkill", "sigterm", "sigabrt", "sigsegv"])
def test_exits_are_described_by_code_or_signal(code, text):
    assert describe_exit(code) == text


LOG_LINES = [
    "plain output from the test",
    "[dtensor_attn 01:02:03.004 rank 1] start setup t.py::a",
    "[dtensor_attn 01:02:03.005 rank 1] start call t.py::a",
    "[other 01:02:03.006] start teardown t.py::not_ours",
    "  [dtensor_attn 01:02:03.007 rank 1] start call t.py::indented",
    "[dtensor_attn 01:02:03.008 rank 1] collected 3 tests",
    "[dtensor_attn 01:02:03.009 rank 1] start teardown t.py::C::b[x y]",
    "[dtensor_attn 01:02:03.010 rank 1] start cleanup t.py::c",
]


@pytest.mark.parametrize("upto", range(len(LOG_LINES) + 1))
def test_the_last_phase_started_is_the_last_harness_phase_line(tmp_path, upto):
    log = tmp_path / "rank1.log"
    log.write_text("\n".join(LOG_LINES[:upto]) + "\n")
    phases = [("t.py::a", "setup"), ("t.py::a", "call"), ("t.py::C::b[x y]", "teardown")]
    seen = [phases[0]] * (upto >= 2) + [phases[1]] * (upto >= 3) + [phases[2]] * (upto >= 7)
    assert last_started(log) == (seen[-1] if seen else None)


def test_a_missing_log_has_no_phase(tmp_path):
    assert last_started(tmp_path / "rank5.log") is None


def test_rank_files_and_collected_lists(tmp_path):
    for name in ("rank0.xml", "rank10.xml", "rank2.xml", "rank1.xml.tmp", "rankx.xml", "junit.xml"):
        (tmp_path / name).write_text("")
    assert {r: p.name for r, p in rank_files(tmp_path).items()} == {
        0: "rank0.xml", 2: "rank2.xml", 10: "rank10.xml"}
    (tmp_path / "rank2.collected.txt").write_text("t.py::a\nt.py::b\n")
    assert read_collected(tmp_path, 2) == ["t.py::a", "t.py::b"]
    assert read_collected(tmp_path, 3) is None


RANK_XML = """<?xml version="1.0" encoding="utf-8"?>
<testsuites>
<testsuite name="dtensor_attn rank 1" rank="1" world_size="4" collected="5" complete="{complete}"{stop}>
<testcase nodeid="t.py::a" time="0.5" />
<testcase nodeid="t.py::b" time="0.25"><skipped message="Skipped: x" /></testcase>
<testcase nodeid="t.py::c"><properties><property name="{root_name}" value="0,2" /></properties><failure message="boom">trace</failure></testcase>
<testcase name="d"><error message="fixture">text</error></testcase>
<testcase nodeid="t.py::e" unfinished="true"><error message="ended" /></testcase>
</testsuite>
</testsuites>
"""


@pytest.mark.parametrize("complete,stop", [("true", ""), ("false", ' stop_reason="why"')],
                         ids=["complete", "stopped"])
def test_one_ranks_file_is_read_into_cases_and_counts(tmp_path, complete, stop):
    path = tmp_path / "rank1.xml"
    path.write_text(RANK_XML.format(complete=complete, stop=stop, root_name=ROOT_CAUSE_PROPERTY))
    info = read_rank(path)
    assert info["counts"] == {CaseKind.PASSED: 1, CaseKind.SKIPPED: 1, CaseKind.FAILED: 1,
                              CaseKind.ERROR: 1}
    assert info["cases"] == {
        "t.py::a": Case("t.py::a", CaseKind.PASSED, seconds=0.5),
        "t.py::b": Case("t.py::b", CaseKind.SKIPPED, "Skipped: x", seconds=0.25),
        "t.py::c": Case("t.py::c", CaseKind.FAILED, "boom", "trace", "0,2"),
        "d": Case("d", CaseKind.ERROR, "fixture", "text"),  # no nodeid: the name stands in
    }
    assert info["failed"] == {"t.py::c": ("0,2", "boom"), "d": (None, "fixture")}
    assert info["in_flight"] == "t.py::e"  # the placeholder names the test the rank ended in
    assert (info["complete"], info["world_size"], info["collected"]) == (complete == "true", 4, 5)
    assert info["stop_reason"] == ("why" if stop else "")


def test_a_truncated_file_is_unreadable_not_an_exception(tmp_path):
    path = tmp_path / "rank0.xml"
    path.write_text(RANK_XML[:200])
    info = read_rank(path)
    assert info["unreadable"] and info["cases"] == {} and info["counts"] == {}


KINDS = list(CaseKind)


@pytest.mark.parametrize("a,b", list(itertools.product(KINDS, KINDS)),
                         ids=lambda k: k.value)
def test_ranks_that_disagree_get_the_worst_case_with_its_root_cause(a, b):
    order = ["passed", "skipped", "failed", "error"]  # docs/harness.md, by hand
    first, second = Case("t.py::x", a, "first"), Case("t.py::x", b, "second", root="1")
    worst = _worst([first, second])
    expected_kind = max(a, b, key=lambda k: order.index(k.value))
    assert worst.kind is expected_kind
    if a is b:
        assert worst is second  # the one that carries the root cause, on a tie
    # the rank order does not matter
    assert _worst([second, first]).kind is expected_kind


def _info(cases=(), complete=True, stop_reason=""):
    return {"cases": {c.nodeid: c for c in cases}, "complete": complete,
            "stop_reason": stop_reason}


COLLECTED = ["t.py::a", "t.py::b", "t.py::c"]


@pytest.mark.parametrize("codes,culprit", [
    ({0: -15, 1: -9}, 1),   # rank 1 killed, rank 0 stopped by torchrun: rank 1
    ({0: 1, 1: -15}, 0),    # rank 0 exited 1 by itself
    ({}, None),             # no report from torchrun: every rank that ended is named
], ids=["killed", "exited", "unknown"])
def test_the_culprit_of_a_test_in_flight_is_the_rank_torchrun_did_not_stop(codes, culprit):
    ranks = {r: _info([Case("t.py::a", CaseKind.PASSED)], complete=False) for r in (0, 1)}
    in_flight = {0: ("t.py::b", "call"), 1: ("t.py::b", "setup")}
    cases, stop = run_cases({0: COLLECTED, 1: COLLECTED}, ranks, in_flight, codes)
    by_id = {c.nodeid: c for c in cases}
    assert [c.nodeid for c in cases] == COLLECTED
    assert by_id["t.py::a"].kind is CaseKind.PASSED
    assert by_id["t.py::b"].kind is CaseKind.ERROR
    assert by_id["t.py::b"].root == ("0,1" if culprit is None else str(culprit))
    assert by_id["t.py::c"].kind is CaseKind.SKIPPED
    assert by_id["t.py::c"].message == f"not run: {stop.splitlines()[0]}"
    if culprit is not None:
        assert f"rank {culprit} ended" in stop and "(root cause)" in by_id["t.py::b"].message


@pytest.mark.parametrize("note", ["", "run timeout after 600 s"], ids=["no-note", "note"])
def test_harness_findings_come_first_and_every_collected_test_once(note):
    finding = Case("dtensor_attn::collection", CaseKind.FAILED, "ranks collected different tests")
    ranks = {0: _info([finding, Case("t.py::a", CaseKind.PASSED)], stop_reason="collections differ"),
             1: _info([Case("t.py::z", CaseKind.PASSED)])}
    cases, stop = run_cases({0: COLLECTED, 1: ["t.py::z", *COLLECTED]}, ranks, {}, {},
                            missing_ranks=(2,), note=note)
    assert [c.nodeid for c in cases] == [
        "dtensor_attn::rank2_never_started", "dtensor_attn::collection", "t.py::a", "t.py::b",
        "t.py::c", "t.py::z"]
    assert stop == (note or "collections differ")
    assert [c.kind for c in cases] == [CaseKind.ERROR, CaseKind.FAILED, CaseKind.PASSED,
                                       CaseKind.SKIPPED, CaseKind.SKIPPED, CaseKind.PASSED]
