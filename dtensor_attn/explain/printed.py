"""Read the values torch prints inside its error messages: DTensor specs, device meshes, sizes,
and the frames of a traceback. Pure text functions; each returns None where the text has none.

The forms, as torch 2.11 and 2.13 print them (older forms too, where users still paste them):

    Spec(f32[8, 2, 12](S(2)))             Spec(f32[32, 4, 3](_S(0, 4)S(1)))    (2.11, 2.13)
    Spec(S(2) on (8, 2, 12))               Spec((S(1), R) on (8, 2))            (older)
    DeviceMesh((cp=2, tp=2), 'cpu', stride=(2, 1))   DeviceMesh((4,), 'cuda', stride=(1,))
    DeviceMesh('cuda', [[0, 1], [2, 3]], mesh_dim_names=('cp', 'tp'))          (older)
    torch.Size([8, 256])    global shape (8, 256)    mesh shape (2, 4)
    File "train.py", line 42, in forward
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dtensor_attn._compat import Placement
from dtensor_attn.explain.parse import parse_placement, parse_placements

_SPEC_NEW = re.compile(r"^\s*[a-z]+\d*\[(?P<shape>[\d,\s]*)\]\((?P<placements>.*)\)\s*$", re.DOTALL)
_SPEC_OLD = re.compile(r"^\s*(?P<placements>.*?)\s+on\s+[(\[](?P<shape>[\d,\s]*)[)\]]\s*$", re.DOTALL)
# one placement of a concatenated Spec string such as "_S(0, 4)S(1)[1]RP(sum)"; _S before S
_PACKED_ITEM = re.compile(r"_S\(\s*-?\d+\s*,\s*\d+\s*\)|S\(\s*-?\d+\s*\)|R|P(?:\(\w+\))?")
_SHARD_ORDER_INDEX = re.compile(r"\[\d+\]")
_INTS = re.compile(r"-?\d+")
_MESH_OLD = re.compile(
    r"\s*'\w+'\s*,\s*(?P<ranks>\[.*?\])\s*(?:,\s*mesh_dim_names=\((?P<names>[^)]*)\))?\s*$", re.DOTALL
)
_FRAME = re.compile(r'^\s*File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)\s*$')


def balanced(text: str, start: int) -> str | None:
    """The text inside the bracket opening at ``start``, or None if it never closes."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] in "(["
        depth -= text[i] in ")]"
        if depth == 0:
            return text[start + 1 : i]
    return None


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(n) for n in _INTS.findall(text))


def placements_of_spec(text: str) -> tuple[Placement, ...]:
    """``_S(0, 4)S(1)`` (2.13, no separators, maybe shard-order indices) or ``(S(1), R)``."""
    compact = re.sub(r"\s", "", _SHARD_ORDER_INDEX.sub("", text))
    items = _PACKED_ITEM.findall(compact)
    if items and "".join(items) == compact:
        return tuple(parse_placement(item) for item in items)
    return parse_placements(text)


@dataclass(frozen=True, slots=True)
class SpecText:
    """A ``Spec(...)`` read from a message: placements, global shape, and what follows it."""

    placements: tuple[Placement, ...]
    shape: tuple[int, ...]
    end: int  # index in the text just after the closing parenthesis


def find_spec(text: str) -> SpecText | None:
    """The first ``Spec(...)`` in ``text`` whose placements and shape both read."""
    for match in re.finditer(r"\bSpec\(", text):
        body = balanced(text, match.end() - 1)
        if body is None:
            continue
        form = _SPEC_NEW.match(body) or _SPEC_OLD.match(body)
        if not form:
            continue
        try:
            placements = placements_of_spec(form.group("placements"))
        except ValueError:
            continue
        return SpecText(placements, _ints(form.group("shape")), match.end() + len(body) + 1)
    return None


def view_size_after(text: str, end: int, in_shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The size list after a Spec, ``, [2, 4, -1]``, with a -1 resolved from ``in_shape``."""
    match = re.match(r"\s*,\s*[\[(](?P<sizes>[-\d,\s]*)[\])]", text[end:])
    if not match:
        return None
    sizes = list(_ints(match.group("sizes")))
    numel = 1
    for size in in_shape:
        numel *= size
    known = 1
    for size in sizes:
        known *= size if size != -1 else 1
    if sizes.count(-1) == 1 and known and numel % known == 0:
        sizes[sizes.index(-1)] = numel // known
    return tuple(sizes) if -1 not in sizes else None


def _nested_shape(text: str) -> tuple[int, ...] | None:
    """Shape of a printed nested list of ranks, ``[[0, 1], [2, 3]]`` -> (2, 2); None if elided."""
    if "..." in text or "…" in text:
        return None
    shape: list[int] = []
    body = text.strip()
    while body.startswith("["):
        inner = balanced(body, 0)
        if inner is None:
            return None
        parts, depth, count = inner.strip(), 0, 1 if inner.strip() else 0
        for char in parts:
            depth += char in "(["
            depth -= char in ")]"
            count += char == "," and depth == 0
        shape.append(count)
        body = parts
    return tuple(shape) if shape and all(shape) else None


def _names(text: str | None) -> tuple[str, ...] | None:
    if not text:
        return None
    names = tuple(n for n in re.findall(r"['\"]?(\w+)['\"]?", text))
    return names or None


@dataclass(frozen=True, slots=True)
class MeshText:
    """A mesh named by a message: sizes (None where elided) and axis names (None if unnamed)."""

    shape: tuple[int, ...] | None
    names: tuple[str, ...] | None

    def __post_init__(self) -> None:
        if self.shape is not None and (not self.shape or min(self.shape) < 1):
            object.__setattr__(self, "shape", None)  # "(tp=0)" is not a mesh: sizes unknown


def find_mesh(text: str) -> MeshText | None:
    """The first ``DeviceMesh(...)`` or ``mesh shape (2, 4)`` in ``text``."""
    for match in re.finditer(r"\bDeviceMesh\(", text):
        body = balanced(text, match.end() - 1)
        if body is None:
            continue
        new = re.match(r"\s*\((?P<axes>[^()]*)\)\s*,\s*'\w+'", body)
        if new:
            axes = [a.strip() for a in new.group("axes").split(",") if a.strip()]
            pairs = [a.partition("=") for a in axes]
            if pairs and all(sep for _, sep, _ in pairs):
                return MeshText(tuple(int(s) for _, _, s in pairs), tuple(n.strip() for n, _, _ in pairs))
            if pairs and all(a.isdigit() for a in axes):
                return MeshText(tuple(int(a) for a in axes), None)
        old = _MESH_OLD.match(body)
        if old:
            shape, names = _nested_shape(old.group("ranks")), _names(old.group("names"))
            if names and shape and len(names) != len(shape):
                shape = None  # a flat rank list with named axes: the sizes are not printed
            return MeshText(shape, names)
    match = re.search(r"\bmesh[ _]shape\W{0,3}[(\[](?P<sizes>[\d,\s]+)[)\]]", text, re.IGNORECASE)
    if match and _ints(match.group("sizes")):
        return MeshText(_ints(match.group("sizes")), None)
    return None


def find_global_shape(text: str) -> tuple[int, ...] | None:
    """``torch.Size([8, 256])`` or ``global shape (8, 256)`` / ``global_shape=[8, 256]``."""
    match = re.search(r"\bglobal[ _]shape\W{0,3}(?:torch\.Size\()?[(\[](?P<s>[\d,\s]+)[)\]]", text, re.IGNORECASE)
    match = match or re.search(r"\btorch\.Size\(\[(?P<s>[\d,\s]+)\]\)", text)
    return _ints(match.group("s")) if match and _ints(match.group("s")) else None


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame of a pasted traceback: where, in which function, and its source line."""

    file: str
    line: int
    function: str
    source: str

    @property
    def in_torch(self) -> bool:
        return "/torch/" in self.file.replace("\\", "/")

    def __str__(self) -> str:
        where = f"{self.file.replace(chr(92), '/').rsplit('/', 1)[-1]}:{self.line} in {self.function}"
        return f"{where}: {self.source}" if self.source else where


def frames(lines: list[str]) -> tuple[Frame, ...]:
    """The frames of a traceback, in order, each with the source line printed under it."""
    found = []
    for i, line in enumerate(lines):
        match = _FRAME.match(line)
        if match:
            after = lines[i + 1].strip() if i + 1 < len(lines) else ""
            source = "" if _FRAME.match(after) or not after or after.startswith(("^", "~")) else after
            found.append(Frame(match.group("file"), int(match.group("line")), match.group("func"), source))
    return tuple(found)


__all__ = [
    "Frame",
    "MeshText",
    "SpecText",
    "balanced",
    "find_global_shape",
    "find_mesh",
    "find_spec",
    "frames",
    "placements_of_spec",
    "view_size_after",
]
