"""The explainer reads back what torch prints (parse.py), for every small placement tuple, and
its rank table (rank_table.rank_indices) agrees with a closed-form reading of each placement on
evenly divisible sizes, written here independently of the chunking the module does.

Closed forms, for a dim of S indices on a mesh axis of N ranks, rank r:
  Shard:                   the r-th contiguous run of S/N indices;
  _StridedShard(sf):       index i is held when (i mod S/sf) // (S/(sf*N)) == r;
  Replicate, Partial:      every index.
"""

from __future__ import annotations

import itertools
import math

import pytest
from torch.distributed.tensor import Partial, Replicate, Shard

from dtensor_attn._compat import StridedShard
from dtensor_attn.explain.bounds import coordinate_of
from dtensor_attn.explain.parse import parse_mesh, parse_placements, parse_shape
from dtensor_attn.explain.rank_table import rank_indices
from dtensor_attn.placements import format_placements

ATOMS = [Replicate(), Partial(), Shard(0), Shard(1), StridedShard(0, split_factor=2),
         StridedShard(1, split_factor=4)]
TUPLES = [t for n in (1, 2, 3) for t in itertools.product(ATOMS, repeat=n)]


@pytest.mark.parametrize("placements", TUPLES, ids=lambda t: format_placements(t))
def test_printed_placements_read_back(placements):
    for text in (format_placements(placements), repr(placements), repr(list(placements))):
        assert parse_placements(text) == placements, text


@pytest.mark.parametrize("text,shape", [
    ("8,256", (8, 256)), ("torch.Size([2, 3])", (2, 3)), ("(4,)", (4,)), ("[1, 2, 3]", (1, 2, 3)),
    ("8x4", (8, 4)),
], ids=["commas", "torch-size", "tuple", "list", "x"])
def test_shapes_read_in_the_forms_people_paste(text, shape):
    assert parse_shape(text) == shape


@pytest.mark.parametrize("text,expected", [
    ("8", ((8,), None)), ("2x4", ((2, 4), None)), ("cp=2,tp=4", ((2, 4), ("cp", "tp"))),
    ("2,2,2", ((2, 2, 2), None)),
], ids=["one-axis", "x", "named", "commas"])
def test_meshes_read_with_or_without_names(text, expected):
    # (not "mesh": the harness's fixture of that name builds a DeviceMesh)
    assert parse_mesh(text) == expected


def closed_form(placement, size, ways, rank, held):
    """Which of ``held`` (the indices a rank holds so far) it keeps after ``placement``."""
    if isinstance(placement, StridedShard):
        sf = placement.split_factor
        block, piece = len(held) // sf, len(held) // (sf * ways)
        return [i for k, i in enumerate(held) if (k % block) // piece == rank]
    if isinstance(placement, Shard):
        piece = len(held) // ways
        return list(held[rank * piece:(rank + 1) * piece])
    return list(held)


def _even_cases():
    meshes = [(2,), (4,), (2, 2), (2, 4)]
    atoms = [Replicate(), Shard(0), Shard(1), StridedShard(0, split_factor=2),
             StridedShard(1, split_factor=2)]
    for mesh in meshes:
        for placements in itertools.product(atoms, repeat=len(mesh)):
            yield pytest.param(mesh, placements,
                               id=f"{'x'.join(map(str, mesh))}-{format_placements(placements)}")


@pytest.mark.parametrize("mesh_shape,placements", list(_even_cases()))
def test_rank_indices_equal_the_closed_forms_on_even_sizes(mesh_shape, placements):
    shape = (32, 16)  # divisible by every product of split factors and axis sizes used here
    for rank in range(math.prod(mesh_shape)):
        coordinate = coordinate_of(rank, mesh_shape)
        expected = [list(range(size)) for size in shape]
        for axis, placement in enumerate(placements):
            if isinstance(placement, (Shard, StridedShard)):
                d = placement.dim
                expected[d] = closed_form(placement, shape[d], mesh_shape[axis],
                                          coordinate[axis], expected[d])
        got = rank_indices(placements, mesh_shape, shape, coordinate)
        assert [list(indices) for indices in got] == expected, (rank, coordinate)


@pytest.mark.parametrize("mesh_shape,placements", list(_even_cases()))
def test_every_index_is_held_by_the_same_number_of_ranks(mesh_shape, placements):
    """Even sizes: each rank holds an equal share, and together the ranks hold every index
    once per axis that does not shard it."""
    shape = (32, 16)
    counts = [[0] * size for size in shape]
    local_sizes = set()
    for rank in range(math.prod(mesh_shape)):
        held = rank_indices(placements, mesh_shape, shape, coordinate_of(rank, mesh_shape))
        local_sizes.add(tuple(len(h) for h in held))
        for d, indices in enumerate(held):
            for i in indices:
                counts[d][i] += 1
    assert len(local_sizes) == 1
    for d in range(2):
        cutting = math.prod(n for n, p in zip(mesh_shape, placements)
                            if isinstance(p, (Shard, StridedShard)) and p.dim == d)
        assert set(counts[d]) == {math.prod(mesh_shape) // cutting}
