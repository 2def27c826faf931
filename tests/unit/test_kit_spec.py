"""The kit's pure parts added for third-party modules: Shapes, CallingConvention, axis roles,
rank views, per-rank fusion, size-1 normalisation, verdict bookkeeping, the dense flex stand-in.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.nn.attention.flex_attention import create_block_mask

from dtensor_attn import _compat
from dtensor_attn.layout import Dim
from dtensor_attn.testing.kit import (
    CallingConvention, CaseFailure, CaseInfo, CaseOutcome, ConformanceError, ConformanceOptions, ConformanceResult,
    FailureKind, MaskScope, Shapes, Status,
)
from dtensor_attn.testing.kit.cases import Call
from dtensor_attn.testing.kit.compare import on_mesh, tolerance_exceeded
from dtensor_attn.testing.kit.rank_masks import fuse, rank_view
from dtensor_attn.testing.kit.spec import parse_axis_roles


class FakeMesh:
    def __init__(self, shape, names):
        self.shape, self.mesh_dim_names = shape, names


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch=0), r"Shapes.batch=0"),
    (dict(num_q_heads=8, num_kv_heads_gqa=3), "fewer kv heads that divide"),
    (dict(num_q_heads=8, num_kv_heads_gqa=8), "fewer kv heads that divide"),
    (dict(seq=8), "expected them to differ"),
])
def test_shapes_refuse_what_the_matrix_cannot_use(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Shapes(**kwargs)
    assert Shapes(head_dim=16).softmax_scale() == 0.25 and Shapes(scale=0.5).softmax_scale() == 0.5


def test_conventions_are_checked_values():
    with pytest.raises(ValueError, match="expected a keyword name"):
        CallingConvention(mask_keyword="attention masks")
    with pytest.raises(ValueError, match="mask_for_causal=True\\) needs make_mask"):
        CallingConvention(mask_for_causal=True)
    assert CallingConvention(mask_scope="per_rank").mask_scope is MaskScope.PER_RANK
    case = CaseInfo(gqa=True, documents=False, lse=None, shapes=Shapes())
    assert CallingConvention(extra_kwargs=lambda c: {"enable_gqa": c.gqa}).kwargs(case) == {"enable_gqa": True}
    assert CallingConvention().kwargs(case) == {} and case.num_kv_heads == 4


def test_axis_roles_words_and_defaults():
    assert parse_axis_roles({"fsdp": "batch", "ep": "replicate", "sp": Dim.L}) == {"fsdp": Dim.B, "ep": None, "sp": Dim.L}
    options = ConformanceOptions(meshes=({"dp_shard": 2, "dp_replicate": 1, "tp": 2},))
    assert options.axis_dims(("dp_shard", "dp_replicate", "cp", "tp")) == (Dim.B, Dim.B, Dim.L, Dim.N)
    with pytest.raises(ValueError, match="axis_roles\\['x'\\]"):
        parse_axis_roles({"x": "experts"})


def test_options_pick_dtype_and_tolerance_by_device_and_dtype():
    assert (ConformanceOptions().dtype, ConformanceOptions().rtol) == (torch.float64, 1e-9)
    half = ConformanceOptions(dtype=torch.bfloat16)
    assert (half.rtol, half.atol) == (5e-2, 5e-2)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            ConformanceOptions(device="cuda")
    with pytest.raises(ValueError, match="expected a Shapes"):
        ConformanceOptions(shapes={"seq": 32})


def test_size_1_axes_are_replicate_inputs_and_replicate_when_compared():
    call = Call("c", FakeMesh((1, 2, 1), ("dp", "cp", "tp")), (Dim.B, Dim.L, Dim.N))
    assert call.in_placements() == (Replicate(), Shard(1), Replicate())
    assert on_mesh((Shard(2), Partial(), _compat.strided_shard(0, 1)), 4, (1, 1, 2)) == (Replicate(), Replicate(), Shard(0))
    assert on_mesh((Shard(2),), 4, (2,)) == (Shard(2),)


def test_tolerance_scales_its_absolute_part_with_the_reference():
    reference = torch.tensor([100.0, 0.0], dtype=torch.float64)
    assert not tolerance_exceeded(reference + torch.tensor([0.0, 4.0]), reference, 0.0, 0.05)[0]  # 4 < 0.05 * 100
    assert tolerance_exceeded(reference + torch.tensor([0.0, 6.0]), reference, 0.0, 0.05) == (True, 6.0)
    assert tolerance_exceeded(torch.tensor([float("nan"), 0.0]), reference, 1.0, 1.0)[0]


def test_rank_views_follow_dtensor_shard_order():
    mesh = FakeMesh((2, 2, 2), ("dp", "cp", "tp"))
    positions_BL = torch.arange(4 * 16).view(4, 16) % 5
    case = CaseInfo(gqa=False, documents=True, lse=None, shapes=Shapes(batch=4, seq=16))
    view = rank_view([1, 1, 0], 6, mesh, (Dim.B, Dim.L, Dim.N), positions_BL, case, torch.device("cpu"))
    assert (view.cp_rank, view.cp_size, view.coords) == (1, 2, {"dp": 1, "cp": 1, "tp": 0})
    assert view.q_index_L.tolist() == list(range(8, 16)) and view.kv_index_L.tolist() == list(range(16))
    assert torch.equal(view.positions_BL, positions_BL[2:4])
    two_cp = FakeMesh((2, 2), ("cp", "sp"))
    inner = rank_view([1, 0], 2, two_cp, (Dim.L, Dim.L), None, case, torch.device("cpu"))
    assert (inner.cp_rank, inner.q_index_L.tolist()) == (2, list(range(8, 12)))  # the first axis is outermost


def test_fuse_holds_each_ranks_tensor_and_refuses_differing_plain_values():
    Meta = collections.namedtuple("Meta", "cu max_q")
    same = fuse({0: Meta(torch.tensor([0, 4]), 4), 1: Meta(torch.tensor([0, 4]), 4)})
    assert isinstance(same, Meta) and not isinstance(same.cu, _compat.LocalTensor)
    differ = fuse({0: {"cu": torch.tensor([0, 4])}, 1: {"cu": torch.tensor([0, 2])}})
    assert _compat.rank_tensors(differ["cu"])[1].tolist() == [0, 2]
    with pytest.raises(ValueError, match=r"mask\[1\] differs between simulated ranks"):
        fuse({0: Meta(torch.tensor([0]), 4), 1: Meta(torch.tensor([0]), 8)})
    assert fuse({0: None, 1: None}) is None


def test_dense_flex_matches_the_formula_with_a_per_rank_mask():
    """Each rank's mask from its own mask_mod; output and LSE (log2 units, as flex's operator)."""
    q_BNLH = torch.randn(1, 2, 8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    masks = {r: create_block_mask(lambda b, h, q, k, r=r: q + 8 * r >= k, None, None, 8, 16, device="cpu") for r in (0, 1)}
    fused = _compat.fuse_block_masks(masks)
    assert isinstance(fused.mask_mod, _compat.PerRankMaskMod)
    k_BNLH = torch.randn(1, 2, 16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    from dtensor_attn._compat.flex_ranks import dense_flex

    out, lse2, _ = dense_flex(q_BNLH, k_BNLH, k_BNLH, None, masks[0].as_tuple(), 0.5, {})
    scores = (q_BNLH @ k_BNLH.transpose(-2, -1)) * 0.5
    scores = scores.masked_fill(torch.arange(16) > torch.arange(8)[:, None], float("-inf"))
    assert torch.allclose(out, scores.softmax(-1) @ k_BNLH) and torch.allclose(lse2 * math.log(2), scores.logsumexp(-1))
    with pytest.raises(RuntimeError, match="outside flex_on_simulated_ranks"):
        fused.mask_mod(0, 0, 0, 0)


def _outcome(status, failures=(), reason=""):
    return CaseOutcome(id=f"s-{status}", variant="s", kernel="", mesh="tp2", heads="mha", mask="causal", lse=None,
                       status=status, reason=reason, failures=failures)


def test_not_exercised_is_never_a_pass():
    result = ConformanceResult("s", (_outcome(Status.PASS), _outcome(Status.NOT_EXERCISED, reason="every call failed")))
    assert not result.ok and result.counts()["not_exercised"] == 1
    assert "1 passed, 0 failed, 0 skipped, 1 not exercised of 2 cases" in result.summary()
    with pytest.raises(ConformanceError, match="NOT EXERCISED \\(tested nothing\\): s-not_exercised: every call failed"):
        result.raise_for_failures()
    assert result.raise_for_failures(allow_not_exercised=True) is result
    failing = CaseFailure("s-fail", FailureKind.MASK_NO_EFFECT, "output", "documents", "causal")
    assert str(failing.kind) == "mask_no_effect"
    with pytest.raises(ConformanceError, match="mask_no_effect"):
        ConformanceResult("s", (_outcome(Status.FAIL, (failing,)),)).raise_for_failures(allow_not_exercised=True)
