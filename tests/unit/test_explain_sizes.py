"""The explainer's small pure pieces, each against an independent computation: symbolic sizes
(symbolic.Size) evaluated with fractions, torch.chunk's piece sizes, mesh coordinates in
DeviceMesh's row-major order, which ranks a table prints, and the size limits at their edges."""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import pytest
import torch

from dtensor_attn.errors import PlacementError
from dtensor_attn.explain.bounds import (
    HEAD_ROWS, MAX_DIM_SIZE, MAX_MESH_AXES, MAX_MESH_RANKS, MAX_ROWS, TAIL_ROWS, check_sizes,
    coordinate_of, shown_ranks,
)
from dtensor_attn.explain.symbolic import Size, Sizes, chunk_sizes

SYMBOLS = ("S", "N", "tp")


def evaluate(text: str, values: dict[str, int]) -> Fraction:
    """The value of a printed Size, ``S/(8*N)`` or ``256/N``, read back by hand."""
    def product(part: str) -> Fraction:
        part = part.strip("()")
        return math.prod((Fraction(values[t]) if t in values else Fraction(int(t))
                          for t in part.split("*")), start=Fraction(1))
    top, _, bottom = text.partition("/")
    return product(top) / (product(bottom) if bottom else 1)


def random_size(rng: random.Random) -> Size:
    return Size(rng.choice([1, 2, 3, 4, 8, 12]), tuple(rng.sample(SYMBOLS, rng.randint(0, 2))),
                rng.choice([1, 2, 4, 6]), tuple(rng.sample(SYMBOLS, rng.randint(0, 2))))


def value(size: Size, values: dict[str, int]) -> Fraction:
    top = size.number * math.prod(values[s] for s in size.symbols)
    bottom = size.over_number * math.prod(values[s] for s in size.over_symbols)
    return Fraction(top, bottom)


@pytest.mark.parametrize("seed", range(25))
def test_a_printed_size_has_the_value_of_its_size(seed):
    rng = random.Random(seed)
    a, b = random_size(rng), random_size(rng)
    values = {s: rng.choice([2, 3, 5, 7]) for s in SYMBOLS}
    for size in (a, b, a.times(b), a.over(b)):
        assert evaluate(str(size), values) == value(size, values), str(size)
    assert value(a.times(b), values) == value(a, values) * value(b, values)
    assert value(a.over(b), values) == value(a, values) / value(b, values)


@pytest.mark.parametrize("size,text", [
    (Size(symbols=("S",)).over(Size(8)).over(Size(symbols=("N",))), "S/(8*N)"),
    (Size(256).over(Size(symbols=("N",))), "256/N"),
    (Size(32), "32"),
    (Size(symbols=("S",)).over(Size(symbols=("S",))), "1"),
    (Size(12).over(Size(8)), "3/2"),
    (Size(16).over(Size(4)), "4"),
    (Size(symbols=("S",)).times(Size(2)).over(Size(4)), "S/2"),
], ids=["docstring", "number-over-symbol", "number", "cancel", "reduced", "exact", "gcd"])
def test_printed_forms(size, text):
    assert str(size) == text


@pytest.mark.parametrize("size,ways,uneven", [
    (Size(8), Size(4), False), (Size(7), Size(4), True), (Size(symbols=("S",)), Size(3), False),
    (Size(6), Size(symbols=("N",)), False),
], ids=["even", "uneven", "symbol-top", "symbol-bottom"])
def test_only_all_number_sizes_with_a_remainder_are_uneven(size, ways, uneven):
    assert size.over(ways).uneven is uneven


@pytest.mark.parametrize("size,ways", list(itertools.product(range(0, 11), range(1, 11))),
                         ids=lambda v: str(v))
def test_chunk_sizes_are_torch_chunks_piece_sizes(size, ways):
    pieces = [len(p) for p in torch.arange(size).chunk(ways)] if size else []
    pieces += [0] * (ways - len(pieces))  # torch.chunk returns fewer pieces; ranks get empty ones
    expected = ", ".join(map(str, pieces[:8])) + (", ..." if ways > 8 else "")
    assert chunk_sizes(size, ways) == expected


