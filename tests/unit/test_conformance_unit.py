"""The conformance kit's pure parts: the expected-placement table, the matrix, options, results.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard

from dtensor_attn import AttentionConfig, Dim, Layout
from dtensor_attn._compat import StridedShard
from dtensor_attn.backends import REGISTRY
from dtensor_attn.config import Backend
from dtensor_attn.testing.kit.check import (
    DEFAULT_MESHES, MESHES, ConformanceOptions, _combinations, _probe_calls,
)
from dtensor_attn.testing.kit.cases import Call, CallSettings, expected_placements
from dtensor_attn.testing.kit.compare import ratio_note as _ratio_note
from dtensor_attn.testing.harness.meshspec import AXIS_DIMS
from dtensor_attn.testing.kit.result import CaseFailure, ConformanceResult, FailureKind
from dtensor_attn.testing.kit.subjects import kernel_label, offered_outputs

B, L, N = Dim.B, Dim.L, Dim.N

# (layout, per-axis BLNH dims, mesh shape, batch, expected): docs/design.md, "Layouts and placements", written by hand.
TABLE = [
    (Layout.BLNH, (N,), (2,), 2, (Shard(2),)),
    (Layout.TNH, (N,), (8,), 2, (Shard(1),)),
    (Layout.TNH, (L,), (2,), 2, (StridedShard(0, split_factor=2),)),
    (Layout.TNH, (L,), (2,), 1, (Shard(0),)),  # a local batch of 1: a plain shard of tokens
    (Layout.TNH, (L, N), (2, 4), 4, (StridedShard(0, split_factor=4), Shard(1))),
    (Layout.TNH, (B, L, N), (2, 2, 2), 4, (Shard(0), StridedShard(0, split_factor=2), Shard(1))),
    (Layout.TNH, (B, L, N), (2, 2, 2), 2, (Shard(0), Shard(0), Shard(1))),
    (Layout.BLN, (L, N), (2, 2), 2, (Shard(1), Shard(2))),
    (Layout.BNL, (L, N), (2, 2), 2, (Shard(2), Shard(1))),
    (Layout.TN, (L, N), (2, 2), 2, (StridedShard(0, split_factor=2), Shard(1))),
    (Layout.BLNH, (None, N), (2, 2), 2, (Replicate(), Shard(2))),
]


@pytest.mark.parametrize("layout,dims,mesh_shape,batch,expected", TABLE)
def test_expected_placements_table(layout, dims, mesh_shape, batch, expected):
    assert expected_placements(layout, dims, mesh_shape, batch) == expected


def _pairs(combination):
    return {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(enumerate(combination), 2)}


@pytest.mark.parametrize("factors", [
    ((False, True), ("causal", "docs"), (False, True)),
    ((False, True), ("causal", "docs"), (None,)),
    ((True,), ("causal",), (False, True)),
])
def test_pairwise_keeps_every_pair_of_values(factors):
    product = list(itertools.product(*factors))
    chosen = _combinations(factors, "pairwise")
    assert set().union(*map(_pairs, chosen)) == set().union(*map(_pairs, product))
    assert len(chosen) <= len(product) and len(set(chosen)) == len(chosen)
    assert _combinations(factors, "all") == product


def test_pairwise_halves_three_yes_no_factors():
    chosen = _combinations(((False, True), ("causal", "docs"), (False, True)), "pairwise")
    assert chosen == [(False, "causal", False), (False, "docs", True), (True, "causal", True), (True, "docs", False)]


def test_options_normalise_meshes_and_backends():
    options = ConformanceOptions(meshes=("cp2xtp2", {"dp": 2, "tp": 2}), backends=("varlen",))
    assert options.meshes == (("cp2xtp2", {"cp": 2, "tp": 2}), ("dp2xtp2", {"dp": 2, "tp": 2}))
    assert options.backends == (Backend.VARLEN,)
    assert set(DEFAULT_MESHES) <= set(MESHES)
    assert sorted(math.prod(MESHES[m].values()) for m in DEFAULT_MESHES) == [1, 2, 4, 4, 8]
    with pytest.raises(TypeError):
        MESHES["tp2"]["tp"] = 3  # the table is read-only


def test_only_varlen_offers_the_packed_output():
    offering = [backend for backend in REGISTRY if Layout.TNH in offered_outputs(backend)]
    assert offering == [Backend.VARLEN]
    assert all(offered_outputs(backend)[0] is Layout.BLNH for backend in REGISTRY)


def test_ratio_note_names_a_constant_factor_only():
    reference = torch.randn(4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert "actual = 4 x expected" in _ratio_note(4 * reference, reference)
    assert _ratio_note(reference + 0.1, reference) == ""
    assert _ratio_note(reference, reference) == ""


def test_cache_probe_calls_cover_placements_and_a_submesh():
    class FakeMesh:
        def __getitem__(self, name):
            return f"submesh {name}"

    calls = _probe_calls(FakeMesh(), {"cp": 2, "tp": 2})
    assert [label for label, _, _ in calls] == ["sharded", "cp replicated", "tp replicated", "tp submesh", "sharded again"]
    assert [dims for _, _, dims in calls] == [(L, N), (None, N), (L, None), (N,), (L, N)]
    assert calls[3][1] == "submesh tp"


def test_kernel_label_reads_the_inner_module_or_nothing():
    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = AttentionConfig(backend=Backend.VARLEN).build()

    assert kernel_label(Wrapper()) == "varlen[math]"  # no varlen kernel on CPU
    assert kernel_label(lambda q, k, v: q) == ""


def test_a_failure_reads_as_one_line():
    failure = CaseFailure("sdpa-BLNH-cp2-mha", FailureKind.VALUES, "output (BLNH)", "the float64 reference",
                          "different values", ranks=(0, 1), shard_ranks=(1,), max_err=0.5, detail="note")
    assert failure.describe() == (
        "sdpa-BLNH-cp2-mha: values of output (BLNH): expected the float64 reference, actual different values "
        "on ranks [0, 1] (max abs err 5.000e-01); wrong shards on ranks [1]; note"
    )
    with pytest.raises(KeyError, match="no case 'x' in this result"):
        ConformanceResult("s", ()).case("x")


def test_inputs_are_placed_by_axis_names():
    class FakeMesh:
        shape = (2, 2, 2)

    assert dict(AXIS_DIMS) == {"dp": B, "cp": L, "tp": N}  # dp shards batch, cp seq, tp heads
    call = Call("case", FakeMesh(), (B, L, N))
    assert call.in_placements() == (Shard(0), Shard(1), Shard(2))
    assert call.expected(Layout.TNH, batch=4) == (Shard(0), StridedShard(0, split_factor=2), Shard(1))
    assert Call("case", FakeMesh(), (None, L, None)).in_placements() == (Replicate(), Shard(1), Replicate())
    settings = CallSettings()
    assert settings.sizes() == {B: 2, L: 16, N: 8, Dim.H: 4}
    assert settings.seq != settings.num_q_heads  # so BLN and BNL shapes differ
