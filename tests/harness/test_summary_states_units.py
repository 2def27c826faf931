"""``summarize``: the state each rank ends in, the exit status, and the FAILED, "run stopped" and
"root cause" lines, from hand-written rank files (the JUnit layout of docs/harness.md) and
torchrun's console report; ``no_test_ran``'s message; ``main``'s output and exit status."""

from __future__ import annotations

from xml.sax.saxutils import quoteattr

import pytest

from dtensor_attn.testing.harness.summary import ROOT_CAUSE_PROPERTY, main, no_test_ran, summarize

TAGS = {"failed": "failure", "error": "error", "skipped": "skipped"}


def case_xml(nodeid: str, kind: str, message: str = "", root: str | None = None) -> str:
    props = (f'<properties><property name="{ROOT_CAUSE_PROPERTY}" value="{root}" /></properties>'
             if root else "")
    child = f"<{TAGS[kind]} message={quoteattr(message)} />" if kind in TAGS else ""
    return f'<testcase nodeid="{nodeid}" time="0.1">{props}{child}</testcase>'


def write_rank(out, rank, cases=(), *, complete=True, world_size=2, collected=None, stop=""):
    """rank<r>.xml with ``cases`` as (nodeid, kind, message, root) tuples."""
    collected = len(cases) if collected is None else collected
    stop_attr = f" stop_reason={quoteattr(stop)}" if stop else ""
    body = "".join(case_xml(*c) for c in cases)
    (out / f"rank{rank}.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?>\n<testsuites>'
        f'<testsuite name="rank {rank}" world_size="{world_size}" collected="{collected}" '
        f'complete="{"true" if complete else "false"}"{stop_attr}>{body}</testsuite></testsuites>\n')


def console(out, codes):
    """torchrun's failure report for ``{rank: exit code}``."""
    (out / "console.log").write_text("Failures:\n" + "".join(
        f"  rank      : {r} (local_rank: {r})\n  exitcode  : {c} (pid: 1{r})\n" for r, c in codes.items()))


def row(rank, passed, failed, errors, skipped, state):
    """One line of the table, columns as wide as the header's (docs/harness.md)."""
    return f"{rank:<6}{passed:>8}{failed:>8}{errors:>8}{skipped:>9}  {state}"


PASSED_A = ("t.py::a", "passed", "", None)
LOG_IN_B = "[dtensor_attn 01:02:03.004 rank 1] start call t.py::b\n"
SIGKILL = ", exit signal 9 SIGKILL"
SIGTERM = ", exit signal 15 SIGTERM (torchrun stops the rest once one fails)"

# rank 1's files -> its state, the run's status, the lines after the table (rank 0 passed t.py::a)
STATES = [
    ("finished", dict(), None, "", "finished", 0, []),
    ("stopped-early", dict(stop="collections differ"), None, "",
     "stopped early (reason below)", 1, ["run stopped: collections differ"]),
    ("ended-before-its-first-test", dict(complete=False, cases=()), None, "",
     "did not finish: ended during before its first test", 1, []),
    ("killed-in-a-test", dict(complete=False), -9, LOG_IN_B,
     f"did not finish: ended during t.py::b (call){SIGKILL}", 1,
     ["root cause: rank 1 ended exit signal 9 SIGKILL during t.py::b (call)"]),
    ("stopped-by-torchrun", dict(complete=False), -15, LOG_IN_B,
     f"did not finish: ended during t.py::b (call){SIGTERM}", 1, []),
    ("exited-1-by-the-harness", dict(complete=False), 1, LOG_IN_B,
     "did not finish: ended during t.py::b (call), exit code 1", 1, []),
    ("exited-2-by-itself", dict(complete=False), 2, LOG_IN_B,
     "did not finish: ended during t.py::b (call), exit code 2", 1,
     ["root cause: rank 1 ended exit code 2 during t.py::b (call)"]),
    ("collected-nothing", dict(cases=(), collected=0), None, "", "finished, no tests collected", 1, []),
    ("finished-but-exited-0", dict(), 0, "", "finished, exit code 0", 0, []),
]


@pytest.mark.parametrize("files,code,log,state,status,tail", [s[1:] for s in STATES],
                         ids=[s[0] for s in STATES])
def test_the_state_of_a_rank_and_the_runs_status(tmp_path, files, code, log, state, status, tail):
    write_rank(tmp_path, 0, [PASSED_A])
    cases = files.pop("cases", [PASSED_A])
    write_rank(tmp_path, 1, cases, **files)
    (tmp_path / "rank1.log").write_text(log)
    if code is not None:
        console(tmp_path, {1: code})
    text, got_status = summarize(tmp_path)
    lines = text.splitlines()
    assert lines[0] == f"dtensor_attn summary of {tmp_path} (2 ranks)"
    assert lines[1] == "rank    passed  failed  errors  skipped  state"
    assert lines[2] == row(0, 1, 0, 0, 0, "finished")
    assert lines[3] == row(1, len(cases), 0, 0, 0, state)
    assert lines[4:] == tail
    assert got_status == status


def test_counts_per_kind_and_a_failed_test_named_with_its_root_cause(tmp_path):
    write_rank(tmp_path, 0, [PASSED_A, ("t.py::b", "failed", "assert 1 == 2\nmore text", "1"),
                             ("t.py::c", "error", "fixture broke", None),
                             ("t.py::d", "skipped", "needs 4 ranks", None)])
    write_rank(tmp_path, 1, [PASSED_A, ("t.py::b", "failed", "rank 1 failed it (root cause)", "1"),
                             ("t.py::c", "passed", "", None), ("t.py::d", "skipped", "x", None)])
    text, status = summarize(tmp_path)
    assert status == 1
    assert text.splitlines()[2:] == [
        row(0, 1, 1, 1, 1, "finished"),
        row(1, 2, 1, 0, 1, "finished"),
        # rank 0's message, first line only; the root cause is added once, not when already said
        "FAILED t.py::b: assert 1 == 2 (root cause: rank 1)",
        "FAILED t.py::c: fixture broke",
    ]


