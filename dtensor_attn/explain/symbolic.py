"""What placements mean when the sizes are unknown: per mesh axis, in terms of symbols.

A mesh axis of unknown size is ``N`` (one axis), ``N0``, ``N1``, ... or its name (``tp``); a
dim of unknown size is ``S`` (where one dim is sharded) or ``S0``, ``S1``, .... Known sizes are
used as numbers. ``_S(1, 8)`` on one axis of N ranks reads:

    dim 1 of size S is cut into 8 blocks of S/8; each block is split across the N ranks of the
    mesh axis: rank r holds the r-th piece (S/(8*N)) of every block, S/N in all

Whether a ``_StridedShard`` decodes to a shard order needs only the mesh: where the mesh is
unknown, ``decode_verdicts`` says whether it can decode for any mesh consistent with the
placements (never: no later axis shards its dim), and on what condition.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from dtensor_attn import _compat
from dtensor_attn._compat import Partial, Placement, Replicate, StridedShard
from dtensor_attn.explain.strided import SHARD_LIKE, decode_shard_order
from dtensor_attn.placements import sharded_mesh_axes


@dataclass(frozen=True, slots=True)
class Size:
    """A product of known numbers and symbols over another: ``S/(8*N)``, ``32``, ``256/N``."""

    number: int = 1
    symbols: tuple[str, ...] = ()
    over_number: int = 1
    over_symbols: tuple[str, ...] = ()

    def times(self, other: Size) -> Size:
        return Size(
            self.number * other.number,
            self.symbols + other.symbols,
            self.over_number * other.over_number,
            self.over_symbols + other.over_symbols,
        )

    def over(self, other: Size) -> Size:
        return self.times(Size(other.over_number, other.over_symbols, other.number, other.symbols))

    @property
    def uneven(self) -> bool:
        """All numbers, and the division leaves a remainder (torch.chunk gives unequal pieces)."""
        return not self.symbols and not self.over_symbols and self.number % self.over_number != 0

    def __str__(self) -> str:
        top, bottom = list(self.symbols), list(self.over_symbols)
        for symbol in list(top):  # S/S cancels
            if symbol in bottom:
                top.remove(symbol)
                bottom.remove(symbol)
        common = math.gcd(self.number, self.over_number) or 1
        number, over = self.number // common, self.over_number // common

        def product(n: int, symbols: list[str]) -> tuple[str, int]:
            parts = ([str(n)] if n != 1 or not symbols else []) + symbols
            return "*".join(parts), len(parts)

        numerator, _ = product(number, top)
        if over == 1 and not bottom:
            return numerator
        denominator, count = product(over, bottom)
        return f"{numerator}/({denominator})" if count > 1 else f"{numerator}/{denominator}"


def chunk_sizes(size: int, ways: int) -> str:
    """torch.chunk's piece sizes of ``size`` over ``ways`` ranks: ``2, 2, 2, 0``."""
    step = -(-size // ways)
    pieces = [min(step, max(0, size - i * step)) for i in range(min(ways, 8))]
    return ", ".join(map(str, pieces)) + (", ..." if ways > 8 else "")


def _blocks(size: Size, ways: Size) -> str:
    """``of 3``, ``of S/N``, or for uneven numbers ``of up to 2 (torch.chunk: 2, 2, 2, 0)``."""
    block = size.over(ways)
    if not block.uneven:
        return f"of {block}"
    return f"of up to {-(-size.number // ways.number)} (torch.chunk: {chunk_sizes(size.number, ways.number)})"


@dataclass(frozen=True, slots=True)
class Sizes:
    """What is known: mesh sizes and dim sizes (None where unknown), and axis names."""

    num_axes: int
    mesh_shape: tuple[int, ...] | None = None
    mesh_names: tuple[str, ...] | None = None
    global_shape: tuple[int, ...] | None = None
    sharded_dims: tuple[int, ...] = ()

    def axis(self, axis: int) -> Size:
        if self.mesh_shape is not None:
            return Size(self.mesh_shape[axis])
        if self.mesh_names:
            return Size(symbols=(self.mesh_names[axis],))
        return Size(symbols=("N" if self.num_axes == 1 else f"N{axis}",))

    def dim(self, dim: int) -> Size:
        if self.global_shape is not None and 0 <= dim < len(self.global_shape):
            return Size(self.global_shape[dim])
        return Size(symbols=("S" if len(set(self.sharded_dims)) <= 1 else f"S{dim}",))

    def axis_words(self, axis: int) -> str:
        """``the N ranks of the mesh axis``, ``the 4 ranks of mesh axis 1 (tp)``."""
        if self.num_axes == 1 and not self.mesh_names:
            return f"the {self.axis(axis)} ranks of the mesh axis"
        name = f" ({self.mesh_names[axis]})" if self.mesh_names and self.mesh_shape is not None else ""
        return f"the {self.axis(axis)} ranks of mesh axis {axis}{name}"


def meaning(placements: Sequence[Placement], sizes: Sizes) -> list[str]:
    """One line per mesh axis: what each rank of that axis holds."""
    lines = []
    for axis, p in enumerate(placements):
        ranks = sizes.axis_words(axis)
        if isinstance(p, Replicate):
            lines.append(f"{p} on axis {axis}: {ranks} hold the same full data")
            continue
        if isinstance(p, Partial):
            lines.append(
                f"{p} on axis {axis}: {ranks} each hold an addend of every element; their "
                f"{p.reduce_op} is the value"
            )
            continue
        if not isinstance(p, SHARD_LIKE):
            lines.append(f"{p} on axis {axis}: a placement the explainer does not know")
            continue
        before = sizes.dim(p.dim)
        earlier = sharded_mesh_axes(placements[:axis], p.dim)
        for a in earlier:
            before = before.over(sizes.axis(a))
        what = f"dim {p.dim} of size {before}" if not earlier else (
            f"dim {p.dim} (the {before} each rank holds after axis {', '.join(map(str, earlier))})"
        )
        n = sizes.axis(axis)
        if isinstance(p, StridedShard):
            sf = Size(_compat.split_factor(p))
            block, total = before.over(sf), before.over(n)
            piece = "" if block.uneven or block.over(n).uneven else f" ({block.over(n)})"
            lines.append(
                f"{p} on axis {axis}: {what} is cut into {sf} blocks {_blocks(before, sf)}; each "
                f"block is split across {ranks}: rank r holds the r-th piece{piece} of every "
                f"block" + ("" if total.uneven else f", {total} in all")
            )
        else:
            lines.append(
                f"{p} on axis {axis}: {what} is cut into {n} contiguous blocks "
                f"{_blocks(before, n)}; rank r of the axis holds block r"
            )
    return lines


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether the ``_StridedShard`` on ``axis`` decodes: True, False, or None (it depends)."""

    axis: int
    placement: Placement
    decodes: bool | None
    reason: str


def decode_verdicts(placements: Sequence[Placement], sizes: Sizes) -> list[Verdict]:
    """A verdict per ``_StridedShard``: exact where the mesh is known, else for any mesh."""
    strided = [a for a, p in enumerate(placements) if isinstance(p, StridedShard)]
    if sizes.mesh_shape is not None:
        _, reasons = decode_shard_order(placements, sizes.mesh_shape)
        return [Verdict(a, placements[a], *reasons[a]) for a in strided]
    verdicts = []
    for a in strided:
        p = placements[a]
        sf, dim = _compat.split_factor(p), p.dim
        later = [b for b in sharded_mesh_axes(placements, dim) if b > a]
        if sf == 1:
            verdicts.append(Verdict(a, p, True, "decodes: a split factor of 1 is a plain shard"))
        elif not later:
            why = " (a 1-axis mesh has none)" if len(placements) == 1 else ""
            verdicts.append(Verdict(a, p, False, (
                f"never decodes, for any mesh: a split factor > 1 decodes only where it equals "
                f"the product of the sizes of later mesh axes that shard dim {dim}, and no later "
                f"axis shards dim {dim}{why}"
            )))
        else:
            products = [sizes.axis(later[0])]
            for b in later[1:]:
                products.append(products[-1].times(sizes.axis(b)))
            also = any(isinstance(placements[b], StridedShard) for b in later)
            verdicts.append(Verdict(a, p, None, (
                f"decodes only if the split factor {sf} equals {' or '.join(map(str, products))}: "
                f"the product of the sizes of the later axes that shard dim {dim} "
                f"({', '.join(f'axis {b}' for b in later)}), taken from the left"
                + (", and the later _StridedShards decode too" if also else "")
            )))
    return verdicts


__all__ = ["Size", "Sizes", "Verdict", "chunk_sizes", "decode_verdicts", "meaning"]
