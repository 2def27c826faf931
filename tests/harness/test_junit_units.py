"""JUnit pieces (junit.py) as values: the case of a test from its phases, exhaustively, the
writer's tallies against a brute-force count, node ids, and the characters XML cannot hold."""

from __future__ import annotations

import itertools
import random
import xml.etree.ElementTree as ET

import pytest

from dtensor_attn.testing.harness.junit import (
    HARNESS, JUnitWriter, _clean, _split_nodeid, case_from_reports, case_xml, junit_path,
)
from dtensor_attn.testing.harness.outcome import CaseKind

NODE = "tests/a.py::test_x"


def _report(when, outcome, text=""):
    longrepr = None
    if outcome == "failed":
        longrepr = text
    elif outcome == "skipped":
        longrepr = ("tests/a.py", 3, f"Skipped: {text}")
    return pytest.TestReport(NODE, ("tests/a.py", 3, "test_x"), {}, outcome, longrepr, when,
                             duration=0.125)


# Every sequence of phases pytest can report: a setup, then a call only after a passed setup,
# then a teardown.
SEQUENCES = [
    [("setup", s), *([("call", c)] if s == "passed" else []), ("teardown", t)]
    for s in ("passed", "failed", "skipped")
    for c in ("passed", "failed", "skipped")
    for t in ("passed", "failed")
]


def expected_case(phases):
    """pytest's junitxml rule, written out: the first failure decides (call: failure, setup or
    teardown: error); else a skip; else passed."""
    for when, outcome in phases:
        if outcome == "failed":
            return ("failed" if when == "call" else "error"), f"{when} boom"
    for when, outcome in phases:
        if outcome == "skipped":
            return "skipped", f"Skipped: {when} skip"
    return "passed", ""


@pytest.mark.parametrize("phases", SEQUENCES,
                         ids=["-".join(f"{w}:{o}" for w, o in p) for p in SEQUENCES])
def test_case_from_every_phase_sequence(phases):
    reports = [_report(when, outcome, f"{when} {'boom' if outcome == 'failed' else 'skip'}")
               for when, outcome in phases]
    case = case_from_reports(reports)
    kind, message = expected_case(phases)
    assert (case["outcome"], case["message"]) == (kind, message)
    assert case["outcome"] is CaseKind(kind)
    assert case["seconds"] == 0.125 * len(phases)
    failed = [when for when, outcome in phases if outcome == "failed"]
    assert case["text"] == "\n\n".join(f"--- {w} ---\n{w} boom" for w in failed)


def test_a_failure_keeps_the_first_message_and_every_phases_text():
    reports = [_report("setup", "passed"), _report("call", "failed", "first line\nsecond"),
               _report("teardown", "failed", "teardown boom")]
    case = case_from_reports(reports)
    assert (case["outcome"], case["message"]) == (CaseKind.FAILED, "first line")
    assert case["text"] == "--- call ---\nfirst line\nsecond\n\n--- teardown ---\nteardown boom"


def test_properties_of_every_phase_are_kept_as_strings():
    reports = [_report("setup", "passed"), _report("call", "passed"), _report("teardown", "passed")]
    reports[0].user_properties.append(("a", 1))
    reports[2].user_properties.append(("b", "x"))
    assert case_from_reports(reports)["properties"] == {"a": "1", "b": "x"}


@pytest.mark.parametrize("nodeid,classname,name", [
    ("tests/a.py::test_x", "tests.a", "test_x"),
    ("tests/a.py::C::test_x[p-1]", "tests.a.C", "test_x[p-1]"),
    ("a.py::C::D::t", "a.C.D", "t"),
    ("dtensor_attn::no_test_ran", "dtensor_attn", "no_test_ran"),
    ("dtensor_attn::collection_error[tests/b.py]", "dtensor_attn", "collection_error[tests/b.py]"),
    ("deep/er/path/t.py::t[a/b]", "deep.er.path.t", "t[a/b]"),
], ids=["function", "method-param", "nested", "harness", "harness-bracket", "slash-in-param"])
def test_node_ids_split_as_pytest_names_them(nodeid, classname, name):
    assert _split_nodeid(nodeid) == (classname, name)
    case = ET.fromstring(case_xml(nodeid, outcome=CaseKind.PASSED, seconds=1.0))
    assert (case.get("classname"), case.get("name"), case.get("file"), case.get("nodeid"),
            case.get("time")) == (classname, name, nodeid.split("::")[0], nodeid, "1.000")


