"""Golden placement tables: compare, fail with a diff, and rewrite with EXPECTTEST_ACCEPT=1."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtensor_attn.testing import assert_golden, format_table
from dtensor_attn.testing.golden import golden_path

ROWS = [("layout", "placements"), ("BLNH", "(S(1), S(2))"), ("TNH", "(_S(0, 2), S(1))")]
TABLE = "layout  placements\nBLNH    (S(1), S(2))\nTNH     (_S(0, 2), S(1))\n"


def test_format_table_aligns_columns():
    assert format_table(ROWS) == TABLE
    assert format_table([]) == ""
    assert format_table([("a",), ("bb", "c")]) == "a\nbb  c\n"


def test_golden_file_match_mismatch_and_missing(tmp_path, monkeypatch):
    monkeypatch.delenv("EXPECTTEST_ACCEPT", raising=False)
    golden = tmp_path / "table.txt"
    golden.write_text(TABLE)
    assert_golden(TABLE, golden)
    with pytest.raises(AssertionError) as error:
        assert_golden(TABLE.replace("S(2)", "S(3)"), golden)
    assert "-BLNH    (S(1), S(2))\n+BLNH    (S(1), S(3))" in str(error.value)
    assert "re-run with EXPECTTEST_ACCEPT=1" in str(error.value)
    with pytest.raises(AssertionError, match=r"does not exist\. Fix: run the test once with "
                                             r"EXPECTTEST_ACCEPT=1"):
        assert_golden(TABLE, tmp_path / "missing.txt")


def test_accept_writes_and_rewrites_the_golden_file(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPECTTEST_ACCEPT", "1")
    golden = tmp_path / "golden" / "new.txt"
    assert_golden(TABLE, golden)
    assert golden.read_text() == TABLE
    assert_golden("changed\n", golden)
    assert golden.read_text() == "changed\n"


def test_bare_name_is_next_to_the_calling_test():
    here = Path(__file__)
    assert golden_path("cp2xtp4", str(here)) == here.parent / "golden" / "cp2xtp4.txt"
    assert golden_path("data/t.txt", str(here)) == here.parent / "data" / "t.txt"
    assert golden_path("/abs/t.txt", str(here)) == Path("/abs/t.txt")


def test_inline_golden_is_rewritten_in_place_with_accept(pytester, monkeypatch):
    pytester.makepyfile(test_inline='''
        from dtensor_attn.testing import assert_golden_inline, format_table

        def test_table():
            assert_golden_inline(format_table([("BLNH", "(S(1), S(2))")]), """\\
        stale
        """)
    ''')
    monkeypatch.delenv("EXPECTTEST_ACCEPT", raising=False)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(failed=1)
    monkeypatch.setenv("EXPECTTEST_ACCEPT", "1")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    assert "BLNH  (S(1), S(2))" in (pytester.path / "test_inline.py").read_text()
    monkeypatch.delenv("EXPECTTEST_ACCEPT")
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_a_helper_names_its_frames_to_find_the_test(tmp_path, monkeypatch):
    monkeypatch.delenv("EXPECTTEST_ACCEPT", raising=False)
    # A helper in another folder, between the test and assert_golden.
    (tmp_path / "golden_helper.py").write_text(
        "from dtensor_attn.testing import assert_golden\n\n"
        "def check(text, name, skip):\n"
        "    assert_golden(text, name, skip=skip)\n"
    )
    monkeypatch.syspath_prepend(tmp_path)
    import golden_helper

    with pytest.raises(AssertionError) as next_to_test:
        golden_helper.check(TABLE, "no_such_table", skip=1)
    assert f"{Path(__file__).parent / 'golden' / 'no_such_table.txt'} does not exist" in str(
        next_to_test.value)
    with pytest.raises(AssertionError) as next_to_helper:
        golden_helper.check(TABLE, "no_such_table", skip=0)
    assert f"{tmp_path / 'golden' / 'no_such_table.txt'} does not exist" in str(
        next_to_helper.value)
