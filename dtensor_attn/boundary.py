"""What LocalMapAttention states at its local_map boundary, inferred from metadata alone.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Pure: placements, global shapes, the mesh shape and the inner module's declared layouts in,
``AttentionPlacements`` out (or a ``PlacementError`` naming the module, expected, actual and the
fix). No DTensor, no collective, no tensor math: a unit test runs it in microseconds. A mesh
axis that shards the sequence is context parallelism: k/v are gathered over it (Replicate as
the kernel sees them) and their local gradients are Partial there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from dtensor_attn._compat import Partial, Placement, Replicate, Shard
from dtensor_attn.errors import PlacementError
from dtensor_attn.layout import Dim, Layout
from dtensor_attn.placements import Placements, format_placements, infer_out_placements, normalize_placements


@dataclasses.dataclass(frozen=True, slots=True)
class AttentionPlacements:
    """Everything LocalMapAttention states at its local_map boundary, for one input signature."""

    q: Placements
    kv: Placements  # as the kernel sees k/v: gathered (Replicate) on context-parallel axes
    out: Placements
    lse: Placements | None
    q_grad: Placements
    kv_grad: Placements  # Partial on context-parallel axes
    cp_axes: tuple[int, ...]


def infer_attention_placements(
    q_placements: Sequence[Placement],
    k_placements: Sequence[Placement],
    v_placements: Sequence[Placement],
    *,
    q_shape: Sequence[int],
    kv_shape: Sequence[int],
    mesh_shape: Sequence[int],
    axis_names: Sequence[str] | None,
    in_layout: Layout,
    out_layout: Layout,
    lse_layout: Layout | None,
    module: str,
) -> AttentionPlacements:
    """Validate q/k/v placements against ``in_layout`` and infer every boundary placement."""
    ndim = in_layout.ndim
    for name, shape in (("q", q_shape), ("k", kv_shape), ("v", kv_shape)):
        if len(shape) != ndim:
            raise PlacementError(
                f"{module}: {name} must be {in_layout.name} ({ndim} dims), got global shape "
                f"{tuple(shape)}. Fix: reshape to {in_layout.name}."
            )
    q_pl = normalize_placements(q_placements, ndim)
    k_pl = normalize_placements(k_placements, ndim)
    v_pl = normalize_placements(v_placements, ndim)
    for name, pl in (("q", q_pl), ("k", k_pl), ("v", v_pl)):
        _check_placement_kinds(module, name, pl, in_layout)
    if k_pl != v_pl:
        raise PlacementError(
            f"{module}: k and v must have the same placements in {in_layout.name}; expected "
            f"v {format_placements(k_pl)}, got {format_placements(v_pl)}. Fix: distribute v like k."
        )
    seq_dim = in_layout.seq_dim
    cp_axes = tuple(i for i, p in enumerate(q_pl) if p == Shard(seq_dim))
    expected_kv = tuple(p if i not in cp_axes else Shard(seq_dim) for i, p in enumerate(q_pl))
    if k_pl != expected_kv:
        raise PlacementError(
            f"{module}: k/v placements must match q's in {in_layout.name} (heads sharded "
            f"alike for TP, seq sharded alike for CP); expected {format_placements(expected_kv)}, "
            f"got {format_placements(k_pl)} (q {format_placements(q_pl)}). "
            f"Fix: distribute k and v with q's placements."
        )
    _check_divisible(module, q_shape, kv_shape, q_pl, in_layout, mesh_shape, axis_names)
    kv_pl = tuple(Replicate() if i in cp_axes else p for i, p in enumerate(k_pl))
    mesh_shape = tuple(mesh_shape)
    out_pl = infer_out_placements(
        q_pl, in_layout, out_layout, global_shape=tuple(q_shape), mesh_shape=mesh_shape, module=module
    )
    lse_pl = None
    if lse_layout is not None:
        lse_pl = infer_out_placements(
            q_pl, in_layout, lse_layout, global_shape=tuple(q_shape), mesh_shape=mesh_shape, module=module
        )
    kv_grad = tuple(Partial() if i in cp_axes else p for i, p in enumerate(k_pl))
    return AttentionPlacements(q_pl, kv_pl, out_pl, lse_pl, q_pl, kv_grad, cp_axes)


def axis_names_of(axis_names: Sequence[str] | None, axes) -> list:
    """Mesh axes by name where the mesh names them (``['tp']``), else by index."""
    return [axis_names[a] if axis_names else a for a in axes]


def _check_placement_kinds(module: str, name: str, placements: Placements, layout: Layout) -> None:
    allowed = {Shard(layout.index(d)) for d in (Dim.B, Dim.L, Dim.N)}
    for axis, p in enumerate(placements):
        if isinstance(p, Replicate) or p in allowed:
            continue
        if isinstance(p, Partial):
            why = "Partial is a pending reduction; attention is not linear in q/k/v"
            fix = f"redistribute {name} to Replicate or Shard before attention"
        elif isinstance(p, Shard) and p.dim == layout.index(Dim.H):
            why = "head_dim is contracted inside the kernel and cannot be split"
            fix = f"shard heads (Shard({layout.heads_dim})) for TP or seq (Shard({layout.seq_dim})) for CP"
        else:
            why = "only batch, seq (CP) and heads (TP) may be sharded"
            fix = f"use Shard({layout.heads_dim}) for heads or Shard({layout.seq_dim}) for seq"
        raise PlacementError(
            f"{module}: {name} in {layout.name} has {p} on mesh axis {axis} "
            f"(placements {format_placements(placements)}); {why}. Expected Replicate, "
            f"Shard({layout.index(Dim.B)}), Shard({layout.seq_dim}) or Shard({layout.heads_dim}). Fix: {fix}."
        )


def _check_divisible(module, q_shape, kv_shape, q_pl, layout: Layout, mesh_shape, axis_names) -> None:
    for dim, what in ((layout.heads_dim, "heads"), (layout.seq_dim, "seq"), (layout.index(Dim.B), "batch")):
        ways = 1
        for axis, p in enumerate(q_pl):
            if p == Shard(dim):
                ways *= mesh_shape[axis]
        for name, shape in (("q", q_shape), ("k/v", kv_shape)):
            if shape[dim] % ways:
                axes = axis_names_of(axis_names, [a for a, p in enumerate(q_pl) if p == Shard(dim)])
                raise PlacementError(
                    f"{module}: {name} has {shape[dim]} {what} in {layout.name}, not divisible by "
                    f"the {ways} ranks of mesh axes {axes} that shard it. Fix: choose a "
                    f"{what} count divisible by {ways}, or a smaller degree on {axes}."
                )
