"""Which global indices each rank holds: the rank table of a placement tuple.

Pure index arithmetic following torch's documented semantics: placements are applied left to
right over the mesh axes, each to what the rank holds so far. ``Shard`` is ``torch.chunk`` (the
last chunks may be short or empty). ``_StridedShard(dim, split_factor=sf)`` first chunks the
dim into ``sf`` pieces, chunks each piece across the axis, and gives rank i the i-th chunk of
every piece. ``Replicate`` and ``Partial`` keep everything (Partial holds addends, not values).

The worked example from torch's ``_StridedShard`` docstring, an [8, 8] tensor on a 2x2 mesh
sharded right to left (first on axis 1, then on axis 0), as FSDP2 on top of TP does:

>>> print(explain_placements("_S(0, 2), S(0)", mesh_shape=(2, 2), global_shape=(8, 8)).table())
rank  coord   local   dim 0 (8)  dim 1 (8)
0     (0, 0)  (2, 8)  0-1        all
1     (0, 1)  (2, 8)  4-5        all
2     (1, 0)  (2, 8)  2-3        all
3     (1, 1)  (2, 8)  6-7        all

With ``S(0), S(0)`` instead, ranks 1 and 2 would swap (rows 2-3 and 4-5): left to right.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dtensor_attn import _compat
from dtensor_attn._compat import Partial, Placement, Shard, StridedShard
from dtensor_attn.errors import PlacementError
from dtensor_attn.explain.bounds import check_sizes, coordinate_of, shown_ranks
from dtensor_attn.explain.parse import parse_mesh, parse_placements, parse_shape
from dtensor_attn.explain.strided import (
    SHARD_LIKE,
    TORCH_211_ERROR,
    ShardOrder,
    StridedNote,
    axis_label,
    decode_shard_order,
    explain_strided,
)
from dtensor_attn.placements import format_placements, normalize_placements

Indices = tuple[int, ...]
Held = Sequence[int]  # a range while only plain shards cut the dim (no per-index work), else a tuple


def _chunk(indices: Held, num_chunks: int, i: int) -> Held:
    """The i-th of ``torch.chunk(indices, num_chunks)``, empty where torch.chunk has none."""
    size = -(-len(indices) // num_chunks)
    return indices[min(i * size, len(indices)) : min((i + 1) * size, len(indices))]


def _strided_chunk(indices: Held, split_factor: int, num_chunks: int, i: int) -> Indices:
    # pieces past len(indices) are empty: a huge split factor costs no more than the dim's size
    pieces = (_chunk(indices, split_factor, j) for j in range(min(split_factor, len(indices))))
    return tuple(index for piece in pieces for index in _chunk(piece, num_chunks, i))


def rank_indices(
    placements: Sequence[Placement],
    mesh_shape: Sequence[int],
    global_shape: Sequence[int],
    coordinate: Sequence[int],
    *,
    upto_axis: int | None = None,
) -> tuple[Held, ...]:
    """Global indices, per tensor dim, held by the rank at ``coordinate``; with ``upto_axis``,
    after the axes before it only. A dim only plain shards cut is a ``range``."""
    held: list[Held] = [range(size) for size in global_shape]
    for axis, placement in enumerate(placements[:upto_axis]):
        if isinstance(placement, StridedShard):
            factor = _compat.split_factor(placement)
            held[placement.dim] = _strided_chunk(
                held[placement.dim], factor, mesh_shape[axis], coordinate[axis]
            )
        elif isinstance(placement, Shard):
            held[placement.dim] = _chunk(held[placement.dim], mesh_shape[axis], coordinate[axis])
    return tuple(held)


@dataclass(frozen=True, slots=True)
class RankShard:
    """What one rank holds: its mesh coordinate and, per tensor dim, the global indices."""

    rank: int
    coordinate: tuple[int, ...]
    held: tuple[Held, ...]

    @property
    def indices(self) -> tuple[Indices, ...]:
        return tuple(tuple(i) for i in self.held)

    @property
    def local_shape(self) -> tuple[int, ...]:
        return tuple(len(i) for i in self.held)


def format_indices(indices: Held, size: int) -> str:
    """``0-1, 4-5``; ``all``; ``none``; long strided patterns as first, second, ..., last."""
    if not indices:
        return "none"
    if isinstance(indices, range) and indices.step == 1:  # one run: no need to walk it
        if len(indices) == size and indices.start == 0:
            return "all"
        return f"{indices.start}" if len(indices) == 1 else f"{indices.start}-{indices[-1]}"
    if len(indices) == size and tuple(indices) == tuple(range(size)):
        return "all"
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    text = [f"{a}" if a == b else f"{a}-{b}" for a, b in runs]
    if len(runs) <= 4:
        return ", ".join(text)
    lengths = {b - a + 1 for a, b in runs}
    steps = {runs[i + 1][0] - runs[i][0] for i in range(len(runs) - 1)}
    head = f"{text[0]}, {text[1]}, ..., {text[-1]}"
    if len(lengths) == 1 and len(steps) == 1:
        return f"{head} ({len(runs)} runs of {lengths.pop()}, every {steps.pop()})"
    return f"{head} ({len(runs)} runs, {len(indices)} indices)"


def _columns(rows: list[list[str]]) -> str:
    """Aligned columns; a one-cell row (an elision) spans the table and sets no width."""
    widths = [max(len(row[i]) for row in rows if len(row) > 1) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def _shape_text(shape: Sequence[int]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


@dataclass(frozen=True, slots=True)
class PlacementExplanation:
    """The answer of ``explain_placements``: print it, or read its fields."""

    placements: tuple[Placement, ...]
    mesh_shape: tuple[int, ...]
    mesh_names: tuple[str, ...] | None
    global_shape: tuple[int, ...]
    shard_order: ShardOrder | None
    strided: tuple[StridedNote, ...]

    @property
    def decodes(self) -> bool:
        """False where torch 2.11 raises "... unable to be interpreted into a shard_order"."""
        return self.shard_order is not None

    @property
    def num_ranks(self) -> int:
        return math.prod(self.mesh_shape)

    def rank(self, rank: int) -> RankShard:
        """What ``rank`` holds, computed on demand (a table computes only the ranks it prints)."""
        if not 0 <= rank < self.num_ranks:
            raise IndexError(f"rank {rank} of a {self.num_ranks}-rank mesh {self.mesh_shape}")
        coordinate = coordinate_of(rank, self.mesh_shape)
        held = rank_indices(self.placements, self.mesh_shape, self.global_shape, coordinate)
        return RankShard(rank, coordinate, held)

    @property
    def ranks(self) -> tuple[RankShard, ...]:
        """Every rank, in rank order (costs the whole mesh: for checks, not for printing)."""
        return tuple(self.rank(r) for r in range(self.num_ranks))

    def table(self) -> str:
        header = ["rank", "coord", "local"] + [
            f"dim {d} ({size})" for d, size in enumerate(self.global_shape)
        ]
        rows = [header]
        shown = shown_ranks(self.num_ranks)
        for previous, rank in zip((-1, *shown), shown):
            if rank != previous + 1:
                rows.append([f"... {rank - previous - 1} more ranks"])
            shard = self.rank(rank)
            rows.append(
                [str(shard.rank), _shape_text(shard.coordinate), _shape_text(shard.local_shape)]
                + [format_indices(i, s) for i, s in zip(shard.held, self.global_shape)]
            )
        return _columns(rows)

    def render(self) -> str:
        mesh = ", ".join(
            f"{n}={s}" if self.mesh_names else str(s)
            for n, s in zip(self.mesh_names or self.mesh_shape, self.mesh_shape)
        )
        lines = [
            f"placements {format_placements(self.placements)} on mesh ({mesh}), "
            f"global shape {_shape_text(self.global_shape)}",
            "",
            self.table(),
        ]
        for axis, p in enumerate(self.placements):
            if isinstance(p, Partial):
                lines.append(
                    f"\n{p} on {axis_label(axis, self.mesh_shape, self.mesh_names)}: every rank "
                    f"holds all indices, as addends; the {p.reduce_op} over the axis is the value."
                )
        if self.strided and self.shard_order is not None:
            order = "; ".join(
                f"dim {d} on " + ", then ".join(f"axis {a}" for a in axes)
                for d, axes in self.shard_order
            )
            lines.append(f"\nshard order (torch decodes it): {order}")
        for note in self.strided:
            lines.append(
                f"\n{note.placement} on {axis_label(note.axis, self.mesh_shape, self.mesh_names)}"
                f": {note.reason}."
            )
            for label, text in (("flatten", note.flatten), ("hint", note.hint)):
                if text:
                    lines.append(f"  {label}: {text}")
        if not self.decodes:
            message = TORCH_211_ERROR.format(p=repr(self.placements))
            lines.append(
                f'\ntorch 2.11 raises "{message}" where it needs a shard order (full_tensor, '
                "redistribute); newer torch: \"... cannot be decoded into a corresponding "
                'shard_order", or a fallback.'
            )
        return "\n".join(lines)

    __str__ = render


def _validate(placements, mesh_shape, global_shape) -> None:
    if len(placements) != len(mesh_shape):
        raise PlacementError(
            f"{len(placements)} placements {format_placements(placements)} for a "
            f"{len(mesh_shape)}-D mesh {_shape_text(mesh_shape)}: expected one placement per mesh "
            "axis. Fix: pass a mesh with one size per placement, e.g. --mesh 2,4 for two."
        )
    for p in placements:
        if isinstance(p, SHARD_LIKE) and not -len(global_shape) <= p.dim < len(global_shape):
            raise PlacementError(
                f"{p} shards dim {p.dim}, but the global shape {_shape_text(global_shape)} has "
                f"{len(global_shape)} dims. Fix: pass the tensor's full global shape."
            )


def explain_placements(
    placements, mesh_shape, global_shape, *, mesh_names: Sequence[str] | None = None
) -> PlacementExplanation:
    """Explain ``placements`` of a tensor of ``global_shape`` on a mesh of ``mesh_shape``.

    Every argument may be a value or text in torch's printed forms (``"_S(1, 8)"``, ``"2,4"``,
    ``"cp=2,tp=4"``, ``"8,256"``). Raises ValueError (PlacementError) for a mismatch or sizes
    past ``bounds``' limits. Ranks are computed on demand: ``rank(r)``, ``ranks`` (all), and
    ``table()`` (only the printed ones).
    """
    placements = parse_placements(placements)
    if isinstance(mesh_shape, str) or not all(isinstance(s, int) for s in mesh_shape):
        mesh_shape, parsed_names = parse_mesh(mesh_shape)
        mesh_names = mesh_names or parsed_names
    mesh_shape, global_shape = tuple(mesh_shape), parse_shape(global_shape)
    if mesh_names is not None and len(mesh_names) != len(mesh_shape):
        raise PlacementError(
            f"{len(mesh_names)} axis names {tuple(mesh_names)} for mesh {mesh_shape}: expected "
            "one name per axis. Fix: pass as many names as mesh sizes."
        )
    _validate(placements, mesh_shape, global_shape)
    check_sizes(mesh_shape, global_shape)
    placements = normalize_placements(placements, len(global_shape))
    order, reasons = decode_shard_order(placements, mesh_shape)
    origin = (0,) * len(mesh_shape)
    strided = tuple(
        explain_strided(
            placements,
            axis,
            len(rank_indices(placements, mesh_shape, global_shape, origin, upto_axis=axis)[p.dim]),
            global_shape,
            mesh_shape,
            mesh_names,
            *reversed(reasons[axis]),
        )
        for axis, p in enumerate(placements)
        if isinstance(p, StridedShard)
    )
    names = tuple(mesh_names) if mesh_names is not None else None
    return PlacementExplanation(placements, mesh_shape, names, global_shape, order, strided)


__all__ = [
    "PlacementExplanation",
    "RankShard",
    "explain_placements",
    "format_indices",
    "rank_indices",
]
