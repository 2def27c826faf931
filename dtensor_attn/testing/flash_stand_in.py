"""A CPU stand-in for the flash kernels under torch's ``varlen_attn``, with their whole contract.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

``with flash_varlen_on_cpu():`` registers CPU kernels for torch's own ops
``torch_attn::_varlen_attn`` and ``torch_attn::_varlen_attn_backward`` (through torch.library,
removed on exit), so that on CPU torch's own Python wrapper ``varlen_attn`` (its argument checks)
and torch's own registered autograd formula run, with these kernels where flash would run.
A stand-in that is kinder than the real kernel hides the real kernel's bugs (torch's formula
drops the LSE gradient: a differentiable stand-in made that invisible on CPU), so these
kernels do what flash does and nothing more:

- forward: fp16/bf16 only, one dtype and device for q/k/v, int32 cu_seqlens, a contiguous last
  dim, head_dim a multiple of 8 up to 256, q heads a multiple of k/v heads; each sequence is one
  softmax; causal and windows aligned bottom-right (query i of Lq sees key j of Lk iff
  i + Lk - Lq - left <= j <= i + Lk - Lq + right, -1 meaning unbounded); accumulation in fp32,
  the output in the input dtype, the LSE in fp32 as (N, T), +inf for a row that sees no key.
- backward: from what it is handed, as flash's: P recomputed from q, k and the given LSE;
  D = rowsum(grad_out * out) read from the given ``out`` (so a caller that adjusts ``out``
  changes D exactly as on the GPU); dS = P * (grad_out v^T - D); no LSE gradient input.
- a ``max_q``/``max_k`` below the longest sequence is an error here; flash would leave rows
  unwritten (garbage), which no test wants to pass.

Checked against the real kernel on the GPU (tests/gpu/test_flash_stand_in.py): forward output
and LSE, and backward with an arbitrary ``out``.
"""

from __future__ import annotations

import contextlib
import math

import torch

from dtensor_attn import _compat

FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def check_flash_arguments(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k) -> None:
    """The argument checks of torch's flash varlen kernels (RuntimeError, as torch raises)."""
    if query.dtype not in FLASH_DTYPES:
        raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise RuntimeError("query and key/value must have the same dtype")
    if any(t.stride(-1) != 1 for t in (query, key, value)):
        raise RuntimeError("Input tensor must have contiguous last dimension")
    head_dim = query.shape[-1]
    if key.shape[-1] != head_dim or value.shape[-1] != head_dim:
        raise RuntimeError("query, key and value must have the same head dimension")
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        raise RuntimeError(f"FlashAttention needs head_dim a multiple of 8, at most {MAX_HEAD_DIM}; got {head_dim}")
    if query.shape[1] % key.shape[1]:
        raise RuntimeError("Number of heads in key/value must divide number of heads in query")
    for name, cu, tokens in (("cu_seqlens_q", cu_seq_q, query.shape[0]), ("cu_seqlens_k", cu_seq_k, key.shape[0])):
        if cu.dtype != torch.int32:
            raise RuntimeError(f"{name} must have dtype int32")
        if cu.device != query.device:
            raise RuntimeError(f"{name} must be on the device of query")
        if int(cu[0]) != 0 or int(cu[-1]) != tokens or bool((cu[1:] < cu[:-1]).any()):
            raise RuntimeError(f"{name} {cu.tolist()} must rise from 0 to the {tokens} packed tokens")
    if cu_seq_q.shape != cu_seq_k.shape:
        raise RuntimeError("cu_seqlens_q and cu_seqlens_k must have the same number of sequences")
    longest_q, longest_k = (max((cu[1:] - cu[:-1]).tolist(), default=0) for cu in (cu_seq_q, cu_seq_k))
    if max_q < longest_q or max_k < longest_k:
        raise RuntimeError(
            f"flash stand-in: max_q {max_q} / max_k {max_k} below the longest sequence "
            f"({longest_q} / {longest_k}): the real kernel would leave those rows unwritten"
        )


def _visible_qk(num_q: int, num_k: int, is_causal: bool, window_size) -> torch.Tensor | None:
    """Which keys each query sees, aligned bottom-right as flash aligns causal and windows."""
    left, right = (-1, -1) if window_size is None else window_size
    if is_causal:
        right = 0
    if left < 0 and right < 0:
        return None
    diagonal_qk = torch.arange(num_k)[None, :] - (torch.arange(num_q)[:, None] + num_k - num_q)
    visible_qk = torch.ones(num_q, num_k, dtype=torch.bool)
    if right >= 0:
        visible_qk &= diagonal_qk <= right
    if left >= 0:
        visible_qk &= diagonal_qk >= -left
    return visible_qk


def _segments(cu_seq_q, cu_seq_k):
    bounds_q, bounds_k = cu_seq_q.tolist(), cu_seq_k.tolist()
    for s in range(len(bounds_q) - 1):
        yield slice(bounds_q[s], bounds_q[s + 1]), slice(bounds_k[s], bounds_k[s + 1])


