"""How big a rank table may be, and which of its ranks are printed.

A table prints every rank of a mesh of up to ``MAX_ROWS`` ranks; a larger one prints the first
``HEAD_ROWS`` and the last ``TAIL_ROWS`` and elides the rest, and only the printed ranks are
computed, so the cost does not grow with the mesh. Sizes past the limits below are refused up
front (they are typos: no cluster has 2**24 ranks), with the option, the value and the fix.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from dtensor_attn.errors import PlacementError

MAX_ROWS = 8
HEAD_ROWS, TAIL_ROWS = 4, 2
MAX_MESH_AXES = 16  # real meshes have up to 5 or 6 (pp, dp_replicate, dp_shard, cp, tp, ep)
MAX_MESH_RANKS = 1 << 24  # 16,777,216
MAX_DIM_SIZE = 1 << 22  # 4,194,304: a strided dim is listed index by index for each printed rank


def shown_ranks(num_ranks: int) -> tuple[int, ...]:
    """The ranks a table prints: all of up to ``MAX_ROWS``, else the first and last few."""
    if num_ranks <= MAX_ROWS:
        return tuple(range(num_ranks))
    return (*range(HEAD_ROWS), *range(num_ranks - TAIL_ROWS, num_ranks))


def coordinate_of(rank: int, mesh_shape: Sequence[int]) -> tuple[int, ...]:
    """The mesh coordinate of ``rank`` (row-major: the last axis varies fastest)."""
    coordinate = []
    for size in reversed(mesh_shape):
        rank, index = divmod(rank, size)
        coordinate.append(index)
    return tuple(reversed(coordinate))


def _sizes(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


def check_sizes(
    mesh_shape: Sequence[int],
    global_shape: Sequence[int],
    *,
    mesh_option: str = "mesh",
    shape_option: str = "global shape",
) -> None:
    """Refuse a mesh or a shape too large to tabulate; the message names the option given."""
    if len(mesh_shape) > MAX_MESH_AXES:
        raise PlacementError(
            f"{mesh_option} has {len(mesh_shape)} axes; the explainer takes at most "
            f"{MAX_MESH_AXES}. Fix: pass one size per mesh axis, e.g. {mesh_option} cp=2,tp=4."
        )
    num_ranks = math.prod(mesh_shape)
    if num_ranks > MAX_MESH_RANKS:
        raise PlacementError(
            f"{mesh_option} {_sizes(mesh_shape)} has {num_ranks} ranks; the rank table takes at "
            f"most {MAX_MESH_RANKS} (2**24). Fix: pass the mesh's real axis sizes (e.g. "
            f"{mesh_option} 8 or {mesh_option} cp=2,tp=4), or leave {mesh_option} out for the "
            "symbolic explanation."
        )
    big = [size for size in global_shape if size > MAX_DIM_SIZE]
    if big:
        raise PlacementError(
            f"{shape_option} {_sizes(global_shape)} has a dim of size {big[0]}; the rank table "
            f"takes dims of at most {MAX_DIM_SIZE} (2**22). Fix: pass a smaller shape in which each "
            "sharded dim is still a multiple of its mesh axes and split factors (the pattern of "
            f"which blocks each rank holds is the same), or leave {shape_option} out for the "
            "symbolic explanation."
        )


__all__ = [
    "MAX_DIM_SIZE",
    "MAX_MESH_AXES",
    "MAX_MESH_RANKS",
    "MAX_ROWS",
    "check_sizes",
    "coordinate_of",
    "shown_ranks",
]
