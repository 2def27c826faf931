"""flex inner attention: ``flex_attention`` with block masks, in the (B, L, N, H) layout.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

On CUDA the kernel is torch's compiled flex_attention with a block mask built from the same
causal/document rule as every other backend. Torch's flex has no CPU backward and no rule for
simulated ranks, so there the math kernel runs (reported as ``flex[math]``).
"""

from __future__ import annotations

import torch

from dtensor_attn import _compat
from dtensor_attn.backends.base import BNLHKernelAttention, CPStrategy, in_simulation
from dtensor_attn.backends.math_kernel import math_attention
from dtensor_attn.config import Backend, Kernel
from dtensor_attn.masks import DocumentMask


class FlexDocumentMask(DocumentMask):
    """Packed-document mask for the flex backend."""


class FlexAttention(BNLHKernelAttention):
    backend = Backend.FLEX
    mask_type = FlexDocumentMask
    cp_strategy = CPStrategy.ALL_GATHER

    def __init__(self, config) -> None:
        super().__init__(config)
        self._compiled_flex = None
        # Plain causal block masks depend only on shapes: build each once, not per call.
        self._causal_block_masks: dict[tuple, object] = {}

    def native_kernel_available(self, device: torch.device) -> bool:
        if in_simulation():
            return False
        # Eager CPU flex runs forward only: use it only when asked for explicitly.
        return device.type == "cuda" or self.config.kernel is Kernel.NATIVE

    def _kernel(self, q_BNLH, k_BNLH, v_BNLH, visibility):
        cfg = self.config
        scale = self.scale_for(q_BNLH.shape[-1])
        device = q_BNLH.device
        num_q, num_kv = q_BNLH.shape[2], k_BNLH.shape[2]
        if not self.uses_native_kernel(device):
            allowed_BLL = visibility.dense_mask(num_q, num_kv, device)
            return math_attention(q_BNLH, k_BNLH, v_BNLH, allowed_BLL, scale=scale, enable_gqa=cfg.enable_gqa)
        if visibility.mask is None and not visibility.sharded:
            key = (num_q, num_kv, device)
            block_mask = self._causal_block_masks.get(key)
            if block_mask is None:
                block_mask = self._causal_block_masks[key] = self._block_mask(1, num_q, num_kv, visibility, device)
        else:
            block_mask = self._block_mask(q_BNLH.shape[0], num_q, num_kv, visibility, device)
        out_BNLH, lse_BNL = _compat.flex_attention_with_lse(
            self._flex_fn(device),
            q_BNLH,
            k_BNLH,
            v_BNLH,
            block_mask=block_mask,
            scale=scale,
            enable_gqa=q_BNLH.shape[1] != k_BNLH.shape[1],
        )
        return out_BNLH, (lse_BNL if cfg.return_lse else None)

    def _flex_fn(self, device: torch.device):
        from torch.nn.attention.flex_attention import flex_attention

        if device.type != "cuda":
            return flex_attention
        if self._compiled_flex is None:
            self._compiled_flex = torch.compile(flex_attention, dynamic=False)
        return self._compiled_flex

    def _block_mask(self, batch, num_q, num_kv, visibility, device):
        from torch.nn.attention.flex_attention import create_block_mask

        mask_mod = visibility.mask_mod(num_q, num_kv, device)
        if mask_mod is None:
            return None
        mask_batch = batch if visibility.mask is not None else None
        return create_block_mask(mask_mod, mask_batch, None, num_q, num_kv, device=device)
