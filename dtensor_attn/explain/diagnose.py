"""Findings over a recorded placement trace: pure functions over event values.

The local_map boundaries first (``mislabel.check_local_map``: an output declared with
placements its kernel's layout denies), then the first op where a ``_StridedShard`` appears or
propagation fails, tied to the mislabelled boundary among its ancestors (its likely cause).
"""

from __future__ import annotations

from dtensor_attn import _compat
from dtensor_attn.explain.mislabel import check_local_map
from dtensor_attn.explain.rank_table import explain_placements
from dtensor_attn.explain.records import Finding, FindingKind, Severity, TensorRecord, TraceEvent


def _ancestors(events: list[TraceEvent], index: int) -> set[int]:
    seen, todo = set(), [index]
    while todo:
        for record in events[todo.pop()].inputs:
            if record.producer is not None and record.producer not in seen:
                seen.add(record.producer)
                todo.append(record.producer)
    return seen


def _new_strided(event: TraceEvent) -> list[TensorRecord]:
    before = {p for r in event.inputs for p in r.placements if isinstance(p, _compat.StridedShard)}
    return [
        r for r in event.outputs
        if any(isinstance(p, _compat.StridedShard) and p not in before for p in r.placements)
    ]


def diagnose(events: list[TraceEvent]) -> list[Finding]:
    """Boundary mislabels, then the first op where a _StridedShard appears or propagation fails."""
    findings: list[Finding] = []
    suspects: dict[int, Finding] = {}
    for event in events:
        if event.is_local_map:
            for finding in check_local_map(event):
                findings.append(finding)
                suspects.setdefault(event.index, finding)
    for event in events:
        strided = [] if event.is_local_map else _new_strided(event)
        if event.error is None and not strided:
            continue
        causes = sorted(_ancestors(events, event.index) & suspects.keys())
        cause = causes[-1] if causes else None
        if event.error is not None:
            title = f"propagation failed at {event.where()}: {event.error}"
            lines = [f"inputs: {'; '.join(map(str, event.inputs))}"]
        else:
            record = strided[0]
            ins = "; ".join(map(str, event.inputs))
            title = f"first _StridedShard at {event.where()}: {ins} -> {record}"
            lines = _strided_lines(record, with_hint=cause is None)
        severity = Severity.ERROR if cause is not None or event.error is not None else Severity.NOTE
        kind = FindingKind.STRIDED if event.error is None else FindingKind.FAILURE
        findings.append(Finding(severity, kind, event.index, title, tuple(lines), cause=cause))
        break
    return sorted(findings, key=lambda f: (f.event, f.cause is None))


def _strided_lines(record: TensorRecord, *, with_hint: bool) -> list[str]:
    explained = explain_placements(
        record.placements, record.mesh_shape, record.shape, mesh_names=record.mesh_names
    )
    lines = []
    for note in explained.strided:
        lines.append(f"{note.placement} on axis {note.axis}: {note.reason}")
        extra = (("flatten", note.flatten), ("hint", note.hint if with_hint else None))
        lines += [f"{label}: {text}" for label, text in extra if text]
    return lines


__all__ = ["diagnose"]
