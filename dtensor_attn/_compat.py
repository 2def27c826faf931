"""The one module that imports private torch symbols, and absorbs torch-version differences.

Every other module imports these names from here. Features are detected by behaviour or by
signature (a keyword of ``varlen_attn``, an attribute), never by comparing version strings.
Supported: torch 2.11 (the GPU image) and 2.13 (CPU here).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
from torch.distributed.tensor import Partial, Placement, Replicate, Shard

# _StridedShard: a shard of a dim that was flattened from several dims (see dtensor_attn.explain).
from torch.distributed.tensor.placement_types import _StridedShard as StridedShard

# DTensor's view algebra: the rules DTensor itself uses to propagate placements through a view.
from torch.distributed.tensor._ops import _view_ops as _view_ops

# Simulated ranks: LocalTensor holds one tensor per rank inside one process.
from torch.distributed._local_tensor import (  # noqa: F401  (re-exported)
    LocalTensor,
    LocalTensorMode,
    maybe_disable_local_tensor_mode,
)
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401

__all__ = [
    "FakeStore",
    "LocalTensor",
    "LocalTensorMode",
    "Partial",
    "Placement",
    "Replicate",
    "Shard",
    "StridedShard",
    "context_parallel_style",
    "flex_attention_with_lse",
    "input_dim",
    "local_tensor_mode_active",
    "maybe_disable_local_tensor_mode",
    "propagate_view_placements",
    "split_factor",
    "strided_shard",
    "varlen_attn_or_none",
    "varlen_supports_gqa",
    "view_groups",
]

InputDim = _view_ops.InputDim
view_groups = _view_ops.view_groups


def input_dim(index: int):
    """One entry of a DimMap: output dim i is input dim ``index`` unchanged."""
    return InputDim(index)


def split_factor(placement: Placement) -> int:
    """The split factor of a _StridedShard (attribute name differs across versions)."""
    for name in ("split_factor", "sf"):
        value = getattr(placement, name, None)
        if value is not None:
            return int(value)
    raise AssertionError(f"{placement!r} has no split factor")


def strided_shard(dim: int, factor: int) -> StridedShard:
    return StridedShard(dim, split_factor=factor)


@functools.cache
def _propagate_accepts_strict_view() -> bool:
    params = inspect.signature(_view_ops.propagate_shape_and_sharding).parameters
    return "strict_view" in params


def propagate_view_placements(
    placements: Sequence[Placement],
    global_shape: Sequence[int],
    rule,
    mesh_shape: Sequence[int],
) -> tuple[list[Placement], list[Placement]]:
    """Run DTensor's own view propagation as a pure function over values.

    ``strict_view=True`` asks DTensor for the placement a view produces without redistribution
    (a seq shard folded into tokens becomes ``_StridedShard``), instead of the redistribution it
    would request. Returns (input placements DTensor needs, output placements).
    """
    kwargs = {"strict_view": True} if _propagate_accepts_strict_view() else {}
    needed, out = _view_ops.propagate_shape_and_sharding(
        list(placements), tuple(global_shape), tuple(rule), tuple(mesh_shape), **kwargs
    )
    return list(needed), list(out)


def local_tensor_mode_active() -> bool:
    """True inside a simulated-ranks region (a LocalTensorMode is on the dispatch stack)."""
    from torch.distributed._local_tensor import local_tensor_mode

    return local_tensor_mode() is not None


def varlen_attn_or_none():
    """torch.nn.attention.varlen.varlen_attn, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


@functools.cache
def varlen_supports_gqa() -> bool:
    """torch 2.11's varlen_attn has no ``enable_gqa``: k/v heads must be expanded there."""
    fn = varlen_attn_or_none()
    return fn is not None and "enable_gqa" in inspect.signature(fn).parameters


def flex_attention_with_lse(flex_fn, *args, **kwargs):
    """Call flex_attention asking for the LSE: ``return_aux`` where this torch has it, else the
    older ``return_lse`` keyword. Returns (out, lse)."""
    from torch.nn.attention import flex_attention as flex_module

    if "return_aux" in inspect.signature(flex_module.flex_attention).parameters:
        out, aux = flex_fn(*args, return_aux=flex_module.AuxRequest(lse=True), **kwargs)
        return out, aux.lse
    return flex_fn(*args, return_lse=True, **kwargs)


def context_parallel_style():
    """torch's private ``_ContextParallel`` parallel style and its attention-type enum."""
    from torch.distributed.tensor.experimental._context_parallel._attention import (
        _ContextParallel,
    )

    return _ContextParallel

