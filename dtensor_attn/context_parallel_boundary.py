"""The context-parallel boundary: what the kernel must get on the cp axis, and a check, on
every forward, that torch's ``_ContextParallel`` hooks produced it.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Ring (sdpa): q and k/v arrive as DTensors ``Shard(seq_dim)`` on the cp mesh. All-gather (flex,
varlen): q stays local, k/v arrive gathered along ``seq_dim`` (``Replicate()``), which shows
as the one dim of k that grew by the cp degree. ``seq_dim`` comes from the module's declared
``in_layout``; a style built with a hand-written ``seq_dim`` that does not match it is named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from dtensor_attn import _compat
from dtensor_attn._compat import Replicate, Shard
from dtensor_attn.backends import REGISTRY, InnerAttention
from dtensor_attn.backends.base import CPStrategy
from dtensor_attn.config import Backend
from dtensor_attn.errors import PlacementError
from dtensor_attn.layout import Layout
from dtensor_attn.placements import Placements, format_placements

KV_SHAPE_KEY = "_dtensor_attn_cp_kv_shape"  # prefix of the kwarg that carries k's local shape to the check


class ContextParallelError(PlacementError):
    """Context parallelism asked for where it cannot run, or run with a wrong boundary."""


@dataclasses.dataclass(frozen=True, slots=True)
class CPBoundary:
    """What the kernel gets on the cp axis: placements of q and of k/v at the kernel call."""

    strategy: CPStrategy
    seq_dim: int
    q: Placements
    kv: Placements

    def row(self) -> tuple[str, ...]:
        return (self.strategy.value, str(self.seq_dim), format_placements(self.q), format_placements(self.kv))


def expected_boundary(layout: Layout, backend: Backend) -> CPBoundary:
    """The boundary for a module whose public layout is ``layout`` (pure)."""
    strategy = REGISTRY[backend].cp_strategy
    seq = (Shard(layout.seq_dim),)
    kv = seq if strategy is CPStrategy.RING else (Replicate(),)
    return CPBoundary(strategy, layout.seq_dim, seq, kv)


def attach_boundary_check(
    inner: InnerAttention, cp_mesh: DeviceMesh, *, on_boundary: Callable[[CPBoundary], None] | None = None
) -> None:
    """Check, on every forward, that torch's hooks sharded or gathered ``in_layout.seq_dim``.

    Attach after the CP style (apply_context_parallel does): one hook runs before all others
    and notes k's local shape, one after torch's hooks compares. Works for any style applied
    to the module, so a test can show it flags one built with a stale ``seq_dim``.
    ``on_boundary`` sees each observed boundary before the comparison (golden tables).
    """

    def note_kv_shape(module, args, kwargs):
        if _compat.local_tensor_mode_active():
            _compat.simulate_cp_all_gather()  # else torch's gather op is silently wrong there
        kwargs[shape_key] = tuple(args[1].shape) if len(args) > 1 else None
        return args, kwargs

    def check(module, args, kwargs):
        kv_shape = kwargs.pop(shape_key, None)
        observed = observe_boundary(args, kv_shape, cp_mesh.size())
        if on_boundary is not None:
            on_boundary(observed)
        expected = expected_boundary(module.in_layout, module.backend)
        if observed != expected:
            raise ContextParallelError(
                f"context parallel boundary of {type(module).__name__} ({module.backend}, layout "
                f"{module.in_layout.name}): expected {expected.strategy.value} on seq_dim "
                f"{expected.seq_dim} (q {format_placements(expected.q)}, k/v "
                f"{format_placements(expected.kv)} at the kernel), got seq_dim {observed.seq_dim} "
                f"(q {format_placements(observed.q)}, k/v {format_placements(observed.kv)}). "
                f"A CP style built with a hand-written seq_dim that does not match the layout "
                f"shards or gathers the wrong dim. Fix: apply_context_parallel(module, cp_mesh), "
                f"which reads seq_dim from in_layout."
            )
        return args, kwargs

    shape_key = f"{KV_SHAPE_KEY}_{id(note_kv_shape)}"  # one key per attached check
    inner.register_forward_pre_hook(note_kv_shape, with_kwargs=True, prepend=True)
    inner.register_forward_pre_hook(check, with_kwargs=True)


def observe_boundary(args, kv_shape: tuple[int, ...] | None, cp_degree: int) -> CPBoundary:
    """The boundary torch's hooks produced, read from the arguments the kernel will get;
    ``kv_shape``: k's local shape before the hooks ran."""
    q, k = args[0], args[1]
    if isinstance(q, DTensor):  # ring: torch wrapped the local tensors as cp-sharded DTensors
        shard = tuple(q.placements)
        dims = [p.dim for p in shard if isinstance(p, Shard)]
        return CPBoundary(CPStrategy.RING, dims[0] if dims else -1, shard, tuple(k.placements))
    return gathered_boundary(kv_shape, tuple(k.shape), cp_degree)


def gathered_boundary(
    local_shape: tuple[int, ...] | None, gathered_shape: tuple[int, ...], cp_degree: int
) -> CPBoundary:
    """All-gather: the one dim of k that grew by the cp degree, all others unchanged, is the
    one torch gathered; anything else is seq_dim -1 (pure)."""
    unreadable = CPBoundary(CPStrategy.ALL_GATHER, -1, (), (Shard(-1),))
    if local_shape is None or len(local_shape) != len(gathered_shape):
        return unreadable
    grown = [d for d, (a, b) in enumerate(zip(local_shape, gathered_shape))
             if b == a * cp_degree and a != b]
    if len(grown) != 1 or any(a != b for d, (a, b) in enumerate(zip(local_shape, gathered_shape))
                              if d not in grown):
        return unreadable
    return CPBoundary(CPStrategy.ALL_GATHER, grown[0], (Shard(grown[0]),), (Replicate(),))


__all__ = [
    "CPBoundary",
    "ContextParallelError",
    "KV_SHAPE_KEY",
    "attach_boundary_check",
    "expected_boundary",
    "gathered_boundary",
    "observe_boundary",
]
