"""``meaning`` and ``decode_verdicts`` (explain/symbolic.py), against torch.

- With the sizes known, each line's numbers (blocks, block size, piece, total, torch.chunk's
  pieces) are replayed as index arithmetic and must give exactly the indices torch's
  ``distribute_tensor`` puts on every simulated rank.
- With the mesh unknown, a verdict's condition ("decodes only if the split factor 4 equals N1 or
  N1*N2") is evaluated on every small mesh and must hold exactly where torch's decoder decodes;
  "never decodes, for any mesh" must hold on every one.
"""

from __future__ import annotations

import functools
import itertools
import math
import re

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import Placement

from dtensor_attn import _compat
from dtensor_attn._compat import maybe_disable_local_tensor_mode
from dtensor_attn.explain.bounds import coordinate_of
from dtensor_attn.explain.symbolic import Sizes, decode_verdicts, meaning
from dtensor_attn.testing.harness.simulate import simulated_mesh

S = _compat.strided_shard


@functools.cache
def torch_indices(mesh_shape: tuple, shape: tuple, placements: tuple, dim: int) -> dict:
    """{rank: the global indices along ``dim`` torch places on that rank}."""
    axes = {f"a{i}": size for i, size in enumerate(mesh_shape)}
    with simulated_mesh(axes) as mesh:
        # made inside the simulation: torch 2.13's LocalTensorMode splits a plain tensor created
        # outside it by _StridedShard as rank 0 would, on every rank
        index = torch.arange(shape[dim]).view([-1 if d == dim else 1 for d in range(len(shape))])
        local = distribute_tensor(index.expand(shape).contiguous(), mesh, list(placements)).to_local()
        with maybe_disable_local_tensor_mode():
            along = {r: t.movedim(dim, 0) for r, t in _compat.rank_tensors(local).items()}
            return {r: (t if t.ndim == 1 else t.flatten(1)[:, 0]).tolist() for r, t in along.items()}


def replay(lines: list[str], placements, coordinate, size: int, dim: int) -> list[int]:
    """The indices of ``dim`` a rank at ``coordinate`` holds, by the numbers in the lines alone."""
    held = list(range(size))
    for axis, (line, p) in enumerate(zip(lines, placements)):
        if getattr(p, "dim", None) != dim:
            continue
        r = coordinate[axis]
        if contiguous := re.search(r"cut into (\d+) contiguous blocks of (\d+);", line):
            step = int(contiguous.group(2))
            held = held[r * step:(r + 1) * step]
        elif uneven := re.search(r"contiguous blocks of up to \d+ \(torch\.chunk: ([\d, ]+)\)", line):
            pieces = [int(n) for n in uneven.group(1).split(", ")]
            held = held[sum(pieces[:r]):sum(pieces[:r + 1])]
        else:
            found = re.search(r"cut into (\d+) blocks of (\d+); .* r-th piece \((\d+)\) of every "
                              r"block, (\d+) in all", line)
            blocks, block, piece, total = map(int, found.groups())
            held = [i for b in range(blocks) for i in held[b * block + r * piece:b * block + (r + 1) * piece]]
            assert len(held) == total, line
    return held


# (mesh shape, global shape, placements, the dim to follow)
KNOWN = [
    ("S1-over-4", (4,), (2, 8), (Shard(1),), 1),
    ("S0-uneven-over-3", (3,), (8,), (Shard(0),), 0),
    ("S0-uneven-over-4", (4,), (6, 2), (Shard(0),), 0),
    ("strided-sf4-over-2", (2,), (24,), (S(0, 4),), 0),
    ("strided-sf3-over-4", (4,), (24, 2), (S(0, 3),), 0),
    ("shard-then-strided-one-dim", (2, 2), (24, 3), (Shard(0), S(0, 2)), 0),
    ("two-shards-of-one-dim", (2, 3), (12,), (Shard(0), Shard(0)), 0),
    ("strided-packed-tokens-cp2xtp2", (2, 2), (16, 4), (S(0, 2), Shard(1)), 0),
    ("heads-of-packed-tokens-cp2xtp2", (2, 2), (16, 4), (S(0, 2), Shard(1)), 1),
]


