"""Third-party-style subjects for the kit's calling-convention tests: written the way torchtitan
writes its inner attentions (BLNH in, ``attention_masks=``, ``enable_gqa=``, ``scale=``, extra
keywords swallowed by ``**kwargs``, a size-1 mesh axis refused unless Replicate), wrapped on
torch's ``local_map`` by hand, independently of dtensor_attn.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import local_map
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

SEQ_DIM, HEADS_DIM = 1, 2


def strict_placements(q) -> None:
    """torchtitan's rule: a Shard on a mesh axis of size 1 is not the Replicate it expects."""
    for i, p in enumerate(q.placements):
        if isinstance(p, Shard) and q.device_mesh.size(i) == 1:
            raise ValueError(f"input DTensor has placements {q.placements}, but in_src_shardings expects Replicate on "
                             f"axis {i} of size 1")


class ThirdPartyAttention(nn.Module):
    """``kernel="flex"``: torch's flex_attention with the caller's per-rank BlockMask (right under
    CP); ``kernel="sdpa"``: sdpa with is_causal=True on the rank's query chunk (torchtitan's sdpa
    under full-DTensor CP: wrong on every CP rank above 0)."""

    def __init__(self, kernel: str = "flex", *, strict: bool = True) -> None:
        super().__init__()
        self.kernel, self.strict = kernel, strict

    def forward(self, q_BLNH, k_BLNH, v_BLNH, *, attention_masks=None, enable_gqa=False, scale=None, **kwargs):
        if self.strict:
            strict_placements(q_BLNH)
        mesh, q_pl = q_BLNH.device_mesh, tuple(q_BLNH.placements)
        cp = [i for i, p in enumerate(q_pl) if p == Shard(SEQ_DIM)]
        kv_pl = tuple(Replicate() if i in cp else p for i, p in enumerate(q_pl))
        kv_grad = tuple(Partial() if i in cp else p for i, p in enumerate(q_pl))

        def kernel(q, k, v):
            q_BNLH, k_BNLH, v_BNLH = (t.transpose(1, 2) for t in (q, k, v))
            if self.kernel == "flex":
                out_BNLH = flex_attention(q_BNLH, k_BNLH, v_BNLH, block_mask=attention_masks, scale=scale, enable_gqa=enable_gqa)
            else:
                out_BNLH = F.scaled_dot_product_attention(q_BNLH, k_BNLH, v_BNLH, is_causal=True, scale=scale, enable_gqa=enable_gqa)
            return out_BNLH.transpose(1, 2)

        return local_map(kernel, out_placements=(q_pl,), in_placements=(q_pl, kv_pl, kv_pl),
                         in_grad_placements=(q_pl, kv_grad, kv_grad), device_mesh=mesh, redistribute_inputs=True)(q_BLNH, k_BLNH, v_BLNH)


def flex_rank_mask(view, *, offset: bool = True):
    """The rank's causal (and document) BlockMask over its query chunk; ``offset=False`` forgets
    the chunk's start (the query's local index taken as global: docs/bugs.md row 11)."""
    q_index_L = view.q_index_L if offset else torch.arange(len(view.q_index_L))
    doc_BL = None
    if view.positions_BL is not None:
        doc_BL = torch.cumsum((view.positions_BL == 0).int(), dim=1)

    def mask_mod(b, h, q_idx, kv_idx):
        q_global = q_index_L[q_idx]
        allowed = q_global >= kv_idx
        if doc_BL is not None:
            allowed = allowed & (doc_BL[b, q_global] == doc_BL[b, kv_idx])
        return allowed

    batch = None if doc_BL is None else doc_BL.shape[0]
    return create_block_mask(mask_mod, batch, None, len(q_index_L), len(view.kv_index_L), device=view.device)
