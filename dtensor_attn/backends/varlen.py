"""varlen inner attention: packed sequences, ``varlen_attn`` on CUDA, in the (B, L, N, H) layout.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

BLNH in, and the layout change is a zero-copy reshape to TNH at the kernel call (the point of
the refactor: no transpose, no copy). The output is the packed TNH tensor itself
(``varlen_output=Layout.TNH``: its heads dim is 1) or a zero-copy view of it back to BLNH.
Each (batch row, document) run of query tokens is one varlen sequence. On CPU and simulated
ranks torch has no kernel, and the math kernel runs with the same contract (``varlen[math]``).
"""

from __future__ import annotations

import torch

from dtensor_attn import _compat
from dtensor_attn.backends.base import CPStrategy, InnerAttention, in_simulation
from dtensor_attn.backends.math_kernel import expand_kv_heads, math_attention
from dtensor_attn.backends.varlen_lse_grad import VarlenWithLseGrad, lse_tokens_heads
from dtensor_attn.backends.varlen_segments import pack_segments
from dtensor_attn.config import Backend
from dtensor_attn.layout import Layout
from dtensor_attn.masks import DocumentMask
from dtensor_attn.visibility import Visibility


class VarlenDocumentMask(DocumentMask):
    """Packed-document mask for the varlen backend."""


class VarlenAttention(InnerAttention):
    backend = Backend.VARLEN
    mask_type = VarlenDocumentMask
    cp_strategy = CPStrategy.ALL_GATHER

    def __init__(self, config) -> None:
        super().__init__(config)
        # Resolved once here, not per call: inside forward they would be traced by torch.compile.
        self._varlen_ops = _compat.varlen_ops()

    @property
    def out_layout(self) -> Layout:
        if self.config.varlen_output is Layout.TNH:
            return Layout.TNH
        return self.config.layout

    @property
    def lse_layout(self) -> Layout | None:
        if not self.config.return_lse:
            return None
        return {Layout.TNH: Layout.TN, Layout.BLNH: Layout.BLN, Layout.BNLH: Layout.BNL}[self.out_layout]

    def native_kernel_available(self, device: torch.device) -> bool:
        return (
            device.type == "cuda" and not in_simulation() and _compat.varlen_attn_or_none() is not None
            and self._varlen_ops is not None
        )

    def attend(self, q, k, v, visibility: Visibility):
        if self.in_layout is Layout.BNLH:
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        batch, num_q, num_q_heads, head_dim = q.shape
        num_kv, num_kv_heads = k.shape[1], k.shape[2]
        # The layout change, at the kernel call: a reshape, which is a view for BLNH input.
        q_TNH = q.reshape(batch * num_q, num_q_heads, head_dim)
        k_TNH = k.reshape(batch * num_kv, num_kv_heads, head_dim)
        v_TNH = v.reshape(batch * num_kv, num_kv_heads, head_dim)
        out_TNH, lse_TN = self._kernel(q_TNH, k_TNH, v_TNH, batch, visibility)
        if self.out_layout is Layout.TNH:
            out, lse = out_TNH, lse_TN
        else:
            out = out_TNH.view(batch, num_q, num_q_heads, head_dim)
            lse = None if lse_TN is None else lse_TN.view(batch, num_q, num_q_heads)
            if self.out_layout is Layout.BNLH:
                out = out.transpose(1, 2)
                lse = None if lse is None else lse.transpose(1, 2)
        return (out, lse) if self.config.return_lse else out

    def _kernel(self, q_TNH, k_TNH, v_TNH, batch, visibility):
        cfg = self.config
        scale = self.scale_for(q_TNH.shape[-1])
        device = q_TNH.device
        num_q, num_kv = q_TNH.shape[0] // batch, k_TNH.shape[0] // batch
        if not self.uses_native_kernel(device):
            allowed_BLL = visibility.dense_mask(num_q, num_kv, device)
            out_BNLH, lse_BNL = math_attention(
                q_TNH.view(batch, num_q, *q_TNH.shape[1:]).transpose(1, 2),
                k_TNH.view(batch, num_kv, *k_TNH.shape[1:]).transpose(1, 2),
                v_TNH.view(batch, num_kv, *v_TNH.shape[1:]).transpose(1, 2),
                allowed_BLL,
                scale=scale,
                enable_gqa=cfg.enable_gqa,
            )
            out_TNH = out_BNLH.transpose(1, 2).reshape(q_TNH.shape)
            return out_TNH, lse_BNL.transpose(1, 2).reshape(q_TNH.shape[:2])
        return self._native(q_TNH, k_TNH, v_TNH, batch, visibility, scale)

    def _native(self, q_TNH, k_TNH, v_TNH, batch, visibility, scale):
        cfg = self.config
        segments = pack_segments(
            visibility, batch=batch, num_q=q_TNH.shape[0] // batch, num_kv=k_TNH.shape[0] // batch,
            device=q_TNH.device,
        )
        if segments.kv_token_index_T is not None:
            # Context parallel: each query run needs its document's keys up to its last query.
            k_TNH = k_TNH.index_select(0, segments.kv_token_index_T)
            v_TNH = v_TNH.index_select(0, segments.kv_token_index_T)
        gqa = {}
        if q_TNH.shape[1] != k_TNH.shape[1]:
            if self._varlen_ops.takes_gqa:
                gqa = {"enable_gqa": True}
            else:  # torch 2.11: no enable_gqa, expand k/v heads here instead
                k_TNH = expand_kv_heads(k_TNH, q_TNH.shape[1], enable_gqa=cfg.enable_gqa)
                v_TNH = expand_kv_heads(v_TNH, q_TNH.shape[1], enable_gqa=cfg.enable_gqa)
        window_size = (-1, 0) if cfg.is_causal else (-1, -1)
        if not cfg.return_lse:  # torch's own autograd formula is right for the output alone
            out_TNH = _compat.varlen_attn_or_none()(
                q_TNH, k_TNH, v_TNH, segments.cu_seq_q, segments.cu_seq_kv, segments.max_q,
                segments.max_kv, scale=scale, window_size=window_size, **gqa,
            )
            return out_TNH, None
        # torch's formula drops the LSE gradient: ours keeps it (see varlen_lse_grad).
        out_TNH, lse = VarlenWithLseGrad.apply(
            self._varlen_ops, q_TNH, k_TNH, v_TNH, segments.cu_seq_q,
            None if segments.cu_seq_kv is segments.cu_seq_q else segments.cu_seq_kv, segments.max_q,
            segments.max_kv, cfg.is_causal, scale, window_size, bool(gqa),
        )
        return out_TNH, lse_tokens_heads(lse, *q_TNH.shape[:2], self._varlen_ops.lse_heads_first)
