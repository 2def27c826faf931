"""Property checks of the pure placement logic (placements.py) over every small mesh and every
way to shard batch, seq and heads, with independently derived expectations.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

- A layout change there and back returns the placements it started from (a view and its
  inverse view hold the same values).
- Between BLNH and BNLH, or to an LSE layout, a plain shard moves to where its logical dim
  moved: the dim's new index, read from the layouts by hand.
- Normalisation, equality, formatting and ``sharded_mesh_axes`` agree with a by-hand reading.
"""

from __future__ import annotations

import itertools
import math

import pytest
from torch.distributed.tensor import Partial, Replicate, Shard

from dtensor_attn import Layout, PlacementError, infer_out_placements
from dtensor_attn._compat import StridedShard
from dtensor_attn.layout import Dim
from dtensor_attn.placements import (
    format_placements, normalize_placement, normalize_placements, placements_equal,
    sharded_mesh_axes,
)

B, L, N, H = 4, 8, 8, 2
SHAPES = {Layout.BLNH: (B, L, N, H), Layout.BNLH: (B, N, L, H)}
MESHES = [(2,), (4,), (2, 2), (2, 4)]
SHARDABLE = (Dim.B, Dim.L, Dim.N)  # head_dim is never sharded at the attention boundary


def logical_placements(mesh_shape):
    """Every assignment of a logical dim (or None: Replicate) to each mesh axis."""
    return itertools.product((None, *SHARDABLE), repeat=len(mesh_shape))


def in_layout(assignment, layout):
    return tuple(Replicate() if d is None else Shard(layout.index(d)) for d in assignment)


def _cases():
    for mesh_shape in MESHES:
        for assignment in logical_placements(mesh_shape):
            name = "-".join("R" if d is None else d.name for d in assignment)
            yield pytest.param(mesh_shape, assignment, id=f"{'x'.join(map(str, mesh_shape))}-{name}")


CASES = list(_cases())


@pytest.mark.parametrize("mesh_shape,assignment", CASES)
@pytest.mark.parametrize("source,target", [(Layout.BLNH, Layout.BNLH), (Layout.BNLH, Layout.BLNH)],
                         ids=["BLNH-to-BNLH", "BNLH-to-BLNH"])
def test_a_transpose_moves_each_shard_with_its_dim(mesh_shape, assignment, source, target):
    got = infer_out_placements(in_layout(assignment, source), source, target,
                               global_shape=SHAPES[source], mesh_shape=mesh_shape)
    assert got == in_layout(assignment, target)


@pytest.mark.parametrize("mesh_shape,assignment", CASES)
def test_packing_to_tokens_and_back_is_the_identity(mesh_shape, assignment):
    blnh = in_layout(assignment, Layout.BLNH)
    sizes = {Dim.B: B, Dim.L: L}
    ways = {d: math.prod(n for n, a in zip(mesh_shape, assignment) if a is d) for d in sizes}
    if any(sizes[d] % ways[d] for d in sizes):  # uneven shards of B or L have no token pattern
        with pytest.raises(PlacementError, match="not a multiple of"):
            infer_out_placements(blnh, Layout.BLNH, Layout.TNH, global_shape=SHAPES[Layout.BLNH],
                                 mesh_shape=mesh_shape)
    else:
        packed = infer_out_placements(blnh, Layout.BLNH, Layout.TNH,
                                      global_shape=SHAPES[Layout.BLNH], mesh_shape=mesh_shape)
        # heads stay a plain shard of dim 1; batch and seq shards become shards of tokens
        expected_dims = [None if d is None else 1 if d is Dim.N else 0 for d in assignment]
        assert [None if p == Replicate() else p.dim for p in packed] == expected_dims
        assert all(isinstance(p, (Shard, StridedShard)) for p in packed if p != Replicate())
        back = infer_out_placements(packed, Layout.TNH, Layout.BLNH, global_shape=(B * L, N, H),
                                    mesh_shape=mesh_shape, batch=B)
        assert placements_equal(back, blnh, 4), (format_placements(packed),
                                                 format_placements(back))


@pytest.mark.parametrize("mesh_shape,assignment", CASES)
@pytest.mark.parametrize("lse", [Layout.BLN, Layout.BNL], ids=lambda l: l.name)
def test_an_lse_layout_keeps_every_shard_of_batch_seq_and_heads(mesh_shape, assignment, lse):
    got = infer_out_placements(in_layout(assignment, Layout.BLNH), Layout.BLNH, lse,
                               global_shape=SHAPES[Layout.BLNH], mesh_shape=mesh_shape)
    assert got == in_layout(assignment, lse)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_a_sharded_head_dim_cannot_reach_an_lse_on_any_axis(mesh_shape):
    for axis in range(len(mesh_shape)):
        placements = tuple(Shard(3) if a == axis else Replicate() for a in range(len(mesh_shape)))
        with pytest.raises(PlacementError):
            infer_out_placements(placements, Layout.BLNH, Layout.BLN,
                                 global_shape=SHAPES[Layout.BLNH], mesh_shape=mesh_shape)


@pytest.mark.parametrize("mesh_shape", MESHES, ids=lambda m: "x".join(map(str, m)))
def test_partial_on_any_axis_is_refused(mesh_shape):
    for axis in range(len(mesh_shape)):
        placements = tuple(Partial() if a == axis else Replicate() for a in range(len(mesh_shape)))
        with pytest.raises(PlacementError, match="contain Partial"):
            infer_out_placements(placements, Layout.BLNH, Layout.TNH,
                                 global_shape=SHAPES[Layout.BLNH], mesh_shape=mesh_shape)


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_normalisation_resolves_negative_dims_and_unit_split_factors(ndim):
    for dim in range(-ndim, ndim):
        assert normalize_placement(Shard(dim), ndim) == Shard(dim % ndim)
        assert normalize_placement(StridedShard(dim, split_factor=1), ndim) == Shard(dim % ndim)
        strided = normalize_placement(StridedShard(dim, split_factor=3), ndim)
        assert isinstance(strided, StridedShard) and strided.dim == dim % ndim
    for other in (Replicate(), Partial()):
        assert normalize_placement(other, ndim) == other


def test_equality_sees_through_spellings_and_formatting_is_torchs():
    assert placements_equal([Shard(-1), Replicate()], (Shard(3), Replicate()), 4)
    assert not placements_equal((Shard(2),), (Shard(1),), 4)
    assert normalize_placements([Shard(-2)], 3) == (Shard(1),)
    assert format_placements((Shard(1), Replicate(), Partial())) == "(S(1), R, P(sum))"
    assert format_placements(()) == "()"


@pytest.mark.parametrize("placements", list(itertools.product(
    (Replicate(), Shard(0), Shard(1), StridedShard(0, split_factor=2)), repeat=3)),
    ids=lambda ps: "-".join(str(p) for p in ps))
def test_sharded_mesh_axes_lists_the_axes_that_cut_each_dim(placements):
    for dim in (0, 1, 2):
        expected = [axis for axis, p in enumerate(placements)
                    if str(p) in (f"S({dim})", f"_S({dim}, 2)")]
        assert sharded_mesh_axes(placements, dim) == expected
