"""Read placements, meshes and shapes as torch prints them (and as people type them).

Accepted placement forms, alone or in a tuple/list (``(S(1), R)``, ``[S(1), R]``, ``S(1), R``):

    S(2)   Shard(2)   Shard(dim=2)
    _S(1, 8)   _StridedShard(dim=1, sf=8)   _StridedShard(dim=1, split_factor=8)
    R   Replicate()
    P   P(sum)   Partial(sum)   Partial(reduce_op='avg')

A whole error message is accepted too: the tuple after the word ``placements`` is read, so
``... placements: (_StridedShard(dim=1, sf=8),) is unable to be interpreted ...`` parses.
Meshes: ``8``, ``2,4``, ``2x4``, ``(2, 4)``, ``cp=2,tp=4``. Shapes: ``8,256``, ``8x256``,
``torch.Size([8, 256])``. Every error is a one-line ValueError that says what was expected.
"""

from __future__ import annotations

import re

from dtensor_attn import _compat
from dtensor_attn._compat import Partial, Placement, Replicate, Shard

_FORMS = "S(dim), Shard(dim=..), _S(dim, split_factor), _StridedShard(dim=.., sf=..), R, P, P(sum)"
_ITEM = re.compile(r"^\s*([A-Za-z_]+)\s*(?:\((.*)\))?\s*$", re.DOTALL)
_REDUCE_OPS = ("sum", "avg", "max", "min", "product")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside parentheses or brackets."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char in "([":
            depth += 1
        elif char in ")]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"unbalanced '(' in {text!r}")
    parts.append(text[start:])
    return [p for p in (part.strip() for part in parts) if p]


def _strip_brackets(text: str) -> str:
    """Remove one pair of enclosing () or [] if it encloses the whole text."""
    text = text.strip()
    while len(text) >= 2 and (text[0], text[-1]) in (("(", ")"), ("[", "]")):
        depth = 0
        for i, char in enumerate(text):
            depth += char in "(["
            depth -= char in ")]"
            if depth == 0 and i < len(text) - 1:
                return text  # "(S(1)), (R)": the first bracket closes early
        text = text[1:-1].strip()
    return text


def _from_message(text: str) -> str:
    """The placement tuple inside a torch error message, or the text unchanged."""
    match = re.search(r"placements\W*?(\(|\[)", text)
    if not match:
        return text
    start, depth = match.start(1), 0
    for i in range(start, len(text)):
        depth += text[i] in "(["
        depth -= text[i] in ")]"
        if depth == 0:
            return text[start : i + 1]
    return text


def _args(body: str, item: str) -> tuple[list[str], dict[str, str]]:
    positional, named = [], {}
    for part in _split_top_level(body):
        key, sep, value = part.partition("=")
        value = value.strip().strip("'\"") if sep else key.strip().strip("'\"")
        if sep:
            named[key.strip()] = value
        elif named:
            raise ValueError(f"positional argument after a keyword in {item!r}")
        else:
            positional.append(value)
    return positional, named


def _int(value: str | None, what: str, item: str) -> int:
    try:
        return int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{item!r}: expected an integer {what}, got {value!r}") from None


def _placement_int(value: str | None, what: str, item: str) -> int:
    """A dim or split factor: torch needs it to fit int64, and past 2**31 it is a typo anyway."""
    number = _int(value, what, item)
    if not -(2**31) <= number < 2**31:
        raise ValueError(f"{item.strip()!r}: the {what} {number} is out of range: expected below 2**31")
    return number


def parse_placement(text: str) -> Placement:
    """One placement in any of torch's printed forms (see the module docstring)."""
    match = _ITEM.match(text)
    if not match:
        raise ValueError(f"cannot read placement {text.strip()!r}: expected one of {_FORMS}")
    name, body = match.group(1).lower(), match.group(2)
    positional, named = _args(body or "", text.strip())
    if name in ("r", "replicate"):
        if positional or named:
            raise ValueError(f"{text.strip()!r}: Replicate takes no arguments")
        return Replicate()
    if name in ("p", "partial"):
        op = named.get("reduce_op", positional[0] if positional else "sum").lower()
        if op not in _REDUCE_OPS:
            raise ValueError(f"{text.strip()!r}: expected a reduce op in {_REDUCE_OPS}, got {op!r}")
        return Partial(op)
    if name in ("s", "shard"):
        if len(positional) + len(named) != 1 or set(named) - {"dim"}:
            raise ValueError(f"{text.strip()!r}: expected Shard(dim), e.g. S(2) or Shard(dim=2)")
        return Shard(_placement_int(named.get("dim", positional[0] if positional else None), "dim", text))
    if name in ("_s", "_stridedshard", "stridedshard", "ss", "_ss"):
        dim = named.get("dim", positional[0] if positional else None)
        rest = positional[1:] if "dim" not in named else positional
        factor = named.get("sf", named.get("split_factor", rest[0] if rest else None))
        if factor is None or set(named) - {"dim", "sf", "split_factor"}:
            raise ValueError(
                f"{text.strip()!r}: expected _S(dim, split_factor), e.g. _S(1, 8) or "
                "_StridedShard(dim=1, sf=8)"
            )
        factor_int = _placement_int(factor, "split factor", text)
        if factor_int < 1:
            raise ValueError(f"{text.strip()!r}: the split factor must be >= 1, got {factor_int}")
        return _compat.strided_shard(_placement_int(dim, "dim", text), factor_int)
    raise ValueError(f"unknown placement {text.strip()!r}: expected one of {_FORMS}")


def parse_placements(text: str | Placement | tuple | list) -> tuple[Placement, ...]:
    """A tuple of placements from text (or placements given as values, returned as a tuple)."""
    if isinstance(text, Placement):
        return (text,)
    if isinstance(text, (tuple, list)):
        return tuple(p if isinstance(p, Placement) else parse_placement(str(p)) for p in text)
    body = _strip_brackets(_from_message(str(text)))
    items = _split_top_level(body)
    if not items:
        raise ValueError(f"no placements in {text!r}: expected e.g. '(S(1), _S(0, 2))'")
    return tuple(parse_placement(item) for item in items)


def _sizes(text: str, what: str) -> list[str]:
    body = str(text).strip()
    body = re.sub(r"^torch\.Size\((.*)\)$", r"\1", body)
    body = _strip_brackets(body)
    parts = [p.strip() for p in re.split(r"[,x×*\s]+", body) if p.strip()]
    if not parts:
        raise ValueError(f"empty {what} {text!r}: expected sizes like '2,4' or '2x4'")
    return parts


def parse_shape(text: str | tuple | list) -> tuple[int, ...]:
    """A tensor shape: ``8,256``, ``8x256``, ``(8, 256)``, ``torch.Size([8, 256])``."""
    parts = [str(p) for p in text] if isinstance(text, (tuple, list)) else _sizes(text, "shape")
    shape = tuple(_int(p, "size", f"shape {text}") for p in parts)
    if any(size < 0 for size in shape):
        raise ValueError(f"shape {text!r}: sizes must be >= 0, got {shape}")
    return shape


def parse_mesh(text: str | tuple | list) -> tuple[tuple[int, ...], tuple[str, ...] | None]:
    """A mesh shape and, where given (``cp=2,tp=4``), its axis names."""
    if isinstance(text, (tuple, list)):
        parts = [str(p) for p in text]
    else:
        parts = [p.strip() for p in _split_top_level(_strip_brackets(str(text)))]
        if len(parts) == 1 and "=" not in parts[0]:
            parts = _sizes(parts[0], "mesh")
    names, sizes = [], []
    for part in parts:
        name, sep, size = part.partition("=")
        names.append(name.strip() if sep else None)
        sizes.append(_int((size if sep else name).strip(), "mesh size", f"mesh {text}"))
    if any(size < 1 for size in sizes):
        raise ValueError(f"mesh {text!r}: every axis needs >= 1 rank, got {tuple(sizes)}")
    if any(names) and not all(names):
        raise ValueError(f"mesh {text!r}: name all axes ('cp=2,tp=4') or none ('2,4')")
    return tuple(sizes), (tuple(names) if all(names) else None)  # type: ignore[arg-type]


__all__ = ["parse_mesh", "parse_placement", "parse_placements", "parse_shape"]
