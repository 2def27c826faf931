"""The explainer's rank tables against what simulated ranks actually hold.

Property style: seeded random placements on 1-D, 2-D and 3-D simulated meshes (uneven sizes,
``_StridedShard`` given directly, and ``_StridedShard`` made by real DTensor views that flatten
sharded dims). The global tensor is an arange, so every local value is its own global flat
index: the explainer's per-dim indices must rebuild every rank's local tensor exactly.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from dtensor_attn import _compat
from dtensor_attn._compat import StridedShard
from dtensor_attn.explain import PlacementExplanation, explain_placements
from dtensor_attn.testing.harness.simulate import simulated_mesh

MESHES = [
    {"a": 2},
    {"a": 3},
    {"a": 4},
    {"a": 2, "b": 2},
    {"a": 2, "b": 3},
    {"cp": 2, "tp": 4},
    {"a": 2, "b": 2, "c": 2},
]
CASES = 20
SHARD_LIKE = (Shard, StridedShard)


def mesh_id(axes: dict[str, int]) -> str:
    return "x".join(f"{name}{size}" for name, size in axes.items())


def expected_local(explained: PlacementExplanation, rank: int) -> torch.Tensor:
    """Rank ``rank``'s local tensor of an arange, rebuilt from the explainer's indices."""
    shape = explained.global_shape
    held = explained.ranks[rank].indices
    flat = torch.zeros(tuple(len(i) for i in held), dtype=torch.long)
    for dim, indices in enumerate(held):
        stride = math.prod(shape[dim + 1 :])
        view = [1] * len(shape)
        view[dim] = len(indices)
        flat = flat + (torch.tensor(indices, dtype=torch.long) * stride).view(view)
    return flat


def held(dtensor: DTensor) -> tuple[tuple, tuple[int, ...], dict[int, torch.Tensor]]:
    """(placements, global shape, each rank's local tensor): read inside the simulated mesh."""
    return tuple(dtensor.placements), tuple(dtensor.shape), _compat.rank_tensors(dtensor.to_local())


def mismatches(placements, shape, locals_by_rank, mesh_shape) -> list[str]:
    """Compare outside the simulated mesh: plain tensor math there runs once, not per rank."""
    explained = explain_placements(placements, mesh_shape, shape)
    wrong = []
    for rank, local in sorted(locals_by_rank.items()):
        expected = expected_local(explained, rank)
        if local.shape != expected.shape or not torch.equal(local, expected):
            wrong.append(f"rank {rank}: holds {local.flatten().tolist()}, table says {expected.flatten().tolist()}")
    return wrong


def random_placements(rng: random.Random, num_axes: int, ndim: int, *, strided_axis: int | None) -> list:
    """Random Replicate / Shard (sometimes a negative dim) / _StridedShard per mesh axis;
    ``strided_axis`` always gets a _StridedShard, so every run covers them."""
    placements = []
    for axis in range(num_axes):
        kind, dim = rng.random(), rng.randrange(ndim)
        if axis == strided_axis or 0.75 <= kind:
            placements.append(_compat.strided_shard(dim, rng.choice([2, 3, 4])))
        elif kind < 0.25:
            placements.append(Replicate())
        else:
            placements.append(Shard(dim - ndim if rng.random() < 0.2 else dim))
    return placements


def random_shape(rng: random.Random, placements: list, mesh_shape, ndim: int, *, even: bool) -> list[int]:
    """Uneven sizes where torch takes them; dims with a _StridedShard (and views) stay even:
    torch's distribute_tensor asserts on an uneven decodable _StridedShard."""
    shape = []
    for dim in range(ndim):
        axes = [a for a, p in enumerate(placements) if isinstance(p, SHARD_LIKE) and p.dim % ndim == dim]
        ways = math.prod(mesh_shape[a] for a in axes)
        factor = math.prod(_compat.split_factor(placements[a]) for a in axes if isinstance(placements[a], StridedShard))
        if factor > 1 or even:  # views: at least 2 per shard, so a merged outer dim is not 1
            shape.append(ways * factor * rng.randint(2 if even else 1, 3 if even else 2))
        else:
            shape.append(rng.randint(1, 2 * ways + 3))
    return shape


@pytest.mark.parametrize("axes", MESHES, ids=mesh_id)
def test_rank_table_equals_distributed_shards(axes):
    rng = random.Random(f"distribute-{mesh_id(axes)}")
    cases = []
    with simulated_mesh(axes) as mesh:
        for case in range(CASES):
            ndim = rng.randint(1, 3)
            strided_axis = rng.randrange(mesh.ndim) if case % 3 == 0 else None
            placements = random_placements(rng, mesh.ndim, ndim, strided_axis=strided_axis)
            shape = random_shape(rng, placements, tuple(mesh.shape), ndim, even=False)
            dtensor = distribute_tensor(torch.arange(math.prod(shape)).view(shape), mesh, placements)
            cases.append((placements, held(dtensor)))
    failures = [
        f"{placements} {shape}: {m}"
        for placements, (actual, shape, local) in cases
        for m in mismatches(actual, shape, local, tuple(axes.values()))
    ]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("axes", MESHES, ids=mesh_id)
def test_rank_table_equals_shards_after_flattening_views(axes):
    """A view merging two sharded dims is where undecodable _StridedShard comes from."""
    rng = random.Random(f"view-{mesh_id(axes)}")
    cases = []
    with simulated_mesh(axes) as mesh:
        for case in range(CASES):
            ndim = rng.randint(2, 4)
            start = rng.randrange(ndim - 1)
            placements = [Shard(p.dim) if isinstance(p, StridedShard) else p
                          for p in random_placements(rng, mesh.ndim, ndim, strided_axis=None)]
            if case % 2 == 0:  # shard the inner merged dim: the view must make a _StridedShard
                placements[rng.randrange(mesh.ndim)] = Shard(start + 1)
            shape = random_shape(rng, placements, tuple(mesh.shape), ndim, even=True)
            merged = [*shape[:start], shape[start] * shape[start + 1], *shape[start + 2 :]]
            dtensor = distribute_tensor(torch.arange(math.prod(shape)).view(shape), mesh, placements)
            cases.append((placements, shape, held(_view_or_skip(dtensor, merged))))
    failures, num_strided = [], 0
    for placements, shape, (viewed, merged, local) in cases:
        num_strided += any(isinstance(p, StridedShard) for p in viewed)
        failures += [f"{placements} {shape} -> {viewed}: {m}" for m in mismatches(viewed, merged, local, tuple(axes.values()))]
        explained = explain_placements(viewed, tuple(axes.values()), merged)
        failures += [f"{viewed}: no flatten reading" for note in explained.strided if note.flatten is None]
    assert not failures, "\n".join(failures)
    assert num_strided >= CASES // 3  # the views did make _StridedShard


def _view_or_skip(dtensor, shape):
    """torch 2.11's DTensor refuses to view a sharded inner dim into a flattened one (the very
    failure the explainer decodes); these tests need real views, so they skip there."""
    try:
        return dtensor.view(shape)
    except RuntimeError as error:
        if "Attempted to flatten" not in str(error):
            raise
        pytest.skip(f"this torch's DTensor view cannot flatten a sharded dim: {error}")


def test_blnh_packed_to_tnh_on_cp_x_tp():
    """DESIGN section 1: BLNH (S(1), S(2)) on (cp=2, tp=4) viewed as TNH is (_S(0, B), S(1))."""
    batch, seq, heads, head_dim = 4, 8, 8, 2
    with simulated_mesh({"cp": 2, "tp": 4}) as mesh:
        x_BLNH = distribute_tensor(
            torch.arange(batch * seq * heads * head_dim).view(batch, seq, heads, head_dim), mesh, [Shard(1), Shard(2)]
        )
        x_TNH = _view_or_skip(x_BLNH, (batch * seq, heads, head_dim))
        assert tuple(x_TNH.placements) == (_compat.strided_shard(0, batch), Shard(1))
        actual = held(x_TNH)
    assert mismatches(*actual, (2, 4)) == []
    explained = explain_placements(x_TNH.placements, "cp=2,tp=4", (batch * seq, heads, head_dim))
    assert not explained.decodes
    assert "the seq shard of a (B=4, L=8, ...) tensor" in explained.strided[0].hint
