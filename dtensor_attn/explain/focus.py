"""What a message is about: the ``_StridedShard`` that does not decode, or the view that failed.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Pure functions over parsed values. Where a message prints the view (``Sharding propagation
failed for aten.view.default(Spec(f32[8, 2, 12](S(2))), [2, 4, -1]) on DeviceMesh((tp=4), ...)``)
the view is re-run through DTensor's view rule: a message that does not say why a view failed
gets the reason from it, and torch 2.13's answer to a flatten that torch 2.11 refuses (a
``_StridedShard``) is shown: the rule's own on 2.13, ``flatten_placements`` (pinned equal to it)
where this torch refuses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from dtensor_attn import _compat
from dtensor_attn._compat import Placement, Shard, StridedShard
from dtensor_attn.explain.causes import Focus
from dtensor_attn.explain.message import Message, MessageKind, read_message
from dtensor_attn.explain.strided import SHARD_LIKE
from dtensor_attn.explain.symbolic import Verdict, chunk_sizes
from dtensor_attn.placements import (
    flatten_placements,
    format_placements,
    normalize_placements,
    sharded_mesh_axes,
)


def shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def strided_focus(verdicts: Sequence[Verdict], placements, names: tuple[str, ...] | None) -> Focus:
    """Focus on the first ``_StridedShard`` that does not (or may not) decode; empty if none."""
    for verdict in verdicts:
        if verdict.decodes is True:
            continue
        p, axis = verdict.placement, verdict.axis
        later = tuple(b for b in sharded_mesh_axes(placements, p.dim) if b > axis)
        name = names[axis] if names else ("cp" if p.dim == 0 else "tp")
        sf = _compat.split_factor(p)
        return Focus(dim=p.dim, split_factor=sf, strided_text=str(p), later_axes=later, axis_name=name)
    return Focus()


@dataclass(frozen=True, slots=True)
class ViewFacts:
    """A view a message prints, with this torch's answer for it, or torch 2.13's where this one
    refuses a flatten that 2.13 answers."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    placements: tuple[Placement, ...]
    sources: tuple | None  # per output dim, the input dims it is made of (None: a split part)
    # this torch's output placements where it answers; where it refuses a flatten, torch 2.13's
    # (flatten_placements), where that has a rule for the view
    answer: tuple[Placement, ...] | None
    refusal: str | None  # this torch's error, where it refuses

    def merged_with(self, dim: int) -> tuple[int, ...] | None:
        for source in self.sources or ():
            if source and len(source) > 1 and dim in source:
                return tuple(source)
        return None

    def split_dims(self) -> list[int]:
        """Sharded input dims no output dim is made of: the view splits (or, size 1, drops) them."""
        used = {d for source in self.sources or () if source for d in source}
        dims = [p.dim for p in self.placements if isinstance(p, SHARD_LIKE)]
        return [d for d in dict.fromkeys(dims) if d not in used] if self.sources is not None else []

    @property
    def text(self) -> str:
        return f"{shape_text(self.in_shape)} -> {shape_text(self.out_shape)}"


def view_facts(message: Message, mesh_shape: tuple[int, ...] | None) -> ViewFacts | None:
    """The view of a 'Sharding propagation failed' message, re-run through DTensor's view rule;
    None if the message does not print the input spec, the target size and the mesh."""
    if message.placements is None or message.global_shape is None or message.view_shape is None:
        return None
    if mesh_shape is None or len(mesh_shape) != len(message.placements):
        return None
    in_shape, out_shape = message.global_shape, message.view_shape
    placements = normalize_placements(message.placements, len(in_shape))
    try:
        sources = _compat.view_sources(in_shape, out_shape)
        rule = _compat.view_groups(in_shape, out_shape)
    except Exception:  # noqa: BLE001 - torch's rule rejects the shapes: no dim reading
        return ViewFacts(in_shape, out_shape, placements, None, None, "not a view of these shapes")
    try:
        _, answer = _compat.propagate_view_placements(placements, in_shape, rule, mesh_shape)
        return ViewFacts(in_shape, out_shape, placements, sources, tuple(answer), None)
    except Exception as error:  # noqa: BLE001 - torch refuses: its words are the reason
        refusal = " ".join(str(error).split())
    own = None
    if "Attempted to flatten multiple dimensions" in refusal:  # torch 2.11: 2.13 answers these
        own = flatten_placements(placements, in_shape, sources, mesh_shape)
    return ViewFacts(in_shape, out_shape, placements, sources, own, refusal)


def reclassify(message: Message, facts: ViewFacts | None) -> tuple[Message, str | None]:
    """A bare 'Sharding propagation failed' gets its reason from DTensor's view rule, run on the
    same values: where it refuses, its words; where it answers with a _StridedShard, torch
    2.11's refusal of a flatten with a sharded inner dim. Returns the message and a note."""
    if message.kind is not MessageKind.PROPAGATION_FAILED or facts is None:
        return message, None
    if facts.answer is None and facts.refusal is not None:
        try:
            inner = read_message(facts.refusal)
        except ValueError:
            return message, None
        if inner.kind is MessageKind.PROPAGATION_FAILED or not inner.is_torch_message:
            return message, None
        fields = {f: getattr(inner, f) for f in ("dim", "dim_size", "axis", "axis_size")}
        note = (
            "the message does not say why; DTensor's view rule, run on the same values, says: "
            f"{facts.refusal[:300]}"
        )
        return dataclasses.replace(message, kind=inner.kind, **fields), note
    for p in facts.placements:
        merged = facts.merged_with(p.dim) if isinstance(p, SHARD_LIKE) else None
        if merged and p.dim != merged[0]:
            note = (
                f"the message does not say why; the view merges dims {merged} with dim {p.dim} "
                "sharded, which torch 2.11's view rule refuses (torch 2.13 answers it)"
            )
            return dataclasses.replace(message, kind=MessageKind.FLATTEN_SHARDED, dim=p.dim), note
    return message, None


