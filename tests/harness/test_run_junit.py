"""The launcher's run-level JUnit file (run_junit.py), from the files ranks leave behind.

Each test writes the files a run of two ranks would leave (per-rank JUnit through the same
writer the ranks use, logs, collected lists, torchrun's console report) and reads back what CI
would read. The planted torchrun suites check the same files end to end.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from dtensor_attn.testing.harness.junit import JUnitWriter
from dtensor_attn.testing.harness.run_junit import main, run_cases, write_for
from dtensor_attn.testing.harness.summary import ROOT_CAUSE_PROPERTY, Case, no_test_ran

TESTS = ["t.py::a", "t.py::b", "t.py::c"]
SCRIPT = Path(__file__).resolve().parents[2] / "dtensor_attn" / "testing" / "harness" / "run_junit.py"


def _rank(out: Path, rank: int, *, collected=TESTS, cases=(), in_flight=None, close=None):
    """One rank's files: cases [(nodeid, outcome, message, root)], then either a test in flight
    (the rank was killed: no close) or a close (kwargs of JUnitWriter.close)."""
    (out / f"rank{rank}.collected.txt").write_text("".join(f"{n}\n" for n in collected))
    writer = JUnitWriter(out / f"rank{rank}.xml", rank=rank, world_size=2)
    writer.expect(collected)
    log = [f"rank {rank} log"]
    for nodeid, outcome, message, root in cases:
        log.append(f"[dtensor_attn 01:02:03.004 rank {rank}] start call {nodeid}")
        writer.add(nodeid, outcome=outcome, seconds=0.5, message=message,
                   properties={ROOT_CAUSE_PROPERTY: root} if root else None)
    if in_flight:
        log.append(f"[dtensor_attn 01:02:03.004 rank {rank}] start call {in_flight}")
        writer.begin_test(in_flight)
    if close is not None:
        writer.close(collected=len(collected), **close)
    (out / f"rank{rank}.log").write_text("\n".join(log) + "\n")


def _run_junit(out: Path, **kwargs) -> tuple[ET.Element, dict[str, tuple[str, str]]]:
    """(the <testsuite>, {nodeid: (outcome, message)}) of the written run-level file."""
    write_for(out, **kwargs)
    (suite,) = ET.parse(out / "junit.xml").getroot().iter("testsuite")
    cases = {}
    for case in suite.iter("testcase"):
        child = next((c for c in case if c.tag != "properties"), None)
        cases[case.get("nodeid")] = ("passed", "") if child is None else (
            child.tag, child.get("message"))
    return suite, cases


TORCHRUN_REPORT = """Failures:
[1]:
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 7692)  (SIGTERM)
Root Cause (first observed failure):
[0]:
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 7693)  (SIGKILL)
"""


def test_a_killed_run_is_red_naming_the_killed_rank_and_lists_every_collected_test(tmp_path):
    # Rank 1 SIGKILLed itself in the call of b; torchrun then SIGTERMed rank 0, also in b.
    for rank in (0, 1):
        _rank(tmp_path, rank, cases=[("t.py::a", "passed", "", None)], in_flight="t.py::b")
    (tmp_path / "console.log").write_text(TORCHRUN_REPORT)
    suite, cases = _run_junit(tmp_path)
    assert cases == {
        "t.py::a": ("passed", ""),
        "t.py::b": ("error", "no rank recorded a result: rank 1 ended during the call of "
                    "t.py::b, exit signal 9 SIGKILL (root cause); rank 0 ended during the call "
                    "of t.py::b, exit signal 15 SIGTERM (torchrun stops the rest once one "
                    "fails)"),
        "t.py::c": ("skipped", "not run: rank 1 ended during the call of t.py::b, exit signal 9 "
                    "SIGKILL"),
    }
    assert {k: suite.get(k) for k in ("tests", "failures", "errors", "skipped", "complete")} == {
        "tests": "3", "failures": "0", "errors": "1", "skipped": "1", "complete": "false"}
    root = suite.find("testcase[@name='b']/properties/property")
    assert (root.get("name"), root.get("value")) == (ROOT_CAUSE_PROPERTY, "1")


def test_a_run_that_stopped_keeps_the_agreed_verdict_and_the_not_run_tests(tmp_path):
    # Rank 1 went silent in b (os._exit): rank 0 recorded the agreed verdict and stopped.
    verdict = "failed in call on rank 1 first (root cause); every rank fails it."
    stop = "stopping the run after t.py::b (call): rank 1 silent"
    _rank(tmp_path, 0, cases=[("t.py::a", "passed", "", None), ("t.py::b", "failed", verdict,
                                                                "1")],
          close={"stop_reason": stop})
    _rank(tmp_path, 1, cases=[("t.py::a", "passed", "", None)], in_flight="t.py::b")
    suite, cases = _run_junit(tmp_path)
    assert cases == {"t.py::a": ("passed", ""), "t.py::b": ("failure", verdict),
                     "t.py::c": ("skipped", f"not run: the run stopped: {stop}")}
    assert suite.get("stop_reason") == stop and suite.get("complete") == "false"


def test_a_collection_mismatch_is_a_failure_and_every_test_of_any_rank_is_listed(tmp_path):
    difference = "ranks collected different tests, so their collectives would not pair up:"
    for rank, collected in ((0, TESTS), (1, [*TESTS, "t.py::only_on_1"])):
        _rank(tmp_path, rank, collected=collected,
              cases=[("dtensor_attn::collection", "failed", difference, None)],
              close={"stop_reason": difference})
    _, cases = _run_junit(tmp_path)
    assert list(cases) == ["dtensor_attn::collection", *TESTS, "t.py::only_on_1"]
    assert cases["dtensor_attn::collection"] == ("failure", difference)
    assert {outcome for outcome, _ in list(cases.values())[1:]} == {"skipped"}


def test_a_rank_without_files_and_a_run_without_any_are_errors(tmp_path):
    _rank(tmp_path, 1, cases=[(n, "passed", "", None) for n in TESTS], close={})
    _, cases = _run_junit(tmp_path)
    assert cases["dtensor_attn::rank0_never_started"][0] == "error"
    assert _run_junit(tmp_path, this_node_only=True)[1] == {n: ("passed", "") for n in TESTS}
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run_junit(empty)[1] == {"dtensor_attn::run": (
        "error", f"no rank left its files in {empty}: the run never started (see console.log)")}


def test_the_launchers_note_is_the_reason_for_tests_never_reached(tmp_path):
    for rank in (0, 1):
        _rank(tmp_path, rank, cases=[("t.py::a", "passed", "", None)], in_flight="t.py::b")
    note = "the run exceeded --run-timeout 12 s and was stopped"
    _, cases = _run_junit(tmp_path, note=note)
    assert cases["t.py::c"] == ("skipped", f"not run: {note}")


def test_a_finished_green_run_is_green(tmp_path):
    for rank in (0, 1):
        _rank(tmp_path, rank, cases=[(n, "passed", "", None) for n in TESTS], close={})
    suite, cases = _run_junit(tmp_path)
    assert cases == {n: ("passed", "") for n in TESTS}
    assert (suite.get("complete"), suite.get("failures"), suite.get("errors")) == (
        "true", "0", "0")


def test_the_worst_recorded_outcome_wins_and_carries_the_root_cause():
    ranks = {0: {"complete": True, "cases": {"t.py::a": Case("t.py::a", "passed")}},
             1: {"complete": False, "cases": {"t.py::a": Case("t.py::a", "failed", "x", root="1")}}}
    cases, stop = run_cases({0: ["t.py::a"]}, ranks, {}, {})
    assert cases == [Case("t.py::a", "failed", "x", root="1")] and stop == "rank 1 ended before " \
                                                                           "its first test"


def test_no_test_ran_names_the_option_and_the_reasons():
    text = no_test_ran(3, {"no mesh marker: runs in simulation": 2, "mesh tp=4 needs 4 ranks": 1})
    first, *rest = text.splitlines()
    assert first.startswith("no test ran under torchrun: 3 collected, every one skipped on every "
                            "rank; tests without a mesh marker skip here unless "
                            "--dtensor-unmarked=run.")
    assert rest[:2] == ["  2 skipped: no mesh marker: runs in simulation",
                        "  1 skipped: mesh tp=4 needs 4 ranks"]
    assert rest[2].startswith("Fix: scripts/run_torchrun.sh ... -- --dtensor-unmarked=run")
    assert no_test_ran(0, {}).startswith("no test ran under torchrun: no tests collected;")


def test_the_launcher_runs_it_as_a_script_without_importing_torch(tmp_path):
    for rank in (0, 1):
        _rank(tmp_path, rank, cases=[(n, "passed", "", None) for n in TESTS], close={})
    result = subprocess.run([sys.executable, "-X", "importtime", str(SCRIPT), str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"run-level JUnit (for CI): {tmp_path / 'junit.xml'}\n"
    imported = [line.split("|")[-1].strip() for line in result.stderr.splitlines()]
    assert "junit" in imported and "summary" in imported and "torch" not in imported
    assert main([str(tmp_path)]) == 0
