"""What every inner attention shares: declared layouts, input checks, kernel choice.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

An inner attention takes local q/k/v in ``in_layout`` and returns ``out_layout`` (and the LSE
in ``lse_layout``). Those three declarations are the single source LocalMapAttention reads to
infer placements; layouts change only next to the kernel call, in each backend's file.

The input checks (``check_mask_type``, ``check_qkv``) read only types, shapes, dtypes and
devices, so LocalMapAttention runs the same ones on DTensors (global shapes) before any
collective, and every backend raises the same error for the same mistake.
"""

from __future__ import annotations

import enum
import math
from typing import ClassVar

import torch
from torch import nn

from dtensor_attn import _compat
from dtensor_attn.config import AttentionConfig, Backend, Kernel
from dtensor_attn.layout import Dim, Layout
from dtensor_attn.masks import DocumentMask, check_mask_shapes, describe
from dtensor_attn.visibility import Visibility


class CPStrategy(enum.Enum):
    """How torch's ``_ContextParallel`` hooks run a backend (dtensor_attn.context_parallel)."""

    RING = "ring"  # torch's SDPA attention type: k/v rotate between ranks (CUDA only)
    ALL_GATHER = "all_gather"  # torch's FLEX attention type: a k/v all-gather, any kernel


class InnerAttention(nn.Module):
    backend: ClassVar[Backend]
    mask_type: ClassVar[type[DocumentMask] | None] = None
    cp_strategy: ClassVar[CPStrategy]  # how apply_context_parallel runs it

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        if not isinstance(config, AttentionConfig):
            raise TypeError(
                f"{type(self).__name__} takes an AttentionConfig, got {describe(config)}. "
                f"Fix: AttentionConfig(backend='{self.backend}').build()."
            )
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
                f"make_attention_masks: {cls.backend} cannot apply packed-document masks. Fix: use "
                f"backend 'flex' or 'varlen' for packed documents, or pass positions=None."
            )
        return cls.mask_type.from_positions(positions_BL)

    @property
    def is_causal(self) -> bool:
        return self.config.is_causal

    def _visibility(self, mask, visibility: Visibility | None) -> Visibility:
        """What the queries may see: the module's causality and ``mask`` on an unsharded sequence,
        or the ``visibility`` a context-parallel path built (which then carries the mask)."""
        if visibility is None:
            return Visibility(self.config.is_causal, mask)
        if mask is not None:
            raise ValueError(
                f"{type(self).__name__}: got a mask and a visibility; the visibility carries the mask. "
                f"Fix: pass Visibility(..., mask=mask) alone."
            )
        if not isinstance(visibility, Visibility) or visibility.is_causal != self.config.is_causal:
            raise ValueError(
                f"{type(self).__name__}: visibility must be a Visibility with is_causal="
                f"{self.config.is_causal} (this module's), got {visibility!r}. Fix: "
                f"Visibility(module.is_causal, mask, q_seq_index_L, kv_seq_index_L)."
            )
        return visibility

    def _check_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask) -> None:
        """The mask's kind, q/k/v in ``in_layout``, and the mask's ids against q/k's (batch, seq)."""
        layout, name = self.in_layout, type(self).__name__
        check_mask_type(f"{name} ({self.backend})", mask, self.mask_type)
        check_qkv(name, layout, q, k, v, enable_gqa=self.config.enable_gqa)
        if mask is not None:
            check_mask_shapes(name, mask, q_BL=batch_seq(q, layout), kv_BL=batch_seq(k, layout))

    def forward(self, q, k, v, mask=None, *, visibility: Visibility | None = None):
        visibility = self._visibility(mask, visibility)
        self._check_inputs(q, k, v, visibility.mask)
        return self.attend(q, k, v, visibility)

    def attend(self, q, k, v, visibility: Visibility):
        """The attention itself, without ``forward``'s input checks: for a caller that has proved
        them for these inputs (LocalMapAttention's plan, from a signature's second call on)."""
        raise NotImplementedError

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
    ``_kernel(q_BNLH, k_BNLH, v_BNLH, visibility) -> (out_BNLH, lse_BNL)``."""

    @property
    def lse_layout(self) -> Layout | None:
        return Layout.BNL if self.config.return_lse else None

    def attend(self, q, k, v, visibility: Visibility):
        legacy = self.in_layout is Layout.BNLH
        q_BNLH = q if legacy else q.transpose(1, 2)
        k_BNLH = k if legacy else k.transpose(1, 2)
        v_BNLH = v if legacy else v.transpose(1, 2)
        out_BNLH, lse_BNL = self._kernel(q_BNLH, k_BNLH, v_BNLH, visibility)
        out = out_BNLH if legacy else out_BNLH.transpose(1, 2)
        return (out, lse_BNL) if self.config.return_lse else out

    def _kernel(self, q_BNLH, k_BNLH, v_BNLH, visibility: Visibility):
        raise NotImplementedError


def in_simulation() -> bool:
    """Simulated ranks run per-rank tensors through torch's dispatcher; only sdpa has rules."""
    return _compat.local_tensor_mode_active()


# -- checks shared with LocalMapAttention (types, shapes, dtypes, devices: no tensor math) -------


