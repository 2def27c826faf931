"""The real CUDA kernels against the float64 math reference: sdpa (flash/cuDNN), compiled flex,
varlen_attn. Skipped on machines without CUDA (with that reason).

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Tolerance: bf16 inputs carry 8 bits of mantissa (relative step 2^-8 ~ 4e-3); attention
outputs are convex combinations of v, so errors stay at that scale: ||out - ref|| / ||ref||
below 2e-2 for bf16 and 2e-3 for fp32 (TF32 may be used by sdpa's math fallbacks), for outputs
and for gradients.
"""

from __future__ import annotations

import pytest
import torch

from dtensor_attn import AttentionConfig, Kernel, Layout, make_attention_masks
from dtensor_attn.backends import REGISTRY
from dtensor_attn.config import Backend
from dtensor_attn.testing.reference import make_inputs, reference_attention, to_layout

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (real kernels)"),
]

REL_TOL = {torch.bfloat16: 2e-2, torch.float32: 2e-3}

CASES = [
    pytest.param(backend, out, documents, id=f"{backend}-{out.name}-{'docs' if documents else 'causal'}")
    for backend in REGISTRY
    for out in ((Layout.BLNH, Layout.TNH) if backend is Backend.VARLEN else (Layout.BLNH,))
    for documents in ((False, True) if REGISTRY[backend].mask_type is not None else (False,))
]


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.mark.parametrize("dtype", [torch.bfloat16], ids=["bf16"])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("backend,out_layout,documents", CASES)
def test_native_kernel_matches_reference(backend, out_layout, documents, gqa, dtype):
    inputs = make_inputs(batch=2, seq=256, num_q_heads=8 if gqa else 4, num_kv_heads=4, head_dim=64, documents=documents)
    config = AttentionConfig(
        backend=backend, enable_gqa=gqa, return_lse=True, kernel=Kernel.NATIVE,
        varlen_output=out_layout if out_layout is Layout.TNH else Layout.BLNH,
    )
    module = config.build()
    device = torch.device("cuda")
    assert module.kernel_name(device) == str(backend)
    leaves = [t.to(device, dtype).requires_grad_() for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]
    mask = make_attention_masks(config, None if inputs.positions_BL is None else inputs.positions_BL.to(device))
    out, lse = module(*leaves, mask)
    ref_leaves = [t.clone().requires_grad_() for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]
    from dtensor_attn.testing.reference import AttentionInputs

    out_ref_BLNH, lse_ref_BLN = reference_attention(AttentionInputs(*ref_leaves, inputs.positions_BL))
    out_ref = to_layout(out_ref_BLNH, out_layout)
    lse_ref = to_layout(lse_ref_BLN, module.lse_layout)
    grad_out = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (out_ref * grad_out).sum().backward()
    (out * grad_out.to(device, dtype)).sum().backward()
    tol = REL_TOL[dtype]
    assert _rel_err(out.cpu(), out_ref) < tol
    assert _rel_err(lse.float().cpu(), lse_ref) < tol
    for name, leaf, ref in zip("qkv", leaves, ref_leaves):
        assert _rel_err(leaf.grad.cpu(), ref.grad) < tol, f"grad {name}"
