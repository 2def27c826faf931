"""The native varlen and flex paths on CPU, per context-parallel rank, against the math kernel.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

On CPU and in simulation VarlenAttention and FlexAttention run the math kernel, so the code that
feeds the CUDA kernels runs only on GPUs, and its context-parallel part only on several: for
varlen ``pack_segments`` (cu_seqlens, maxima, the keys each query run needs) and the k/v
gathering, for flex the block mask built from each rank's global seq indices. Here each case is
one CP rank's view as the full-mesh and hook paths hand it to the kernel (the rank's query chunk
with its global seq indices, every key in shard order), and the native path runs on CPU:

- varlen against ``contract_varlen_attn``: torch's documented contract of ``varlen_attn``,
  written with plain differentiable ops (one softmax per packed sequence; causal is flash's
  bottom-right alignment, query i of Lq sees key j of Lk iff j <= i + Lk - Lq), with the
  argument checks torch does; forward and backward, in both torch signatures;
- flex with torch's own eager flex_attention and create_block_mask (forward only: "FlexAttention
  does not support backward on CPU").

Tolerance: float64 throughout; only summation order differs (~1e-15), so 1e-10. A wrong segment
boundary, causal alignment, rank offset or gathered key moves values by O(0.1).
"""

from __future__ import annotations

import inspect
import itertools
import math

import pytest
import torch

from dtensor_attn import AttentionConfig, Kernel, Layout, make_attention_masks
from dtensor_attn.backends import VarlenAttention
from dtensor_attn.backends.varlen_segments import pack_segments
from dtensor_attn.load_balance import SeqOrder, global_seq_index, permute_mask
from dtensor_attn.testing.reference import cp_rank_view, make_inputs

TOL = dict(rtol=1e-10, atol=1e-10)
B, L, H = 2, 16, 8


