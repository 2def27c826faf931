"""On the real flash kernels: the LSE gradient, and the CPU stand-in's fidelity to them.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

- torch's own ``varlen_attn`` drops the LSE gradient (BUGS row 12): pinned here, because the CPU
  stand-in (dtensor_attn.testing.flash_stand_in) reproduces exactly that;
- the stand-in's forward (output, (N, T) LSE, bottom-right causal) and backward equal flash's on
  the same bf16 inputs, the backward with an arbitrary ``out`` (flash reads D = rowsum(dO * O)
  off the ``out`` it is handed, which our LSE-gradient formula relies on) and a padded head_dim;
- VarlenAttention with ``return_lse=True`` gives the float64 reference's q/k/v gradients with the
  LSE in the loss, and with the LSE as the whole loss.

Tolerance: bf16 inputs, fp32 accumulation on both sides, outputs rounded to bf16 (2^-8): relative
error (norm) 2e-2 against float64, 1e-2 between two fp32-accumulating kernels; the LSE is fp32.
"""

from __future__ import annotations

import pytest
import torch

from dtensor_attn import AttentionConfig, Kernel, Layout, _compat, make_attention_masks
from dtensor_attn.testing import flash_stand_in
from dtensor_attn.testing.reference import make_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (flash varlen kernels)"),
    pytest.mark.skipif(_compat.varlen_ops() is None, reason="this torch has no varlen ops"),
]

CUDA = torch.device("cuda")


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double().cpu()
    return float((actual.double().cpu() - expected).norm() / expected.norm().clamp_min(1e-30))


