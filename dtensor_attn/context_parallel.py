"""Context parallelism through torch's ``_ContextParallel`` hooks on inner attention modules.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

The other way, full-mesh DTensors through LocalMapAttention, needs nothing from here. This
module hooks torch's parallel style onto every inner attention, with ``seq_dim`` read from the
module's declared ``in_layout`` (1 for BLNH, 2 for the legacy BNLH): no caller writes it, so it
cannot go stale when a layout moves. Each rank calls the module on its local seq chunk of
q/k/v, as torch's CP expects:

    ring (sdpa, CUDA only):  q/k/v become DTensors Shard(seq_dim) on the cp mesh; torch's ring
                             attention rotates k/v; the output comes back local.
    all-gather (flex, varlen): k/v are all-gathered along seq_dim (gradients reduce-scattered);
                             q stays local. Our hook passes the global seq index of each local
                             query and gathered key (``q_seq_index_L``/``kv_seq_index_L``), so
                             causal and document masks see the right per-rank offset; torch's
                             hook leaves that to a CP-rewritten BlockMask, which the math kernel
                             and our own block masks do not use.

Masks: the global document mask in shard order (the one LocalMapAttention takes: made from the
original positions, then ``permute_mask`` when load-balanced); the hook keeps each rank's rows.
Every forward checks the boundary (``context_parallel_boundary.py``, whose names are re-exported
here): the dim torch sharded or gathered must be ``seq_dim``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import distribute_tensor
from torch.distributed.tensor.parallel import parallelize_module

from dtensor_attn import _compat
from dtensor_attn._compat import Shard
from dtensor_attn.backends import InnerAttention
from dtensor_attn.backends.base import CPStrategy
from dtensor_attn.config import Kernel
from dtensor_attn.context_parallel_boundary import (
    KV_SHAPE_KEY, CPBoundary, ContextParallelError, attach_boundary_check, expected_boundary,
)
from dtensor_attn.load_balance import SeqOrder, global_seq_index
from dtensor_attn.visibility import Visibility

_APPLIED_ATTR = "_dtensor_attn_cp_mesh"


def apply_context_parallel(
    inner_or_model: nn.Module, cp_mesh: DeviceMesh, *, seq_order: SeqOrder = SeqOrder.CONTIGUOUS
) -> list[InnerAttention]:
    """Hook torch's ``_ContextParallel`` onto every inner attention in ``inner_or_model``.

    ``cp_mesh``: the 1-D cp mesh (``mesh["cp"]``). ``seq_order``: how the sequence is laid out
    before it is sharded, the same knob as ``LocalMapAttention(seq_order=...)``:
    ``SeqOrder.HEAD_TAIL`` balances causal work (``load_balance.head_tail_permutation``).
    Returns the hooked modules. Raises ContextParallelError before any hook is added where torch
    cannot run it.
    """
    if not isinstance(seq_order, SeqOrder):
        raise ValueError(
            f"apply_context_parallel: seq_order must be SeqOrder.CONTIGUOUS or SeqOrder.HEAD_TAIL, got "
            f"{seq_order!r}. Fix: seq_order=SeqOrder.HEAD_TAIL to balance causal work (from dtensor_attn "
            f"import SeqOrder)."
        )
    load_balance = seq_order is SeqOrder.HEAD_TAIL
    inners = [m for m in inner_or_model.modules() if isinstance(m, InnerAttention)]
    if not inners:
        raise ValueError(
            f"apply_context_parallel: {type(inner_or_model).__name__} holds no inner attention "
            f"(dtensor_attn.backends.InnerAttention). Fix: pass the model or the module built by "
            f"AttentionConfig.build()."
        )
    if cp_mesh.ndim != 1:
        raise ContextParallelError(
            f"apply_context_parallel: expected the 1-D cp mesh, got a {cp_mesh.ndim}-D mesh "
            f"{cp_mesh}. Fix: pass mesh['cp']."
        )
    for inner in inners:
        _check_supported(inner, cp_mesh, load_balance)
    style_type = _compat.context_parallel_style()
    for inner in inners:
        strategy = inner.cp_strategy
        if strategy is CPStrategy.RING:
            _compat.enable_ring_attention(load_balance=load_balance)
            inner.register_forward_pre_hook(_RingInputCheck(load_balance), with_kwargs=True)
            attention_type = style_type.AttentionType.SDPA
        else:
            inner.register_forward_pre_hook(_AllGatherInputs(cp_mesh, seq_order), with_kwargs=True)
            attention_type = style_type.AttentionType.FLEX
        style = style_type(seq_dim=inner.in_layout.seq_dim, attention_type=attention_type)
        parallelize_module(inner, cp_mesh, style)
        if strategy is CPStrategy.ALL_GATHER:
            inner.register_forward_pre_hook(_after_torch_gather, with_kwargs=True)
        attach_boundary_check(inner, cp_mesh)
        setattr(inner, _APPLIED_ATTR, cp_mesh)
    return inners


def hooks_cp_mesh(inner) -> DeviceMesh | None:
    """The cp mesh apply_context_parallel put on ``inner``, or None where it applied none."""
    return getattr(inner, _APPLIED_ATTR, None)


def _check_supported(inner: InnerAttention, cp_mesh: DeviceMesh, load_balance: bool) -> None:
    where = f"apply_context_parallel: {type(inner).__name__} ({inner.backend}, layout {inner.in_layout.name})"
    full_mesh_fix = (
        "Fix: use full-mesh CP through LocalMapAttention (q/k/v DTensors with "
        f"Shard({inner.in_layout.seq_dim}) on the cp axis), which runs every backend on CPU and GPU"
    )
    if hooks_cp_mesh(inner) is not None:
        raise ContextParallelError(f"{where}: context parallel is already applied to this module; a second "
                                   f"application would gather k/v twice. Fix: apply it once.")
    if getattr(inner, "cp_strategy", None) is None:
        raise ContextParallelError(f"{where}: {type(inner).__name__} declares no cp_strategy. {full_mesh_fix}.")
    if inner.cp_strategy is not CPStrategy.RING:
        return
    device = cp_mesh.device_type
    if device != "cuda" and not _compat.ring_attention_runs_on(device):
        raise ContextParallelError(
            f"{where} on a {device} mesh: torch's ring attention (_ContextParallel SDPA) runs only on "
            f"CUDA; torch has no sharding rule for _scaled_dot_product_flash_attention_for_cpu, so "
            f"the forward would fail inside torch. {full_mesh_fix}, or run on CUDA devices."
        )
    unsupported = {
        "the math kernel (Kernel.MATH)": inner.config.kernel is Kernel.MATH,
        "return_lse=True": inner.config.return_lse,
        "load balancing without is_causal": load_balance and not inner.config.is_causal,
    }
    for what, asked in unsupported.items():
        if asked:
            raise ContextParallelError(f"{where}: torch's ring attention does not support {what}. {full_mesh_fix}.")


class _RingInputCheck:
    """Runs first: the ring takes q, k, v only, and torch's load-balance switch is process-wide."""

    def __init__(self, load_balance: bool) -> None:
        self.load_balance = load_balance

    def __call__(self, module, args, kwargs):
        extra = [k for k, v in kwargs.items() if v is not None and not k.startswith(KV_SHAPE_KEY)
                 and not (k == "visibility" and v.mask is None and not v.sharded)]  # the module's own causality
        if not 3 <= len(args) <= 4 or any(a is not None for a in args[3:]) or extra:
            raise ContextParallelError(
                f"{type(module).__name__} under ring CP takes q, k, v (and mask=None) only; got "
                f"{len(args)} positional arguments and keywords {sorted(extra)}. torch's ring applies "
                f"no masks or seq indices. Fix: call it with q, k, v, or use full-mesh CP through "
                f"LocalMapAttention."
            )
        if _compat.ring_load_balance() != self.load_balance:
            raise ContextParallelError(
                f"{type(module).__name__}: applied with load balancing {self.load_balance} (seq_order), but torch's "
                f"process-wide ring option is now {_compat.ring_load_balance()} (another "
                f"apply_context_parallel call changed it). Fix: use one seq_order per process."
            )
        return args, kwargs