@pytest.mark.parametrize("mesh_shape,shape,placements,dim", [k[1:] for k in KNOWN], ids=[k[0] for k in KNOWN])
def test_the_numbers_in_each_line_give_the_indices_torch_places(mesh_shape, shape, placements, dim):
    sharded = tuple(p.dim for p in placements if hasattr(p, "dim"))
    lines = meaning(placements, Sizes(len(mesh_shape), mesh_shape, None, shape, sharded))
    assert len(lines) == len(placements)
    expected = torch_indices(mesh_shape, shape, placements, dim)
    for rank in range(math.prod(mesh_shape)):
        coordinate = coordinate_of(rank, mesh_shape)
        assert replay(lines, placements, coordinate, shape[dim], dim) == expected[rank], (rank, lines)


class Mystery(Placement):
    def __str__(self) -> str:
        return "M?"


@pytest.mark.parametrize("placement,sizes,line", [
    (Replicate(), Sizes(1), "R on axis 0: the N ranks of the mesh axis hold the same full data"),
    (Replicate(), Sizes(1, (4,), ("tp",)), "R on axis 0: the 4 ranks of mesh axis 0 (tp) hold the same full data"),
    (Partial(), Sizes(1), "P(sum) on axis 0: the N ranks of the mesh axis each hold an addend of "
                          "every element; their sum is the value"),
    (Partial("max"), Sizes(1, mesh_names=("cp",)), "P(max) on axis 0: the cp ranks of mesh axis 0 each "
                                                   "hold an addend of every element; their max is the value"),
    (Mystery(), Sizes(1), "M? on axis 0: a placement the explainer does not know"),
], ids=["replicate", "replicate-named", "partial-sum", "partial-max-named", "unknown"])
def test_placements_that_do_not_shard_read_as_what_every_rank_holds(placement, sizes, line):
    assert meaning((placement,), sizes) == [line]


def test_a_symbolic_line_per_axis_names_the_axes_and_the_earlier_ones():
    lines = meaning((Shard(0), Replicate(), S(0, 2), Shard(1)), Sizes(4, sharded_dims=(0, 0, 1)))
    assert lines == [
        "S(0) on axis 0: dim 0 of size S0 is cut into N0 contiguous blocks of S0/N0; rank r of the axis holds block r",
        "R on axis 1: the N1 ranks of mesh axis 1 hold the same full data",
        "_S(0, 2) on axis 2: dim 0 (the S0/N0 each rank holds after axis 0) is cut into 2 blocks of "
        "S0/(2*N0); each block is split across the N2 ranks of mesh axis 2: rank r holds the r-th "
        "piece (S0/(2*N0*N2)) of every block, S0/(N0*N2) in all",
        "S(1) on axis 3: dim 1 of size S1 is cut into N3 contiguous blocks of S1/N3; rank r of the axis holds block r",
    ]


def test_an_uneven_strided_block_names_torch_chunks_pieces_and_no_total():
    (line,) = meaning((S(0, 4),), Sizes(1, (2,), None, (10,), (0,)))
    assert line == ("_S(0, 4) on axis 0: dim 0 of size 10 is cut into 4 blocks of up to 3 (torch.chunk: "
                    "3, 3, 3, 1); each block is split across the 2 ranks of the mesh axis: rank r holds "
                    "the r-th piece of every block, 5 in all")


# ---------------------------------------------------------------- verdicts without a mesh
MESH_SIZES = (1, 2, 3, 4)


def holds(reason: str, sf: int, mesh_shape, names) -> bool:
    """Evaluate "equals A or A*B" with the mesh's sizes put in for the axis names."""
    products = re.search(r"equals (.+?): the product", reason).group(1).split(" or ")
    value = {name: size for name, size in zip(names, mesh_shape)}
    return any(sf == math.prod(value[n] for n in p.split("*")) for p in products)


