"""Read what a user has: placements, or torch's error message (one line or a whole traceback).

``read_message(text)`` returns a ``Message``: which torch message it is (``MessageKind``), the
line it was read from, and every value the text names: placements, a mesh (sizes and axis
names), a global shape, the dim the message is about, a view's target size, and the last frame
of the user's own code. Kinds, with torch's wording (torch 2.13 unless marked):

    NOT_INTERPRETED    use_strided_shard_as_shard_order is True, but placements: (...) is unable
                       to be interpreted into a corresponding shard_order              (torch 2.11)
    NOT_DECODED        _StridedShard placements (...) cannot be decoded into a corresponding
                       shard_order
    FLATTEN_SHARDED    Attempted to flatten multiple dimensions, with dimension 2 being sharded
                                                                                       (torch 2.11)
    FLATTEN_UNEVEN     Cannot flatten unevenly sharded tensor: dimension 1 (size 6) is not evenly
                       divisible by mesh dimension 0 (size 4)   (2.11: Attempted to flatten
                       unevenly sharded dimension 1)
    UNFLATTEN_UNEVEN   Cannot unflatten unevenly sharded tensor: output dimension 0 (size 3) ...
                       (2.11: Attempted to split the sharded dimension 0 into multiple subdimensions)
    RESHAPE_SHARDED    This operation would remove or reshape sharded dimension 1
    PROPAGATION_FAILED Sharding propagation failed for aten.view.default(Spec(...), [...]) on
                       DeviceMesh(...) -- with none of the above before it
    PLACEMENTS         no torch message: placements as torch prints them

Text that is none of these raises a one-line ValueError listing the accepted forms.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from dtensor_attn._compat import Placement
from dtensor_attn.explain.parse import parse_placements
from dtensor_attn.explain.printed import (
    Frame,
    find_global_shape,
    find_mesh,
    find_spec,
    frames,
    view_size_after,
)


class MessageKind(enum.Enum):
    PLACEMENTS = "placements"
    NOT_INTERPRETED = "not interpreted as a shard order"
    NOT_DECODED = "not decoded into a shard order"
    FLATTEN_SHARDED = "flatten with a sharded inner dim"
    FLATTEN_UNEVEN = "flatten of an unevenly sharded dim"
    UNFLATTEN_UNEVEN = "split of a sharded dim the mesh does not divide"
    RESHAPE_SHARDED = "view that removes or reshapes a sharded dim"
    PROPAGATION_FAILED = "sharding propagation failed"


_D = r"(?P<dim>\d+)"
_SIZES = (
    r"(?:\s*\(size (?P<size>\d+)\) is not evenly divisible by mesh dimension (?P<axis>\d+) "
    r"\(size (?P<axis_size>\d+)\))?"
)
# the more specific kinds first: a chained traceback holds the propagation failure around them
_PATTERNS: tuple[tuple[MessageKind, re.Pattern], ...] = tuple(
    (kind, re.compile(pattern.replace(" ", r"\s+"), re.IGNORECASE))  # pasted text wraps anywhere
    for kind, pattern in (
        (MessageKind.FLATTEN_SHARDED, rf"Attempted to flatten multiple dimensions, with dimension {_D} being sharded"),
        (MessageKind.FLATTEN_UNEVEN, rf"Cannot flatten unevenly sharded tensor: dimension {_D}{_SIZES}"),
        (MessageKind.FLATTEN_UNEVEN, rf"Attempted to flatten unevenly sharded dimension {_D}"),
        (MessageKind.UNFLATTEN_UNEVEN, rf"Cannot unflatten unevenly sharded tensor: output dimension {_D}{_SIZES}"),
        (MessageKind.UNFLATTEN_UNEVEN, rf"Attempted to split the sharded dimension {_D} into multiple"),
        (MessageKind.RESHAPE_SHARDED, rf"would remove or reshape sharded dimension {_D}"),
        (
            MessageKind.NOT_INTERPRETED,
            r"use_strided_shard_as_shard_order is True, but placements"
            r"|is unable to be interpreted into a corresponding shard_order",
        ),
        (MessageKind.NOT_DECODED, r"cannot be decoded into a corresponding shard_order"),
        (MessageKind.PROPAGATION_FAILED, r"Sharding propagation failed (?:for|on op) (?P<op>[\w.]+)"),
    )
)
_ERROR_TYPE = re.compile(r"(?:^|\s)(?P<type>(?:\w+\.)*\w*(?:Error|Exception))\s*:")
MAX_CHARS = 1_000_000  # a traceback is a few kB; more is a whole log, and slow to scan
_RANK_PREFIX = re.compile(r"^[ \t]*\[(?:rank|default)\d*\]:[ \t]?", re.MULTILINE)  # torchrun's
ACCEPTED = (
    "expected placements as torch prints them ('_S(1, 8)', '(S(1), R)', "
    "'(_StridedShard(dim=1, sf=8),)') or a torch error about them, one line or a whole "
    "traceback ('... is unable to be interpreted into a corresponding shard_order', '... cannot "
    "be decoded into a corresponding shard_order', 'Attempted to flatten multiple dimensions, "
    "with dimension 2 being sharded', 'Sharding propagation failed for aten.view.default(...)')"
)


@dataclass(frozen=True, slots=True)
class Message:
    """What the pasted text says; None wherever it does not say."""

    kind: MessageKind
    line: str = ""  # torch's line the kind was read from, whitespace collapsed
    error_type: str | None = None
    placements: tuple[Placement, ...] | None = None
    placements_error: str | None = None  # why the placements of a known message did not read
    mesh_shape: tuple[int, ...] | None = None
    mesh_names: tuple[str, ...] | None = None
    global_shape: tuple[int, ...] | None = None
    dim: int | None = None  # the tensor dim the message names
    dim_size: int | None = None
    axis: int | None = None  # the mesh axis an uneven message names, and its size
    axis_size: int | None = None
    op: str | None = None
    view_shape: tuple[int, ...] | None = None  # a view's target size (-1 resolved)
    frame: Frame | None = None  # the last frame of the user's code in a traceback
    local_map: str | None = None  # the kernel of a local_map the error passed through

    @property
    def is_torch_message(self) -> bool:
        return self.kind is not MessageKind.PLACEMENTS


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= 60 else flat[:57] + "...")


def _line_of(text: str, start: int, end: int) -> str:
    """The lines a match spans (a pasted message may wrap), whitespace collapsed."""
    begin = text.rfind("\n", 0, start) + 1
    stop = text.find("\n", end)
    return " ".join(text[begin : len(text) if stop < 0 else stop].split())


def _int(match: re.Match, group: str) -> int | None:
    value = match.groupdict().get(group)
    return int(value) if value is not None else None


def read_message(text: str) -> Message:
    """Read placements or a torch error message; one-line ValueError if it is neither."""
    if len(text) > MAX_CHARS:
        raise ValueError(
            f"the input has {len(text)} characters; expected at most {MAX_CHARS}: one message or "
            "traceback. Fix: paste the traceback of the one error"
        )
    text = _RANK_PREFIX.sub("", str(text)).strip()
    if not text:
        raise ValueError(f"nothing to explain: {ACCEPTED}")
    found = next(((k, m) for k, p in _PATTERNS for m in [p.search(text)] if m), None)
    if found is None:
        try:
            return Message(MessageKind.PLACEMENTS, placements=parse_placements(text))
        except ValueError as error:
            detail = " ".join(str(error).split())
            if not detail.startswith(("cannot read placement", "unknown placement", "no placements")):
                raise  # a placement with a bad argument: its own error says what it expected
            name = detail.split(": expected one of")[0]
            name = "" if name.startswith("cannot read placement") else f" ({name})"
            raise ValueError(f"cannot read {_snippet(text)}{name}: {ACCEPTED}") from None
    kind, match = found
    line = _line_of(text, match.start(), match.end())
    error_type = _ERROR_TYPE.search(text[: match.start()].rsplit("\n", 1)[-1] + " ")
    spec = find_spec(text)
    placements = spec.placements if spec else None
    placements_error = None
    if placements is None and kind in (MessageKind.NOT_INTERPRETED, MessageKind.NOT_DECODED):
        try:
            placements = parse_placements(line)
        except ValueError as error:
            placements_error = " ".join(str(error).split())
    mesh = find_mesh(text)
    axis, axis_size = _int(match, "axis"), _int(match, "axis_size")
    axis_size = axis_size if axis_size else None  # "(size 0)" is no mesh axis: unknown
    mesh_shape = mesh.shape if mesh else None
    if mesh_shape is None and axis_size is not None and placements is not None and len(placements) == 1:
        mesh_shape = (axis_size,)  # "mesh dimension 0 (size 4)" of a 1-axis mesh is the mesh
    all_frames = frames(text.splitlines())
    user_frames = [f for f in all_frames if not f.in_torch]
    return Message(
        kind,
        line=line,
        error_type=error_type.group("type") if error_type else None,
        placements=placements,
        placements_error=placements_error,
        mesh_shape=mesh_shape,
        mesh_names=mesh.names if mesh else None,
        global_shape=spec.shape if spec else find_global_shape(text),
        dim=_int(match, "dim"),
        dim_size=_int(match, "size"),
        axis=axis,
        axis_size=axis_size,
        op=match.group("op") if "op" in match.groupdict() else _op(text),
        view_shape=view_size_after(text, spec.end, spec.shape) if spec else None,
        frame=user_frames[-1] if user_frames else None,
        local_map=_local_map_kernel(text, all_frames),
    )


def _local_map_kernel(text: str, all_frames: tuple[Frame, ...]) -> str | None:
    """``local_map(packed_attention)`` as the trace prints it, or the user's function called
    from torch's local_map wrapper (``_func_map.py``) in a traceback."""
    match = re.search(r"\blocal_map\((?P<name>\w+)\)", text)
    if match:
        return match.group("name")
    for i, frame in enumerate(all_frames):
        if frame.in_torch and "_func_map" in frame.file:
            kernel = next((f for f in all_frames[i + 1 :] if not f.in_torch), None)
            if kernel is not None:
                return kernel.function
    return None


def _op(text: str) -> str | None:
    match = re.search(r"Sharding propagation failed (?:for|on op) (?P<op>[\w.]+)", text)
    return match.group("op") if match else None


__all__ = ["ACCEPTED", "MAX_CHARS", "Message", "MessageKind", "read_message"]
