"""Inner attention on plain tensors: every backend against the float64 reference, masks, GQA,
config errors, and the zero-copy varlen path.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Tolerance: float64 everywhere; 1e-10 is ~5 orders above reduction-order rounding.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dtensor_attn import AttentionConfig, Kernel, Layout, make_attention_masks
from dtensor_attn.backends import REGISTRY, VarlenAttention
from dtensor_attn.config import Backend
from dtensor_attn.testing.reference import make_inputs, reference_attention, to_layout

TOL = dict(rtol=1e-10, atol=1e-10)

CASES = [
    pytest.param(backend, layout, out, documents, id=f"{backend}-{out.name if out is Layout.TNH else layout.name}-{'docs' if documents else 'causal'}")
    for backend in REGISTRY
    for layout in (Layout.BLNH, Layout.BNLH)
    for out in ((Layout.BLNH, Layout.TNH) if backend is Backend.VARLEN and layout is Layout.BLNH else (layout,))
    # sdpa refuses document masks (test_sdpa_refuses_document_masks...)
    for documents in ((False, True) if REGISTRY[backend].mask_type is not None else (False,))
]


@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("backend,layout,out_layout,documents", CASES)
def test_backend_matches_reference(backend, layout, out_layout, documents, gqa):
    inputs = make_inputs(num_q_heads=8 if gqa else 4, num_kv_heads=4, documents=documents, seq=12)
    config = AttentionConfig(
        backend=backend, layout=layout, enable_gqa=gqa, return_lse=True, scale=0.3,
        varlen_output=out_layout if out_layout is Layout.TNH else Layout.BLNH,
    )
    module = config.build()
    assert (module.in_layout, module.out_layout) == (layout, out_layout)
    mask = make_attention_masks(config, inputs.positions_BL)
    q, k, v = (to_layout(t, layout) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    out, lse = module(q, k, v, mask)
    out_ref_BLNH, lse_ref_BLN = reference_attention(inputs, scale=0.3)
    torch.testing.assert_close(out, to_layout(out_ref_BLNH, out_layout), **TOL)
    torch.testing.assert_close(lse, to_layout(lse_ref_BLN, module.lse_layout), **TOL)


def test_sdpa_refuses_document_masks_and_accepts_single_documents():
    inputs = make_inputs(documents=True)
    with pytest.raises(ValueError, match="sdpa cannot apply packed-document masks.*Fix: use backend 'flex' or 'varlen'"):
        make_attention_masks(AttentionConfig(backend="sdpa"), inputs.positions_BL)
    assert make_attention_masks(AttentionConfig(backend="sdpa"), torch.arange(8).repeat(2, 1)) is None


@pytest.mark.parametrize("given,built", [("flex", "varlen"), ("varlen", "flex"), ("varlen", "sdpa")])
def test_mask_for_another_backend_raises(given, built):
    """docs/bugs.md row 7: a config said flex, the model was built with another backend."""
    inputs = make_inputs(documents=True)
    mask = make_attention_masks(AttentionConfig(backend=given), inputs.positions_BL)
    module = AttentionConfig(backend=built).build()
    with pytest.raises(ValueError, match=f"was handed a {type(mask).__name__}.*Fix: make masks with make_attention_masks"):
        module(inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH, mask)


def test_flex_and_varlen_agree_on_documents():
    inputs = make_inputs(documents=True, seq=16, batch=3)
    outs = []
    for backend in ("flex", "varlen"):
        config = AttentionConfig(backend=backend)
        outs.append(config.build()(inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH, make_attention_masks(config, inputs.positions_BL)))
    torch.testing.assert_close(outs[0], outs[1], **TOL)
    causal, _ = reference_attention(inputs, use_documents=False)
    assert (outs[0] - causal).abs().max() > 0.1


def test_flex_native_cpu_forward_matches_math_kernel():
    """torch's eager flex on CPU (forward only) and our math kernel implement one contract."""
    inputs = make_inputs(documents=True, num_q_heads=8, num_kv_heads=4)
    results = []
    for kernel in (Kernel.NATIVE, Kernel.MATH):
        config = AttentionConfig(backend="flex", kernel=kernel, enable_gqa=True, return_lse=True)
        with torch.no_grad():
            results.append(config.build()(inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH, make_attention_masks(config, inputs.positions_BL)))
    torch.testing.assert_close(results[0], results[1], **TOL)


