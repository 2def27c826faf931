"""The CPU flash stand-in keeps flash's contract: its checks, alignment, LSE and backward.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

A stand-in kinder than the real kernel hides the real kernel's bugs (docs/bugs.md row 13);
tests/gpu/test_varlen_lse_grad.py holds it to flash on a GPU, these pin each part on CPU.
Tolerance: bf16 inputs, fp32 accumulation, outputs rounded to bf16: 2e-2 against float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from dtensor_attn.testing.flash_stand_in import check_flash_arguments, varlen_backward, varlen_forward

CU = torch.tensor([0, 5, 8], dtype=torch.int32)


def _qkv(num_heads=4, num_kv_heads=4, head_dim=8, tokens=8, dtype=torch.bfloat16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, n, head_dim, generator=gen).to(dtype) for n in (num_heads, num_kv_heads, num_kv_heads)]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dtype=torch.float32), "FlashAttention only support fp16 and bf16 data type"),
        (dict(head_dim=12), "head_dim a multiple of 8, at most 256; got 12"),
        (dict(head_dim=264), "at most 256; got 264"),
        (dict(num_heads=3, num_kv_heads=2), "Number of heads in key/value must divide number of heads in query"),
    ],
)
def test_flash_refuses_what_flash_refuses(change, message):
    q, k, v = _qkv(**change)
    with pytest.raises(RuntimeError, match=message):
        check_flash_arguments(q, k, v, CU, CU, 5, 5)


def test_cu_seqlens_must_be_int32_rising_to_the_token_count():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="cu_seqlens_q must have dtype int32"):
        check_flash_arguments(q, k, v, CU.long(), CU, 5, 5)
    with pytest.raises(RuntimeError, match=r"cu_seqlens_k \[0, 5, 7\] must rise from 0 to the 8 packed tokens"):
        check_flash_arguments(q, k, v, CU, torch.tensor([0, 5, 7], dtype=torch.int32), 5, 5)
    with pytest.raises(RuntimeError, match="the real kernel would leave those rows unwritten"):
        check_flash_arguments(q, k, v, CU, CU, 4, 5)
    with pytest.raises(RuntimeError, match="contiguous last dimension"):
        check_flash_arguments(q.transpose(0, 2).contiguous().transpose(0, 2), k, v, CU, CU, 5, 5)


def test_mixed_dtypes_are_refused():
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="same dtype"):
        check_flash_arguments(q, k.half(), v, CU, CU, 5, 5)


def _dense_reference(q, k, v, cu_q, cu_k, *, is_causal, window=(-1, -1)):
    """Per sequence, float64, flash's bottom-right alignment written out by hand."""
    outs, lses = [], []
    group = q.shape[1] // k.shape[1]
    for s in range(len(cu_q) - 1):
        qs = q[int(cu_q[s]):int(cu_q[s + 1])].double()
        ks = k[int(cu_k[s]):int(cu_k[s + 1])].double().repeat_interleave(group, 1)
        vs = v[int(cu_k[s]):int(cu_k[s + 1])].double().repeat_interleave(group, 1)
        num_q, num_k = qs.shape[0], ks.shape[0]
        scores = torch.einsum("qnh,knh->nqk", qs, ks) / math.sqrt(q.shape[-1])
        for i in range(num_q):
            for j in range(num_k):
                offset = j - (i + num_k - num_q)
                hidden = (is_causal and offset > 0) or (window[0] >= 0 and offset < -window[0]) or (
                    window[1] >= 0 and offset > window[1])
                if hidden:
                    scores[:, i, j] = float("-inf")
        lse = torch.logsumexp(scores, -1)
        probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
        outs.append(torch.einsum("nqk,knh->qnh", probs, vs))
        lses.append(torch.where(torch.isinf(lse), float("inf"), lse))
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.mark.parametrize("is_causal, window", [(True, None), (False, None), (False, [2, 0]), (False, [-1, 1])],
                         ids=["causal", "full", "window-left2", "window-right1"])