MESHES = [(1,), (3,), (2, 2), (2, 3), (3, 1, 2), (2, 2, 2), (1, 4, 1)]


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_coordinates_follow_device_mesh_row_major_order(mesh_shape):
    expected = list(itertools.product(*(range(s) for s in mesh_shape)))
    assert [coordinate_of(r, mesh_shape) for r in range(math.prod(mesh_shape))] == expected
    # the same as torch's own arange(...).view(mesh_shape) layout of ranks
    ranks = torch.arange(math.prod(mesh_shape)).view(mesh_shape)
    for rank, coordinate in enumerate(expected):
        assert int(ranks[coordinate]) == rank


@pytest.mark.parametrize("num_ranks", range(0, 21))
def test_shown_ranks_are_all_up_to_the_limit_else_head_and_tail(num_ranks):
    shown = shown_ranks(num_ranks)
    if num_ranks <= MAX_ROWS:
        assert shown == tuple(range(num_ranks))
    else:
        assert shown == (*range(HEAD_ROWS), *range(num_ranks - TAIL_ROWS, num_ranks))
        assert len(shown) == HEAD_ROWS + TAIL_ROWS and len(set(shown)) == len(shown)


def test_a_huge_mesh_prints_its_first_and_last_ranks():
    assert shown_ranks(MAX_MESH_RANKS) == (0, 1, 2, 3, MAX_MESH_RANKS - 2, MAX_MESH_RANKS - 1)


@pytest.mark.parametrize("mesh_shape,global_shape,needle", [
    ((1,) * (MAX_MESH_AXES + 1), (4,), f"mesh has {MAX_MESH_AXES + 1} axes; the explainer takes at most {MAX_MESH_AXES}"),
    ((MAX_MESH_RANKS, 2), (4,), f"has {2 * MAX_MESH_RANKS} ranks; the rank table takes at most {MAX_MESH_RANKS}"),
    ((2,), (4, MAX_DIM_SIZE + 1), f"has a dim of size {MAX_DIM_SIZE + 1}; the rank table takes dims of at most {MAX_DIM_SIZE}"),
], ids=["axes", "ranks", "dim"])
def test_sizes_just_past_the_limits_are_refused(mesh_shape, global_shape, needle):
    with pytest.raises(PlacementError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        check_sizes(mesh_shape, global_shape)


def test_sizes_at_the_limits_are_accepted_and_the_option_is_named():
    check_sizes((1,) * MAX_MESH_AXES, (MAX_DIM_SIZE,))
    check_sizes((MAX_MESH_RANKS,), (1,))
    with pytest.raises(PlacementError, match=r"^--mesh has 17 axes.*--mesh cp=2,tp=4"):
        check_sizes((1,) * 17, (1,), mesh_option="--mesh")
    with pytest.raises(PlacementError, match=r"^--shape 1,4194305 has a dim"):
        check_sizes((1,), (1, MAX_DIM_SIZE + 1), shape_option="--shape")


@pytest.mark.parametrize("sizes,axis_words,dim", [
    (Sizes(1), "the N ranks of the mesh axis", "S"),
    (Sizes(2), "the N1 ranks of mesh axis 1", "S"),
    (Sizes(2, mesh_names=("cp", "tp")), "the tp ranks of mesh axis 1", "S"),
    (Sizes(2, mesh_shape=(2, 4), mesh_names=("cp", "tp")), "the 4 ranks of mesh axis 1 (tp)", "S"),
    (Sizes(2, mesh_shape=(2, 4), global_shape=(8, 64)), "the 4 ranks of mesh axis 1", "64"),
    (Sizes(2, sharded_dims=(0, 1)), "the N1 ranks of mesh axis 1", "S1"),
], ids=["one-axis", "two-axes", "names", "names-and-sizes", "shape", "two-sharded-dims"])
def test_axes_and_dims_read_as_numbers_names_or_symbols(sizes, axis_words, dim):
    axis = 0 if sizes.num_axes == 1 else 1
    assert sizes.axis_words(axis) == axis_words
    assert str(sizes.dim(1)) == dim
