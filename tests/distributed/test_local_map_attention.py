"""LocalMapAttention on DTensors: the seed bug, cached plans, and an error for every bad input.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Tolerance: ``precision_for(mesh.device_type)``: float64 and 1e-9 on CPU ranks, bf16 inputs (the
native kernels' dtype) and 5e-2 on CUDA (see test_attention_matrix.py).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import local_map

from dtensor_attn import AttentionConfig, Layout, LocalMapAttention, PlacementError, make_attention_masks
from dtensor_attn.testing import assert_dtensor_close, assert_placements
from dtensor_attn.testing.reference import make_mesh_inputs, precision_for, reference_attention, to_layout

B, L, N, H = 2, 8, 8, 8


def _varlen_packed() -> LocalMapAttention:
    return LocalMapAttention(AttentionConfig(backend="varlen", varlen_output=Layout.TNH).build())


def _distribute(mesh, inputs, placements):
    return [distribute_tensor(t, mesh, placements) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]


@pytest.mark.mesh(tp=8)
def test_seed_bug_copied_placements_are_caught_and_ours_are_right(mesh):
    """torchtitan PR #2761: BLNH Shard(2) copied onto varlen's packed TNH output.

    16 heads on tp=8: two heads per rank, so head order and head_dim order differ (with one
    head per rank the wrong label happens to give the right values)."""
    num_heads = 16
    inputs = make_mesh_inputs(mesh, batch=B, seq=L, num_q_heads=num_heads, num_kv_heads=num_heads, head_dim=H)
    q, k, v = _distribute(mesh, inputs, (Shard(2),))
    out_ref_BLNH, _ = reference_attention(inputs)
    inner = AttentionConfig(backend="varlen", varlen_output=Layout.TNH).build()

    # The buggy wrapper: output placements copied from the inputs.
    buggy = local_map(
        inner, out_placements=[Shard(2)], in_placements=((Shard(2),),) * 3,
        in_grad_placements=((Shard(2),),) * 3, device_mesh=mesh,
    )
    bad_TNH = buggy(q, k, v)
    head_dim = inputs.q_BLNH.shape[-1]
    assert tuple(bad_TNH.shape) == (B * L, num_heads // 8, head_dim * 8)  # head_dim x tp: a wrong global shape
    try:
        bad_BLD = bad_TNH.view(B, L, -1)
    except RuntimeError as e:  # torch 2.11: the view itself fails, far from the cause
        assert "flatten multiple dimensions" in str(e)
    else:  # torch 2.13: the view succeeds with a _StridedShard and silently wrong values
        with pytest.raises(AssertionError):
            assert_dtensor_close(bad_BLD, out_ref_BLNH.reshape(B, L, -1), **precision_for(mesh.device_type).tol)

    out_TNH = _varlen_packed()(q, k, v)
    assert_placements(out_TNH, (Shard(1),))
    assert tuple(out_TNH.shape) == (B * L, num_heads, head_dim)
    assert_dtensor_close(out_TNH, to_layout(out_ref_BLNH, Layout.TNH), **precision_for(mesh.device_type).tol)
    assert_dtensor_close(out_TNH.view(B, L, -1), out_ref_BLNH.reshape(B, L, -1), **precision_for(mesh.device_type).tol)


@pytest.mark.mesh(cp=2, tp=2)
def test_plans_are_cached_per_signature_not_first_call(mesh):
    """docs/bugs.md row 6: a wrapper that keeps its first local_map gives stale placements later."""
    attention = LocalMapAttention(AttentionConfig(backend="sdpa").build())
    inputs = make_mesh_inputs(mesh, batch=B, seq=L, num_q_heads=N, num_kv_heads=N, head_dim=H)
    out_ref_BLNH, _ = reference_attention(inputs)
    for placements in [(Replicate(), Shard(2)), (Shard(1), Shard(2)), (Shard(1), Replicate()), (Replicate(), Shard(2))]:
        out = attention(*_distribute(mesh, inputs, placements))
        assert_placements(out, placements)
        assert_dtensor_close(out, out_ref_BLNH, **precision_for(mesh.device_type).tol, msg=str(placements))
    tp_mesh = mesh["tp"]
    out = attention(*_distribute(tp_mesh, inputs, (Shard(2),)))
    assert out.device_mesh == tp_mesh
    assert_dtensor_close(out, out_ref_BLNH, **precision_for(mesh.device_type).tol, msg="tp submesh")
    assert len(attention._plans) == 4


@pytest.mark.mesh(tp=2)
def test_documents_flex_and_varlen_agree_under_tp(mesh):
    inputs = make_mesh_inputs(mesh, batch=B, seq=L, num_q_heads=N, num_kv_heads=N, head_dim=H, documents=True)
    out_ref_BLNH, _ = reference_attention(inputs)
    outs = []
    for backend in ("flex", "varlen"):
        config = AttentionConfig(backend=backend)
        mask = make_attention_masks(config, inputs.positions_BL)
        out = LocalMapAttention(config.build())(*_distribute(mesh, inputs, (Shard(2),)), mask)
        assert_dtensor_close(out, out_ref_BLNH, **precision_for(mesh.device_type).tol, msg=backend)
        outs.append(out.full_tensor())
    causal_only, _ = reference_attention(inputs, use_documents=False)
    assert (causal_only - out_ref_BLNH).abs().max() > 0.1  # the documents do change the values


# -- errors: each names the module, the layout, expected and actual, and the fix ------------


def _qkv(mesh, placements=(Shard(2),), **kwargs):
    inputs = make_mesh_inputs(mesh, batch=B, seq=L, num_q_heads=N, num_kv_heads=N, head_dim=H, **kwargs)
    return _distribute(mesh, inputs, placements)


@pytest.mark.mesh(cp=2, tp=2)
def test_error_qkv_on_different_meshes(mesh):
    q, k, v = _qkv(mesh, (Replicate(), Shard(2)))
    k_tp = distribute_tensor(make_mesh_inputs(mesh, num_q_heads=N).k_BLNH, mesh["tp"], (Shard(2),))
    with pytest.raises(PlacementError, match=r"LocalMapAttention\(sdpa\): q is on .* but k is on .*Fix: put q, k and v on the same mesh"):
        LocalMapAttention(AttentionConfig(backend="sdpa").build())(q, k_tp, v)


@pytest.mark.mesh(tp=2)
def test_error_kv_placements_differ_from_q(mesh):
    q, k, v = _qkv(mesh)
    k_rep, v_rep = (t.redistribute(mesh, (Replicate(),)) for t in (k, v))
    with pytest.raises(PlacementError, match=r"k/v placements must match q's in BLNH.*expected \(S\(2\)\), got \(R\)"):
        LocalMapAttention(AttentionConfig(backend="sdpa").build())(q, k_rep, v_rep)
    with pytest.raises(PlacementError, match=r"k and v must have the same placements.*expected v \(S\(2\)\), got \(R\)"):
        LocalMapAttention(AttentionConfig(backend="sdpa").build())(q, k, v_rep)


@pytest.mark.mesh(tp=2)
def test_error_partial(mesh):
    q, k, v = _qkv(mesh, (Replicate(),))
    q_partial = DTensor.from_local(q.to_local() / 2, mesh, (Partial(),))
    with pytest.raises(PlacementError, match=r"q in BLNH has P\(sum\) on mesh axis 0.*Fix: redistribute q to Replicate or Shard"):
        LocalMapAttention(AttentionConfig(backend="flex").build())(q_partial, k, v)


@pytest.mark.mesh(tp=2)
def test_error_head_dim_shard(mesh):
    q, k, v = _qkv(mesh, (Shard(3),))
    with pytest.raises(PlacementError, match=r"q in BLNH has S\(3\).*head_dim is contracted.*Fix: shard heads \(Shard\(2\)\)"):
        LocalMapAttention(AttentionConfig(backend="varlen").build())(q, k, v)


@pytest.mark.mesh(tp=4)
def test_error_heads_not_divisible_by_tp(mesh):
    inputs = make_mesh_inputs(mesh, batch=B, seq=L, num_q_heads=6, num_kv_heads=2, head_dim=H)
    q = distribute_tensor(inputs.q_BLNH, mesh, (Replicate(),)).redistribute(mesh, (Shard(2),))
    k, v = (distribute_tensor(t, mesh, (Replicate(),)).redistribute(mesh, (Shard(2),)) for t in (inputs.k_BLNH, inputs.v_BLNH))
    with pytest.raises(PlacementError, match=r"q has 6 heads in BLNH, not divisible by the 4 ranks of mesh axes \['tp'\]"):
        LocalMapAttention(AttentionConfig(backend="sdpa", enable_gqa=True).build())(q, k, v)


@pytest.mark.mesh(tp=2)
def test_error_dtensor_q_with_plain_kv(mesh):
    q, k, v = _qkv(mesh)
    with pytest.raises(PlacementError, match=r"must all be DTensors or all plain tensors, got q=DTensor, k=(Local)?Tensor, v=(Local)?Tensor"):
        LocalMapAttention(AttentionConfig(backend="sdpa").build())(q, k.full_tensor(), v.full_tensor())


@pytest.mark.mesh(tp=2)
def test_error_dtensor_keyword_argument(mesh):
    q, k, v = _qkv(mesh)
    with pytest.raises(PlacementError, match=r"keyword argument 'q_seq_index_L' is a DTensor.*Fix: pass it positionally"):
        LocalMapAttention(AttentionConfig(backend="sdpa").build())(q, k, v, q_seq_index_L=q)


class _LyingKernel(torch.nn.Module):
    """Declares BLNH out but returns the packed TNH tensor: the seed bug's shape mismatch."""

    in_layout = Layout.BLNH
    out_layout = Layout.BLNH
    lse_layout = None
    is_causal = True

    def __init__(self):
        super().__init__()
        self.inner = AttentionConfig(backend="varlen", varlen_output=Layout.TNH).build()

    def forward(self, q, k, v, mask=None, **kwargs):
        return self.inner(q, k, v, mask, **kwargs)


