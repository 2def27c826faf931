"""Golden placement tables through ``expecttest``: ``EXPECTTEST_ACCEPT=1`` rewrites them.

Two forms. Inline, the expected text is a string literal in the test, rewritten in place::

    assert_golden_inline(format_table(rows), '''\\
    BLNH (S(1), S(2)) -> TNH (_S(0, 2), S(1))
    ''')

In a file, next to the test under ``golden/`` (a bare name) or at a path relative to the test
file; accepting writes the file::

    assert_golden(format_table(rows), "placements_cp2xtp4")   # golden/placements_cp2xtp4.txt

``format_table`` prints rows of cells as aligned columns, so a table reads well in a diff.
"""

from __future__ import annotations

import difflib
import inspect
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import expecttest

ACCEPT_ENV = "EXPECTTEST_ACCEPT"  # expecttest's own switch, read at call time as expecttest does


def format_table(rows: Iterable[Sequence[object]], *, sep: str = "  ") -> str:
    """Rows of cells as left-aligned columns, one line per row, trailing spaces stripped."""
    cells = [[str(cell) for cell in row] for row in rows]
    num_columns = max(map(len, cells), default=0)
    widths = [max(len(row[i]) for row in cells if i < len(row)) for i in range(num_columns)]
    lines = [
        sep.join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in cells
    ]
    return "\n".join(lines) + ("\n" if lines else "")


def assert_golden_inline(actual: str, expect: str, *, skip: int = 0) -> None:
    """``actual`` equals the string literal ``expect`` at the call site (expecttest inline)."""
    expecttest.assert_expected_inline(actual, expect, skip=1 + skip)


def golden_path(path_or_name: str | os.PathLike, caller_file: str) -> Path:
    """A bare name means ``golden/<name>.txt`` next to the caller; a path is relative to it."""
    path = Path(path_or_name)
    if path.is_absolute():
        return path
    base = Path(caller_file).resolve().parent
    if len(path.parts) == 1 and not path.suffix:
        return base / "golden" / f"{path.name}.txt"
    return base / path


def assert_golden(actual: str, path_or_name: str | os.PathLike, *, skip: int = 0) -> None:
    """``actual`` equals the golden file's text; with ``EXPECTTEST_ACCEPT=1`` the file is
    (re)written instead. ``skip`` counts helper frames between the test and this call."""
    frame = inspect.currentframe()
    for _ in range(1 + skip):
        frame = frame.f_back
    caller = frame.f_code.co_filename
    path = golden_path(path_or_name, caller)
    if os.environ.get(ACCEPT_ENV):
        if not path.exists() or path.read_text() != actual:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(actual)
        return
    if not path.exists():
        raise AssertionError(
            f"golden file {path} does not exist. Fix: run the test once with "
            f"{ACCEPT_ENV}=1 to write it, review it, and commit it."
        )
    expected = path.read_text()
    if expected == actual:
        return
    diff = "".join(
        difflib.unified_diff(
            expected.splitlines(True), actual.splitlines(True), fromfile=str(path), tofile="actual"
        )
    )
    raise AssertionError(
        f"golden mismatch with {path}:\n{diff}\nIf the new text is right, re-run with "
        f"{ACCEPT_ENV}=1 to rewrite the file (review the diff before committing)."
    )
