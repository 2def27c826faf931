"""What every inner attention shares: declared layouts, input checks, kernel choice.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

An inner attention takes local q/k/v in ``in_layout`` and returns ``out_layout`` (and the LSE
in ``lse_layout``). Those three declarations are the single source LocalMapAttention reads to
infer placements; layouts change only next to the kernel call, in each backend's file.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from dtensor_attn import _compat
from dtensor_attn.backends.math_kernel import allowed_mask
from dtensor_attn.config import AttentionConfig, Backend, CPStrategy, Kernel
from dtensor_attn.layout import Layout
from dtensor_attn.masks import DocumentMask


class InnerAttention(nn.Module):
    backend: ClassVar[Backend]
    mask_type: ClassVar[type[DocumentMask] | None] = None
    cp_strategy: ClassVar[CPStrategy]  # how apply_context_parallel runs it

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        if config.backend is not self.backend:
            raise ValueError(
                f"{type(self).__name__} is the {self.backend} backend, but the config says "
                f"{config.backend}. Fix: build the module with config.build()."
            )
        self.config = config

    # -- declarations read by LocalMapAttention ------------------------------------------
    @property
    def in_layout(self) -> Layout:
        return self.config.layout

    @property
    def out_layout(self) -> Layout:
        return self.config.layout

    @property
    def lse_layout(self) -> Layout | None:
        return None

    # -- masks ----------------------------------------------------------------------------
    @classmethod
    def make_masks(cls, config: AttentionConfig, positions_BL: torch.Tensor | None):
        if positions_BL is None:
            return None
        if cls.mask_type is None:
            raise ValueError(
                f"{cls.backend} cannot apply packed-document masks. Fix: use backend "
                f"'flex' or 'varlen' for packed documents, or pass positions=None."
            )
        return cls.mask_type.from_positions(positions_BL)

    def _check_mask(self, mask) -> None:
        if mask is None:
            return
        if self.mask_type is None or not isinstance(mask, self.mask_type):
            raise ValueError(
                f"{type(self).__name__} ({self.backend}) was handed a {type(mask).__name__}; it "
                f"applies {self.mask_type.__name__ if self.mask_type else 'no masks'}. Fix: make "
                f"masks with make_attention_masks(config, positions) from the same config that "
                f"built this module."
            )

    # -- inputs ---------------------------------------------------------------------------
    def _check_qkv(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        layout = self.in_layout
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != layout.ndim:
                raise ValueError(
                    f"{type(self).__name__}: {name} must be {layout.name} "
                    f"({layout.ndim} dims), got shape {tuple(t.shape)}"
                )
        if k.shape != v.shape:
            raise ValueError(f"{type(self).__name__}: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
        heads = layout.heads_dim
        num_q_heads, num_kv_heads = q.shape[heads], k.shape[heads]
        if num_q_heads != num_kv_heads and not self.config.enable_gqa:
            raise ValueError(
                f"{type(self).__name__}: q has {num_q_heads} heads and k/v {num_kv_heads}; "
                f"fix: AttentionConfig(enable_gqa=True) for GQA"
            )
        if num_q_heads % num_kv_heads:
            raise ValueError(
                f"{type(self).__name__}: q heads ({num_q_heads}) must be a multiple of k/v "
                f"heads ({num_kv_heads})"
            )

    def scale_for(self, head_dim: int) -> float:
        return self.config.scale if self.config.scale is not None else 1.0 / math.sqrt(head_dim)

    # -- kernel choice --------------------------------------------------------------------
    def native_kernel_available(self, device: torch.device) -> bool:
        raise NotImplementedError

    def uses_native_kernel(self, device: torch.device) -> bool:
        kernel = self.config.kernel
        if kernel is Kernel.MATH:
            return False
        available = self.native_kernel_available(device)
        if kernel is Kernel.NATIVE and not available:
            raise RuntimeError(
                f"{type(self).__name__}: Kernel.NATIVE asked for, but torch has no {self.backend} "
                f"kernel for {device.type} in this run. Fix: Kernel.AUTO or Kernel.MATH."
            )
        return available

    def kernel_name(self, device: torch.device) -> str:
        """For test ids and reports: ``flex`` or ``flex[math]``."""
        suffix = "" if self.uses_native_kernel(device) else "[math]"
        return f"{self.backend}{suffix}"

    def allowed(self, num_q, num_kv, mask, q_seq_index_L, kv_seq_index_L, device):
        return allowed_mask(
            is_causal=self.config.is_causal,
            num_q=num_q,
            num_kv=num_kv,
            mask=mask,
            q_seq_index_L=q_seq_index_L,
            kv_seq_index_L=kv_seq_index_L,
            device=device,
        )

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"backend={c.backend}, layout={self.in_layout.name}->{self.out_layout.name}, "
            f"is_causal={c.is_causal}, enable_gqa={c.enable_gqa}, return_lse={c.return_lse}, "
            f"kernel={c.kernel.value}"
        )


class BNLHKernelAttention(InnerAttention):
    """An inner attention whose kernel takes (B, N, L, H) (sdpa, flex): the layout change is the
    transpose here, at the kernel call, and back; both are views. Subclasses implement
    ``_kernel(q_BNLH, k_BNLH, v_BNLH, mask, q_seq_index_L, kv_seq_index_L) -> (out_BNLH, lse_BNL)``."""

    @property
    def lse_layout(self) -> Layout | None:
        return Layout.BNL if self.config.return_lse else None

    def forward(self, q, k, v, mask=None, *, q_seq_index_L=None, kv_seq_index_L=None):
        self._check_mask(mask)
        self._check_qkv(q, k, v)
        legacy = self.in_layout is Layout.BNLH
        q_BNLH = q if legacy else q.transpose(1, 2)
        k_BNLH = k if legacy else k.transpose(1, 2)
        v_BNLH = v if legacy else v.transpose(1, 2)
        out_BNLH, lse_BNL = self._kernel(q_BNLH, k_BNLH, v_BNLH, mask, q_seq_index_L, kv_seq_index_L)
        out = out_BNLH if legacy else out_BNLH.transpose(1, 2)
        return (out, lse_BNL) if self.config.return_lse else out

    def _kernel(self, q_BNLH, k_BNLH, v_BNLH, mask, q_seq_index_L, kv_seq_index_L):
        raise NotImplementedError


def in_simulation() -> bool:
    """Simulated ranks run per-rank tensors through torch's dispatcher; only sdpa has rules."""
    return _compat.local_tensor_mode_active()
