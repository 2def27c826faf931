"""The docs stay true and self-contained: tests they name exist; nothing points outside the repo."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_every_test_the_bug_catalogue_names_exists():
    text = (REPO / "docs" / "bugs.md").read_text()
    rows = [line for line in text.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [int(line.split("|")[1]) for line in rows] == list(range(1, 14))
    for line in rows:
        named = re.findall(r"`(tests/[\w/]+\.py)(?:::(\w+))?`", line.split("|")[5])
        assert named, f"row {line.split('|')[1].strip()} names no test"
        for path, test in named:
            source = (REPO / path).read_text()
            assert not test or re.search(rf"^def {test}\(", source, re.M), f"{path}::{test} does not exist"


def test_nothing_refers_to_files_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    outside = re.compile(r"\.\./shared|/work/|(?<![\w/])(DESIGN|BUGS|STYLE)\.md")
    offenders = []
    for name in tracked:
        path = REPO / name
        if path.suffix not in {".py", ".md", ".sh", ".toml", ".yml", ".txt"} or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if outside.search(line) and name != "tests/unit/test_docs.py":
                offenders.append(f"{name}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)