def check_mask_type(who: str, mask, mask_type: type[DocumentMask] | None) -> None:
    """``mask`` is None or a ``mask_type`` of (batch, seq) id tensors; ``mask_type`` None: the
    module applies no masks."""
    if mask is None:
        return
    fix = "Fix: make masks with make_attention_masks(config, positions) from the same config that built this module"
    if mask_type is None or not isinstance(mask, mask_type):
        applies = mask_type.__name__ if mask_type is not None else "no masks (causal only)"
        also = ", or pass mask=None" if mask_type is None else ""
        raise ValueError(f"{who} was handed a {describe(mask)} as its mask; it applies {applies}. {fix}{also}.")
    for name in ("q_document_ids_BL", "kv_document_ids_BL"):
        ids = getattr(mask, name)
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            what = f"has shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else f"is a {type(ids).__name__}"
            raise ValueError(
                f"{who} was handed a {type(mask).__name__} whose {name} {what}; expected a "
                f"(batch, seq) tensor of document ids. {fix}."
            )


def check_qkv(
    where: str,
    layout: Layout,
    q,
    k,
    v,
    *,
    enable_gqa: bool | None,
    scope: str = "",
    heads_sharding: tuple[list, int] | None = None,
) -> None:
    """q/k/v in ``layout``: tensors of one floating dtype and device, k and v alike, q's batch
    and head_dim, and heads that GQA can group. ``scope`` ("global" for DTensors) and
    ``heads_sharding`` (mesh axes, ranks) say in the message which counts these are;
    ``enable_gqa`` None skips the flag check (a module without an AttentionConfig)."""
    dims = ", ".join(d.value for d in layout.dims)
    tag = f" ({scope})" if scope else ""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"{where}: {name} must be a tensor in {layout.name} ({dims}), got {describe(t)}. "
                f"Fix: pass q, k and v as tensors (or DTensors) of shape ({dims})."
            )
        if t.dim() != layout.ndim:
            raise ValueError(
                f"{where}: {name} must be {layout.name} ({layout.ndim} dims: {dims}), got shape "
                f"{tuple(t.shape)}{tag}. Fix: view it as ({dims})."
            )
    dtypes = f"q {q.dtype}, k {k.dtype}, v {v.dtype}"
    if not all(t.is_floating_point() for t in (q, k, v)):
        raise ValueError(f"{where}: q, k and v must be floating point, got {dtypes}. Fix: cast them, e.g. q.float().")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(
            f"{where}: q, k and v must share one dtype, got {dtypes}. Fix: cast k and v to "
            f"q's dtype (k.to(q.dtype)), or q to theirs."
        )
    if not q.device == k.device == v.device:
        raise ValueError(
            f"{where}: q, k and v must be on one device, got q {q.device}, k {k.device}, "
            f"v {v.device}. Fix: move k and v to q's device (k.to(q.device))."
        )
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(
            f"{where}: k and v must have the same shape, got k {tuple(k.shape)}, v "
            f"{tuple(v.shape)}{tag}. Fix: give v the ({dims}) of k."
        )
    batch, head_dim = layout.index(Dim.B), layout.index(Dim.H)
    if q.shape[batch] != k.shape[batch]:
        num = q.shape[batch]
        raise ValueError(
            f"{where}: q has batch {num} but k/v batch {k.shape[batch]}{tag}; each batch row "
            f"attends to its own keys. Fix: give k and v q's batch of {num} "
            f"(k.expand({num}, -1, -1, -1) for keys shared by every row)."
        )
    if q.shape[head_dim] != k.shape[head_dim]:
        raise ValueError(
            f"{where}: q has head_dim {q.shape[head_dim]} but k/v head_dim {k.shape[head_dim]}"
            f"{tag}; scores contract q and k over head_dim. Fix: project q, k and v to the same head_dim."
        )
    _check_gqa(where, q.shape[layout.heads_dim], k.shape[layout.heads_dim], enable_gqa, scope, heads_sharding)


def _check_gqa(where, num_q_heads, num_kv_heads, enable_gqa, scope, heads_sharding) -> None:
    if num_q_heads == num_kv_heads:
        return
    axes, ways = heads_sharding if heads_sharding is not None else ([], 1)
    sharded = f"heads sharded over mesh axes {axes} of {ways} ranks" if ways > 1 else ""
    tag = f" ({'; '.join(p for p in (scope, sharded) if p)})" if scope or sharded else ""
    counts = f"q has {num_q_heads} heads and k/v {num_kv_heads}{tag}"
    if enable_gqa is False:
        raise ValueError(
            f"{where}: {counts}: that is GQA, but enable_gqa is False. Fix: AttentionConfig(enable_gqa=True)."
        )
    if num_q_heads % num_kv_heads:
        valid = [d for d in range(1, num_q_heads + 1) if num_q_heads % d == 0 and d % ways == 0]
        need = f"divide {num_q_heads}" + (f" and are divisible by {ways}" if ways > 1 else "")
        choices = " or ".join(filter(None, (", ".join(map(str, valid[:-1])), str(valid[-1])))) if valid else "none"
        raise ValueError(
            f"{where}: {counts}; GQA needs q heads to be a multiple of k/v heads. "
            f"Fix: use k/v heads that {need}: {choices}."
        )


def batch_seq(t, layout: Layout) -> tuple[int, int]:
    """(batch, seq) of a tensor in ``layout``: what its document mask's ids must be."""
    return t.shape[layout.index(Dim.B)], t.shape[layout.seq_dim]