def _packed(num_heads=8, num_kv_heads=8, head_dim=64, lengths=(100, 28, 128), seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(lengths)
    q_TNH, k_TNH, v_TNH = (
        torch.randn(tokens, n, head_dim, generator=gen).bfloat16() for n in (num_heads, num_kv_heads, num_kv_heads)
    )
    cu_seq = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q_TNH, k_TNH, v_TNH, cu_seq, max(lengths)


def _gqa_kwargs(num_heads, num_kv_heads):
    if num_heads == num_kv_heads:
        return {}
    if not _compat.varlen_ops().takes_gqa:
        pytest.skip("this torch's varlen op has no enable_gqa (torch 2.11): GQA is expanded by the module")
    return {"enable_gqa": True}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("num_kv_heads", [8, 2], ids=["mha", "gqa"])
def test_stand_in_forward_equals_flash(causal, num_kv_heads):
    q_TNH, k_TNH, v_TNH, cu_seq, max_len = _packed(num_kv_heads=num_kv_heads)
    arguments = dict(cu_seq_q=cu_seq, cu_seq_k=cu_seq, max_q=max_len, max_k=max_len, is_causal=causal,
                     scale=0.125, window_size=[-1, 0] if causal else [-1, -1], **_gqa_kwargs(8, num_kv_heads))
    on_gpu = {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in arguments.items()}
    out_TNH, lse, _ = _compat.varlen_ops().forward(query=q_TNH.to(CUDA), key=k_TNH.to(CUDA), value=v_TNH.to(CUDA), **on_gpu)
    out_cpu, lse_cpu, _ = flash_stand_in.varlen_forward(query=q_TNH, key=k_TNH, value=v_TNH, **arguments)
    assert tuple(lse.shape) == tuple(lse_cpu.shape) == (8, q_TNH.shape[0])  # (N, T) on both
    assert lse.dtype == lse_cpu.dtype == torch.float32 and out_TNH.dtype == out_cpu.dtype
    assert _rel_err(out_TNH, out_cpu) < 1e-2
    assert _rel_err(lse, lse_cpu) < 1e-3


@pytest.mark.parametrize("pad", [0, 8], ids=["H64", "H72-padded"])
@pytest.mark.parametrize("num_kv_heads", [8, 2], ids=["mha", "gqa"])
def test_stand_in_backward_equals_flash_with_any_out(num_kv_heads, pad):
    """Flash's backward reads D off the ``out`` it is handed: a random ``out`` (not the forward's)
    gives the same gradients on flash and the stand-in."""
    q_TNH, k_TNH, v_TNH, cu_seq, max_len = _packed(num_kv_heads=num_kv_heads, head_dim=64 + pad)
    _gqa_kwargs(8, num_kv_heads)  # skips where GQA is not the kernel's
    gen = torch.Generator().manual_seed(3)
    arguments = dict(cu_seq_q=cu_seq, cu_seq_k=cu_seq, max_q=max_len, max_k=max_len, is_causal=True,
                     scale=0.125, window_size=[-1, 0])
    _, lse_cpu, rng = flash_stand_in.varlen_forward(query=q_TNH, key=k_TNH, value=v_TNH, **arguments)
    out_TNH = torch.randn(q_TNH.shape, generator=gen).bfloat16()
    grad_out_TNH = torch.randn(q_TNH.shape, generator=gen).bfloat16()
    tensors = dict(grad_out=grad_out_TNH, query=q_TNH, key=k_TNH, value=v_TNH, out=out_TNH, lse=lse_cpu,
                   rng_state=rng, **arguments)
    on_gpu = {k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}
    flash = _compat.varlen_ops().backward(**on_gpu)
    stand_in = flash_stand_in.varlen_backward(**tensors)
    for name, a, b in zip(("grad q", "grad k", "grad v"), flash, stand_in):
        assert a.shape == b.shape, name
        assert _rel_err(a, b) < 1e-2, name


def test_torch_varlen_attn_drops_the_lse_gradient():
    """What the stand-in reproduces (tests/unit/test_native_paths.py pins the stand-in's side).
    If this fails, torch propagates the LSE gradient now: the stand-in must follow."""
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    q_TNH, _, _, cu_seq, max_len = _packed()
    q_TNH = q_TNH.to(CUDA).requires_grad_()
    cu_seq = cu_seq.to(CUDA)
    _, lse = varlen_attn(q_TNH, q_TNH, q_TNH, cu_seq, cu_seq, max_len, max_len, return_aux=AuxRequest(lse=True))
    assert lse.requires_grad
    lse.sum().backward()
    assert float(q_TNH.grad.abs().max()) == 0.0


@pytest.mark.parametrize("lse_only", [False, True], ids=["out+lse", "lse-only"])
@pytest.mark.parametrize("out_layout", [Layout.BLNH, Layout.TNH])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "docs"])
def test_varlen_lse_gradient_on_the_real_kernel(documents, gqa, out_layout, lse_only):
    inputs = make_inputs(batch=2, seq=256, num_q_heads=8, num_kv_heads=4 if gqa else 8, head_dim=64, documents=documents)
    results = []
    for kernel, device, dtype in ((Kernel.NATIVE, CUDA, torch.bfloat16), (Kernel.MATH, torch.device("cpu"), torch.float64)):
        config = AttentionConfig(backend="varlen", enable_gqa=gqa, return_lse=True, varlen_output=out_layout, kernel=kernel)
        positions_BL = None if inputs.positions_BL is None else inputs.positions_BL.to(device)
        leaves = [t.bfloat16().to(device, dtype).requires_grad_() for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]
        out, lse = config.build()(*leaves, make_attention_masks(config, positions_BL))
        gen = torch.Generator().manual_seed(1)
        loss = (lse * torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(device, lse.dtype)).sum()
        if not lse_only:
            loss = loss + (out * torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device, out.dtype)).sum()
        loss.backward()
        results.append([t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves])
    for name, native, reference in zip(("grad q", "grad k", "grad v"), *results):
        if lse_only and name == "grad v":
            # The LSE does not depend on v: 0 but for the nudge of each row whose output gradient
            # is 0, b = sqrt|g| 2^-50 (|g| < 4 here), summed over at most L = 256 rows: < 1e-12.
            assert float(native.abs().max()) < 1e-12
            continue
        assert _rel_err(native, reference) < 2e-2, name
