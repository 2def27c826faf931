"""torch's own ``varlen_attn`` with its LSE, wrapped on local_map as a third-party module would
(gpt-oss's VarlenAttention): the subject that shows torch dropping the LSE gradient on GPU.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

TP only (heads sharded; torchtitan runs no varlen under CP). Causal within packed documents
from ``mask`` (global positions, the kit's default convention); the LSE comes back BLN. The
kernel needs CUDA and bf16/fp16; on torch 2.11 its GQA is expanded here (no ``enable_gqa``).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import Shard
from torch.distributed.tensor.experimental import local_map

from dtensor_attn import _compat


def _cu_seqlens(positions_BL: torch.Tensor | None, batch: int, seq: int, device) -> tuple[torch.Tensor, int]:
    """Document starts of every row, packed (each row's offset b * seq), and the longest document."""
    if positions_BL is None:
        starts = [torch.tensor([b * seq]) for b in range(batch)]
    else:
        starts = [(positions_BL[b] == 0).nonzero().flatten() + b * seq for b in range(batch)]
    cu = torch.cat(starts + [torch.tensor([batch * seq])]).to(device=device, dtype=torch.int32)
    return cu, int(cu.diff().max())


class TorchVarlenWithLse(nn.Module):
    """(out BLNH, lse BLN) from torch.nn.attention.varlen.varlen_attn, as it ships (its LSE gradient
    is whatever torch's autograd formula gives)."""

    def forward(self, q_BLNH, k_BLNH, v_BLNH, mask=None):
        varlen_attn = _compat.varlen_attn_or_none()
        if varlen_attn is None:
            raise RuntimeError("torch_varlen: this torch has no torch.nn.attention.varlen; expected torch >= 2.11")
        mesh, pl = q_BLNH.device_mesh, tuple(q_BLNH.placements)
        if any(isinstance(p, Shard) and p.dim != 2 for p in pl):
            raise ValueError(f"torch_varlen: placements {pl}; expected heads sharded only (Shard(2)) or Replicate")
        lse_pl = pl  # BLN's heads are dim 2, as BLNH's

        def kernel(q, k, v):
            batch, seq, num_heads, head_dim = q.shape
            if k.shape[2] != num_heads:  # GQA: neighbouring q heads share a k/v head
                k, v = (t.repeat_interleave(num_heads // k.shape[2], dim=2) for t in (k, v))
            cu, longest = _cu_seqlens(mask, batch, seq, q.device)
            q_TNH, k_TNH, v_TNH = (t.reshape(batch * seq, num_heads, head_dim) for t in (q, k, v))
            # torch 2.11 says is_causal= and return_lse=; 2.13 window_size=(-1, 0) and return_aux=
            kwargs = {"is_causal": True} if _compat.accepts_keyword(varlen_attn, "is_causal") else {"window_size": (-1, 0)}
            if _compat.accepts_keyword(varlen_attn, "return_aux"):
                from torch.nn.attention.varlen import AuxRequest
                kwargs["return_aux"] = AuxRequest(lse=True)
            else:
                kwargs["return_lse"] = True
            out_TNH, lse = varlen_attn(q_TNH, k_TNH, v_TNH, cu, cu, longest, longest, **kwargs)
            heads_first = lse.shape[0] == num_heads and lse.shape[1] == batch * seq  # (N, T) on 2.13
            lse_TN = lse.transpose(0, 1) if heads_first else lse
            return out_TNH.view(batch, seq, num_heads, head_dim), lse_TN.reshape(batch, seq, num_heads).to(torch.float32)

        return local_map(kernel, out_placements=(pl, lse_pl), in_placements=(pl, pl, pl), in_grad_placements=(pl, pl, pl),
                         device_mesh=mesh)(q_BLNH, k_BLNH, v_BLNH)
