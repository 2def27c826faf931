"""docs/bad-input.md's table, read by the unit and the distributed bad-input tests, and the one
check of an error against its row.

tests/ is on sys.path (it holds the root conftest.py), so both test files import this module.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"
TABLE_HEADER = "| case | bad input | caught in | error | message starts with |"


@dataclasses.dataclass(frozen=True)
class DocRow:
    id: str
    bad_input: str
    caught_in: str
    error: str
    message_start: str


def doc_rows() -> dict[str, DocRow]:
    """The table of docs/bad-input.md, by case id (cells are `code`: the backticks go)."""
    lines = DOC.read_text().splitlines()
    rows = {}
    for line in lines[lines.index(TABLE_HEADER) + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        row = DocRow(*(cell[1:-1] if cell.startswith("`") and cell.endswith("`") else cell for cell in cells))
        assert row.id not in rows, f"docs/bad-input.md has two rows {row.id!r}"
        rows[row.id] = row
    return rows


def raising_functions(info: pytest.ExceptionInfo) -> set[str]:
    """Qualified names of the functions the exception passed through (``Class.method``)."""
    code = (entry.frame.code.raw for entry in info.traceback)
    return {getattr(c, "co_qualname", c.co_name) for c in code} | {entry.name for entry in info.traceback}


def check_against_doc(row: DocRow, case_match: str, info: pytest.ExceptionInfo) -> None:
    message = str(info.value)
    assert type(info.value).__name__ == row.error, (row.error, repr(info.value))
    assert message.startswith(row.message_start), f"doc says the message starts {row.message_start!r}; it is {message!r}"
    assert re.search(case_match, message, re.S), f"{case_match!r} not in {message!r}"
    assert "Fix: " in message, message
    functions = raising_functions(info)
    assert row.caught_in in functions or row.caught_in.split(".")[-1] in functions, (row.caught_in, sorted(functions))