@pytest.mark.parametrize("code", range(0x20), ids=lambda c: f"0x{c:02x}")
def test_only_the_characters_xml_forbids_are_replaced(code):
    char = chr(code)
    allowed = char in "\t\n\r"
    assert _clean(f"a{char}b") == (f"a{char}b" if allowed else "a?b")
    xml = case_xml(NODE, outcome=CaseKind.FAILED, seconds=0.0, message=f"m{char}", text=f"t{char}")
    failure = ET.fromstring(xml).find("failure")  # parses: nothing illegal got through
    assert failure.text.startswith("t")


def test_a_message_is_cut_at_500_characters_and_the_text_is_not():
    xml = case_xml(NODE, outcome=CaseKind.ERROR, seconds=0.0, message="m" * 900, text="t" * 900)
    error = ET.fromstring(xml).find("error")
    assert (len(error.get("message")), len(error.text)) == (500, 900)


def test_junit_path_is_per_rank(tmp_path):
    assert [junit_path(tmp_path, r).name for r in (0, 7, 12)] == ["rank0.xml", "rank7.xml",
                                                                  "rank12.xml"]


@pytest.mark.parametrize("seed", range(6))
def test_writer_tallies_equal_a_brute_force_count(tmp_path, seed):
    rng = random.Random(seed)
    writer = JUnitWriter(tmp_path / "rank0.xml", rank=0, world_size=1)
    added = []
    for i in range(rng.randint(1, 12)):
        kind = rng.choice(list(CaseKind))
        nodeid = f"{HARNESS}finding{i}" if rng.random() < 0.2 else f"t.py::t{i}"
        reason = rng.choice(["a", "b"])
        writer.add(nodeid, outcome=kind, seconds=0.0, message=f"Skipped: {reason}")
        added.append((nodeid, kind, reason))
    tests = [(n, k, r) for n, k, r in added if not n.startswith(HARNESS)]
    assert dict(writer.counts) == {k: n for k in CaseKind
                                   if (n := sum(kind is k for _, kind, _ in added))}
    assert writer.num_ran == sum(k is not CaseKind.SKIPPED for _, k, _ in tests)
    skips = {}
    for _, kind, reason in tests:
        if kind is CaseKind.SKIPPED:
            skips[reason] = skips.get(reason, 0) + 1
    assert dict(writer.skip_reasons) == skips
    writer.close(collected=len(added))
    suite = ET.parse(tmp_path / "rank0.xml").getroot().find("testsuite")
    kinds = [k for _, k, _ in added]
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors"), suite.get("skipped")) == (
        str(len(kinds)), str(kinds.count(CaseKind.FAILED)), str(kinds.count(CaseKind.ERROR)),
        str(kinds.count(CaseKind.SKIPPED)))


@pytest.mark.parametrize("recorded", list(itertools.product([False, True], repeat=3)),
                         ids=lambda r: "".join("R" if x else "-" for x in r))
def test_close_lists_exactly_the_tests_never_recorded_as_not_run(tmp_path, recorded):
    nodeids = ["t.py::a", "t.py::b", "t.py::c"]
    writer = JUnitWriter(tmp_path / "rank1.xml", rank=1, world_size=2)
    writer.expect(nodeids)
    for nodeid, done in zip(nodeids, recorded):
        if done:
            writer.add(nodeid, outcome=CaseKind.PASSED, seconds=0.0)
    writer.close(collected=3, stop_reason="stopping: rank 0 hung\nmore")
    cases = {c.get("nodeid"): c for c in ET.parse(tmp_path / "rank1.xml").getroot().iter("testcase")}
    assert list(cases) == [n for n, d in zip(nodeids, recorded) if d] + [
        n for n, d in zip(nodeids, recorded) if not d]
    for nodeid, done in zip(nodeids, recorded):
        skipped = cases[nodeid].find("skipped")
        assert (skipped is None) == done
        if not done:
            assert skipped.get("message") == "not run: the run stopped: stopping: rank 0 hung"
    assert writer.num_ran == sum(recorded)  # the not-run tests are not counted as run
