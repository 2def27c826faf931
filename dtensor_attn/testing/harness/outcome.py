"""The harness's outcomes, in one home: what a rank reports for a test phase, and what a JUnit
case records.

- ``Outcome``: a rank's outcome of one phase (setup, call, teardown), posted to the other ranks
  and judged by ``agreement.judge``: pytest's passed, skipped, failed, and the harness's own
  hung, stuck and silent (a watchdog declared it, or the others reported for it).
- ``CaseKind``: one ``<testcase>`` of a JUnit file: passed, failed, error or skipped; a failed
  call is a failure, a failed setup or teardown an error (``CaseKind.of_failed_phase``).

Both are ``str`` enums whose values are the strings written to the store, the JUnit files and
the summaries, so those stay byte for byte what they were. Standard library only: the
launcher runs ``summary.py`` and ``run_junit.py`` as scripts, without importing torch, and they
import this file as a sibling.
"""

from __future__ import annotations

import enum


class _StrValue(str, enum.Enum):
    """A ``str`` enum that prints and formats as its value on every Python version."""

    __str__ = str.__str__
    __format__ = str.__format__


class Outcome(_StrValue):
    PASSED = "passed"
    SKIPPED = "skipped"
    FAILED = "failed"
    HUNG = "hung"  # the phase ran past the timeout outside any collective
    STUCK = "stuck"  # waiting in a collective another rank never joined
    SILENT = "silent"  # no report and no heartbeat: exited, killed, or holding the GIL

    @property
    def is_problem(self) -> bool:
        """The phase failed on every rank if any rank reports this."""
        return self in (Outcome.FAILED, Outcome.HUNG, Outcome.STUCK, Outcome.SILENT)

    @property
    def diverged(self) -> bool:
        """This rank left the phase on its own (the others may wait in a collective for it)."""
        return self in (Outcome.FAILED, Outcome.HUNG, Outcome.SILENT)


class CaseKind(_StrValue):
    PASSED = "passed"
    SKIPPED = "skipped"
    FAILED = "failed"
    ERROR = "error"

    @classmethod
    def of_failed_phase(cls, when: str) -> CaseKind:
        """pytest's rule: a failed call is a failure, a failed setup or teardown an error."""
        return cls.FAILED if when == "call" else cls.ERROR

    @classmethod
    def from_tag(cls, tag: str | None) -> CaseKind:
        """The kind of a ``<testcase>`` from the tag of its result child (None: no child)."""
        return _KIND_OF_TAG[tag]

    @property
    def tag(self) -> str | None:
        """The child element a ``<testcase>`` of this kind carries (None for passed)."""
        return _TAG_OF_KIND[self]

    @property
    def severity(self) -> int:
        """Worse is larger: what ranks that disagree on a case agree on is the worst."""
        return _SEVERITY[self]

    @property
    def is_problem(self) -> bool:
        return self in (CaseKind.FAILED, CaseKind.ERROR)


_TAG_OF_KIND = {CaseKind.PASSED: None, CaseKind.SKIPPED: "skipped", CaseKind.FAILED: "failure",
                CaseKind.ERROR: "error"}
_KIND_OF_TAG = {tag: kind for kind, tag in _TAG_OF_KIND.items()}
_SEVERITY = {CaseKind.PASSED: 0, CaseKind.SKIPPED: 1, CaseKind.FAILED: 2, CaseKind.ERROR: 3}
RESULT_TAGS = tuple(tag for tag in _TAG_OF_KIND.values() if tag is not None)  # JUnit child tags


__all__ = ["RESULT_TAGS", "CaseKind", "Outcome"]
