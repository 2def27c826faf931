"""The placement matrix of LocalMapAttention under TP and TP x CP (inputs carry the CP shard).

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Every backend x public layout (BLNH, legacy BNLH, varlen's packed TNH output) x mesh (tp 1/2/4/8,
cp2 x tp4, dp2 x cp2 x tp2) x GQA x
LSE: the full output, LSE and q/k/v gradients, on every rank, equal the float64 single-device
reference, and the output placements equal the explicit table below (written out by hand, not
computed by the code under test).

Tolerance: ``precision_for(mesh.device_type)``. On CPU ranks inputs, kernel and reference are
float64 (1e-9: reduction order only); on CUDA the real kernels take bf16 inputs (and head_dim 16
for compiled flex), the reference is float64 from the same rounded values (5e-2). Any placement
mistake moves values by O(1).
"""

from __future__ import annotations

import pytest
from torch.distributed.tensor import Shard, distribute_tensor

from dtensor_attn import AttentionConfig, Layout, LocalMapAttention, PlacementError
from dtensor_attn._compat import packed_strided_shard_usable
from dtensor_attn.backends import REGISTRY
from dtensor_attn.config import Backend
from dtensor_attn._compat import StridedShard
from dtensor_attn.testing import assert_dtensor_close, assert_placements
from dtensor_attn.testing.reference import AttentionInputs, make_inputs, precision_for, reference_attention, to_layout

BATCH = 2


def _layouts(backend: Backend) -> list[tuple[Layout, Layout]]:
    """(public input layout, output layout) pairs the backend offers."""
    pairs = [(Layout.BLNH, Layout.BLNH), (Layout.BNLH, Layout.BNLH)]
    if backend is Backend.VARLEN:
        pairs.append((Layout.BLNH, Layout.TNH))
    return pairs


CASES = [
    pytest.param(backend, in_layout, out_layout, id=f"{backend}-{out_layout.name if out_layout is Layout.TNH else in_layout.name}")
    for backend in REGISTRY
    for in_layout, out_layout in _layouts(backend)
]

MESHES = [
    pytest.param("tp", marks=pytest.mark.mesh(tp=1), id="tp1"),
    pytest.param("tp", marks=pytest.mark.mesh(tp=2), id="tp2"),
    pytest.param("tp", marks=pytest.mark.mesh(tp=4), id="tp4"),
    pytest.param("tp", marks=pytest.mark.mesh(tp=8), id="tp8"),
    pytest.param("cp,tp", marks=pytest.mark.mesh(cp=2, tp=4), id="cp2xtp4"),
    pytest.param("dp,cp,tp", marks=pytest.mark.mesh(dp=2, cp=2, tp=2), id="dp2xcp2xtp2"),
]

# The table: placements per mesh kind and layout, for tensors and for LSEs.
SEQ_HEADS = {  # (cp shards seq, tp shards heads)
    Layout.BLNH: (Shard(1), Shard(2)),
    Layout.BNLH: (Shard(2), Shard(1)),
    Layout.TNH: (StridedShard(0, split_factor=BATCH), Shard(1)),
    Layout.BLN: (Shard(1), Shard(2)),
    Layout.BNL: (Shard(2), Shard(1)),
    Layout.TN: (StridedShard(0, split_factor=BATCH), Shard(1)),
}
HEADS = {layout: (seq_heads[1],) for layout, seq_heads in SEQ_HEADS.items()}
# dp shards batch: dim 0 everywhere; with BATCH=2 on dp=2 the local batch is 1, so the packed
# seq shard is a plain Shard(0) (docs/design.md, "Layouts and placements"), not a _StridedShard.
BATCH_SEQ_HEADS = {
    Layout.BLNH: (Shard(0), Shard(1), Shard(2)),
    Layout.BNLH: (Shard(0), Shard(2), Shard(1)),
    Layout.TNH: (Shard(0), Shard(0), Shard(1)),
    Layout.BLN: (Shard(0), Shard(1), Shard(2)),
    Layout.BNL: (Shard(0), Shard(2), Shard(1)),
    Layout.TN: (Shard(0), Shard(0), Shard(1)),
}
TABLES = {"tp": HEADS, "cp,tp": SEQ_HEADS, "dp,cp,tp": BATCH_SEQ_HEADS}