def test_forward_aligns_bottom_right_and_returns_the_lse_as_heads_by_tokens(is_causal, window):
    q, k, v = _qkv(num_heads=4, num_kv_heads=2, tokens=8)
    cu_k = torch.tensor([0, 6, 8], dtype=torch.int32)  # 5 queries see 6 keys: alignment matters
    k6, v6 = k[:8], v[:8]
    out_TNH, lse_NT, rng = varlen_forward(query=q, key=k6, value=v6, cu_seq_q=CU, cu_seq_k=cu_k, max_q=5, max_k=6,
                                          is_causal=is_causal, scale=None, window_size=window, enable_gqa=True)
    expected_out, expected_lse = _dense_reference(q, k6, v6, CU, cu_k, is_causal=is_causal,
                                                  window=tuple(window) if window else (-1, -1))
    assert out_TNH.dtype == torch.bfloat16 and lse_NT.dtype == torch.float32 and lse_NT.shape == (4, 8)
    assert rng.dtype == torch.uint64
    torch.testing.assert_close(out_TNH.double(), expected_out, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse_NT.double(), expected_lse, rtol=1e-5, atol=1e-5)


def test_a_query_that_sees_no_key_gets_zero_and_an_lse_of_plus_inf():
    """flash writes +inf (not -inf) where a row's softmax sum is 0: a window right of -1 hides
    every key from the first queries."""
    q, k, v = _qkv(tokens=8)
    out_TNH, lse_NT, _ = varlen_forward(query=q, key=k, value=v, cu_seq_q=CU, cu_seq_k=CU, max_q=5, max_k=5,
                                        window_size=[0, -1], is_causal=False)
    # window (0, -1): query i sees keys >= i (bottom-right aligned, equal lengths): nobody is empty
    assert torch.isfinite(lse_NT).all()
    empty_q = torch.tensor([0, 3, 5], dtype=torch.int32)
    cu_k = torch.tensor([0, 0, 8], dtype=torch.int32)  # the first sequence has no keys at all
    out_TNH, lse_NT, _ = varlen_forward(query=q[:5], key=k, value=v, cu_seq_q=empty_q, cu_seq_k=cu_k,
                                        max_q=3, max_k=8, is_causal=False)
    assert torch.equal(out_TNH[:3].float(), torch.zeros(3, 4, 8))
    assert torch.isinf(lse_NT[:, :3]).all() and (lse_NT[:, :3] > 0).all()


def test_backward_reads_delta_off_the_out_it_is_handed():
    """flash's D = rowsum(dO * O) uses the O passed in; changing O by a vector orthogonal to dO
    changes nothing, and changing it along dO shifts every dS row by exactly that amount."""
    q, k, v = _qkv(num_heads=4, num_kv_heads=2)
    arguments = dict(cu_seq_q=CU, cu_seq_k=CU, max_q=5, max_k=5, is_causal=True, scale=None, window_size=[-1, 0])
    out, lse, rng = varlen_forward(query=q, key=k, value=v, enable_gqa=True, **arguments)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).bfloat16()
    base = varlen_backward(grad_out=grad_out, query=q, key=k, value=v, out=out, lse=lse, rng_state=rng, **arguments)
    shifted = varlen_backward(grad_out=grad_out, query=q, key=k, value=v, out=(out.float() + 3.0).bfloat16(),
                              lse=lse, rng_state=rng, **arguments)
    assert (shifted[0].float() - base[0].float()).abs().max() > 1e-2  # D moved: dq and dk change
    torch.testing.assert_close(shifted[2], base[2])  # dv = P^T dO does not read O


def test_backward_sums_kv_gradients_over_each_gqa_group():
    q, k, v = _qkv(num_heads=4, num_kv_heads=2)
    arguments = dict(cu_seq_q=CU, cu_seq_k=CU, max_q=5, max_k=5, is_causal=True, scale=None, window_size=[-1, 0])
    out, lse, rng = varlen_forward(query=q, key=k, value=v, enable_gqa=True, **arguments)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).bfloat16()
    grouped = varlen_backward(grad_out=grad_out, query=q, key=k, value=v, out=out, lse=lse, rng_state=rng, **arguments)
    k4, v4 = (t.repeat_interleave(2, dim=1) for t in (k, v))
    out4, lse4, _ = varlen_forward(query=q, key=k4, value=v4, **arguments)
    expanded = varlen_backward(grad_out=grad_out, query=q, key=k4, value=v4, out=out4, lse=lse4, rng_state=rng,
                               **arguments)
    torch.testing.assert_close(grouped[0], expanded[0], rtol=2e-2, atol=2e-2)
    for g, e in zip(grouped[1:], expanded[1:]):
        torch.testing.assert_close(g.float(), e.float().unflatten(1, (2, 2)).sum(2), rtol=2e-2, atol=2e-2)
