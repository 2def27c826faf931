"""``explain_strided`` and ``decode_shard_order``'s reasons, against torch: each ``_StridedShard``
here is made by a real DTensor ``view`` on simulated ranks, so the flatten the explainer names
must be the one the test performed; the decodable split factors it lists must be exactly those
torch's own decoder accepts.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import functools
import math
import re

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from dtensor_attn import _compat
from dtensor_attn._compat import StridedShard
from dtensor_attn.explain.strided import decode_shard_order, explain_strided
from dtensor_attn.placements import flatten_placements
from dtensor_attn.testing.harness.simulate import simulated_mesh


@functools.cache
def viewed(axes: tuple, shape: tuple, placements: tuple, target: tuple) -> tuple:
    """The placements DTensor's view gives a ``shape`` tensor placed ``placements``, as ``target``.
    Where this torch refuses the flatten (torch 2.11), torch 2.13's answer as ``flatten_placements``
    gives it (pinned equal to DTensor's own in test_placements.py, where DTensor answers)."""
    if _compat.view_flattens_sharded_dims():
        with simulated_mesh(dict(axes)) as mesh:
            return tuple(distribute_tensor(torch.zeros(shape), mesh, list(placements)).view(target).placements)
    mesh_shape = tuple(size for _, size in axes)
    return flatten_placements(placements, shape, _compat.view_sources(shape, target), mesh_shape)


# (mesh axes, pre-view shape, its placements, view target, the merged (outer, inner), the strided axis)
FLATTENS = [
    ("BL-cp2", (("cp", 2),), (4, 8), (Shard(1),), (32,), (4, 8), 0),
    ("BLNH-to-TNH-cp2xtp2", (("cp", 2), ("tp", 2)), (2, 8, 4, 3), (Shard(1), Shard(2)), (16, 4, 3), (2, 8), 0),
    ("BLH-odd-batch-cp4", (("cp", 4),), (3, 8, 2), (Shard(1),), (24, 2), (3, 8), 0),
    ("dp-then-cp-of-one-dim", (("dp", 2), ("cp", 2)), (4, 8), (Shard(0), Shard(1)), (32,), (4, 8), 1),
    ("packed-output-labelled-S2", (("tp", 2),), (16, 4, 8), (Shard(2),), (16, 32), (4, 8), 0),
]


@pytest.mark.parametrize("axes,shape,pre,target,merged,axis", [f[1:] for f in FLATTENS],
                         ids=[f[0] for f in FLATTENS])
def test_the_flatten_named_is_the_view_that_made_it(axes, shape, pre, target, merged, axis):
    placements = viewed(axes, shape, pre, target)
    strided = placements[axis]
    assert isinstance(strided, StridedShard)  # torch 2.13's view answers with one
    mesh_shape, names = tuple(s for _, s in axes), tuple(n for n, _ in axes)
    dim, outer, inner = strided.dim, *merged
    size_before = target[dim] // math.prod(  # rank 0's part after the axes to its left
        mesh_shape[a] for a in range(axis) if getattr(placements[a], "dim", None) == dim)
    order, reasons = decode_shard_order(placements, mesh_shape)
    assert order is None and reasons[axis][0] is False
    note = explain_strided(placements, axis, size_before, target, mesh_shape, names,
                           reasons[axis][1], False)
    ways = mesh_shape[axis]
    assert note.flatten == (
        f"dim {dim} (size {target[dim]}) = flatten of ({outer}, {inner}) with the {inner} sharded on "
        f"axis {axis} ({names[axis]}), {ways} ranks ({inner // ways} per rank in each of the {outer} "
        f"blocks): a DTensor view of a {shape} tensor with placements "
        f"({', '.join(map(str, pre))}) as {target} produces exactly this")
    if dim == 0:
        assert note.hint.startswith(f"in attention code: the seq shard of a (B={outer}, L={inner}, ...) "
                                    f"tensor viewed as (B*L, ...): packed tokens (TNH) under context "
                                    f"parallelism on {names[axis]}.")
    else:
        assert note.hint.startswith(f"in attention code: dims (N/tp={outer}, H*tp={inner}) of a packed "
                                    "TNH output labelled with the BLNH Shard(2)")
    assert (note.axis, note.placement, note.decodes) == (axis, strided, False)


