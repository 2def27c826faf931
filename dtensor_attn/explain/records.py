"""The values of a placement trace and of its findings: what ``trace.py`` records, what the
checks (``mislabel.py``, ``diagnose.py``) say about it and what ``report.py`` prints. Pure values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from dtensor_attn.placements import format_placements


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """A DTensor as an event saw it; ``producer`` is the event that made it (None: an input)."""

    placements: tuple
    shape: tuple[int, ...]
    mesh_shape: tuple[int, ...]
    mesh_names: tuple[str, ...] | None
    producer: int | None = None
    name: str = ""

    def __str__(self) -> str:
        label = f"{self.name} " if self.name else ""
        return f"{label}{format_placements(self.placements)} {tuple(self.shape)}"


@dataclass(slots=True)
class TraceEvent:
    """One DTensor op, or one local_map call (``declared_out``: its out_placements)."""

    index: int
    name: str
    module: str
    inputs: list[TensorRecord]
    outputs: list[TensorRecord] = field(default_factory=list)
    error: str | None = None
    is_local_map: bool = False

    def where(self) -> str:
        return f"#{self.index} {self.name}" + (f" in {self.module}" if self.module else "")

    def __str__(self) -> str:
        ins = "; ".join(map(str, self.inputs))
        outs = "; ".join(map(str, self.outputs)) if self.error is None else f"FAILED: {self.error}"
        arrow = "-> declared" if self.is_local_map else "->"
        return f"{self.where()}: {ins} {arrow} {outs}"


class Severity(str, enum.Enum):
    ERROR = "error"
    WARNING = "warning"
    NOTE = "note"


class FindingKind(str, enum.Enum):
    MISLABEL = "mislabel"  # a local_map output declared with placements its kernel's layout denies
    STRIDED = "strided"  # the first _StridedShard
    FAILURE = "failure"  # propagation failed


@dataclass(frozen=True, slots=True)
class Finding:
    severity: Severity
    kind: FindingKind
    event: int
    title: str
    lines: tuple[str, ...] = ()
    fix: str | None = None
    cause: int | None = None  # index of the finding's likely cause (a local_map event)


def headline_order(finding: Finding) -> tuple:
    """The one rule for what a report leads with: errors first; among them the op where a
    _StridedShard appeared or propagation failed before the local_map mislabel that caused it;
    then by event order."""
    return (finding.severity is not Severity.ERROR, finding.kind is FindingKind.MISLABEL, finding.event)


__all__ = ["Finding", "FindingKind", "Severity", "TensorRecord", "TraceEvent", "headline_order"]
