"""The harness's outcomes (outcome.py): typed values whose strings are what the files hold.

The store, the per-rank and run-level JUnit files and the summaries were written with these
strings before the enums existed; these tests pin the strings, the JUnit tag mapping, the
order of severity, and that the launcher's stdlib-only scripts still import without torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from dtensor_attn.testing.harness.agreement import RankReport, Verdict
from dtensor_attn.testing.harness.junit import case_xml
from dtensor_attn.testing.harness.outcome import RESULT_TAGS, CaseKind, Outcome
from dtensor_attn.testing.harness.summary import Case
from dtensor_attn.testing.harness.watchdog import PeerEvent

HARNESS_DIR = Path(__file__).resolve().parents[2] / "dtensor_attn" / "testing" / "harness"

# The strings each value is written as: the store's reports, JUnit files, summaries (by hand).
OUTCOME_STRINGS = {
    Outcome.PASSED: "passed", Outcome.SKIPPED: "skipped", Outcome.FAILED: "failed",
    Outcome.HUNG: "hung", Outcome.STUCK: "stuck", Outcome.SILENT: "silent",
}
CASE_STRINGS = {
    CaseKind.PASSED: "passed", CaseKind.SKIPPED: "skipped", CaseKind.FAILED: "failed",
    CaseKind.ERROR: "error",
}
# JUnit's child element per kind (pytest's junitxml writes the same tags).
CASE_TAGS = {CaseKind.PASSED: None, CaseKind.SKIPPED: "skipped", CaseKind.FAILED: "failure",
             CaseKind.ERROR: "error"}
ALL_VALUES = [*OUTCOME_STRINGS.items(), *CASE_STRINGS.items()]


def _id(value) -> str:
    return f"{type(value).__name__}.{value.name}" if hasattr(value, "name") else str(value)


def test_every_member_is_listed_here():
    assert set(Outcome) == set(OUTCOME_STRINGS) and set(CaseKind) == set(CASE_STRINGS)


@pytest.mark.parametrize("member,text", ALL_VALUES, ids=[_id(m) for m, _ in ALL_VALUES])
def test_a_member_writes_as_its_string_everywhere(member, text):
    assert member == text and member.value == text
    assert (str(member), f"{member}", f"{member:>8}", "%s" % member) == (
        text, text, f"{text:>8}", text)
    assert json.dumps(member) == json.dumps(text)
    assert json.dumps({member: 1}) == json.dumps({text: 1})  # summary totals are keyed by it
    assert {text: 7}[member] == 7 and {member: 7}[text] == 7  # hashes alike
    element = ET.Element("e", {"a": member})
    assert ET.tostring(element) == f'<e a="{text}" />'.encode()
    assert type(member)(text) is member


@pytest.mark.parametrize("enum_type", [Outcome, CaseKind], ids=lambda t: t.__name__)
def test_an_unknown_string_is_refused(enum_type):
    with pytest.raises(ValueError):
        enum_type("timeout")


def test_problems_and_divergence_follow_the_agreement_rules():
    # agreement.py: failed, hung, stuck or silent on any rank fails the phase on every rank;
    # a rank that failed, hung or went silent left the phase itself (stuck ranks wait on it).
    assert {o for o in Outcome if o.is_problem} == {
        Outcome.FAILED, Outcome.HUNG, Outcome.STUCK, Outcome.SILENT}
    assert {o for o in Outcome if o.diverged} == {Outcome.FAILED, Outcome.HUNG, Outcome.SILENT}
    assert {k for k in CaseKind if k.is_problem} == {CaseKind.FAILED, CaseKind.ERROR}


@pytest.mark.parametrize("kind", list(CaseKind), ids=_id)
def test_the_tag_of_a_kind_reads_back_as_that_kind(kind):
    assert kind.tag == CASE_TAGS[kind]
    assert CaseKind.from_tag(kind.tag) is kind


def test_result_tags_are_the_tags_of_every_kind_but_passed():
    assert sorted(RESULT_TAGS) == sorted(t for t in CASE_TAGS.values() if t is not None)


@pytest.mark.parametrize("tag", ["testcase", "properties", "system-out", "Failure", ""])
def test_a_tag_that_is_no_result_has_no_kind(tag):
    with pytest.raises(KeyError):
        CaseKind.from_tag(tag)


@pytest.mark.parametrize("when,kind", [("setup", CaseKind.ERROR), ("call", CaseKind.FAILED),
                                       ("teardown", CaseKind.ERROR)])
def test_a_failed_call_is_a_failure_and_a_failed_fixture_an_error(when, kind):
    assert CaseKind.of_failed_phase(when) is kind


def test_severity_orders_passed_skipped_failed_error():
    ordered = sorted(CaseKind, key=lambda k: k.severity)
    assert ordered == [CaseKind.PASSED, CaseKind.SKIPPED, CaseKind.FAILED, CaseKind.ERROR]
    assert len({k.severity for k in CaseKind}) == len(CaseKind)  # a strict order


@pytest.mark.parametrize("kind", list(CaseKind), ids=_id)
def test_case_xml_writes_the_kinds_tag_and_nothing_else(kind):
    case = ET.fromstring(case_xml("t.py::x", outcome=kind, seconds=0.25, message="m", text="t"))
    assert [child.tag for child in case] == ([] if kind.tag is None else [kind.tag])
    if kind.tag is not None:
        assert (case[0].get("message"), case[0].text) == ("m", "t")


@pytest.mark.parametrize("text", ["passed", "failed", "skipped", "hung", "stuck", "silent"])
def test_a_rank_report_from_the_store_carries_the_typed_outcome(text):
    raw = json.dumps({"rank": 2, "outcome": text, "at": 1.5, "text": "", "counts": []})
    report = RankReport.from_json(raw)
    assert report.outcome is Outcome(text)
    assert json.loads(report.to_json())["outcome"] == text  # written back as the same string


def test_values_built_from_strings_hold_the_enum_and_refuse_unknown_strings():
    assert RankReport(rank=0, outcome="stuck", at=0.0).outcome is Outcome.STUCK
    assert PeerEvent("silent", 1).kind is Outcome.SILENT
    assert Case("t.py::x", "error").kind is CaseKind.ERROR
    for build in (lambda: RankReport(rank=0, outcome="boom", at=0.0),
                  lambda: PeerEvent("gone", 1), lambda: Case("t.py::x", "failure")):
        with pytest.raises(ValueError):
            build()


def test_a_verdict_outcome_compares_with_its_string():
    assert Verdict(outcome=Outcome.FAILED).outcome == "failed"


def test_kinds_and_outcomes_share_the_strings_they_have_in_common():
    common = set(OUTCOME_STRINGS.values()) & set(CASE_STRINGS.values())
    assert common == {"passed", "skipped", "failed"}
    for text in common:
        assert Outcome(text) == CaseKind(text)


@pytest.mark.parametrize("script", ["outcome.py", "junit.py", "summary.py", "run_junit.py"])
def test_the_launchers_scripts_import_as_siblings_without_torch(script):
    """scripts/run_torchrun.sh runs summary.py and run_junit.py by path: they, and what they
    import, must not pull in torch (or the package, whose __init__ does)."""
    probe = (f"import runpy, sys; sys.path.insert(0, {str(HARNESS_DIR)!r}); "
             f"runpy.run_path({str(HARNESS_DIR / script)!r}, run_name='probe'); "
             "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('dtensor_attn')); "
             "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, cwd=HARNESS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_outcome_string_is_compared_outside_its_home():
    """One home: the harness compares outcomes as enum members, never as string literals."""
    words = sorted({*OUTCOME_STRINGS.values(), *CASE_STRINGS.values()})
    patterns = [f'{op} "{w}"' for w in words for op in ("==", "!=")]
    patterns += [f'outcome="{w}"' for w in words] + [f'"{w}": 0' for w in words]
    offenders = []
    for path in sorted(HARNESS_DIR.glob("*.py")):
        if path.name == "outcome.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            offenders += [f"{path.name}:{number}: {line.strip()}" for p in patterns if p in line]
    assert not offenders, "\n".join(offenders)

