"""DTensor internals: _StridedShard, the view algebra, the redistribution planner's probe, shard orders.

Part of dtensor_attn._compat, the one home of private torch imports; import names from the
package, not from here."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
from torch.distributed.tensor import Placement, Replicate, Shard

# _StridedShard: a shard of a dim that was flattened from several dims (see dtensor_attn.explain).
from torch.distributed.tensor.placement_types import _StridedShard as StridedShard

# DTensor's view algebra: the rules DTensor itself uses to propagate placements through a view.
from torch.distributed.tensor._ops import _view_ops as _view_ops

from dtensor_attn._compat.simulation import maybe_disable_local_tensor_mode


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


@functools.cache
def view_flattens_sharded_dims() -> bool:
    """Whether DTensor's view algebra folds a sharded non-leading dim into a flattened one,
    answering with a ``_StridedShard`` (torch 2.13), rather than refusing ("Attempted to flatten
    multiple dimensions, with dimension 1 being sharded", torch 2.11). Probed once, by behaviour."""
    try:
        propagate_view_placements([Shard(1)], (2, 4), view_groups((2, 4), (8,)), (2,))
    except RuntimeError:
        return False
    return True


@functools.cache
def packed_strided_shard_probe() -> tuple[bool, str]:
    """(usable, why): can this torch redistribute (e.g. ``full_tensor()``) a tensor placed
    ``_StridedShard(0, sf=2)`` on a 1-D mesh of 2, the placement of varlen's packed TNH output
    under CP with a local batch of 2? Run once, by behaviour: DTensor plans that redistribution
    on a mesh built without process groups. torch 2.11 raises "use_strided_shard_as_shard_order
    is True, but placements: (_StridedShard(dim=0, sf=2),) is unable to be interpreted into a
    corresponding shard_order"; torch 2.13 falls back to a plan that works."""
    from torch.distributed.tensor import _redistribute

    plan = getattr(_redistribute, "_gen_transform_infos_non_cached", None) or _redistribute._gen_transform_infos
    return probe_strided_shard_redistribution(plan)


def probe_strided_shard_redistribution(plan) -> tuple[bool, str]:
    """The probe behind packed_strided_shard_probe, with DTensor's planner passed in (tests
    hand it one that fails as torch 2.11's does)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    with maybe_disable_local_tensor_mode():
        try:
            mesh = DeviceMesh("cpu", torch.arange(2), _init_backend=False, _rank=0)
        except TypeError:  # no _rank keyword: the rank comes from the (initialised) default group
            mesh = DeviceMesh("cpu", torch.arange(2), _init_backend=False)
        meta = TensorMeta(torch.Size([8]), (1,), torch.float32)
        try:
            src = DTensorSpec(mesh, (strided_shard(0, 2),), tensor_meta=meta)
            plan(src, DTensorSpec(mesh, (Replicate(),), tensor_meta=meta))
        except (ValueError, RuntimeError, NotImplementedError, AssertionError) as error:
            return False, f"{type(error).__name__}: {error}"
    return True, "DTensor plans the redistribution of _StridedShard(0, sf=2)"


def packed_strided_shard_usable() -> bool:
    """True where a _StridedShard(0, sf=B) packed output can be used downstream (see the probe)."""
    return packed_strided_shard_probe()[0]


def view_sources(from_shape: Sequence[int], to_shape: Sequence[int]) -> tuple:
    """For each dim of a view ``from_shape -> to_shape``, the input dims it is made of, read from
    DTensor's view rule: ``(i,)`` kept, ``(i, j)`` flattened, None part of a split or unknown.
    Size-1 input dims the rule drops are paired, in order, with size-1 output dims."""
    rule = view_groups(tuple(from_shape), tuple(to_shape))
    sources: list = []
    for spec in rule:
        if isinstance(spec, InputDim):
            sources.append((spec.input_dim,))
        elif isinstance(spec, _view_ops.Flatten) and all(
            isinstance(d, InputDim) for d in spec.input_dims
        ):
            sources.append(tuple(d.input_dim for d in spec.input_dims))
        elif isinstance(spec, _view_ops.Singleton):
            sources.append(())
        else:
            sources.append(None)
    used = {i for s in sources if s for i in s}
    dropped = [i for i, size in enumerate(from_shape) if size == 1 and i not in used]
    for j, s in enumerate(sources):
        if s == ():
            sources[j] = (dropped.pop(0),) if dropped else None
    return tuple(sources)


def torch_shard_order(placements: Sequence[Placement], mesh_shape: Sequence[int]):
    """torch's own decoding of _StridedShard placements into a shard order, as
    ``((dim, axes), ...)``, or None where torch cannot decode it (to check the explainer)."""
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    class _Sizes:  # the decoder only asks the mesh for axis sizes
        def size(self, axis: int) -> int:
            return mesh_shape[axis]

    order = DTensorSpec._maybe_convert_StridedShard_to_shard_order(tuple(placements), _Sizes())
    return None if order is None else tuple((e.tensor_dim, tuple(e.mesh_dims)) for e in order)
