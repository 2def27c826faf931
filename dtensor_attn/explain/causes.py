"""The likely causes of a placement error, ranked, each with why and the fix. Pure text.

``rank_causes(kind, focus)`` orders the causes for a message kind by what the message says:
the dim it names, whether later mesh axes shard that dim, and (where the message prints the
view) which dims the view merges. The first cause of ``_S(1, 8)`` is the packed-TNH mislabel
of torchtitan PR #2761; of ``_S(0, 4)``, packed tokens under context parallelism.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from dtensor_attn.explain.message import MessageKind


class CauseKind(enum.Enum):
    PACKED_TNH_MISLABEL = (
        "packed-TNH mislabel (torchtitan PR #2761): a varlen attention's packed (B*L, N, H) output "
        "labelled with the BLNH Shard(2) (head_dim) instead of Shard(1) (heads), then viewed"
    )
    CP_PACKED_TOKENS = (
        "packed tokens under context parallelism: a (B, L, ...) tensor with the seq dim sharded "
        "on cp, viewed as (B*L, ...)"
    )
    FLATTENED_SHARDED_INNER_DIM = (
        "a view or reshape that flattened dims while one after the first of them was sharded"
    )
    RIGHT_TO_LEFT_MISMATCH = (
        "a right-to-left shard (FSDP2 on top of TP) whose split factor does not match this mesh"
    )
    HAND_WRITTEN_PLACEMENTS = (
        "a _StridedShard written or copied by hand into DTensor.from_local(...) or a local_map's "
        "out_placements"
    )
    DECLARED_GLOBAL_SHAPE = (
        "a local_map or from_local whose declared placements make DTensor compute the wrong "
        "global shape"
    )
    UNEVEN_SIZE = "a sharded dim that is not a multiple of its mesh axis"
    SPLIT_OF_SHARDED_DIM = (
        "a view that splits a sharded dim (packed tokens T into (B, L), N*H into (N, H)) into "
        "pieces whose first one the mesh axis does not divide"
    )
    REMOVED_SHARDED_DIM = "a view that drops or re-splits a sharded dim"
    NON_CONTIGUOUS_LOCAL = (
        "a local tensor whose strides do not allow view() (a kernel returned a transposed or "
        "non-contiguous tensor)"
    )


@dataclass(frozen=True, slots=True)
class Focus:
    """What the causes are about, as far as the message tells (None where it does not)."""

    dim: int | None = None  # the tensor dim in question
    split_factor: int | None = None  # of the first _StridedShard that does not decode
    strided_text: str | None = None  # that placement as torch prints it, "_S(1, 8)"
    later_axes: tuple[int, ...] = ()  # later mesh axes sharding the same dim
    axis_name: str = "tp"  # the mesh axis the placement is on, by name where known
    view: str | None = None  # "(8, 2, 12) -> (2, 4, 24)", where the message prints it
    merged: tuple[int, ...] | None = None  # input dims the view merges into one
    ndim: int | None = None  # of the viewed tensor
    mislabel: str | None = None  # the packed-TNH reading of the viewed tensor, if it fits
    sizes: str | None = None  # "dim 1 has size 6 and mesh axis 0 has 4 ranks: pieces 2, 2, 2, 0"
    local_view: bool = False  # torch's own view of the local tensor failed (strides)


@dataclass(frozen=True, slots=True)
class Cause:
    """One likely cause: what it is (``kind.value`` is its title), why it fits, and the fix."""

    kind: CauseKind
    why: tuple[str, ...]
    fix: str


_FIXES = {
    CauseKind.PACKED_TNH_MISLABEL: "declare the packed output's out_placements as Shard(1); derive "
    "it with infer_out_placements(in_placements, Layout.BLNH, Layout.TNH, ...)",
    CauseKind.CP_PACKED_TOKENS: "keep the attention output BLNH outside the kernel "
    "(LocalMapAttention's default), or pack inside the local_map kernel and declare the packed "
    "output with infer_out_placements(in_placements, Layout.BLNH, Layout.TNH, ...); on torch 2.11 "
    "a packed output under CP needs a local batch of 1; torch 2.13 handles it",
    CauseKind.FLATTENED_SHARDED_INNER_DIM: "shard the first of the merged dims instead, or "
    "redistribute the sharded one to Replicate() before the view, or view the local tensors "
    "inside local_map and declare the result's placements (infer_out_placements derives them)",
    CauseKind.RIGHT_TO_LEFT_MISMATCH: "let fully_shard / distribute_tensor compute the placements "
    "on this mesh instead of carrying them over",
    CauseKind.HAND_WRITTEN_PLACEMENTS: "state the placement the local tensors really have (usually "
    "a plain Shard), derived from the layout with infer_out_placements; "
    "trace_placements(model, *inputs) shows where it was declared",
    CauseKind.DECLARED_GLOBAL_SHAPE: "check the declared out_placements against the kernel's "
    "output layout; trace_placements(model, *inputs) flags the boundary that declared them",
    CauseKind.UNEVEN_SIZE: "pad the dim to a multiple of the axis size (a seq under CP with load "
    "balancing: a multiple of 2*cp), or pick a mesh that divides it, or redistribute the dim to "
    "Replicate() before the view",
    CauseKind.SPLIT_OF_SHARDED_DIM: "make the first piece a multiple of the mesh axis (e.g. a local "
    "batch cp divides), or split the local tensors inside local_map, or redistribute before the view",
    CauseKind.REMOVED_SHARDED_DIM: "redistribute dim {dim} to Replicate() (or shard another dim) "
    "before the view; a sharded dim smaller than its mesh axis leaves ranks empty and is usually a "
    "mislabel",
    CauseKind.NON_CONTIGUOUS_LOCAL: "call .contiguous() on the kernel's output inside local_map, "
    "or use reshape()",
}


def _why(kind: CauseKind, focus: Focus) -> list[str]:
    """Why the cause fits, with the message's numbers where it has them."""
    d, sf, name = focus.dim, focus.split_factor, focus.axis_name
    dim = d if d is not None else "d"
    C = CauseKind
    if kind is C.PACKED_TNH_MISLABEL:
        why = [
            f"the DTensor then claims (B*L, N/{name}, H*{name}); a view that merges its heads and "
            f"head_dim dims makes _S({dim}, N/{name}) of the merged dim"
        ]
        why += [f"here the split factor {sf} would be N/{name}: {sf} heads per rank"] if sf else []
        return why + ([focus.mislabel] if focus.mislabel else [])
    if kind is C.CP_PACKED_TOKENS:
        first = (
            f"each rank holds its L/{name} positions of every batch row: torch 2.13 labels that "
            "_S(0, B), B the local batch"
        )
        if sf:
            return [first, f"here B = {sf}; the placement is right, but torch 2.11 cannot full_tensor() or redistribute it"]
        return [first, "torch 2.11's view rule refuses to fold a sharded seq into tokens"]
    if kind is C.FLATTENED_SHARDED_INNER_DIM:
        if focus.view and focus.merged:
            return [
                f"the view {focus.view} merges dims {focus.merged} into one with dim {d} sharded: "
                "each rank's part of the merged dim is a piece of every block, not one block"
            ]
        return [
            f"(A, X) -> A*X with X sharded gives _S({dim}, A): each rank holds its piece of X in "
            "each of the A blocks" + (f"; here A = {sf}" if sf else "")
        ]
    if kind is C.RIGHT_TO_LEFT_MISMATCH:
        later = ", ".join(f"axis {a}" for a in focus.later_axes)
        return [
            f"{focus.strided_text or '_S(d, sf)'} records that dim {dim} was sharded first on a "
            f"later axis ({later}); torch decodes it only where the split factor is the product "
            "of those axes' sizes",
            "a split factor carried over from another mesh (a checkpoint, a resized or flattened "
            "mesh) does not decode",
        ]
    if kind is C.HAND_WRITTEN_PLACEMENTS:
        return [
            "a _StridedShard is what DTensor's view makes; passed in by hand it says each rank "
            "holds a piece of every block, which the local tensors rarely do"
        ]
    if kind is C.DECLARED_GLOBAL_SHAPE:
        return [
            "DTensor computes the global shape from the local shape and the declared placements: "
            "a wrong label makes a wrong global shape, and a later view fails or silently "
            "reorders values"
        ]
    if kind is C.UNEVEN_SIZE:
        uneven = "torch.chunk gives uneven pieces, and a flattened or split dim cannot describe them"
        return [focus.sizes, uneven] if focus.sizes else [uneven]
    if kind is C.SPLIT_OF_SHARDED_DIM:
        why = [focus.sizes] if focus.sizes else []
        if focus.view and d is not None:
            why.append(
                f"the view {focus.view} splits dim {d} while it is sharded; the shard can stay "
                "only on a first piece that the mesh axis divides"
            )
        return why or ["the view splits a sharded dim; only a first piece the mesh axis divides can stay sharded"]
    if kind is C.REMOVED_SHARDED_DIM:
        view = f"the view {focus.view}" if focus.view else "the view"
        return [f"dim {dim} is sharded, but {view} keeps no dim that starts with it: view() never redistributes"]
    return [
        "DTensor found the placements, but the local tensor's own view() failed: its memory is "
        "not laid out for that shape"
    ]