def _expected(mesh_kind: str, layout: Layout):
    return TABLES[mesh_kind][layout]


@pytest.mark.parametrize("return_lse", [False, True], ids=["", "lse"])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("mesh_kind", MESHES)
@pytest.mark.parametrize("backend,in_layout,out_layout", CASES)
def test_matrix(mesh, mesh_kind, backend, in_layout, out_layout, gqa, return_lse):
    precision = precision_for(mesh.device_type)
    inputs = make_inputs(batch=BATCH, seq=8, num_q_heads=16 if gqa else 8, num_kv_heads=8,
                         head_dim=precision.head_dim(8), dtype=precision.dtype)
    config = AttentionConfig(
        backend=backend, layout=in_layout, enable_gqa=gqa, return_lse=return_lse,
        varlen_output=out_layout if out_layout is Layout.TNH else Layout.BLNH,
    )
    attention = LocalMapAttention(config.build())
    assert attention.inner.out_layout is out_layout

    # Reference: float64, unsharded, from the same global tensors; grads of sum(out) + sum(lse)/4.
    q_ref, k_ref, v_ref = (to_layout(t.double(), in_layout).clone().requires_grad_() for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    back = (lambda t: t) if in_layout is Layout.BLNH else (lambda t: t.transpose(1, 2))
    out_ref_BLNH, lse_ref_BLN = reference_attention(AttentionInputs(back(q_ref), back(k_ref), back(v_ref), None))
    out_ref = to_layout(out_ref_BLNH, out_layout)
    lse_layout = attention.inner.lse_layout
    loss_ref = out_ref.sum() + (to_layout(lse_ref_BLN, lse_layout).sum() / 4 if return_lse else 0)
    loss_ref.backward()

    in_placements = _expected(mesh_kind, in_layout)
    q, k, v = (distribute_tensor(t.detach().to(precision.dtype), mesh, in_placements).requires_grad_() for t in (q_ref, k_ref, v_ref))
    if out_layout is Layout.TNH and mesh_kind == "cp,tp" and not packed_strided_shard_usable():
        # torch 2.11 cannot use the (correct) _StridedShard placement downstream: refused up front.
        with pytest.raises(PlacementError, match=r"cannot redistribute or full_tensor\(\).*Fix: varlen_output=Layout.BLNH"):
            attention(q, k, v)
    else:
        _check_forward_backward(attention, q, k, v, q_ref, k_ref, v_ref, out_ref, lse_ref_BLN, mesh_kind, in_placements, out_layout, return_lse, precision.tol)


def _check_forward_backward(attention, q, k, v, q_ref, k_ref, v_ref, out_ref, lse_ref_BLN, mesh_kind, in_placements, out_layout, return_lse, tol):
    lse_layout = attention.inner.lse_layout
    result = attention(q, k, v)
    out, lse = result if return_lse else (result, None)

    assert_placements(out, _expected(mesh_kind, out_layout))
    assert tuple(out.shape) == tuple(out_ref.shape)
    assert_dtensor_close(out, out_ref, **tol, msg="output")
    loss = out.sum()
    if return_lse:
        assert_placements(lse, _expected(mesh_kind, lse_layout))
        assert_dtensor_close(lse, to_layout(lse_ref_BLN, lse_layout), **tol, msg="lse")
        loss = loss + lse.sum() / 4
    loss.backward()
    for name, t, ref in (("q", q, q_ref), ("k", k, k_ref), ("v", v, v_ref)):
        assert_placements(t.grad, in_placements)
        assert_dtensor_close(t.grad, ref.grad, **tol, msg=f"grad {name}")
