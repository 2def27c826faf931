"""JUnit XML per rank, written as each test finishes, so results survive the rank being killed.

The file is a valid document after every test: each new ``<testcase>`` is written over the
tail, which is written again after it, and flushed. Until the session ends, the tail holds an
``unfinished="true"`` error case naming the test in flight ("rank 1 ended during this test
without recording its result"): the file of a rank killed mid-run (SIGKILL, os._exit, or
torchrun stopping the others) is never green. At the end the file is rewritten once with
every collected test (those the run never reached as skipped, "not run: <why>"), the totals on
``<testsuite>`` and ``complete="true"`` (``"false"`` for a rank that ended early).

The harness's own findings (ranks collected different tests, a collection error, no test ran)
are failures with a nodeid under ``dtensor_attn::``. The run-level file CI reads is written by
the launcher from these files (``run_junit.py``). Standard library only: the launcher's
scripts import this file without importing torch.
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

if __package__:
    from dtensor_attn.testing.harness.outcome import CaseKind
else:  # imported by summary.py run as a script: the sibling file, without importing torch
    from outcome import CaseKind

_FOOTER = "</testsuite>\n</testsuites>\n"
HARNESS = "dtensor_attn::"  # nodeid prefix of the harness's own cases, which are not tests
UNFINISHED = "unfinished"  # attribute of a rank's placeholder case until it finishes
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


def case_xml(nodeid: str, *, outcome: CaseKind, seconds: float, message: str = "", text: str = "",
             properties: dict[str, str] | None = None, extra: dict[str, str] | None = None) -> str:
    """One ``<testcase>``."""
    classname, name = _split_nodeid(nodeid)
    case = ET.Element(
        "testcase",
        {"classname": classname, "name": name, "file": nodeid.split("::")[0],
         "time": f"{seconds:.3f}", "nodeid": nodeid, **(extra or {})},
    )
    if properties:
        props = ET.SubElement(case, "properties")
        for key, value in properties.items():
            ET.SubElement(props, "property", {"name": key, "value": _clean(str(value))})
    tag = CaseKind(outcome).tag
    if tag is not None:
        child = ET.SubElement(case, tag, {"message": _clean(message)[:500]})
        child.text = _clean(text)
    return ET.tostring(case, encoding="unicode") + "\n"


class JUnitWriter:
    """One rank's JUnit file; ``add`` is thread-safe (the watchdog writes a hung test's case)."""

    def __init__(self, path: Path, *, rank: int, world_size: int) -> None:
        self.path = Path(path)
        self.rank = rank
        self._attrs = {
            "name": f"dtensor_attn rank {rank}",
            "rank": str(rank),
            "world_size": str(world_size),
            "hostname": socket.gethostname(),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        self._lock = threading.Lock()
        self._cases: list[str] = []
        self.counts: Counter[CaseKind] = Counter()
        self.num_ran = 0  # tests (not harness cases) that passed, failed or errored
        self.skip_reasons: Counter[str] = Counter()
        self._expected: list[str] = []
        self._recorded: set[str] = set()
        self._in_flight = ""
        self._start = time.monotonic()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")
        self._body_end = self._write_header(self._attrs)
        self._write_tail()

    def _write_header(self, attrs: dict[str, str]) -> int:
        suite = ET.Element("testsuite", attrs)
        opening = ET.tostring(suite, encoding="unicode").removesuffix(" />")
        self._file.write(f'<?xml version="1.0" encoding="utf-8"?>\n<testsuites>\n{opening}>\n')
        return self._file.tell()

    def _write_tail(self) -> None:
        """The placeholder error case and the closing tags, after the cases so far."""
        log = f"rank{self.rank}.log"
        if self._in_flight:
            nodeid, message = self._in_flight, (
                f"rank {self.rank} ended during this test without recording its result: "
                f"killed, exited, or stopped by torchrun (see {log})")
        else:
            nodeid = f"{HARNESS}rank{self.rank}_unfinished"
            message = f"rank {self.rank} ended before finishing its session (see {log})"
        placeholder = case_xml(nodeid, outcome=CaseKind.ERROR, seconds=0.0, message=message,
                               text=f"{message}; the launcher's junit.xml has the whole run",
                               extra={UNFINISHED: "true"})
        self._file.seek(self._body_end)
        self._file.write(placeholder + _FOOTER)
        self._file.truncate()
        self._file.flush()

    def expect(self, nodeids: list[str]) -> None:
        """The collected tests: at close, those never recorded are listed as not run."""
        self._expected = list(nodeids)

    def begin_test(self, nodeid: str) -> None:
        """Name the test in flight in the placeholder (a killed rank's file names it)."""
        with self._lock:
            if not self._file.closed:
                self._in_flight = nodeid
                self._write_tail()

    def add(
        self,
        nodeid: str,
        *,
        outcome: CaseKind,
        seconds: float,
        message: str = "",
        text: str = "",
        properties: dict[str, str] | None = None,
    ) -> None:
        """One test's result."""
        outcome = CaseKind(outcome)
        xml = case_xml(nodeid, outcome=outcome, seconds=seconds, message=message, text=text,
                       properties=properties)
        with self._lock:
            if self._file.closed:
                return
            self._cases.append(xml)
            self._recorded.add(nodeid)
            self.counts[outcome] += 1
            if not nodeid.startswith(HARNESS):
                self.num_ran += outcome is not CaseKind.SKIPPED
                if outcome is CaseKind.SKIPPED:
                    self.skip_reasons[message.removeprefix("Skipped: ")] += 1
            self._file.seek(self._body_end)
            self._file.write(xml)
            self._body_end = self._file.tell()
            self._in_flight = ""
            self._write_tail()

    def close(self, *, collected: int, stop_reason: str = "", complete: bool = True) -> None:
        """List the expected tests never recorded as not run, then rewrite the file once with
        the totals; later ``add`` calls are ignored. ``complete=False``: this rank is ending
        early (hung, stuck, lost the store); the others may have gone on."""
        why = (f"the run stopped: {stop_reason}" if stop_reason else "the session ended before "
               "it (pytest -x, --maxfail or an interruption)")
        for nodeid in self._expected:
            if nodeid not in self._recorded:
                self.add(nodeid, outcome=CaseKind.SKIPPED, seconds=0.0,
                         message=f"not run: {why.splitlines()[0]}", text=why)
        with self._lock:
            if self._file.closed:
                return
            self._file.close()
            attrs = dict(self._attrs)
            attrs.update(
                tests=str(sum(self.counts.values())),
                failures=str(self.counts[CaseKind.FAILED]),
                errors=str(self.counts[CaseKind.ERROR]),
                skipped=str(self.counts[CaseKind.SKIPPED]),
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
    outcome, message, texts = CaseKind.PASSED, "", []
    for report in reports:
        if report.failed:
            if not outcome.is_problem:
                outcome = CaseKind.of_failed_phase(report.when)
                message = report.longreprtext.strip().split("\n")[0]
            texts.append(f"--- {report.when} ---\n{report.longreprtext}")
        elif report.skipped and outcome is CaseKind.PASSED:
            outcome = CaseKind.SKIPPED
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