def contract_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                         scale=None, window_size=(-1, -1), enable_gqa=False):
    """``torch.nn.attention.varlen.varlen_attn`` as documented (torch 2.13 signature)."""
    num_q_heads, num_kv_heads = query.shape[1], key.shape[1]
    if not enable_gqa and num_q_heads != num_kv_heads:
        raise ValueError(f"Expect query and key/value to have the same number of heads but got "
                         f"Hq={num_q_heads} and Hkv={num_kv_heads}. Try setting enable_gqa=True for GQA.")
    assert num_q_heads % num_kv_heads == 0
    assert window_size in ((-1, -1), (-1, 0)), window_size
    for name, cu, tokens in (("cu_seq_q", cu_seq_q, query.shape[0]), ("cu_seq_k", cu_seq_k, key.shape[0])):
        assert cu.dtype == torch.int32 and cu.device == query.device, (name, cu.dtype, cu.device)
        assert int(cu[0]) == 0 and int(cu[-1]) == tokens and bool((cu[1:] >= cu[:-1]).all()), (name, cu, tokens)
    assert cu_seq_q.shape == cu_seq_k.shape
    lens_q, lens_k = (cu[1:] - cu[:-1] for cu in (cu_seq_q, cu_seq_k))
    # The kernel sizes its tiles by these: a maximum that is too small truncates a sequence.
    assert max_q == int(lens_q.max()) and max_k == int(lens_k.max()), (max_q, lens_q, max_k, lens_k)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    outs, lses = [], []
    for s in range(len(lens_q)):
        q_TNH = query[int(cu_seq_q[s]):int(cu_seq_q[s + 1])]
        k_TNH = key[int(cu_seq_k[s]):int(cu_seq_k[s + 1])].repeat_interleave(num_q_heads // num_kv_heads, dim=1)
        v_TNH = value[int(cu_seq_k[s]):int(cu_seq_k[s + 1])].repeat_interleave(num_q_heads // num_kv_heads, dim=1)
        scores_NTT = torch.einsum("qnh,knh->nqk", q_TNH, k_TNH) * scale
        if window_size == (-1, 0):
            num_q, num_k = q_TNH.shape[0], k_TNH.shape[0]
            seen_TT = torch.arange(num_k)[None, :] <= torch.arange(num_q)[:, None] + (num_k - num_q)
            scores_NTT = scores_NTT.masked_fill(~seen_TT, float("-inf"))
        lse_NT = torch.logsumexp(scores_NTT, dim=-1)
        outs.append(torch.einsum("nqk,knh->qnh", torch.softmax(scores_NTT, dim=-1), v_TNH))
        lses.append(lse_NT)
    out_TNH, lse_NT = torch.cat(outs), torch.cat(lses, dim=1)  # the LSE as the kernel returns it: (N, T)
    if return_aux is not None and return_aux.lse:
        return out_TNH, lse_NT
    return out_TNH


def contract_varlen_attn_211(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None,
                             scale=None, window_size=(-1, -1)):
    """torch 2.11's signature: no ``enable_gqa``, so k/v must come with q's head count."""
    return contract_varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, return_aux=return_aux,
                                scale=scale, window_size=window_size)


SIGNATURES = [pytest.param(contract_varlen_attn, id="torch2.13"), pytest.param(contract_varlen_attn_211, id="torch2.11")]


@pytest.fixture
def native_varlen(monkeypatch, request):
    """VarlenAttention's native path on CPU, with ``request.param`` as the kernel."""
    kernel = request.param
    monkeypatch.setattr(VarlenAttention, "native_kernel_available", lambda self, device: True)
    monkeypatch.setattr("dtensor_attn._compat.varlen_attn_or_none", lambda: kernel)
    return kernel


def rank_view(inputs, config, *, cp: int, rank: int, order: SeqOrder, documents: bool):
    """(q, k, v, mask, q_seq_index_L, kv_seq_index_L) as CP rank ``rank`` hands them to the
    kernel (``cp_rank_view``, which LocalMapAttention is checked to hand over exactly)."""
    mask = make_attention_masks(config, inputs.positions_BL) if documents else None
    view = cp_rank_view(inputs, mask, cp_degree=cp, rank=rank, order=order)
    return view.q_BLNH, view.k_BLNH, view.v_BLNH, view.mask, view.q_seq_index_L, view.kv_seq_index_L


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


@pytest.mark.parametrize("native_varlen", SIGNATURES, indirect=True)
@pytest.mark.parametrize("out_layout", [Layout.BLNH, Layout.TNH])
@pytest.mark.parametrize("cp,rank,order,documents,causal,gqa", list(_cases()))
def test_varlen_native_path_equals_math_kernel(native_varlen, out_layout, cp, rank, order, documents, causal, gqa):
    """Output, LSE and q/k/v gradients of the native path (segments, gathered keys, the kernel
    contract) equal the math kernel's on the same rank view."""
    inputs = make_inputs(batch=B, seq=L, num_q_heads=8, num_kv_heads=2 if gqa else 8, head_dim=H, documents=documents)
    results = []
    for kernel in (Kernel.AUTO, Kernel.MATH):
        config = AttentionConfig(backend="varlen", is_causal=causal, enable_gqa=gqa, return_lse=True,
                                 varlen_output=out_layout, kernel=kernel)
        module = config.build()
        q, k, v, mask, q_index_L, kv_index_L = rank_view(inputs, config, cp=cp, rank=rank, order=order, documents=documents)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out, lse = module(*leaves, mask, q_seq_index_L=q_index_L, kv_seq_index_L=kv_index_L)
        (out.sum() + lse.sum() / 4).backward()
        results.append((out, lse, *(leaf.grad for leaf in leaves)))
        assert module.uses_native_kernel(q.device) is (kernel is Kernel.AUTO)
    for name, native, math_ in zip(("out", "lse", "grad q", "grad k", "grad v"), *results):
        assert native.shape == math_.shape, (name, native.shape, math_.shape)
        torch.testing.assert_close(native, math_, **TOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("cp,rank,order,documents,causal,gqa", list(_cases()))
def test_flex_native_path_equals_math_kernel(cp, rank, order, documents, causal, gqa):
    """Output and LSE of torch's eager flex with our block mask (rank offsets, documents,
    head-tail order, GQA) equal the math kernel's on the same rank view."""
    inputs = make_inputs(batch=B, seq=L, num_q_heads=8, num_kv_heads=2 if gqa else 8, head_dim=H, documents=documents)
    results = []
    for kernel in (Kernel.NATIVE, Kernel.MATH):
        config = AttentionConfig(backend="flex", is_causal=causal, enable_gqa=gqa, return_lse=True, kernel=kernel)
        q, k, v, mask, q_index_L, kv_index_L = rank_view(inputs, config, cp=cp, rank=rank, order=order, documents=documents)
        with torch.no_grad():
            results.append(config.build()(q, k, v, mask, q_seq_index_L=q_index_L, kv_seq_index_L=kv_index_L))
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


@pytest.mark.parametrize("native_varlen", SIGNATURES[:1], indirect=True)
def test_contract_kernel_sees_the_documents(native_varlen):
    """The check above can fail: the contract kernel honours segments, so packed documents
    change its output (a kernel that ignored cu_seqlens would equal the causal-only output)."""
    inputs = make_inputs(batch=B, seq=L, documents=True)
    config = AttentionConfig(backend="varlen")
    module = config.build()
    q, k, v = inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH
    with_docs = module(q, k, v, make_attention_masks(config, inputs.positions_BL))
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
    segments = pack_segments(
        batch=1, num_q=4, num_kv=8, is_causal=True,
        mask=mask.with_tensors(mask.q_document_ids_BL[:, 4:], mask.kv_document_ids_BL),
        q_seq_index_L=index_L[4:], kv_seq_index_L=index_L, device=torch.device("cpu"),
    )
    assert segments.cu_seq_q.tolist() == [0, 3, 4]
    assert segments.cu_seq_kv.tolist() == [0, 5, 6]
    assert (segments.max_q, segments.max_kv) == (3, 5)
    # Keys in shard order: positions 0, 1 are at 0, 1; 2, 3, 4 at 4, 5, 6; 5 at 7.
    assert segments.kv_token_index_T.tolist() == [0, 1, 4, 5, 6, 7]
    assert segments.cu_seq_q.dtype == segments.cu_seq_kv.dtype == torch.int32


def test_contract_kernel_signatures_match_torch():
    """The stand-in of this torch's signature takes what its varlen_attn takes, in order, the
    keywords as keywords (torch 2.13 has enable_gqa, 2.11 not)."""
    varlen = pytest.importorskip("torch.nn.attention.varlen")
    torch_params = inspect.signature(varlen.varlen_attn).parameters
    stand_in = contract_varlen_attn if "enable_gqa" in torch_params else contract_varlen_attn_211
    ours = inspect.signature(stand_in).parameters
    assert list(ours) == [p for p in torch_params if p in ours]
    for name, param in ours.items():
        assert param.kind is torch_params[name].kind, name
    assert "enable_gqa" not in inspect.signature(contract_varlen_attn_211).parameters


def test_lse_layout_is_read_off_torch_not_guessed_from_the_shape():
    """T == N (8 tokens of a cp4 rank, 8 heads) made the shape check take torch's (N, T) LSE for
    (T, N): the cp4 cases above failed on the LSE until the layout came from torch's fake kernel."""
    from dtensor_attn import _compat

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
    from dtensor_attn.backends import varlen

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("dtensor_attn._compat.varlen_lse_heads_first", lambda: heads_first)
        return varlen._lse_TN(lse, num_tokens, num_heads)
