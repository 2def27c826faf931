"""What the explainer works from: the options' values over those the message names.

``resolve(message, mesh, shape)`` parses and bounds ``--mesh`` and ``--shape`` (their errors name
them: exit code 2), takes the message's own mesh, axis names and global shape where the options
do not give them, and drops (with a note) those that do not fit the placements or are too large
for a rank table.
"""

from __future__ import annotations

from dataclasses import dataclass

from dtensor_attn._compat import Placement
from dtensor_attn.errors import PlacementError
from dtensor_attn.explain.bounds import MAX_MESH_AXES, check_sizes
from dtensor_attn.explain.focus import shape_text
from dtensor_attn.explain.message import Message
from dtensor_attn.explain.parse import parse_mesh, parse_shape
from dtensor_attn.explain.strided import SHARD_LIKE
from dtensor_attn.placements import format_placements, normalize_placements


@dataclass(frozen=True, slots=True)
class Known:
    """What the answer works from: the options' values over the message's, and where each is from."""

    placements: tuple[Placement, ...] | None
    mesh_shape: tuple[int, ...] | None
    names: tuple[str, ...] | None
    global_shape: tuple[int, ...] | None
    mesh_from: str
    shape_from: str
    notes: tuple[str, ...]


def _from_message(message: Message, notes: list[str]):
    """The message's mesh, axis names and shape, dropped (with a note) where they do not fit."""
    placements, names = message.placements, message.mesh_names
    mesh_shape, global_shape = message.mesh_shape, message.global_shape
    if mesh_shape is not None and placements is not None and len(mesh_shape) != len(placements):
        notes.append(
            f"the message's mesh {shape_text(mesh_shape)} has {len(mesh_shape)} axes for "
            f"{len(placements)} placements: not used"
        )
        mesh_shape = names = None
    if names is not None and placements is not None and len(names) != len(placements):
        names = None
    if global_shape is not None and placements is not None and not _fits(placements, global_shape):
        notes.append(f"the message's shape {shape_text(global_shape)} has too few dims for the placements: not used")
        global_shape = None
    try:
        check_sizes(mesh_shape or (), ())
    except PlacementError:
        notes.append(f"the message's mesh {shape_text(mesh_shape)} is too large for a rank table: not used")
        mesh_shape = None
    try:
        check_sizes((), global_shape or ())
    except PlacementError:
        notes.append(f"the message's shape {shape_text(global_shape)} is too large for a rank table: not used")
        global_shape = None
    return mesh_shape, names, global_shape


def _fits(placements, global_shape) -> bool:
    ndim = len(global_shape)
    return all(-ndim <= p.dim < ndim for p in placements if isinstance(p, SHARD_LIKE))


def resolve(message: Message, mesh: str | None, shape: str | None) -> Known:
    """Options first (their errors name them: exit code 2), then what the message names."""
    placements = message.placements
    if placements is not None and len(placements) > MAX_MESH_AXES:
        raise PlacementError(
            f"{len(placements)} placements: one per mesh axis, and the explainer takes at most "
            f"{MAX_MESH_AXES} axes. Fix: paste one tensor's placements, e.g. '(S(1), _S(0, 2))'."
        )
    notes: list[str] = []
    mesh_shape, names, global_shape = _from_message(message, notes)
    mesh_from = shape_from = "from the message"
    if mesh is not None:
        mesh_shape, names = parse_mesh(mesh)
        check_sizes(mesh_shape, (), mesh_option="--mesh")
        mesh_from = "from --mesh"
        if placements is not None and len(mesh_shape) != len(placements):
            raise PlacementError(
                f"{len(placements)} placements {format_placements(placements)} for a "
                f"{len(mesh_shape)}-D mesh {shape_text(mesh_shape)}: expected one placement per "
                "mesh axis. Fix: pass a mesh with one size per placement, e.g. --mesh 2,4 for two."
            )
    if shape is not None:
        global_shape = parse_shape(shape)
        check_sizes((), global_shape, shape_option="--shape")
        shape_from = "from --shape"
        bad = [p for p in placements or () if isinstance(p, SHARD_LIKE) and not _fits((p,), global_shape)]
        if bad:
            raise PlacementError(
                f"{bad[0]} shards dim {bad[0].dim}, but the global shape {shape_text(global_shape)} "
                f"has {len(global_shape)} dims. Fix: pass the tensor's full global shape with --shape."
            )
    if placements is not None and global_shape is not None:
        placements = normalize_placements(placements, len(global_shape))  # S(-1) is S(ndim - 1)
    return Known(placements, mesh_shape, names, global_shape, mesh_from, shape_from, tuple(notes))


def mesh_text(mesh_shape, names) -> str:
    return ",".join(f"{n}={s}" for n, s in zip(names, mesh_shape)) if names else ",".join(map(str, mesh_shape))


__all__ = ["Known", "mesh_text", "resolve"]
