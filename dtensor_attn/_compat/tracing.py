"""The debugger's windows into torch: dispatch modes, pytrees, local_map's frames, collective counts.

Part of dtensor_attn._compat, the one home of private torch imports; import names from the
package, not from here."""

from __future__ import annotations

import functools
import inspect


# What RowwiseParallel returns by default: its value is only final after .wait().
from torch.distributed._functional_collectives import AsyncCollectiveTensor  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: F401
from torch.utils._pytree import tree_leaves  # noqa: F401


@functools.cache
def _local_map_codes() -> frozenset:
    """Code objects of the function ``local_map`` runs per call: ``_local_map_wrapped`` behind a
    functools.partial (2.13), or the closure ``wrapped`` inside ``local_map`` (older torch)."""
    from torch.distributed.tensor.experimental import _func_map

    codes = {c for c in _func_map.local_map.__code__.co_consts if inspect.iscode(c)}
    codes = {c for c in codes if c.co_name == "wrapped"}
    wrapped = getattr(_func_map, "_local_map_wrapped", None)
    if wrapped is not None:
        codes.add(wrapped.__code__)
    return frozenset(codes)


def local_map_call(frame) -> dict | None:
    """The kernel, declared placements, mesh and arguments of a local_map call, read from the
    frame of torch's wrapper (None for any other frame). Older torch keeps them as closure
    variables, which ``f_locals`` also shows."""
    if frame.f_code not in _local_map_codes():
        return None
    names = ("func", "out_placements", "in_placements", "in_grad_placements", "device_mesh", "args")
    local_vars = frame.f_locals
    return {name: local_vars.get(name) for name in names}


def collective_counts() -> list[tuple[tuple[int, ...], int]]:
    """(global ranks, collectives issued so far) of every process group this rank belongs to,
    in creation order; [] where this torch cannot tell. Ranks compare these after each test:
    members of one group that issued different numbers of collectives are out of step."""
    from torch.distributed.distributed_c10d import _world, get_process_group_ranks

    counts = []
    for group in list(_world.pg_names):
        try:
            counts.append((tuple(get_process_group_ranks(group)), group._get_sequence_number_for_group()))
        except (AttributeError, RuntimeError, ValueError):
            continue
    return counts
