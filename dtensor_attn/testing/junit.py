"""JUnit XML per rank, written as each test finishes, so results survive the rank being killed.

The file is a valid document after every test: each new ``<testcase>`` is written over the
closing tags, which are written again after it, and flushed. At the end of the session the
file is rewritten once with the totals on ``<testsuite>`` and ``complete="true"``; a file
without that attribute belongs to a rank that did not finish.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

_FOOTER = "</testsuite>\n</testsuites>\n"
_ILLEGAL_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


def junit_path(out_dir: Path, rank: int) -> Path:
    return Path(out_dir) / f"rank{rank}.xml"


def _clean(text: str) -> str:
    return _ILLEGAL_XML.sub("?", text)


def _split_nodeid(nodeid: str) -> tuple[str, str]:
    """pytest-style (classname, name): ``tests/a.py::C::t[x]`` -> (``tests.a.C``, ``t[x]``)."""
    parts = nodeid.split("::")
    module = parts[0].removesuffix(".py").replace("/", ".")
    return ".".join([module, *parts[1:-1]]), parts[-1]


class JUnitWriter:
    """One rank's JUnit file; ``add`` is thread-safe (the watchdog writes a hung test's case)."""

    def __init__(self, path: Path, *, rank: int, world_size: int) -> None:
        self.path = Path(path)
        self._attrs = {
            "name": f"dtensor_attn rank {rank}",
            "rank": str(rank),
            "world_size": str(world_size),
            "hostname": socket.gethostname(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self._lock = threading.Lock()
        self._cases: list[str] = []
        self.counts: Counter[str] = Counter()
        self._start = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")
        self._body_end = self._write_header(self._attrs)
        self._file.write(_FOOTER)
        self._file.flush()

    def _write_header(self, attrs: dict[str, str]) -> int:
        suite = ET.Element("testsuite", attrs)
        opening = ET.tostring(suite, encoding="unicode").removesuffix(" />")
        self._file.write(f'<?xml version="1.0" encoding="utf-8"?>\n<testsuites>\n{opening}>\n')
        return self._file.tell()

    def add(
        self,
        nodeid: str,
        *,
        outcome: str,
        seconds: float,
        message: str = "",
        text: str = "",
        properties: dict[str, str] | None = None,
    ) -> None:
        """One test's result; ``outcome`` is passed, failed, error or skipped."""
        classname, name = _split_nodeid(nodeid)
        case = ET.Element(
            "testcase",
            {"classname": classname, "name": name, "file": nodeid.split("::")[0],
             "time": f"{seconds:.3f}", "nodeid": nodeid},
        )
        if properties:
            props = ET.SubElement(case, "properties")
            for key, value in properties.items():
                ET.SubElement(props, "property", {"name": key, "value": _clean(str(value))})
        if outcome in ("failed", "error", "skipped"):
            tag = {"failed": "failure", "error": "error", "skipped": "skipped"}[outcome]
            child = ET.SubElement(case, tag, {"message": _clean(message)[:500]})
            child.text = _clean(text)
        xml = ET.tostring(case, encoding="unicode") + "\n"
        with self._lock:
            if self._file.closed:
                return
            self._cases.append(xml)
            self.counts[outcome] += 1
            self._file.seek(self._body_end)
            self._file.write(xml)
            self._body_end = self._file.tell()
            self._file.write(_FOOTER)
            self._file.flush()

    def close(self, *, collected: int, stop_reason: str = "", complete: bool = True) -> None:
        """Rewrite the file once with the totals; later ``add`` calls are ignored.
        ``complete=False``: this rank is ending early (hung, stuck); others may have gone on."""
        with self._lock:
            if self._file.closed:
                return
            self._file.close()
            attrs = dict(self._attrs)
            attrs.update(
                tests=str(sum(self.counts.values())),
                failures=str(self.counts["failed"]),
                errors=str(self.counts["error"]),
                skipped=str(self.counts["skipped"]),
                time=f"{time.monotonic() - self._start:.3f}",
                collected=str(collected),
                complete="true" if complete else "false",
            )
            if stop_reason:
                attrs["stop_reason"] = _clean(stop_reason)
            tmp = self.path.with_suffix(".xml.tmp")
            with open(tmp, "w", encoding="utf-8") as self._file:
                self._write_header(attrs)
                self._file.writelines(self._cases)
                self._file.write(_FOOTER)
            os.replace(tmp, self.path)


def case_from_reports(reports: list) -> dict:
    """``JUnitWriter.add`` arguments for one test from its pytest phase reports (setup, call,
    teardown): a failed call is a failure, a failed setup or teardown an error."""
    outcome, message, texts = "passed", "", []
    for report in reports:
        if report.failed:
            kind = "failed" if report.when == "call" else "error"
            if outcome not in ("failed", "error"):
                outcome, message = kind, report.longreprtext.strip().split("\n")[0]
            texts.append(f"--- {report.when} ---\n{report.longreprtext}")
        elif report.skipped and outcome == "passed":
            outcome = "skipped"
            longrepr = report.longrepr
            message = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    properties = {name: str(value) for report in reports for name, value in report.user_properties}
    return {
        "outcome": outcome,
        "seconds": sum(report.duration for report in reports),
        "message": message,
        "text": "\n\n".join(texts),
        "properties": properties,
    }