VERDICTS = [
    ("sf1-is-a-shard", (S(0, 1), Shard(1)), True, "decodes: a split factor of 1 is a plain shard"),
    ("one-axis", (S(1, 8),), False, "never decodes, for any mesh: a split factor > 1 decodes only where it "
     "equals the product of the sizes of later mesh axes that shard dim 1, and no later axis shards dim 1 "
     "(a 1-axis mesh has none)"),
    ("later-axis-shards-another-dim", (S(0, 2), Shard(1)), False, "never decodes, for any mesh: a split "
     "factor > 1 decodes only where it equals the product of the sizes of later mesh axes that shard dim 0, "
     "and no later axis shards dim 0"),
    ("earlier-shard-only", (Shard(0), S(0, 2)), False, None),
    ("one-later-shard", (S(0, 2), Shard(0)), None, "decodes only if the split factor 2 equals N1: the "
     "product of the sizes of the later axes that shard dim 0 (axis 1), taken from the left"),
    ("two-later-shards", (S(0, 4), Shard(0), Shard(0)), None, "decodes only if the split factor 4 equals "
     "N1 or N1*N2: the product of the sizes of the later axes that shard dim 0 (axis 1, axis 2), taken "
     "from the left"),
    ("later-shard-past-another-dim", (S(1, 3), Shard(0), Shard(1)), None, "decodes only if the split "
     "factor 3 equals N2: the product of the sizes of the later axes that shard dim 1 (axis 2), taken "
     "from the left"),
]


@pytest.mark.parametrize("placements,decodes,reason", [v[1:] for v in VERDICTS], ids=[v[0] for v in VERDICTS])
def test_a_verdict_without_a_mesh_holds_on_every_mesh_torch_is_given(placements, decodes, reason):
    (verdict,) = [v for v in decode_verdicts(placements, Sizes(len(placements))) if v.decodes is not True
                  or decodes is True]
    assert verdict.decodes is decodes
    if reason is not None:
        assert verdict.reason == reason
    names = [f"N{a}" for a in range(len(placements))]
    for mesh_shape in itertools.product(MESH_SIZES, repeat=len(placements)):
        torch_decodes = _compat.torch_shard_order(placements, mesh_shape) is not None
        if decodes is None:
            sf = _compat.split_factor(verdict.placement)
            assert torch_decodes is holds(verdict.reason, sf, mesh_shape, names), mesh_shape
        else:
            assert torch_decodes is decodes, mesh_shape


def test_a_condition_names_the_axes_and_the_later_strided_shards():
    placements = (S(0, 4), S(0, 2), Shard(0))
    verdicts = decode_verdicts(placements, Sizes(3, mesh_names=("dp", "cp", "tp")))
    assert [v.axis for v in verdicts] == [0, 1]
    assert verdicts[0].reason == (
        "decodes only if the split factor 4 equals cp or cp*tp: the product of the sizes of the later "
        "axes that shard dim 0 (axis 1, axis 2), taken from the left, and the later _StridedShards "
        "decode too")
    assert verdicts[1].reason.startswith("decodes only if the split factor 2 equals tp:")
    # on a mesh where both conditions hold, torch decodes; where the second fails, it does not
    assert _compat.torch_shard_order(placements, (1, 2, 2)) is not None
    assert _compat.torch_shard_order(placements, (1, 4, 1)) is None


@pytest.mark.parametrize("mesh_shape", [(2, 2), (2, 3), (3, 2)], ids=["2x2", "2x3", "3x2"])
def test_with_the_mesh_known_the_verdict_is_torchs(mesh_shape):
    placements = (S(0, 2), Shard(0))
    (verdict,) = decode_verdicts(placements, Sizes(2, mesh_shape))
    assert verdict.decodes is (_compat.torch_shard_order(placements, mesh_shape) is not None)
    assert verdict.decodes is (mesh_shape[1] == 2)
