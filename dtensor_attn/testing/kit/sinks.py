"""Attention sinks through the LSE, as torchtitan's gpt-oss applies them: a subject and its
reference transform, for checking that an attention keeps its LSE gradient.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

gpt-oss rescales attention's output per head by ``sigmoid(lse - sink)`` (the sink is one more
logit in the softmax's denominator): ``out_BLNH * sigmoid(lse_BLN - sinks_N)``. The q and k
gradients then flow through the LSE too, so a kernel that drops the LSE gradient (torch's
``varlen_attn`` on GPU) trains on wrong q/k gradients while v's stays right. Give the kit
``CallingConvention(out_transform=sinks_transform(sinks_N))`` so the float64 reference applies
the same rescale.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor


def sink_rescale(out_BLNH: torch.Tensor, lse_BLN: torch.Tensor, sinks_N: torch.Tensor) -> torch.Tensor:
    """gpt-oss's rescale: ``out * sigmoid(lse - sink)`` per (token, head)."""
    scale_BLN = torch.sigmoid(lse_BLN - sinks_N.to(lse_BLN.dtype).view(1, 1, -1))
    return out_BLNH * scale_BLN.unsqueeze(-1).to(out_BLNH.dtype)


def sinks_transform(sinks_N: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The reference's out_transform for ``SinksAttention(..., sinks_N)``."""
    return lambda out_BLNH, lse_BLN: sink_rescale(out_BLNH, lse_BLN, sinks_N.double())


class SinksAttention(nn.Module):
    """``attention(q, k, v, mask)`` returning (out BLNH, lse BLN) DTensors, rescaled by sinks.
    ``drop_lse_grad=True`` detaches the LSE first: what a kernel that drops its LSE gradient
    does, for showing that the kit reports it."""

    def __init__(self, attention: nn.Module, sinks_N: torch.Tensor, *, drop_lse_grad: bool = False) -> None:
        super().__init__()
        self.attention, self.drop_lse_grad = attention, drop_lse_grad
        self.register_buffer("sinks_N", sinks_N.detach().clone())

    def forward(self, q_BLNH, k_BLNH, v_BLNH, mask=None):
        out_BLNH, lse_BLN = self.attention(q_BLNH, k_BLNH, v_BLNH, mask)
        if tuple(lse_BLN.shape) != tuple(out_BLNH.shape[:3]):
            raise ValueError(f"SinksAttention: the LSE has shape {tuple(lse_BLN.shape)}; expected BLN "
                             f"{tuple(out_BLNH.shape[:3])}. Fix: an attention whose LSE layout is BLN (varlen's)")
        if self.drop_lse_grad:
            lse_BLN = lse_BLN.detach()
        sinks_N = self.sinks_N.to(lse_BLN.device)
        if isinstance(lse_BLN, DTensor):
            mesh = lse_BLN.device_mesh
            sinks_N = distribute_tensor(sinks_N, mesh, [Replicate()] * mesh.ndim)
        return sink_rescale(out_BLNH, lse_BLN, sinks_N)
