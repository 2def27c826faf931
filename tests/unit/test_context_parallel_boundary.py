"""The context-parallel boundary (context_parallel_boundary.py) as values, without any hook.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

``gathered_boundary`` reads which dim torch's all-gather grew from k's shape before and after;
it is checked against a brute-force reading over every small shape and cp degree.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from dtensor_attn.backends import REGISTRY
from dtensor_attn.backends.base import CPStrategy
from dtensor_attn.config import Backend
from dtensor_attn.context_parallel import CPBoundary as ReExported
from dtensor_attn.context_parallel_boundary import (
    CPBoundary, expected_boundary, gathered_boundary, observe_boundary,
)
from dtensor_attn.layout import Layout

UNREADABLE = CPBoundary(CPStrategy.ALL_GATHER, -1, (), (Shard(-1),))
STRATEGY = {Backend.SDPA: CPStrategy.RING, Backend.FLEX: CPStrategy.ALL_GATHER,
            Backend.VARLEN: CPStrategy.ALL_GATHER}  # docs/context-parallel.md, by hand


def brute_force_gathered(local, gathered, degree):
    """The one dim whose size was multiplied by the degree while all others stayed, else None."""
    if len(local) != len(gathered):
        return None
    candidates = [d for d in range(len(local))
                  if gathered[d] == local[d] * degree
                  and all(gathered[e] == local[e] for e in range(len(local)) if e != d)]
    return candidates[0] if len(candidates) == 1 and local[candidates[0]] != 0 else None


SHAPES = list(itertools.product((1, 2, 3), (2, 4), (3, 6)))


@pytest.mark.parametrize("degree", [2, 3], ids=lambda d: f"cp{d}")
@pytest.mark.parametrize("local", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gathered_dim_matches_brute_force_over_every_small_growth(local, degree):
    for dim in range(len(local)):
        gathered = tuple(s * degree if d == dim else s for d, s in enumerate(local))
        expected = brute_force_gathered(local, gathered, degree)
        got = gathered_boundary(local, gathered, degree)
        if expected is None:
            assert got == UNREADABLE
        else:
            assert got == CPBoundary(CPStrategy.ALL_GATHER, expected, (Shard(expected),),
                                     (Replicate(),))
    # unchanged, or two dims grown: no single gathered dim
    assert gathered_boundary(local, local, degree) == UNREADABLE
    both = (local[0] * degree, local[1] * degree, local[2])
    assert gathered_boundary(local, both, degree) == UNREADABLE


@pytest.mark.parametrize("local,gathered", [
    (None, (2, 8, 4)),           # the shape was never noted
    ((2, 4, 4), (2, 12, 4)),     # grown by 3 on a cp=2 mesh
    ((2, 4, 4), (2, 8, 5)),      # another dim changed too
    ((2, 4, 4), (2, 8)),         # a dim was dropped
], ids=["not-noted", "wrong-factor", "two-dims-changed", "dim-dropped"])
def test_shapes_that_are_no_single_gather_are_unreadable(local, gathered):
    assert gathered_boundary(local, gathered, 2) == UNREADABLE


@pytest.mark.parametrize("backend", list(Backend), ids=lambda b: b.value)
@pytest.mark.parametrize("layout", [Layout.BLNH, Layout.BNLH], ids=lambda l: l.name)
def test_expected_boundary_per_backend_and_layout(backend, layout):
    boundary = expected_boundary(layout, backend)
    seq_dim = {Layout.BLNH: 1, Layout.BNLH: 2}[layout]
    assert boundary.strategy is STRATEGY[backend] is REGISTRY[backend].cp_strategy
    assert (boundary.seq_dim, boundary.q) == (seq_dim, (Shard(seq_dim),))
    # ring: k/v stay sharded and rotate; all-gather: k/v whole on every rank
    kv = (Shard(seq_dim),) if STRATEGY[backend] is CPStrategy.RING else (Replicate(),)
    assert boundary.kv == kv
    assert boundary.row() == (STRATEGY[backend].value, str(seq_dim), f"(S({seq_dim}))",
                              f"(S({seq_dim}))" if kv[0] != Replicate() else "(R)")


@pytest.mark.parametrize("layout", [Layout.BLNH, Layout.BNLH], ids=lambda l: l.name)
def test_observing_plain_tensors_reads_the_all_gather(layout):
    seq_dim = layout.seq_dim
    local = [2, 3, 3, 4]
    local[seq_dim] = 4
    gathered = list(local)
    gathered[seq_dim] = 8
    q, k = torch.zeros(local), torch.zeros(gathered)
    observed = observe_boundary((q, k, k), tuple(local), 2)
    assert observed == expected_boundary(layout, Backend.FLEX)


def test_a_stale_seq_dim_is_observed_as_the_dim_it_gathered():
    """torchtitan PR #2761's stale seq_dim=2 on BLNH gathers heads: the boundary says dim 2."""
    local, gathered = (2, 4, 3, 8), (2, 4, 6, 8)
    observed = gathered_boundary(local, gathered, 2)
    assert observed.seq_dim == 2 and observed != expected_boundary(Layout.BLNH, Backend.FLEX)


def test_context_parallel_re_exports_the_boundary():
    assert ReExported is CPBoundary