@pytest.mark.parametrize("backend", list(REGISTRY))
def test_gqa_without_flag_is_an_error(backend):
    """docs/bugs.md row 8: the GQA flag must reach the kernel (or the error must be clear)."""
    inputs = make_inputs(num_q_heads=8, num_kv_heads=4)
    with pytest.raises(ValueError, match=r"q has 8 heads and k/v 4.*enable_gqa=True"):
        AttentionConfig(backend=backend).build()(inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown backend 'flash'; expected one of sdpa, flex, varlen"):
        AttentionConfig(backend="flash")
    with pytest.raises(ValueError, match="varlen_output=Layout.TNH needs backend varlen"):
        AttentionConfig(backend="sdpa", varlen_output=Layout.TNH)
    with pytest.raises(ValueError, match="layout must be Layout.BLNH or the legacy Layout.BNLH"):
        AttentionConfig(backend="sdpa", layout=Layout.TNH)
    with pytest.raises(RuntimeError, match="Kernel.NATIVE asked for, but torch has no varlen kernel for cpu"):
        AttentionConfig(backend="varlen", kernel=Kernel.NATIVE).build()(*(torch.randn(1, 4, 2, 8) for _ in range(3)))
    assert AttentionConfig(backend="flex").backend is Backend.FLEX


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


COPY_OPS = ("copy_", "clone", "_to_copy", "contiguous", "transpose", "permute", "index_select", "cat")


def _fake_varlen_with_gqa(q_TNH, k_TNH, v_TNH, cu_q, cu_kv, max_q, max_kv, *, enable_gqa=False, **kwargs):
    """torch 2.13's op takes enable_gqa; shapes only (no LSE asked for: the output alone)."""
    assert enable_gqa and "return_aux" not in kwargs
    return torch.empty_like(q_TNH)


def _fake_varlen_without_gqa(q_TNH, k_TNH, v_TNH, cu_q, cu_kv, max_q, max_kv, **kwargs):
    """torch 2.11's op has no enable_gqa: k/v must arrive with q's head count."""
    assert k_TNH.shape[1] == q_TNH.shape[1] and "enable_gqa" not in kwargs, "torch 2.11 varlen needs expanded k/v heads"
    return torch.empty_like(q_TNH)


@pytest.mark.parametrize("fake,expected_copies", [(_fake_varlen_with_gqa, []), (_fake_varlen_without_gqa, ["clone", "clone"])], ids=["torch2.13-gqa-kwarg", "torch2.11-expand-kv"])
@pytest.mark.parametrize("out_layout", [Layout.BLNH, Layout.TNH])
def test_varlen_blnh_path_makes_no_copy(monkeypatch, out_layout, fake, expected_copies):
    """The point of the refactor: BLNH in, a zero-copy reshape to TNH at the kernel, no copy.

    The CUDA kernel is replaced by a fake that checks shapes; the kernel gets zero-copy views of
    q/k/v. Where varlen_attn has no enable_gqa (torch 2.11), the only copies are the k/v head
    expansions (repeat_interleave)."""
    inputs = make_inputs(num_q_heads=8, num_kv_heads=4)
    q, k, v = inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH
    seen = {}

    def recording_fake(q_TNH, k_TNH, v_TNH, *args, **kwargs):
        seen.update(q=q_TNH, k=k_TNH, kwargs=kwargs)
        return fake(q_TNH, k_TNH, v_TNH, *args, **kwargs)

    monkeypatch.setattr(VarlenAttention, "native_kernel_available", lambda self, device: True)
    monkeypatch.setattr("dtensor_attn._compat.varlen_attn_or_none", lambda: recording_fake)
    module = AttentionConfig(backend="varlen", enable_gqa=True, varlen_output=out_layout).build()
    if module._varlen_ops is None:
        pytest.skip("this torch has no varlen ops (torch.nn.attention.varlen)")
    monkeypatch.setattr(module._varlen_ops, "takes_gqa", fake is _fake_varlen_with_gqa)
    with _CountOps() as ops:
        out = module(q, k, v)
    copies = [name.split(".")[0] for name in ops.names if name.split(".")[0] in COPY_OPS]
    assert copies == expected_copies, copies
    assert seen["q"].data_ptr() == q.data_ptr() and seen["q"].shape == (16, 8, 8)
    if not expected_copies:
        assert seen["k"].data_ptr() == k.data_ptr()
    assert out.shape == ((2, 8, 8, 8) if out_layout is Layout.BLNH else (16, 8, 8))
    assert seen["kwargs"]["window_size"] == (-1, 0)
