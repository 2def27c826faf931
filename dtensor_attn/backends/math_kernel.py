"""The math reference kernel: dense masked attention with the contract of every backend.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Used where torch has no kernel for the run (flex backward and varlen on CPU, simulated
ranks) and as the float64 reference of the tests. Test ids and reports name it ``[math]``.
"""

from __future__ import annotations

import torch



def expand_kv_heads(kv_BNLH: torch.Tensor, num_q_heads: int, *, enable_gqa: bool, heads_dim: int = 1):
    """Repeat each k/v head for its group of q heads (GQA), after checking the group fits."""
    num_kv_heads = kv_BNLH.shape[heads_dim]
    if num_kv_heads == num_q_heads:
        return kv_BNLH
    if not enable_gqa:
        raise ValueError(
            f"q has {num_q_heads} heads and k/v {num_kv_heads}: that is GQA, but enable_gqa is "
            f"False. Fix: AttentionConfig(enable_gqa=True)."
        )
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"GQA needs q heads ({num_q_heads}) to be a multiple of k/v heads ({num_kv_heads})"
        )
    return kv_BNLH.repeat_interleave(num_q_heads // num_kv_heads, dim=heads_dim)


def math_attention(
    q_BNLH: torch.Tensor,
    k_BNLH: torch.Tensor,
    v_BNLH: torch.Tensor,
    allowed_BLL: torch.Tensor | None,
    *,
    scale: float,
    enable_gqa: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention; returns (out_BNLH, lse_BNL). A query that may see no key gets 0 and
    an LSE of -inf, as flex and varlen do."""
    num_q_heads = q_BNLH.shape[1]
    k_BNLH = expand_kv_heads(k_BNLH, num_q_heads, enable_gqa=enable_gqa)
    v_BNLH = expand_kv_heads(v_BNLH, num_q_heads, enable_gqa=enable_gqa)
    scores_BNLL = torch.matmul(q_BNLH, k_BNLH.transpose(-1, -2)) * scale
    if allowed_BLL is not None:
        scores_BNLL = scores_BNLL.masked_fill(~allowed_BLL[:, None], float("-inf"))
    lse_BNL = torch.logsumexp(scores_BNLL, dim=-1)
    # exp(-inf - finite) = 0 for a fully masked row instead of nan.
    finite_lse_BNL = torch.where(torch.isinf(lse_BNL), torch.zeros_like(lse_BNL), lse_BNL)
    probs_BNLL = torch.exp(scores_BNLL - finite_lse_BNL[..., None])
    # In BLNH memory, as torch's kernels lay out their output: a BLNH caller's transpose back
    # is contiguous, so a model's out.view(B, L, -1) works.
    out_BNLH = torch.matmul(probs_BNLL, v_BNLH).transpose(1, 2).contiguous().transpose(1, 2)
    return out_BNLH, lse_BNL
