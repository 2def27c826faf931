"""A local_map output declared with placements its kernel's layout denies: a pure check.

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

import math

from dtensor_attn import _compat
from dtensor_attn.explain.rank_table import rank_indices
from dtensor_attn.explain.records import Finding, FindingKind, Severity, TensorRecord, TraceEvent
from dtensor_attn.explain.strided import SHARD_LIKE
from dtensor_attn.layout import Dim, Layout
from dtensor_attn.placements import format_placements, normalize_placements, view_placements


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


__all__ = ["check_local_map"]
