"""What ``check_attention`` hands back (kit/result.py): a failure's line, the table of failures,
the summary's counts with ``not_exercised`` and ``mask_no_effect``, and the lookups, on a
hand-built result whose every expected line is written out below."""

from __future__ import annotations

import pytest

from dtensor_attn.testing.kit import CaseFailure, CaseOutcome, ConformanceError, ConformanceResult, FailureKind, Status

VALUES = CaseFailure("v-cp2", FailureKind.VALUES, "output (BLNH)", "the float64 reference", "different values",
                     ranks=(1, 3), shard_ranks=(3,), max_err=0.5, detail="ranks [0, 2] hold the right full tensor")
NO_MASK = CaseFailure("v-docs", FailureKind.MASK_NO_EFFECT, "output", "the document-masked reference",
                      "the causal-only result")
PLACED = CaseFailure("v-cp2", FailureKind.PLACEMENTS, "lse", "(S(0), S(2))", "(S(0), S(1))", detail="x " * 150)


def outcome(case_id, status, failures=(), reason=""):
    return CaseOutcome(id=case_id, variant="v", kernel="", mesh="cp2", heads="mha", mask="causal", lse=None,
                       status=status, reason=reason, failures=tuple(failures))


RESULT = ConformanceResult("Mine", (
    outcome("v-cp2", Status.FAIL, (VALUES, PLACED)),
    outcome("v-tp2", Status.PASS),
    outcome("v-docs", Status.FAIL, (NO_MASK,)),
    outcome("v-sdpa-docs", Status.SKIP, reason="no document masks"),
    outcome("v-sdpa-docs-gqa", Status.SKIP, reason="no document masks"),
    outcome("v-big", Status.SKIP, reason="a torch limit"),
    outcome("v-cache", Status.NOT_EXERCISED, reason="every call failed for a fresh subject too"),
))


@pytest.mark.parametrize("failure,line", [
    (VALUES, "v-cp2: values of output (BLNH): expected the float64 reference, actual different values on ranks "
             "[1, 3] (max abs err 5.000e-01); wrong shards on ranks [3]; ranks [0, 2] hold the right full tensor"),
    (NO_MASK, "v-docs: mask_no_effect of output: expected the document-masked reference, actual the causal-only result"),
], ids=["every-part", "bare"])
def test_a_failure_reads_as_one_line(failure, line):
    assert failure.describe() == line


def test_the_summary_counts_every_status_and_lists_what_tested_nothing():
    assert RESULT.counts() == {"pass": 1, "fail": 2, "skip": 3, "not_exercised": 1}
    assert RESULT.summary() == (
        "check_attention(Mine): 1 passed, 2 failed, 3 skipped, 1 not exercised of 7 cases\n"
        "  skipped: a torch limit\n"
        "  skipped: no document masks\n"  # once, however many cases it skipped
        "  NOT EXERCISED (tested nothing): v-cache: every call failed for a fresh subject too")
    assert not RESULT.ok


def test_the_table_has_one_aligned_row_per_failure_with_cut_details():
    lines = RESULT.table().splitlines()
    assert [line.split()[:2] for line in lines] == [["case", "kind"], ["v-cp2", "values"],
                                                    ["v-cp2", "placements"], ["v-docs", "mask_no_effect"]]
    starts = [lines[0].index(column) for column in ("kind", "what", "expected", "actual", "ranks", "detail")]
    for line, failure in zip(lines[1:], (VALUES, PLACED, NO_MASK)):
        assert line[starts[0]:].startswith(str(failure.kind))  # every column where the header's is
        assert line[starts[1]:].startswith(failure.what) and line[starts[3]:].startswith(failure.actual)
    assert lines[1][starts[4]:].startswith("1,3 (shards 3)")
    assert lines[1][starts[5]:] == "max abs err 5.00e-01; ranks [0, 2] hold the right full tensor"
    assert lines[2][starts[5]:] == ("x " * 150)[:197] + "..."  # whitespace collapsed, cut to 200
    assert lines[3][starts[4]:].startswith("-")  # no ranks


def test_lookups_by_kind_and_case_keep_the_cases_order_once():
    assert RESULT.failures == [VALUES, PLACED, NO_MASK]
    assert RESULT.failures_of(FailureKind.PLACEMENTS) == [PLACED]
    assert RESULT.failures_of(case="v-cp2") == [VALUES, PLACED]
    assert RESULT.failures_of(FailureKind.VALUES, case="v-docs") == []
    assert RESULT.failed_ids() == ["v-cp2", "v-docs"] and RESULT.failed_ids(FailureKind.MASK_NO_EFFECT) == ["v-docs"]
    assert RESULT.case("v-tp2").status is Status.PASS
    with pytest.raises(KeyError, match="no case 'v-tp8' in this result; ids: \\['v-cp2', 'v-tp2', "):
        RESULT.case("v-tp8")


@pytest.mark.parametrize("statuses,ok,raises", [
    ((Status.PASS, Status.SKIP), True, None),
    ((Status.PASS, Status.NOT_EXERCISED), False, "1 not exercised"),
    ((Status.SKIP,), True, None),  # nothing failed; a run that only skips is the caller's to judge
], ids=["pass-and-skip", "not-exercised", "only-skips"])
def test_ok_and_raise_without_failures(statuses, ok, raises):
    result = ConformanceResult("s", tuple(outcome(f"c{i}", s, reason="r") for i, s in enumerate(statuses)))
    assert result.ok is ok and str(result) == result.summary()
    if raises:
        with pytest.raises(ConformanceError, match=raises) as error:
            result.raise_for_failures()
        assert "case  kind" not in str(error.value)  # no table without failures
        assert result.raise_for_failures(allow_not_exercised=True) is result
    else:
        assert result.raise_for_failures() is result


def test_failures_raise_with_the_summary_and_the_table_even_when_not_exercised_is_allowed():
    with pytest.raises(ConformanceError) as error:
        RESULT.raise_for_failures(allow_not_exercised=True)
    assert str(error.value) == str(RESULT) == RESULT.summary() + "\n" + RESULT.table()
    assert isinstance(error.value, AssertionError)  # pytest shows it as a test failure
