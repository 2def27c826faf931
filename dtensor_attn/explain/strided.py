"""What a ``_StridedShard`` means: does it decode to a shard order, and which flatten made it.

Pure functions over placement values; the index arithmetic lives in ``rank_table``.

Decoding follows torch's ``DTensorSpec._maybe_convert_StridedShard_to_shard_order``: walk the mesh
axes right to left; a shard of dim d with split factor sf decodes if sf is the product of the
sizes of a prefix of the axes already placed for d (axes to its right that shard d). A Shard has
sf 1 and always decodes. ``_S(0, 2), S(0)`` on a 2x2 mesh decodes to "dim 0 on axis 1, then
axis 0" (FSDP2 + TP); ``_S(1, 8)`` on an 8-rank mesh does not: no axis to its right shards dim 1.

A ``_StridedShard`` that does not decode is what a DTensor ``view`` makes when it merges two dims
and the inner one is sharded: ``(B=4, L=8)`` with L sharded 2 ways, viewed as 32 tokens, is
``_S(0, 4)``: each rank holds its half of L in each of the 4 batch rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dtensor_attn import _compat
from dtensor_attn._compat import Placement, Shard, StridedShard
from dtensor_attn.placements import format_placements, normalize_placements, view_placements

ShardOrder = tuple[tuple[int, tuple[int, ...]], ...]
SHARD_LIKE = (Shard, StridedShard)  # torch 2.13: _StridedShard is not a Shard subclass
TORCH_211_ERROR = (
    "use_strided_shard_as_shard_order is True, but placements: {p} is unable to be "
    "interpreted into a corresponding shard_order"
)


@dataclass(frozen=True, slots=True)
class StridedNote:
    """One ``_StridedShard`` of a placement tuple, explained."""

    axis: int
    placement: Placement
    decodes: bool
    reason: str
    flatten: str | None
    hint: str | None


def _factor(placement: Placement) -> int:
    return _compat.split_factor(placement) if isinstance(placement, StridedShard) else 1


def axis_label(axis: int, mesh_shape: Sequence[int], names: Sequence[str] | None) -> str:
    name = f" ({names[axis]})" if names else ""
    return f"axis {axis}{name}, {mesh_shape[axis]} ranks"


def decode_shard_order(
    placements: Sequence[Placement], mesh_shape: Sequence[int]
) -> tuple[ShardOrder | None, dict[int, tuple[bool, str]]]:
    """torch's shard order of ``placements`` (dim, axes in sharding order), or None.

    Also returns, for every shard-like axis, whether and why it decodes.
    """
    orders: dict[int, list[int]] = {}
    reasons: dict[int, tuple[bool, str]] = {}
    decodes = True
    for axis in reversed(range(len(placements))):
        placement = placements[axis]
        if not isinstance(placement, SHARD_LIKE):
            continue
        order = orders.setdefault(placement.dim, [])
        prefixes = [math.prod(mesh_shape[a] for a in order[:i]) for i in range(len(order) + 1)]
        factor = _factor(placement)
        later = ", ".join(f"axis {a} ({mesh_shape[a]})" for a in order) or "none"
        if factor in prefixes:
            position = prefixes.index(factor)
            order.insert(position, axis)
            before = ", ".join(f"axis {a} ({mesh_shape[a]})" for a in order[:position])
            reasons[axis] = True, (
                f"decodes: split factor {factor} = product of the sizes of the axes that shard "
                f"dim {placement.dim} before it ({before or 'none'})"
            )
        else:
            decodes = False
            reasons[axis] = False, (
                f"does not decode to a shard order: split factor {factor} is not a product of "
                f"the sizes of later mesh axes sharding dim {placement.dim} (later axes: "
                f"{later}; decodable split factors: {', '.join(map(str, prefixes))})"
            )
    if not decodes:
        return None, reasons
    order = tuple((dim, tuple(axes)) for dim, axes in sorted(orders.items()) if axes)
    return order, reasons


def _pre_view(
    placements: Sequence[Placement], axis: int, outer: int, inner: int, global_shape: Sequence[int]
) -> tuple[tuple[int, ...], tuple[Placement, ...]] | None:
    """Shape and placements of the tensor whose view would produce ``placements``, or None."""
    dim = placements[axis].dim
    shape = (*global_shape[:dim], outer, inner, *global_shape[dim + 1 :])
    pre: list[Placement] = []
    for b, p in enumerate(placements):
        if not isinstance(p, SHARD_LIKE) or p.dim < dim:
            pre.append(p)
        elif p.dim > dim:
            factor = _factor(p)
            pre.append(_compat.strided_shard(p.dim + 1, factor) if factor > 1 else Shard(p.dim + 1))
        elif b == axis:
            pre.append(Shard(dim + 1))
        elif b < axis and _factor(p) == 1:
            pre.append(Shard(dim))  # an earlier plain shard of the merged dim splits the outer part
        else:
            return None
    return shape, tuple(pre)


def _view_reproduces(pre_shape, pre_placements, placements, global_shape, mesh_shape) -> bool:
    """Check a flatten reading with DTensor's own view rule, or where torch 2.11 refuses to
    flatten a sharded inner dim, with the same rule infer_out_placements uses then."""
    try:
        _, out = view_placements(pre_placements, pre_shape, global_shape, mesh_shape)
    except Exception:  # noqa: BLE001 - a rule torch refuses means "not this flatten"
        return False
    ndim = len(global_shape)
    return normalize_placements(out, ndim) == normalize_placements(placements, ndim)


def explain_strided(
    placements: Sequence[Placement],
    axis: int,
    size_before: int,
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    mesh_names: Sequence[str] | None,
    reason: str,
    decodes: bool,
) -> StridedNote:
    """Explain the ``_StridedShard`` on ``axis``; ``size_before`` is rank 0's size of its dim
    after the axes to its left have sharded it."""
    placement = placements[axis]
    dim, factor = placement.dim, _factor(placement)
    size = global_shape[dim]
    flatten = hint = None
    if decodes:
        flatten = (
            f"not a flatten: it records that dim {dim} was sharded right to left (the order "
            "above), as FSDP2 sharding on top of TP does"
        )
    elif size_before % factor:
        flatten = (
            f"no flatten of dim {dim} gives it: rank 0 holds {size_before} of dim {dim} before "
            f"{axis_label(axis, mesh_shape, mesh_names)}, not a multiple of the split factor "
            f"{factor}"
        )
    else:
        inner = size_before // factor
        outer = size // inner if inner and size % inner == 0 else None
        ways = mesh_shape[axis]
        per_rank = inner // ways if inner % ways == 0 else "uneven"
        if outer is not None:
            flatten = (
                f"dim {dim} (size {size}) = flatten of ({outer}, {inner}) with the {inner} sharded "
                f"on {axis_label(axis, mesh_shape, mesh_names)} ({per_rank} per rank in each of "
                f"the {outer} blocks)"
            )
            pre = _pre_view(placements, axis, outer, inner, global_shape)
            if pre and _view_reproduces(*pre, placements, global_shape, mesh_shape):
                flatten += (
                    f": a DTensor view of a {tuple(pre[0])} tensor with placements "
                    f"{format_placements(pre[1])} as {tuple(global_shape)} produces exactly this"
                )
            hint = _attention_hint(dim, outer, inner, mesh_names, axis)
    return StridedNote(axis, placement, decodes, reason, flatten, hint)


def _attention_hint(
    dim: int, outer: int, inner: int, names: Sequence[str] | None, axis: int
) -> str:
    axis_name = names[axis] if names else f"axis {axis}"
    if dim == 0:
        return (
            f"in attention code: the seq shard of a (B={outer}, L={inner}, ...) tensor viewed as "
            f"(B*L, ...): packed tokens (TNH) under context parallelism on {axis_name}. Expected "
            "there (each rank holds its seq chunk of every batch row); torch 2.11 cannot "
            "full_tensor() or redistribute it."
        )
    return (
        f"in attention code: dims (N/tp={outer}, H*tp={inner}) of a packed TNH output labelled "
        "with the BLNH Shard(2) (head_dim) instead of Shard(1) (heads), then viewed (torchtitan "
        "#2761). Fix: declare the packed output's out_placements as Shard(1); "
        "trace_placements() points at the wrapper."
    )


__all__ = [
    "SHARD_LIKE",
    "ShardOrder",
    "StridedNote",
    "TORCH_211_ERROR",
    "decode_shard_order",
    "explain_strided",
]
