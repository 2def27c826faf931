"""The files the harness writes, byte for byte: a two-rank run's per-rank JUnit files, the
run-level junit.xml CI reads and the summary, with the clock and the host name fixed.

The expected text was produced by the harness before its outcomes became enums (outcome.py)
and must not change with them: CI parsers and the planted torchrun suites read these bytes.
Rank 0 finished after the run stopped at t.py::c (an error there); rank 1 failed t.py::c
(the root cause) and was SIGKILLed during t.py::d.
"""

from __future__ import annotations

import types

import pytest

from dtensor_attn.testing.harness import junit, run_junit, summary
from dtensor_attn.testing.harness.junit import JUnitWriter
from dtensor_attn.testing.harness.outcome import CaseKind

TESTS = ["t.py::a", "t.py::b", "t.py::c", "t.py::d"]
RANK_CASES = {  # rank -> [(nodeid, kind, message, text, root-cause ranks)]
    0: [("t.py::a", CaseKind.PASSED, "", "", None),
        ("t.py::b", CaseKind.SKIPPED, "Skipped: needs 4 ranks", "", None),
        ("t.py::c", CaseKind.ERROR, "boom <&>", "trace\x01", "1")],
    1: [("t.py::a", CaseKind.PASSED, "", "", None),
        ("t.py::b", CaseKind.SKIPPED, "Skipped: needs 4 ranks", "", None),
        ("t.py::c", CaseKind.FAILED, "boom <&>", "trace\x01", "1")],
}

EXPECTED_SUMMARY = (
    "dtensor_attn summary of OUT (2 ranks)\n"
    "rank    passed  failed  errors  skipped  state\n"
    "0            1       0       1        2  stopped early (reason below)\n"
    "1            1       1       0        1  did not finish: ended during t.py::d (call), exit signal 9 SIGKILL\n"
    "FAILED t.py::c: boom <&> (root cause: rank 1)\n"
    "run stopped: stopping the run after t.py::c\n"
    "root cause: rank 1 ended exit signal 9 SIGKILL during t.py::d (call)\n"
).rstrip("\n")

EXPECTED = {
    "rank0.xml": (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<testsuites>\n'
        '<testsuite name="dtensor_attn rank 0" rank="0" world_size="2" hostname="host" timestamp="2024-01-02T03:04:05" tests="4" failures="0" errors="1" skipped="2" time="0.000" collected="4" complete="true" stop_reason="stopping the run after t.py::c">\n'
        '<testcase classname="t" name="a" file="t.py" time="0.500" nodeid="t.py::a" />\n'
        '<testcase classname="t" name="b" file="t.py" time="0.000" nodeid="t.py::b"><skipped message="Skipped: needs 4 ranks" /></testcase>\n'
        '<testcase classname="t" name="c" file="t.py" time="0.100" nodeid="t.py::c"><properties><property name="dtensor_attn_root_cause_ranks" value="1" /></properties><error message="boom &lt;&amp;&gt;">trace?</error></testcase>\n'
        '<testcase classname="t" name="d" file="t.py" time="0.000" nodeid="t.py::d"><skipped message="not run: the run stopped: stopping the run after t.py::c">the run stopped: stopping the run after t.py::c</skipped></testcase>\n'
        '</testsuite>\n'
        '</testsuites>\n'
    ),
    "rank1.xml": (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<testsuites>\n'
        '<testsuite name="dtensor_attn rank 1" rank="1" world_size="2" hostname="host" timestamp="2024-01-02T03:04:05">\n'
        '<testcase classname="t" name="a" file="t.py" time="0.500" nodeid="t.py::a" />\n'
        '<testcase classname="t" name="b" file="t.py" time="0.000" nodeid="t.py::b"><skipped message="Skipped: needs 4 ranks" /></testcase>\n'
        '<testcase classname="t" name="c" file="t.py" time="0.100" nodeid="t.py::c"><properties><property name="dtensor_attn_root_cause_ranks" value="1" /></properties><failure message="boom &lt;&amp;&gt;">trace?</failure></testcase>\n'
        '<testcase classname="t" name="d" file="t.py" time="0.000" nodeid="t.py::d" unfinished="true"><error message="rank 1 ended during this test without recording its result: killed, exited, or stopped by torchrun (see rank1.log)">rank 1 ended during this test without recording its result: killed, exited, or stopped by torchrun (see rank1.log); the launcher\'s junit.xml has the whole run</error></testcase>\n'
        '</testsuite>\n'
        '</testsuites>\n'
    ),
    "junit.xml": (
        '<?xml version="1.0" encoding="utf-8"?>\n'
        '<testsuites>\n'
        '<testsuite name="dtensor_attn torchrun, 2 ranks" tests="4" failures="0" errors="1" skipped="2" time="0.600" timestamp="2024-01-02T03:04:05" hostname="host" world_size="2" complete="false" stop_reason="stopping the run after t.py::c">\n'
        '<testcase classname="t" name="a" file="t.py" time="0.500" nodeid="t.py::a" />\n'
        '<testcase classname="t" name="b" file="t.py" time="0.000" nodeid="t.py::b"><skipped message="Skipped: needs 4 ranks" /></testcase>\n'
        '<testcase classname="t" name="c" file="t.py" time="0.100" nodeid="t.py::c"><properties><property name="dtensor_attn_root_cause_ranks" value="1" /></properties><error message="boom &lt;&amp;&gt;">trace?</error></testcase>\n'
        '<testcase classname="t" name="d" file="t.py" time="0.000" nodeid="t.py::d"><skipped message="not run: the run stopped: stopping the run after t.py::c">the run stopped: stopping the run after t.py::c</skipped></testcase>\n'
        '</testsuite>\n'
        '</testsuites>\n'
    ),
}


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    fixed = types.SimpleNamespace(strftime=lambda fmt: "2024-01-02T03:04:05",
                                  monotonic=lambda: 5.0, time=lambda: 0.0)
    for module in (junit, run_junit):
        monkeypatch.setattr(module, "time", fixed)
        monkeypatch.setattr(module, "socket", types.SimpleNamespace(gethostname=lambda: "host"))
    for rank, cases in RANK_CASES.items():
        (tmp_path / f"rank{rank}.collected.txt").write_text("".join(f"{n}\n" for n in TESTS))
        writer = JUnitWriter(tmp_path / f"rank{rank}.xml", rank=rank, world_size=2)
        writer.expect(TESTS)
        for nodeid, kind, message, text, root in cases:
            writer.add(nodeid, outcome=kind, seconds=0.5 if kind is CaseKind.PASSED else
                       0.1 if kind.is_problem else 0.0, message=message, text=text,
                       properties={summary.ROOT_CAUSE_PROPERTY: root} if root else None)
        (tmp_path / f"rank{rank}.log").write_text(
            f"[dtensor_attn 01:02:03.004 rank {rank}] start call t.py::d\n")
        if rank == 0:
            writer.close(collected=4, stop_reason="stopping the run after t.py::c")
        else:
            writer.begin_test("t.py::d")  # then SIGKILLed: no close
    (tmp_path / "console.log").write_text("  rank      : 1 (local_rank: 1)\n"
                                          "  exitcode  : -9 (pid: 3)\n")
    return tmp_path


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_junit_files_are_byte_for_byte_what_they_were(run_dir, name):
    run_junit.write_for(run_dir)
    assert (run_dir / name).read_bytes() == "".join(EXPECTED[name]).encode()


def test_the_summary_is_word_for_word_what_it_was(run_dir):
    text, status = summary.summarize(run_dir)
    assert text.replace(str(run_dir), "OUT") == "".join(EXPECTED_SUMMARY)
    assert status == 1
