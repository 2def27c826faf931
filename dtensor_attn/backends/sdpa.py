"""sdpa inner attention: ``F.scaled_dot_product_attention`` in the (B, L, N, H) layout.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Causal masking only: sdpa refuses packed-document masks (make_masks raises), so a config that
asks for documents cannot silently get a kernel that ignores them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dtensor_attn.backends.base import BNLHKernelAttention, CPStrategy
from dtensor_attn.backends.math_kernel import math_attention
from dtensor_attn.config import Backend


class SDPAAttention(BNLHKernelAttention):
    backend = Backend.SDPA
    cp_strategy = CPStrategy.RING

    @classmethod
    def make_masks(cls, config, positions_BL):
        if positions_BL is None:
            return None
        restarts_BL = positions_BL[:, 1:] == 0
        if bool(restarts_BL.any()):
            row = int(restarts_BL.any(dim=1).int().argmax())
            index = int(restarts_BL[row].int().argmax()) + 1
            raise ValueError(
                f"make_attention_masks: sdpa cannot apply packed-document masks: positions restart "
                f"at 0 inside row {row} (at seq index {index}); sdpa takes one document per row. "
                f"Fix: use backend 'flex' or 'varlen' for packed documents."
            )
        return None

    def native_kernel_available(self, device: torch.device) -> bool:
        return True

    def _kernel(self, q_BNLH, k_BNLH, v_BNLH, visibility):
        # mask is always None here: _check_inputs refuses every mask for sdpa.
        cfg = self.config
        scale = self.scale_for(q_BNLH.shape[-1])
        num_q, num_kv = q_BNLH.shape[2], k_BNLH.shape[2]
        # Plain causal on an unsharded sequence keeps sdpa's flash path (no mask tensor).
        plain_causal = not visibility.sharded and num_q == num_kv
        native = self.uses_native_kernel(q_BNLH.device)
        allowed_BLL = None
        if not native or cfg.return_lse or (cfg.is_causal and not plain_causal):
            allowed_BLL = visibility.dense_mask(num_q, num_kv, q_BNLH.device)
        if not native:
            return math_attention(q_BNLH, k_BNLH, v_BNLH, allowed_BLL, scale=scale, enable_gqa=cfg.enable_gqa)
        gqa = q_BNLH.shape[1] != k_BNLH.shape[1]
        out_BNLH = F.scaled_dot_product_attention(
            q_BNLH,
            k_BNLH,
            v_BNLH,
            attn_mask=None if allowed_BLL is None else allowed_BLL[:, None],
            is_causal=cfg.is_causal and allowed_BLL is None,
            scale=scale,
            enable_gqa=gqa,
        )
        lse_BNL = None
        if cfg.return_lse:
            # sdpa does not return its LSE publicly: recompute it (one extra score pass).
            _, lse_BNL = math_attention(q_BNLH, k_BNLH, v_BNLH[..., :1], allowed_BLL, scale=scale, enable_gqa=cfg.enable_gqa)
        return out_BNLH, lse_BNL
