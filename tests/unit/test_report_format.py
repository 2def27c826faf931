"""The conformance report's files, from hand-made results (no ranks, milliseconds).

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import re

import pytest

from dtensor_attn.report import HTML_NAME, MARKDOWN_NAME, write_report
from dtensor_attn.testing.kit.result import (
    CaseFailure, CaseOutcome, ConformanceError, ConformanceResult, FailureKind, Status,
)

PLANTED = CaseFailure(
    "varlen-TNH-cp2xtp2-gqa", FailureKind.PLACEMENTS, "output", "(_S(0, 2), S(1))", "(S(0), S(1))",
    detail="TNH output of inputs (S(1), S(2))",
)


def _case(case_id: str, mesh: str, status: Status, *, failures=(), reason="", out="(S(1), S(2))") -> CaseOutcome:
    variant, heads = "-".join(case_id.split("-")[:2]), case_id.split("-")[-1]
    return CaseOutcome(
        id=case_id, variant=variant, kernel=f"{variant.split('-')[0]}[math]", mesh=mesh, heads=heads, mask="causal",
        lse=False, status=status, reason=reason, out_placements=out, failures=failures,
    )


def _results(*, planted: bool) -> list[ConformanceResult]:
    cases = (
        _case("varlen-TNH-tp2-gqa", "tp2", Status.PASS, out="(S(1))"),
        _case("varlen-TNH-cp2xtp2-gqa", "cp2xtp2", Status.FAIL if planted else Status.PASS,
              failures=(PLANTED,) if planted else (), out="(S(0), S(1))"),
        _case("sdpa-BLNH-tp2-gqa", "tp2", Status.SKIP, reason="sdpa cannot apply packed-document masks", out=""),
    )
    return [ConformanceResult("LocalMapAttention", cases)]


def test_writes_markdown_and_html_with_one_cell_per_case(tmp_path):
    report = write_report(_results(planted=False), tmp_path / "out")
    assert (report.markdown.name, report.html.name) == (MARKDOWN_NAME, HTML_NAME)
    markdown = report.markdown.read_text()
    assert "| case | tp2 | cp2xtp2 |" in markdown
    assert "| varlen-TNH varlen[math] gqa causal no lse | pass `(S(1))` | pass `(S(0), S(1))` |" in markdown
    assert "- 1 x sdpa cannot apply packed-document masks" in markdown  # skips are counted with reasons
    assert "Kernels: sdpa[math], varlen[math]." in markdown
    assert report.counts == {"pass": 2, "fail": 0, "skip": 1, "not_exercised": 0} and report.exit_code == 0


def test_the_html_page_is_self_contained(tmp_path):
    page = write_report(_results(planted=True), tmp_path).html.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    for outside in ("src=", "href=", "http:", "https:", "<script", "<link", "@import", "url("):
        assert outside not in page, outside
    assert page.count("<td class=") == 4  # 2 rows x 2 meshes, the empty cell included


def test_a_planted_failure_shows_as_fail(tmp_path):
    report = write_report(_results(planted=True), tmp_path)
    assert report.exit_code == 1 and report.counts["fail"] == 1
    markdown = report.markdown.read_text()
    row = next(line for line in markdown.splitlines() if line.startswith("| varlen-TNH"))
    assert "FAIL `(S(0), S(1))`: placements of output: expected (_S(0, 2), S(1)), actual (S(0), S(1))" in row
    assert "varlen-TNH-cp2xtp2-gqa  placements  output" in markdown  # the failure table
    page = report.html.read_text()
    cell = re.search(r'<td class="fail" title="([^"]*)">(.*?)</td>', page)
    assert cell and cell.group(1).startswith("varlen-TNH-cp2xtp2-gqa")
    assert "expected (_S(0, 2), S(1)), actual (S(0), S(1))" in cell.group(2)


def test_raise_for_failures_names_the_case_and_what_differed():
    (result,) = _results(planted=True)
    with pytest.raises(ConformanceError) as failure:
        result.raise_for_failures()
    lines = str(failure.value).splitlines()
    assert lines[0] == "check_attention(LocalMapAttention): 1 passed, 1 failed, 1 skipped of 3 cases"
    assert lines[1] == "  skipped: sdpa cannot apply packed-document masks"
    assert lines[2].split() == ["case", "kind", "what", "expected", "actual", "ranks", "detail"]
    assert lines[3].split()[:3] == ["varlen-TNH-cp2xtp2-gqa", "placements", "output"]
    assert _results(planted=False)[0].raise_for_failures().ok