@pytest.mark.mesh(tp=2)
def test_error_kernel_shape_disagrees_with_declared_layout(mesh):
    q, k, v = _qkv(mesh)
    h = q.shape[-1]  # 8 on CPU ranks, the native kernels' 16 on CUDA
    with pytest.raises(PlacementError, match=rf"returned a local output of shape \(16, 4, {h}\), but it declares BLNH, which for local q \(2, 8, 4, {h}\) is \(2, 8, 4, {h}\)"):
        LocalMapAttention(_LyingKernel())(q, k, v)


@pytest.mark.mesh(cp=4)
def test_error_packed_output_uneven_seq(mesh):
    inputs = make_mesh_inputs(mesh, batch=B, seq=6, num_q_heads=N, num_kv_heads=N, head_dim=H)
    q, k, v = (distribute_tensor(t, mesh, (Replicate(),)).redistribute(mesh, (Shard(1),)) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    with pytest.raises(PlacementError, match=r"q has 6 seq in BLNH, not divisible by the 4 ranks"):
        _varlen_packed()(q, k, v)


@pytest.mark.mesh(tp=2)
def test_error_mask_for_another_backend(mesh):
    q, k, v = _qkv(mesh, documents=True)
    inputs = make_mesh_inputs(mesh, batch=B, seq=L, documents=True)
    flex_mask = make_attention_masks(AttentionConfig(backend="flex"), inputs.positions_BL)
    with pytest.raises(ValueError, match=r"VarlenAttention \(varlen\) was handed a FlexDocumentMask"):
        LocalMapAttention(AttentionConfig(backend="varlen").build())(q, k, v, flex_mask)
