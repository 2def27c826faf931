"""torch's varlen kernels with an autograd formula that keeps the LSE gradient.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

torch's ``varlen_attn`` registers a backward that ignores the gradient of its LSE (it hands
only ``grad_out`` to the flash backward), while the LSE still says ``requires_grad=True``: any
model that backpropagates through the LSE (attention sinks, say) gets silently wrong q/k
gradients. Used when the caller asks for the LSE; without it, torch's own formula is right.

How the LSE gradient g gets into a kernel that takes only grad_out: flash's backward computes
dS = P * (dP - D) with dP = dO v^T and D = rowsum(dO * O), reading O as it is handed, and uses
O for nothing else. The exact gradient with an LSE term is dS = P * (dP - D + g). So the kernel
is handed O' = O - (g / |dO|^2) dO instead of O: then rowsum(dO * O') = D - g, and nothing else
changes. The per-row factor g / |dO|^2 is kept below 2^100 (fp32 holds it, and O' stays in
range): a row whose |dO|^2 is below |g| 2^-100 (its output unused, or nearly) gets
dO + b e_0 with b = sqrt|g| 2^-50 instead of dO, a nudge 2^-50 / sqrt|g| the size of g, far
below the bf16 rounding of any gradient. Four elementwise passes (a norm, the nudge, O', a
cast), no host sync, one graph under torch.compile; O' is rounded to the kernel dtype, which
costs about 2^-9 / sqrt(H) of g, below the kernel's own bf16 rounding of P.
"""

from __future__ import annotations

import torch

MAX_FACTOR_LOG2 = 100  # g / |dO|^2 stays below 2^100: fp32 holds it, and O' = O - factor dO too


class VarlenWithLseGrad(torch.autograd.Function):
    """(out_TNH, lse) = varlen attention, with the LSE (in the kernel's layout) differentiable."""

    @staticmethod
    def forward(ctx, ops, q_TNH, k_TNH, v_TNH, cu_seq_q, cu_seq_kv, max_q, max_kv, is_causal, scale, window_size,
                enable_gqa):
        """``ops``: _compat.varlen_ops(), resolved by the caller (outside any compiled region);
        ``cu_seq_kv`` None: the same as ``cu_seq_q`` (torch.compile refuses one tensor twice)."""
        arguments = dict(
            cu_seq_q=cu_seq_q, cu_seq_k=cu_seq_q if cu_seq_kv is None else cu_seq_kv, max_q=max_q, max_k=max_kv, is_causal=is_causal,
            scale=scale, window_size=list(window_size),
        )
        if enable_gqa:
            arguments["enable_gqa"] = True
        out_TNH, lse, rng_state = ops.forward(query=q_TNH, key=k_TNH, value=v_TNH, **arguments)
        ctx.save_for_backward(q_TNH, k_TNH, v_TNH, out_TNH, lse, rng_state)
        ctx.ops, ctx.arguments = ops, arguments  # the backward op takes the same, but enable_gqa
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(rng_state)
        return out_TNH, lse

    @staticmethod
    def backward(ctx, grad_out_TNH, grad_lse):
        q_TNH, k_TNH, v_TNH, out_TNH, lse, rng_state = ctx.saved_tensors
        if grad_out_TNH is None and grad_lse is None:
            return (None,) * 12
        if grad_out_TNH is None:
            grad_out_TNH = torch.zeros_like(out_TNH)
        saved = dict(lse=lse, rng_state=rng_state, **ctx.arguments)
        ops = ctx.ops
        if grad_lse is None:
            grads = ops.backward(grad_out=grad_out_TNH.contiguous(), query=q_TNH, key=k_TNH, value=v_TNH, out=out_TNH, **saved)
        else:
            grads = _backward_with_lse_grad(ops, grad_out_TNH, grad_lse, q_TNH, k_TNH, v_TNH, out_TNH, saved)
        return (None, *grads, *(None,) * 8)


def _backward_with_lse_grad(ops, grad_out_TNH, grad_lse, q_TNH, k_TNH, v_TNH, out_TNH, saved):
    # The gradient has the kernel's LSE layout, which lse_tokens_heads reads as it reads the LSE.
    grad_lse_TN1 = lse_tokens_heads(grad_lse, *q_TNH.shape[:2], ops.lse_heads_first)[..., None].double()
    grad_out_TNH = grad_out_TNH.to(out_TNH.dtype)
    # Per-row scalars in float64 (T * N of them: cheap), so no square underflows or overflows.
    norm2_TN1 = torch.linalg.vector_norm(grad_out_TNH, dim=-1, keepdim=True, dtype=torch.float64) ** 2
    nudge_TN1 = (norm2_TN1 < grad_lse_TN1.abs() * 2.0**-MAX_FACTOR_LOG2) & (grad_lse_TN1 != 0)
    size_TN1 = (grad_lse_TN1.abs().sqrt() * 2.0 ** -(MAX_FACTOR_LOG2 // 2)).to(out_TNH.dtype)
    size_TN1 = torch.where(nudge_TN1, size_TN1, 0)
    e0_H = torch.zeros(grad_out_TNH.shape[-1], dtype=out_TNH.dtype, device=out_TNH.device)
    e0_H[0] = 1
    first_TN1 = grad_out_TNH[..., :1].double()
    grad_out_TNH = torch.addcmul(grad_out_TNH, size_TN1, e0_H)
    norm2_TN1 = norm2_TN1 - first_TN1**2 + grad_out_TNH[..., :1].double() ** 2  # |dO + b e0|^2, as rounded
    factor_TN1 = torch.where(grad_lse_TN1 == 0, 0.0, grad_lse_TN1 / norm2_TN1.clamp_min(torch.finfo(torch.float64).tiny))
    out_for_delta_TNH = torch.addcmul(out_TNH, grad_out_TNH, -factor_TN1.float())  # fp32: out + bf16 * fp32
    return ops.backward(
        grad_out=grad_out_TNH, query=q_TNH, key=k_TNH, value=v_TNH,
        out=out_for_delta_TNH.to(out_TNH.dtype), **saved,
    )


def lse_tokens_heads(lse: torch.Tensor, num_tokens: int, num_heads: int, heads_first: bool | None) -> torch.Tensor:
    """The kernel's LSE as (T, N). It is documented as (T, N), but torch's kernel returns (N, T);
    the shape alone cannot tell when T == N (a small CP chunk), so ``heads_first`` is read off
    torch's fake kernel (``VarlenOps.lse_heads_first``), and the shape decides only where that
    could not run (None)."""
    if heads_first is None:
        heads_first = tuple(lse.shape) == (num_heads, num_tokens)
    lse_TN = lse.transpose(0, 1) if heads_first else lse
    if tuple(lse_TN.shape) != (num_tokens, num_heads):
        raise RuntimeError(
            f"VarlenAttention: varlen_attn returned an LSE of shape {tuple(lse.shape)} for "
            f"{num_tokens} tokens and {num_heads} heads; expected (T, N) = ({num_tokens}, "
            f"{num_heads}) or (N, T). This torch's varlen_attn changed its LSE layout."
        )
    return lse_TN
