"""Findings over a recorded placement trace: pure functions over event values.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

The check that finds the torchtitan #2761 bug: at a ``local_map`` boundary, the kernel's local
output is a view of a local input (same numel); DTensor's view rule says which input dim each
output dim came from, and so which placements the output must carry. A varlen kernel packing
BLNH q ``(Shard(2),)`` into TNH gives local (B*L, N/tp, H); heads is dim 1, so the output is
``(Shard(1),)``. Declaring the copied ``Shard(2)`` claims head_dim is split instead: global
(B*L, N/tp, H*tp). A later view of that tensor is where ``_StridedShard`` shows up.
"""

from __future__ import annotations

import enum

import math
from dataclasses import dataclass, field

from dtensor_attn import _compat
from dtensor_attn.explain.rank_table import explain_placements, rank_indices
from dtensor_attn.explain.strided import SHARD_LIKE
from dtensor_attn.layout import Dim, Layout
from dtensor_attn.placements import format_placements, normalize_placements, view_placements


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


def _local_shape(record: TensorRecord) -> tuple[int, ...]:
    origin = (0,) * len(record.mesh_shape)
    held = rank_indices(record.placements, record.mesh_shape, record.shape, origin)
    return tuple(len(i) for i in held)


def _layouts(in_ndim: int, out_ndim: int, sources) -> tuple[Layout, Layout] | None:
    """The unique pair of named layouts consistent with a view's dim sources, if any."""
    pairs = []
    for lin in Layout:
        for lout in Layout:
            if (lin.ndim, lout.ndim) != (in_ndim, out_ndim):
                continue
            atoms = [tuple(a for k in src for a in lin.dims[k].atoms) for src in sources]
            if all(atoms[j] == lout.dims[j].atoms for j in range(out_ndim)):
                pairs.append((lin, lout))
    return pairs[0] if len(pairs) == 1 else None


def _expected(inp: TensorRecord, sources, mesh_shape) -> tuple | None:
    """Placements the output must carry if it is this view of ``inp`` (DTensor's view rule)."""
    if any(s is None for s in sources):
        return None
    shape = tuple(math.prod(inp.shape[k] for k in src) for src in sources)
    placements = normalize_placements(inp.placements, len(inp.shape))
    try:
        needed, out = view_placements(placements, inp.shape, shape, mesh_shape)
    except Exception:  # noqa: BLE001 - no rule, torch's or ours: we cannot judge this boundary
        return None
    if normalize_placements(needed, len(inp.shape)) != placements:
        return None  # not a view of the global tensor without redistribution: cannot judge
    return normalize_placements(out, len(shape)), shape


def _long(p) -> str:
    return f"Shard({p.dim})" if type(p) is _compat.Shard else str(p)


def _symbol(dim: Dim) -> str:
    return "B*L" if dim is Dim.T else dim.name


def check_local_map(event: TraceEvent) -> list[Finding]:
    """Flag outputs whose declared placements disagree with the view the kernel applied."""
    findings = []
    for j, out in enumerate(event.outputs):
        declared = normalize_placements(out.placements, len(out.shape))
        out_local = _local_shape(out)
        for inp in event.inputs:
            sharded = any(isinstance(p, SHARD_LIKE) for p in inp.placements)
            if inp.mesh_shape != out.mesh_shape or not sharded:
                continue
            in_local = _local_shape(inp)
            if math.prod(in_local) != math.prod(out_local) or not out_local:
                continue
            try:
                sources = _compat.view_sources(in_local, out_local)
            except Exception:  # noqa: BLE001 - not a view: this input is not the output's source
                continue
            found = _expected(inp, sources, out.mesh_shape)
            if found is None:
                continue
            expected, true_shape = found
            axes = [
                a for a, (d, e) in enumerate(zip(declared, expected))
                if isinstance(d, SHARD_LIKE) and isinstance(e, SHARD_LIKE) and d != e
            ]
            if axes:
                findings.append(_mislabel(event, j, out, inp, sources, expected, true_shape, axes))
            break
    return findings


def _mislabel(event, j, out, inp, sources, expected, true_shape, axes) -> Finding:
    mesh, names = out.mesh_shape, out.mesh_names
    axis_names = [names[a] if names else f"axis{a}" for a in range(len(mesh))]
    layouts = _layouts(len(inp.shape), len(out.shape), sources)
    arg = inp.name or "an input"
    declared = normalize_placements(out.placements, len(out.shape))
    out_local = _local_shape(out)
    pairs = [(declared[a].dim, expected[a].dim) for a in axes]
    ambiguous = any(d != e and out_local[d] == out_local[e] for d, e in pairs)
    lines = []
    if layouts:
        lin, lout = layouts
        lines.append(
            f"the kernel returned a {lout.name} tensor (local shape {_local_shape(out)}) from "
            f"{arg} in {lin.name} ({format_placements(inp.placements)}, local shape "
            f"{_local_shape(inp)}) on mesh {dict(zip(axis_names, mesh))}"
        )
        claimed = [_symbol(d) for d in lout.dims]
        true = list(claimed)
        packed = "packed " if Dim.T in lout.dims else ""
        for a in axes:
            e, d = expected[a].dim, declared[a].dim
            if e == d:
                lines.append(
                    f"in the {packed}{lout.name} layout each rank's {lout.dims[e].value} (dim {e}) "
                    f"are strided, so the output should be {_long(expected[a])} on "
                    f"{axis_names[a]}; "
                    f"the declared {_long(declared[a])} says each rank holds one contiguous block, "
                    "so full_tensor() puts them in the wrong order"
                )
                continue
            lines.append(
                f"in the {packed}{lout.name} layout {lout.dims[e].value} is dim {e}, so the output "
                f"should be {_long(expected[a])} on {axis_names[a]}; the declared "
                f"{_long(declared[a])} is {lout.dims[d].value} x {axis_names[a]}"
            )
            claimed[e] = f"{claimed[e]}/{axis_names[a]}"
            claimed[d] = f"{claimed[d]}*{axis_names[a]}"
        if claimed != true:
            lines.append(
                f"so the DTensor claims global shape ({', '.join(claimed)}) = {tuple(out.shape)} "
                f"instead of ({', '.join(true)}) = {tuple(true_shape)}"
            )
        fix = (
            f"declare out_placements {format_placements(expected)} for output {j}: derive it from "
            f"the kernel's output layout, infer_out_placements(in_placements, Layout.{lin.name}, "
            f"Layout.{lout.name}, ...), instead of copying the input's placements"
        )
    else:
        for a in axes:
            e, d = expected[a].dim, declared[a].dim
            lines.append(
                f"output dim {e} is made of {arg} dim(s) {sources[e]}, sharded on {axis_names[a]}, "
                f"so the output should be {_long(expected[a])}; the declared {_long(declared[a])} "
                f"splits output dim {d} (from {arg} dim(s) {sources[d]}) instead"
            )
        lines.append(f"global shape claimed {tuple(out.shape)}, true {tuple(true_shape)}")
        fix = f"declare out_placements {format_placements(expected)} for output {j}"
    if ambiguous:
        lines.append("the two dims have the same local size, so shapes alone cannot tell: if the "
                     "kernel permutes them, this label may be right")
    return Finding(
        Severity.WARNING if ambiguous else Severity.ERROR,
        FindingKind.MISLABEL,
        event.index,
        f"{event.where()}: output {j} declared {format_placements(declared)}, which does not match "
        f"the kernel's output layout",
        tuple(lines),
        fix,
    )


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


__all__ = ["Finding", "FindingKind", "Severity", "TensorRecord", "TraceEvent", "check_local_map", "diagnose", "headline_order"]
