"""torch's varlen kernels with an autograd formula that keeps the LSE gradient.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

torch's ``varlen_attn`` registers a backward that ignores the gradient of its LSE (it hands
only ``grad_out`` to the flash backward), while the LSE still says ``requires_grad=True``: any
model that backpropagates through the LSE (attention sinks, say) gets silently wrong q/k
gradients. Used when the caller asks for the LSE; without it, torch's own formula is right.

How the LSE gradient g gets into a kernel that takes only grad_out: flash's backward computes
dS = P * (dP - D) with dP = dO v^T and D = rowsum(dO * O), reading O as it is handed. The
exact gradient with an LSE term is dS = P * (dP - D + g). Appending zero columns to q, k and v
changes neither the scores nor dP; appending columns to dO (ones) and to O (-g, split in two
low-precision parts so its rounding costs nothing) makes the kernel's D equal D - g. The extra
columns' gradients are dropped. This costs a padded copy of q, k, v, out and grad_out in the
backward of LSE calls only, and head_dim + 8 in the kernel.
"""

from __future__ import annotations

import math

import torch

HEAD_DIM_ALIGN = 8  # flash kernels take head_dim in multiples of 8


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
    head_dim = q_TNH.shape[-1]
    pad = HEAD_DIM_ALIGN  # keeps head_dim a multiple of 8 and leaves room for the two columns
    # The gradient has the kernel's LSE layout: (N, T) on every torch measured; (T, N) as documented.
    heads_first = tuple(grad_lse.shape) == (q_TNH.shape[1], q_TNH.shape[0]) and ops.lse_heads_first is not False
    grad_lse_TN = (grad_lse.transpose(0, 1) if heads_first else grad_lse).float()
    # -g as hi + lo in the kernel's dtype: hi carries 8 mantissa bits (bf16), lo the next 8.
    minus_g_hi_TN = (-grad_lse_TN).to(out_TNH.dtype)
    minus_g_lo_TN = (-grad_lse_TN - minus_g_hi_TN.float()).to(out_TNH.dtype)
    extra_out_TNH = torch.zeros(*out_TNH.shape[:2], pad, dtype=out_TNH.dtype, device=out_TNH.device)
    extra_out_TNH[..., 0], extra_out_TNH[..., 1] = minus_g_hi_TN, minus_g_lo_TN
    extra_grad_TNH = torch.zeros_like(extra_out_TNH)
    extra_grad_TNH[..., :2] = 1
    padded = dict(
        grad_out=torch.cat([grad_out_TNH.to(out_TNH.dtype), extra_grad_TNH], dim=-1),
        out=torch.cat([out_TNH, extra_out_TNH], dim=-1),
        query=_zero_pad(q_TNH, pad),
        key=_zero_pad(k_TNH, pad),
        value=_zero_pad(v_TNH, pad),
    )
    if saved["scale"] is None:  # the kernel would take 1/sqrt of the padded head_dim
        saved = dict(saved, scale=1.0 / math.sqrt(head_dim))
    grad_q, grad_k, grad_v = ops.backward(**padded, **saved)
    return grad_q[..., :head_dim], grad_k[..., :head_dim], grad_v[..., :head_dim]


def _zero_pad(t_TNH: torch.Tensor, pad: int) -> torch.Tensor:
    return torch.nn.functional.pad(t_TNH, (0, pad))


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