def test_a_strided_shard_that_decodes_is_not_a_flatten():
    placements = (_compat.strided_shard(0, 2), Shard(0))  # FSDP2 on top of TP: 2 = the tp size
    order, reasons = decode_shard_order(placements, (4, 2))
    assert order == ((0, (1, 0)),) == _compat.torch_shard_order(placements, (4, 2))
    note = explain_strided(placements, 0, 16, (16,), (4, 2), None, reasons[0][1], True)
    assert note.flatten.startswith("not a flatten: it records that dim 0 was sharded right to left")
    assert note.hint is None


@pytest.mark.parametrize("size_before,factor,names,expected", [
    (12, 5, ("cp",), "no flatten of dim 0 gives it: rank 0 holds 12 of dim 0 before axis 0 (cp), "
                     "2 ranks, not a multiple of the split factor 5"),
    (9, 2, None, "no flatten of dim 0 gives it: rank 0 holds 9 of dim 0 before axis 0, 2 ranks, "
                 "not a multiple of the split factor 2"),
], ids=["named-axis", "unnamed-axis"])
def test_a_split_factor_that_does_not_divide_is_no_flatten(size_before, factor, names, expected):
    placements = (_compat.strided_shard(0, factor),)
    note = explain_strided(placements, 0, size_before, (size_before,), (2,), names, "r", False)
    assert (note.flatten, note.hint) == (expected, None)


def test_a_hand_written_strided_shard_no_view_makes_is_not_claimed_to_be_one():
    # _S(0, 4) with an earlier _S(0, 2) of the same dim: no view of a plain-sharded tensor gives
    # it, so the flatten is described but not claimed to be reproduced.
    placements = (_compat.strided_shard(0, 2), _compat.strided_shard(0, 4))
    note = explain_strided(placements, 1, 16, (32,), (2, 2), ("a", "b"), "r", False)
    assert note.flatten == ("dim 0 (size 32) = flatten of (8, 4) with the 4 sharded on axis 1 (b), "
                            "2 ranks (2 per rank in each of the 8 blocks)")


def _decodable(reason: str) -> list[int]:
    return [int(n) for n in re.search(r"decodable split factors: ([\d, ]+)\)", reason).group(1).split(", ")]


# placements with one _StridedShard to vary: (placements builder of sf, mesh shape, its axis)
VARIED = [
    ("alone", lambda sf: (_compat.strided_shard(0, sf),), (4,), 0),
    ("before-one-shard", lambda sf: (_compat.strided_shard(0, sf), Shard(0)), (2, 3), 0),
    ("before-two-shards", lambda sf: (_compat.strided_shard(1, sf), Shard(1), Shard(1)), (2, 2, 3), 0),
    ("shard-of-another-dim-between", lambda sf: (_compat.strided_shard(0, sf), Shard(1), Shard(0)), (2, 2, 4), 0),
    ("after-a-replicate", lambda sf: (Replicate(), _compat.strided_shard(0, sf), Shard(0)), (3, 2, 4), 1),
]


@pytest.mark.parametrize("build,mesh_shape,axis", [v[1:] for v in VARIED], ids=[v[0] for v in VARIED])
def test_the_decodable_split_factors_listed_are_exactly_torchs(build, mesh_shape, axis):
    """For every split factor 1..25: decodes by our reason iff torch decodes, and where it does
    not, the split factors the reason lists are those torch accepts."""
    accepted = [sf for sf in range(1, 26) if _compat.torch_shard_order(build(sf), mesh_shape) is not None]
    assert accepted and accepted[0] == 1
    for sf in range(1, 26):
        decodes, reason = decode_shard_order(build(sf), mesh_shape)[1][axis]
        assert decodes is (sf in accepted), (sf, reason)
        if not decodes:
            assert _decodable(reason) == accepted, reason