def _scores_NQK(q_TNH, k_TNH, scale, visible_qk):
    """fp32 scores of one sequence, k/v heads repeated for their q heads (GQA)."""
    group = q_TNH.shape[1] // k_TNH.shape[1]
    k_TNH = k_TNH.float().repeat_interleave(group, dim=1)
    scores_NQK = torch.einsum("qnh,knh->nqk", q_TNH.float(), k_TNH) * scale
    if visible_qk is not None:
        scores_NQK = scores_NQK.masked_fill(~visible_qk, float("-inf"))
    return scores_NQK


def varlen_forward(*, query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, scale=None,
                   window_size=None, enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """``torch_attn::_varlen_attn`` on CPU: (out_TNH, lse_NT, rng_state)."""
    if seqused_k is not None or block_table is not None:
        raise RuntimeError("flash stand-in: seqused_k / block_table (paged KV) are not implemented")
    check_flash_arguments(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    group = query.shape[1] // key.shape[1]
    out_TNH = torch.zeros_like(query)
    lse_NT = torch.full((query.shape[1], query.shape[0]), float("inf"), dtype=torch.float32)
    for rows_q, rows_k in _segments(cu_seq_q, cu_seq_k):
        num_q, num_k = rows_q.stop - rows_q.start, rows_k.stop - rows_k.start
        if num_q == 0 or num_k == 0:
            continue
        scores_NQK = _scores_NQK(query[rows_q], key[rows_k], scale, _visible_qk(num_q, num_k, is_causal, window_size))
        lse_NQ = torch.logsumexp(scores_NQK, dim=-1)
        seen_NQ = torch.isfinite(lse_NQ)
        probs_NQK = torch.exp(scores_NQK - torch.where(seen_NQ, lse_NQ, 0.0)[..., None])
        v_TNH = value[rows_k].float().repeat_interleave(group, dim=1)
        out_TNH[rows_q] = torch.einsum("nqk,knh->qnh", probs_NQK, v_TNH).to(query.dtype)
        lse_NT[:, rows_q] = torch.where(seen_NQ, lse_NQ, float("inf"))  # flash: +inf where no key
    return out_TNH, lse_NT, torch.zeros(2, dtype=torch.uint64)


def varlen_backward(*, grad_out, query, key, value, out, lse, cu_seq_q, cu_seq_k, max_q, max_k, is_causal,
                    rng_state, scale=None, window_size=None):
    """``torch_attn::_varlen_attn_backward`` on CPU: (grad_q, grad_k, grad_v), flash's formula."""
    check_flash_arguments(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    group = query.shape[1] // key.shape[1]
    grad_q = torch.zeros(query.shape, dtype=torch.float32)
    grad_k = torch.zeros(key.shape, dtype=torch.float32)
    grad_v = torch.zeros(value.shape, dtype=torch.float32)
    # D, from the out it is handed, in fp32: what flash's preprocessing kernel computes.
    delta_NT = (grad_out.float() * out.float()).sum(-1).transpose(0, 1)
    for rows_q, rows_k in _segments(cu_seq_q, cu_seq_k):
        num_q, num_k = rows_q.stop - rows_q.start, rows_k.stop - rows_k.start
        if num_q == 0 or num_k == 0:
            continue
        scores_NQK = _scores_NQK(query[rows_q], key[rows_k], scale, _visible_qk(num_q, num_k, is_causal, window_size))
        probs_NQK = torch.exp(scores_NQK - lse[:, rows_q].float()[..., None])  # lse +inf: a row of zeros
        grad_out_TNH = grad_out[rows_q].float()
        v_TNH = value[rows_k].float().repeat_interleave(group, dim=1)
        k_TNH = key[rows_k].float().repeat_interleave(group, dim=1)
        grad_probs_NQK = torch.einsum("qnh,knh->nqk", grad_out_TNH, v_TNH)
        grad_scores_NQK = probs_NQK * (grad_probs_NQK - delta_NT[:, rows_q][..., None])
        grad_q[rows_q] = torch.einsum("nqk,knh->qnh", grad_scores_NQK, k_TNH) * scale
        grad_k_TNH = torch.einsum("nqk,qnh->knh", grad_scores_NQK, query[rows_q].float()) * scale
        grad_v_TNH = torch.einsum("nqk,qnh->knh", probs_NQK, grad_out_TNH)
        # GQA: each k/v head's gradient sums over its group of q heads.
        grad_k[rows_k] = grad_k_TNH.unflatten(1, (-1, group)).sum(2)
        grad_v[rows_k] = grad_v_TNH.unflatten(1, (-1, group)).sum(2)
    return grad_q.to(query.dtype), grad_k.to(key.dtype), grad_v.to(value.dtype)


@contextlib.contextmanager
def flash_varlen_on_cpu():
    """Inside the block, torch's ``varlen_attn`` runs on CPU tensors with these kernels."""
    with _compat.varlen_kernels_for("CPU", forward=varlen_forward, backward=varlen_backward):
        yield