@pytest.mark.parametrize("roots,expected", [
    ((None, "1"), "FAILED t.py::b: from rank 1 (root cause: rank 1)"),  # the agreed verdict wins
    (("0", None), "FAILED t.py::b: from rank 0 (root cause: rank 0)"),  # a later local note does not
    ((None, None), "FAILED t.py::b: from rank 0"),  # neither knows: the first rank's words
    (("0", "1"), "FAILED t.py::b: from rank 0 (root cause: rank 0)"),  # both know: the first
], ids=["later-knows", "earlier-knows", "neither", "both"])
def test_which_ranks_words_a_failure_is_reported_with(tmp_path, roots, expected):
    for rank, root in enumerate(roots):
        write_rank(tmp_path, rank, [("t.py::b", "failed", f"from rank {rank}", root)])
    text, status = summarize(tmp_path)
    assert status == 1
    assert [line for line in text.splitlines() if line.startswith("FAILED")] == [expected]


def test_one_stop_reason_shared_by_ranks_is_said_once(tmp_path):
    write_rank(tmp_path, 0, [PASSED_A], stop="timeout")
    write_rank(tmp_path, 1, [PASSED_A], stop="timeout")
    write_rank(tmp_path, 2, [PASSED_A], world_size=3, stop="rank 2 hung")
    text, status = summarize(tmp_path)
    assert status == 1
    assert text.splitlines()[-2:] == ["run stopped: timeout", "run stopped: rank 2 hung"]
    assert text.splitlines()[0].endswith("(3 ranks)")


@pytest.mark.parametrize("present,world_size,expected_ranks", [
    ((0,), 3, 3),  # the file says 3: ranks 1 and 2 never started
    ((0, 3), 2, 4),  # a rank3.xml means at least 4 ranks, whatever the files say
], ids=["from-the-files-world-size", "from-the-highest-rank-file"])
def test_the_world_size_covers_every_rank_that_should_have_a_file(tmp_path, present, world_size,
                                                                  expected_ranks):
    for rank in present:
        write_rank(tmp_path, rank, [PASSED_A], world_size=world_size)
    text, status = summarize(tmp_path)
    never = [r for r in range(expected_ranks) if r not in present]
    assert status == 1
    assert text.splitlines()[0].endswith(f"({expected_ranks} ranks)")
    assert [line for line in text.splitlines() if "never started" in line] == [
        f"{r:<6}  no JUnit file: the rank never started" for r in never]


def test_a_never_started_rank_still_shows_torchruns_exit(tmp_path):
    write_rank(tmp_path, 0, [PASSED_A])
    console(tmp_path, {1: -9})
    text, _ = summarize(tmp_path)
    assert text.splitlines()[3] == f"1       no JUnit file: the rank never started{SIGKILL}"


def test_an_unreadable_file_is_a_failed_rank_with_the_parse_error(tmp_path):
    write_rank(tmp_path, 0, [PASSED_A])
    (tmp_path / "rank1.xml").write_text("<testsuites><testsuite")
    text, status = summarize(tmp_path)
    assert status == 1
    line = text.splitlines()[3]
    assert line.startswith("1       ") and "line 1" in line  # ElementTree's words, not a traceback


def test_one_nodes_ranks_only(tmp_path):
    write_rank(tmp_path, 2, [PASSED_A], world_size=4)
    write_rank(tmp_path, 3, [PASSED_A], world_size=4)
    text, status = summarize(tmp_path, this_node_only=True)
    assert (status, text.splitlines()[2:]) == (0, [row(2, 1, 0, 0, 0, "finished"),
                                                   row(3, 1, 0, 0, 0, "finished")])


@pytest.mark.parametrize("num_collected,reasons,lines", [
    (0, {}, ["no test ran under torchrun: no tests collected; tests without"]),
    (5, {"no mesh marker": 2, "needs 8 ranks": 3, "a reason": 2}, [
        "no test ran under torchrun: 5 collected, every one skipped on every rank; tests without",
        "  3 skipped: needs 8 ranks", "  2 skipped: a reason", "  2 skipped: no mesh marker"]),
], ids=["nothing-collected", "all-skipped-most-common-reason-first"])
def test_a_run_that_tested_nothing_says_why_and_how_to_fix_it(num_collected, reasons, lines):
    text = no_test_ran(num_collected, reasons).splitlines()
    assert text[0].startswith(lines[0])
    assert text[0].endswith("--dtensor-unmarked=run. A run that tests nothing is not a pass "
                            "(pytest exits 5 when nothing ran).")
    assert text[1:-1] == lines[1:]
    assert text[-1].startswith("Fix: scripts/run_torchrun.sh ... -- --dtensor-unmarked=run")


@pytest.mark.parametrize("failing", [False, True], ids=["passing", "failing"])
def test_main_prints_the_summary_and_exits_with_its_status(tmp_path, capsys, failing):
    write_rank(tmp_path, 0, [("t.py::a", "failed" if failing else "passed", "boom", None)], world_size=1)
    assert main([str(tmp_path)]) == int(failing)
    out = capsys.readouterr().out
    assert out.splitlines()[0] == f"dtensor_attn summary of {tmp_path} (1 ranks)"
    assert ("FAILED t.py::a: boom" in out) is failing
