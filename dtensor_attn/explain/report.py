"""The printed report of a placement trace: the first problem with its likely cause and fix,
then the other findings, then the event log."""

from __future__ import annotations

from dtensor_attn.explain.records import Finding, FindingKind, Severity, headline_order

_LABELS = {Severity.ERROR: "PROBLEM", Severity.WARNING: "warning", Severity.NOTE: "note"}


def _block(finding: Finding, indent: str = "  ") -> list[str]:
    lines = [f"{indent}{line}" for line in finding.lines]
    if finding.fix:
        lines.append(f"{indent}fix: {finding.fix}")
    return lines


def _count(num: int, noun: str) -> str:
    return f"{num} {noun}" + ("" if num == 1 else "s")


def render_trace(trace, *, max_events: int = 60) -> str:
    events, findings = trace.events, trace.findings
    num_maps = sum(e.is_local_map for e in events)
    count = {s: sum(f.severity is s for f in findings) for s in (Severity.ERROR, Severity.WARNING)}
    lines = [
        f"placement trace of {trace.target}: {_count(len(events) - num_maps, 'DTensor op')}, "
        f"{_count(num_maps, 'local_map call')}; {_count(count[Severity.ERROR], 'error')}, "
        f"{_count(count[Severity.WARNING], 'warning')}"
    ]
    if not trace.boundaries_seen:
        lines.append(
            "note: another profiler owns sys.setprofile, so local_map boundaries were not recorded"
        )
    mislabels = {f.event: f for f in findings if f.kind is FindingKind.MISLABEL}
    shown: set[int] = set()
    ordered = sorted(findings, key=headline_order)
    for finding in ordered:
        if id(finding) in shown:
            continue
        shown.add(id(finding))
        label = _LABELS[finding.severity]
        lines += ["", f"{label}: {finding.title}"] + _block(finding)
        cause = mislabels.get(finding.cause) if finding.cause is not None else None
        if cause is not None:
            shown.add(id(cause))
            lines += [f"  likely cause: {cause.title}"] + _block(cause, "    ")
    if not findings:
        lines += ["", "no placement problem found: every local_map output matches its kernel's "
                  "layout, no _StridedShard appeared, every op propagated"]
    if trace.error is not None:
        text = str(trace.error).strip().splitlines()
        lines += ["", f"the call raised {type(trace.error).__name__}: {text[0] if text else ''}"]
    flagged = {f.event for f in findings} | {f.cause for f in findings if f.cause is not None}
    lines += ["", "events:"]
    for event in events:
        if event.index < max_events or event.index in flagged:
            mark = "  <--" if event.index in flagged else ""
            lines.append(f"  {event}{mark}")
    if len(events) > max_events:
        lines.append(f"  ... {len(events) - max_events} more events not shown")
    return "\n".join(lines)


__all__ = ["render_trace"]