class _AllGatherInputs:
    """Runs before torch's all-gather hook: global seq indices and each rank's mask rows."""

    def __init__(self, cp_mesh: DeviceMesh, order: SeqOrder) -> None:
        self.cp_mesh, self.order = cp_mesh, order

    def __call__(self, module, args, kwargs):
        if len(args) < 3 or len(args) > 4:
            raise TypeError(f"{type(module).__name__} takes q, k, v and an optional mask positionally")
        if kwargs.get("visibility") is not None and kwargs["visibility"].sharded:
            raise ContextParallelError(
                f"{type(module).__name__} got a sharded visibility while context parallel hooks are "
                f"applied: the sequence is then sharded twice (full-mesh CP over a mesh with a cp axis, "
                f"and the hooks). Fix: keep the cp axis off the DTensors' mesh, or drop the hooks."
            )
        q, k, v = args[:3]
        mask = args[3] if len(args) == 4 else kwargs.get("mask")
        if mask is None and kwargs.get("visibility") is not None:
            mask = kwargs["visibility"].mask
        seq_dim, degree = module.in_layout.seq_dim, self.cp_mesh.size()
        seq_len = q.shape[seq_dim] * degree
        index_L = global_seq_index(self.order, seq_len, degree, device=q.device)
        if mask is not None:
            ids_BL = mask.q_document_ids_BL
            if ids_BL.shape[-1] != seq_len or mask.kv_document_ids_BL.shape[-1] != seq_len:
                raise ContextParallelError(
                    f"{type(module).__name__}: under context parallel hooks the mask covers the whole "
                    f"sequence; expected document ids of seq length {seq_len} (local {q.shape[seq_dim]} x "
                    f"cp {degree}), got {tuple(ids_BL.shape)}. Fix: make the mask from the global "
                    f"positions (then permute_mask if load-balanced), not from the local shard."
                )
            kv_ids_BL = mask.kv_document_ids_BL.to(q.device)
            mask = mask.with_tensors(self._local_rows(ids_BL.to(q.device), 1), kv_ids_BL)
        visibility = Visibility(module.is_causal, mask, self._local_rows(index_L, 0), index_L)
        kwargs = {**{k: v for k, v in kwargs.items() if k != "mask"}, "visibility": visibility}
        # torch's hook reads q, k, v by flex_attention's positions (query, key, value, score_mod,
        # block_mask); some versions assert on block_mask. _after_torch_gather undoes this.
        return (q, k, v, *_compat.FLEX_CP_HOOK_TRAILING_ARGS), kwargs

    def _local_rows(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's chunk of a global tensor (no communication: every rank holds all of it)."""
        with torch.no_grad():
            return distribute_tensor(t, self.cp_mesh, [Shard(dim)], src_data_rank=None).to_local()


class _ContiguousGrad(torch.autograd.Function):
    """Identity forward; the gradient leaves contiguous. torch's backward of its k/v all-gather
    chunks the gradient along seq_dim, concatenates the chunks (keeping an unusual memory
    format, such as the math kernel's channels-last-like key gradient) and reduce-scatters it:
    torch 2.11's reduce-scatter refuses a non-contiguous input. A contiguous gradient costs
    nothing more; any other is copied once here instead of failing there."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _after_torch_gather(module, args, kwargs):
    """Runs after torch's hook gathered k/v: drops the flex trailing args, and routes the
    gathered k/v's gradients through ``_ContiguousGrad`` on their way back to torch's op."""
    q, k, v = args[:3]
    if torch.is_grad_enabled():
        k, v = (_ContiguousGrad.apply(t) if t.requires_grad else t for t in (k, v))
    return (q, k, v), kwargs


__all__ = [
    "CPBoundary",
    "CPStrategy",
    "ContextParallelError",
    "hooks_cp_mesh",
    "apply_context_parallel",
    "attach_boundary_check",
    "expected_boundary",
]