def _cause(kind: CauseKind, focus: Focus) -> Cause:
    dim = focus.dim if focus.dim is not None else "d"
    return Cause(kind, tuple(_why(kind, focus)), _FIXES[kind].format(dim=dim))


_STRIDED_KINDS = (MessageKind.NOT_INTERPRETED, MessageKind.NOT_DECODED, MessageKind.PLACEMENTS)


def _order(kind: MessageKind, focus: Focus) -> list[CauseKind]:
    C = CauseKind
    if kind in _STRIDED_KINDS:
        if focus.split_factor is None:
            return []
        first = [C.RIGHT_TO_LEFT_MISMATCH] if focus.later_axes else []
        packed = [C.CP_PACKED_TOKENS] if focus.dim == 0 else [C.PACKED_TNH_MISLABEL]
        return first + packed + [C.FLATTENED_SHARDED_INNER_DIM, C.HAND_WRITTEN_PLACEMENTS]
    if kind is MessageKind.FLATTEN_SHARDED:
        ndim, merged = focus.ndim, focus.merged
        if merged is not None and ndim is not None:  # the view is known: which dims it merges
            heads = ndim >= 3 and merged == (ndim - 2, ndim - 1)  # (N, H) of a (T, N, H)
            tokens = ndim >= 3 and merged[0] == 0  # (B, L) of a (B, L, ...)
        else:  # only the dim: TNH's head_dim is 2, BLNH's seq is 1
            heads, tokens = (focus.dim or 0) >= 2, focus.dim == 1
        packed = [C.PACKED_TNH_MISLABEL] if heads else [C.CP_PACKED_TOKENS] if tokens else []
        return packed + [C.FLATTENED_SHARDED_INNER_DIM, C.DECLARED_GLOBAL_SHAPE]
    if kind is MessageKind.FLATTEN_UNEVEN:
        return [C.UNEVEN_SIZE, C.DECLARED_GLOBAL_SHAPE]
    if kind is MessageKind.UNFLATTEN_UNEVEN:
        return [C.SPLIT_OF_SHARDED_DIM, C.DECLARED_GLOBAL_SHAPE]
    if kind is MessageKind.RESHAPE_SHARDED:
        return [C.REMOVED_SHARDED_DIM, C.DECLARED_GLOBAL_SHAPE]
    local = [C.NON_CONTIGUOUS_LOCAL] if focus.local_view else []
    return local + [C.DECLARED_GLOBAL_SHAPE]


def rank_causes(kind: MessageKind, focus: Focus) -> list[Cause]:
    """The likely causes, most likely first; [] where nothing needs fixing."""
    return [_cause(cause, focus) for cause in _order(kind, focus)]


__all__ = ["Cause", "CauseKind", "Focus", "rank_causes"]
