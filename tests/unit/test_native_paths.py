"""The native varlen and flex paths on CPU, per context-parallel rank, against the math kernel.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

On CPU and in simulation VarlenAttention and FlexAttention run the math kernel, so the code that
feeds the CUDA kernels runs only on GPUs, and its context-parallel part only on several: for
varlen ``pack_segments`` (cu_seqlens, maxima, the keys each query run needs) and the k/v
gathering, for flex the block mask built from each rank's global seq indices. Here each case is
one CP rank's view as the full-mesh and hook paths hand it to the kernel (the rank's query chunk
with its global seq indices, every key in shard order), and the native path runs on CPU:

- varlen through torch's own ``varlen_attn`` wrapper and torch's own varlen ops, with the flash
  kernels replaced on CPU by ``flash_varlen_on_cpu`` (dtensor_attn.testing.flash_stand_in: flash's
  argument checks, bottom-right causal alignment, (N, T) LSE, and flash's backward, which reads
  D off the ``out`` it is handed and takes no LSE gradient), in bf16 as flash requires; forward
  and backward, the LSE in the loss, with k/v heads handed to the kernel (torch 2.13) or expanded
  first (torch 2.11's op has no ``enable_gqa``);
- flex with torch's own eager flex_attention and create_block_mask (forward only: "FlexAttention
  does not support backward on CPU").

Tolerance: flex compares float64 with float64 (only summation order differs, ~1e-15), so 1e-10.
varlen runs in bf16 (flash takes nothing else) against the math kernel in float64 on the same
bf16-rounded inputs: the stand-in accumulates in fp32 and rounds the output and gradients to bf16
(2^-8 relative), so 2e-2; a wrong segment boundary, causal alignment, rank offset, gathered key
or a dropped LSE gradient moves values by O(0.1) (a dropped LSE gradient by the whole LSE term).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dtensor_attn import AttentionConfig, Kernel, Layout, _compat, make_attention_masks
from dtensor_attn.backends import VarlenAttention
from dtensor_attn.backends.varlen_lse_grad import lse_tokens_heads
from dtensor_attn.backends.varlen_segments import pack_segments
from dtensor_attn.load_balance import SeqOrder, global_seq_index, permute_mask
from dtensor_attn.testing.flash_stand_in import flash_varlen_on_cpu
from dtensor_attn.testing.reference import cp_rank_view, make_inputs
from dtensor_attn.visibility import Visibility

TOL = dict(rtol=1e-10, atol=1e-10)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)
B, L, H = 2, 16, 8

KERNEL_GQA = [pytest.param(True, id="gqa-in-kernel"), pytest.param(False, id="gqa-expanded")]


@pytest.fixture
def native_varlen(monkeypatch, request):
    """VarlenAttention's native path on CPU: torch's varlen_attn on the flash stand-in.
    ``request.param``: whether the kernel takes GQA (torch 2.13's op) or k/v heads are expanded
    before it (torch 2.11's op, rehearsed here by hiding ``enable_gqa``)."""
    if _compat.varlen_ops() is None:
        pytest.skip("this torch has no varlen ops (torch.nn.attention.varlen)")
    monkeypatch.setattr(VarlenAttention, "native_kernel_available", lambda self, device: True)
    if not request.param:
        monkeypatch.setattr(_compat.varlen_ops(), "takes_gqa", False)
    with flash_varlen_on_cpu():
        yield


def _weights(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def run_varlen(config, q, k, v, visibility, *, dtype, lse_only=False, out_scale=1.0):
    """Output, LSE and q/k/v gradients of ``config``'s module on ``dtype`` copies of q/k/v, with
    a loss that weighs the output (by ``out_scale`` too: a tensor zeroes some rows) and the LSE
    (or the LSE alone)."""
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = config.build()(*leaves, visibility=visibility)
    loss = (lse * _weights(lse.shape, 2).to(lse.dtype)).sum()
    if not lse_only:
        loss = loss + (out * (_weights(out.shape, 1) * out_scale).to(out.dtype)).sum()
    loss.backward()
    grads = [torch.zeros_like(leaf) if leaf.grad is None else leaf.grad for leaf in leaves]  # v, LSE alone
    return [t.double() for t in (out, lse, *grads)]


def rank_view(inputs, config, *, cp: int, rank: int, order: SeqOrder, documents: bool):
    """(q, k, v, visibility) as CP rank ``rank`` hands them to the
    kernel (``cp_rank_view``, which LocalMapAttention is checked to hand over exactly)."""
    mask = make_attention_masks(config, inputs.positions_BL) if documents else None
    view = cp_rank_view(inputs, mask, cp_degree=cp, rank=rank, order=order)
    return view.q_BLNH, view.k_BLNH, view.v_BLNH, view.visibility(config.is_causal)


def _cases():
    for cp, order, documents, causal, gqa in itertools.product(
        (1, 2, 4), SeqOrder, (False, True), (True, False), (False, True)
    ):
        if cp == 1 and order is SeqOrder.HEAD_TAIL:
            continue
        for rank in range(cp):
            words = [f"cp{cp}", f"rank{rank}", order.value, "docs" if documents else "nodocs",
                     "causal" if causal else "full", "gqa" if gqa else "mha"]
            yield pytest.param(cp, rank, order, documents, causal, gqa, id="-".join(words))


@pytest.mark.parametrize("native_varlen", KERNEL_GQA, indirect=True)
@pytest.mark.parametrize("out_layout", [Layout.BLNH, Layout.TNH])
@pytest.mark.parametrize("cp,rank,order,documents,causal,gqa", list(_cases()))
def test_varlen_native_path_equals_math_kernel(native_varlen, out_layout, cp, rank, order, documents, causal, gqa):
    """Output, LSE and q/k/v gradients of the native path (segments, gathered keys, torch's
    wrapper and ops on the flash stand-in, our LSE-gradient formula) equal the math kernel's
    on the same rank view, with the LSE in the loss."""
    inputs = make_inputs(batch=B, seq=L, num_q_heads=8, num_kv_heads=2 if gqa else 8, head_dim=H, documents=documents)
    results = []
    for kernel, dtype in ((Kernel.AUTO, torch.bfloat16), (Kernel.MATH, torch.float64)):
        config = AttentionConfig(backend="varlen", is_causal=causal, enable_gqa=gqa, return_lse=True,
                                 varlen_output=out_layout, kernel=kernel)
        q, k, v, visibility = rank_view(inputs, config, cp=cp, rank=rank, order=order, documents=documents)
        q, k, v = (t.to(torch.bfloat16).double() for t in (q, k, v))  # both from the same rounded values
        results.append(run_varlen(config, q, k, v, visibility, dtype=dtype))
        assert config.build().uses_native_kernel(q.device) is (kernel is Kernel.AUTO)
    for name, native, math_ in zip(("out", "lse", "grad q", "grad k", "grad v"), *results):
        assert native.shape == math_.shape, (name, native.shape, math_.shape)
        torch.testing.assert_close(native, math_, **BF16_TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("native_varlen", KERNEL_GQA, indirect=True)
@pytest.mark.parametrize("documents", [False, True], ids=["causal", "docs"])
def test_varlen_lse_alone_carries_the_gradient(native_varlen, documents):
    """BUGS row 12 on CPU: with the LSE as the whole loss, torch's varlen_attn formula gives
    q/k gradients of 0 (relative error 1.0, as measured on the H200); ours the math kernel's."""
    inputs = make_inputs(batch=B, seq=L, num_q_heads=8, num_kv_heads=2, head_dim=H, documents=documents)
    results = []
    for kernel, dtype in ((Kernel.AUTO, torch.bfloat16), (Kernel.MATH, torch.float64)):
        config = AttentionConfig(backend="varlen", enable_gqa=True, return_lse=True, kernel=kernel)
        mask = make_attention_masks(config, inputs.positions_BL)
        q, k, v = (t.to(torch.bfloat16).double() for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
        results.append(run_varlen(config, q, k, v, Visibility(True, mask), dtype=dtype, lse_only=True))
    for name, native, math_ in list(zip(("out", "lse", "grad q", "grad k", "grad v"), *results))[1:]:
        torch.testing.assert_close(native, math_, **BF16_TOL, msg=lambda m, name=name: f"{name}: {m}")
    assert float(results[1][2].abs().max()) > 0.1  # the LSE does move q: the check can fail


@pytest.mark.parametrize("native_varlen", KERNEL_GQA[:1], indirect=True)
@pytest.mark.parametrize("out_scale", [0.0, 1e-30, 1e-12, 1e6], ids=["rows-0", "rows-1e-30", "rows-1e-12", "rows-1e6"])
def test_varlen_lse_gradient_with_tiny_or_huge_output_gradients(native_varlen, out_scale):
    """The formula divides by |grad_out| per row: rows whose output gradient is 0 (a loss mask),
    denormal-small or huge, beside rows of ordinary size, all get the math kernel's gradients."""
    inputs = make_inputs(batch=B, seq=L, num_q_heads=8, num_kv_heads=2, head_dim=H, documents=True)
    rows_BL11 = torch.ones(B, L, 1, 1, dtype=torch.float64)
    rows_BL11[:, ::2] = out_scale  # every other token
    results = []
    for kernel, dtype in ((Kernel.AUTO, torch.bfloat16), (Kernel.MATH, torch.float64)):
        config = AttentionConfig(backend="varlen", enable_gqa=True, return_lse=True, kernel=kernel)
        q, k, v = (t.to(torch.bfloat16).double() for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
        mask = make_attention_masks(config, inputs.positions_BL)
        results.append(run_varlen(config, q, k, v, Visibility(True, mask), dtype=dtype, out_scale=rows_BL11))
    for name, native, math_ in list(zip(("out", "lse", "grad q", "grad k", "grad v"), *results))[2:]:
        scale = float(math_.abs().max())
        torch.testing.assert_close(native / scale, math_ / scale, **BF16_TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("native_varlen", KERNEL_GQA[:1], indirect=True)
def test_stand_in_drops_the_lse_gradient_as_torch_does(native_varlen):
    """The stand-in keeps the real kernel's contract, its flaw included: through torch's own
    varlen_attn the LSE says requires_grad, and its gradient never reaches q (BUGS row 12)."""
    from torch.nn.attention.varlen import AuxRequest, varlen_attn

    q_TNH = torch.randn(16, 4, 8, generator=torch.Generator().manual_seed(0)).bfloat16().requires_grad_()
    cu_seq = torch.tensor([0, 10, 16], dtype=torch.int32)
    out_TNH, lse = varlen_attn(q_TNH, q_TNH, q_TNH, cu_seq, cu_seq, 10, 10, return_aux=AuxRequest(lse=True))
    assert lse.requires_grad and tuple(lse.shape) == (4, 16)  # torch's kernels: (N, T)
    lse.sum().backward()
    assert float(q_TNH.grad.abs().max()) == 0.0


@pytest.mark.parametrize("cp,rank,order,documents,causal,gqa", list(_cases()))
def test_flex_native_path_equals_math_kernel(cp, rank, order, documents, causal, gqa):
    """Output and LSE of torch's eager flex with our block mask (rank offsets, documents,
    head-tail order, GQA) equal the math kernel's on the same rank view."""
    inputs = make_inputs(batch=B, seq=L, num_q_heads=8, num_kv_heads=2 if gqa else 8, head_dim=H, documents=documents)
    results = []
    for kernel in (Kernel.NATIVE, Kernel.MATH):
        config = AttentionConfig(backend="flex", is_causal=causal, enable_gqa=gqa, return_lse=True, kernel=kernel)
        q, k, v, visibility = rank_view(inputs, config, cp=cp, rank=rank, order=order, documents=documents)
        with torch.no_grad():
            results.append(config.build()(q, k, v, visibility=visibility))
    for name, native, math_ in zip(("out", "lse"), *results):
        torch.testing.assert_close(native, math_, **TOL, msg=lambda m, name=name: f"{name}: {m}")


def test_flex_reuses_the_plain_causal_block_mask():
    """Built once per shape and device (the per-call cost on GPUs), and right on every call."""
    inputs = make_inputs(batch=B, seq=L)
    module = AttentionConfig(backend="flex", kernel=Kernel.NATIVE).build()
    reference = AttentionConfig(backend="flex", kernel=Kernel.MATH).build()
    with torch.no_grad():
        for _ in range(2):
            out = module(inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)
            torch.testing.assert_close(out, reference(inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH), **TOL)
    assert list(module._causal_block_masks) == [(L, L, inputs.q_BLNH.device)]


@pytest.mark.parametrize("native_varlen", KERNEL_GQA[:1], indirect=True)
def test_stand_in_sees_the_documents(native_varlen):
    """The check above can fail: the stand-in honours segments, so packed documents change its
    output (a kernel that ignored cu_seqlens would equal the causal-only output)."""
    inputs = make_inputs(batch=B, seq=L, documents=True)
    config = AttentionConfig(backend="varlen")
    module = config.build()
    q, k, v = (t.bfloat16() for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    with_docs = module(q, k, v, make_attention_masks(config, inputs.positions_BL))
    assert module.kernel_name(q.device) == "varlen"
    assert (with_docs - module(q, k, v)).abs().max() > 0.1


def test_segments_of_a_cp_rank_with_documents():
    """A hand-checked case: L=8 split in 2 documents [0..4], [5..7] (one row), head-tail cp=2,
    rank 1 holds global positions 2, 3, 4, 5. Runs of consecutive queries of one document:
    (2, 3, 4) in document 0 with keys 0..4, and (5,) in document 1 with key 5."""
    positions_BL = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]])
    config = AttentionConfig(backend="varlen")
    index_L = global_seq_index(SeqOrder.HEAD_TAIL, 8, 2)
    assert index_L.tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    mask = permute_mask(make_attention_masks(config, positions_BL), index_L)
    rank1_mask = mask.with_tensors(mask.q_document_ids_BL[:, 4:], mask.kv_document_ids_BL)
    visibility = Visibility(True, rank1_mask, q_seq_index_L=index_L[4:], kv_seq_index_L=index_L)
    segments = pack_segments(visibility, batch=1, num_q=4, num_kv=8, device=torch.device("cpu"))
    assert segments.cu_seq_q.tolist() == [0, 3, 4]
    assert segments.cu_seq_kv.tolist() == [0, 5, 6]
    assert (segments.max_q, segments.max_kv) == (3, 5)
    # Keys in shard order: positions 0, 1 are at 0, 1; 2, 3, 4 at 4, 5, 6; 5 at 7.
    assert segments.kv_token_index_T.tolist() == [0, 1, 4, 5, 6, 7]
    assert segments.cu_seq_q.dtype == segments.cu_seq_kv.dtype == torch.int32


def test_lse_layout_is_read_off_torch_not_guessed_from_the_shape():
    """T == N (8 tokens of a cp4 rank, 8 heads) made the shape check take torch's (N, T) LSE for
    (T, N): the cp4 cases above failed on the LSE until the layout came from torch's fake kernel."""
    # torch 2.13's fake kernel: (num_heads, total_q); None where a torch has none to ask.
    assert _compat.varlen_lse_heads_first() is not False
    lse_NT = torch.arange(6.0).view(2, 3)
    assert torch.equal(_lse(lse_NT, heads_first=True, num_tokens=3, num_heads=2), lse_NT.T)
    assert torch.equal(_lse(lse_NT.T, heads_first=False, num_tokens=3, num_heads=2), lse_NT.T)
    # Where torch's fake kernel cannot run: the shape decides, and a tie is torch's (N, T).
    assert torch.equal(_lse(lse_NT.T, heads_first=None, num_tokens=3, num_heads=2), lse_NT.T)
    square = torch.arange(4.0).view(2, 2)
    assert torch.equal(_lse(square, heads_first=None, num_tokens=2, num_heads=2), square.T)
    with pytest.raises(RuntimeError, match=r"LSE of shape \(2, 3\) for 4 tokens and 2 heads"):
        _lse(lse_NT, heads_first=None, num_tokens=4, num_heads=2)


def _lse(lse, *, heads_first, num_tokens, num_heads):
    return lse_tokens_heads(lse, num_tokens, num_heads, heads_first)


@pytest.mark.parametrize("native_varlen", KERNEL_GQA[:1], indirect=True)
@pytest.mark.parametrize("return_lse", [False, True], ids=["out", "out+lse"])
def test_varlen_native_path_compiles_in_one_graph(native_varlen, return_lse):
    """torch.compile(fullgraph=True) traces the native path, our LSE-gradient function included
    (aot_eager: the same autograd graph inductor gets, without a C++ build), with eager's
    values and gradients. A graph break (an op schema read per call, one tensor passed twice to
    an autograd.Function) fails here."""
    inputs = make_inputs(batch=B, seq=L, num_q_heads=8, num_kv_heads=2, head_dim=H, documents=True)
    config = AttentionConfig(backend="varlen", enable_gqa=True, return_lse=return_lse, varlen_output=Layout.TNH)
    module = config.build()
    mask = make_attention_masks(config, inputs.positions_BL)
    results = []
    for fn in (module, torch.compile(module, backend="aot_eager", fullgraph=True)):
        leaves = [t.bfloat16().requires_grad_() for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]
        out = fn(*leaves, mask)
        loss = (out[0].float().sum() + out[1].sum()) if return_lse else out.float().sum()
        loss.backward()
        results.append([out[0] if return_lse else out, *(leaf.grad for leaf in leaves)])
    for name, eager, compiled in zip(("out", "grad q", "grad k", "grad v"), *results):
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