def _mislabel(facts: ViewFacts, mesh_shape, names) -> str | None:
    """The packed-TNH reading of a 3-D (T, a, b) tensor labelled Shard(2) whose last two dims
    the view merges: what each rank holds, the true global shape and the label it should have."""
    if len(facts.in_shape) != 3 or facts.merged_with(2) != (1, 2):
        return None
    axes = [a for a, p in enumerate(facts.placements) if type(p) is Shard and p.dim == 2]
    if len(axes) != 1 or facts.in_shape[2] % mesh_shape[axes[0]]:
        return None
    a = axes[0]
    ways, name = mesh_shape[a], names[a] if names else f"axis {a}"
    t, heads_local, h_claimed = facts.in_shape
    local = (t, heads_local, h_claimed // ways)
    true = (t, heads_local * ways, h_claimed // ways)
    return (
        f"read as a packed output: each rank holds {shape_text(local)} = (B*L, N/{name}, H), so "
        f"the true global shape is {shape_text(true)} and the label should be Shard(1); the "
        f"declared Shard(2) claims {shape_text(facts.in_shape)} = (B*L, N/{name}, H*{name})"
    )


def view_focus(
    message: Message, facts: ViewFacts | None, mesh_shape: tuple[int, ...] | None, names
) -> Focus:
    """Focus for the view kinds: the dim the message names, the merged dims, the sizes."""
    dim = message.dim
    unflatten = message.kind is MessageKind.UNFLATTEN_UNEVEN
    if unflatten:  # torch numbers the piece of the split, not the tensor dim: find the dim
        split = facts.split_dims() if facts is not None else []
        dim = split[0] if split else None
    name = names[0] if names and len(names) == 1 else ("cp" if dim == 1 else "tp")
    sizes = None
    if message.dim_size is not None and message.axis_size is not None:
        if unflatten:
            sizes = (
                f"piece {message.dim} of the split has size {message.dim_size}, not a multiple of "
                f"the {message.axis_size} ranks of mesh axis {message.axis}"
            )
        else:
            sizes = (
                f"dim {dim} has size {message.dim_size} and mesh axis {message.axis} has "
                f"{message.axis_size} ranks: torch.chunk pieces {chunk_sizes(message.dim_size, message.axis_size)}"
            )
    elif facts is not None and dim is not None and mesh_shape is not None and dim < len(facts.in_shape):
        axes = sharded_mesh_axes(facts.placements, dim)
        if message.kind is MessageKind.FLATTEN_UNEVEN and axes:
            size, ways = facts.in_shape[dim], mesh_shape[axes[0]]
            sizes = (
                f"dim {dim} has size {size} and mesh axis {axes[0]} has {ways} ranks: "
                f"torch.chunk pieces {chunk_sizes(size, ways)}"
            )
    if facts is None:
        return Focus(dim=dim, axis_name=name, sizes=sizes, local_view="Cannot view a tensor" in message.line)
    merged = facts.merged_with(dim) if dim is not None else None
    if names and dim is not None:
        axes = sharded_mesh_axes(facts.placements, dim)
        name = names[axes[0]] if axes else name
    return Focus(
        dim=dim,
        axis_name=name,
        view=facts.text,
        merged=merged,
        ndim=len(facts.in_shape),
        mislabel=_mislabel(facts, mesh_shape, names) if mesh_shape else None,
        sizes=sizes,
        local_view="Cannot view a tensor" in message.line or "Cannot view a tensor" in (facts.refusal or ""),
    )


def view_lines(facts: ViewFacts | None, names) -> list[str]:
    """What the view does to each dim, and what this torch's view rule answers."""
    if facts is None:
        return []
    lines = []
    for j, source in enumerate(facts.sources or ()):
        if source and len(source) > 1:
            sharded = [d for d in source[1:] if sharded_mesh_axes(facts.placements, d)]
            tail = f"; dim {sharded[0]} (not the first of them) is sharded" if sharded else ""
            lines.append(f"the view {facts.text} merges dims {source} into dim {j}{tail}")
    for d in facts.split_dims():
        verb = "drops" if facts.in_shape[d] == 1 else "splits"
        lines.append(f"the view {facts.text} {verb} dim {d}, which is sharded")
    if facts.answer is not None:
        strided = any(isinstance(p, StridedShard) for p in facts.answer)
        # an answer beside a refusal is ours, reproducing torch 2.13's flatten rule
        whose = "this torch's view rule" if facts.refusal is None else "torch 2.13's view rule (this torch refuses)"
        lines.append(
            f"{whose} answers it: {format_placements(facts.answer)} on "
            f"{shape_text(facts.out_shape)}" + (" (a _StridedShard, no error)" if strided else "")
        )
    return lines


__all__ = ["ViewFacts", "reclassify", "shape_text", "strided_focus", "view_facts", "view_focus", "view_lines"]
