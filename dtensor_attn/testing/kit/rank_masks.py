"""Masks per rank: each rank's view of a case, the mask built from it, and (on simulated ranks)
the per-rank masks fused into one value.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

On simulated ranks one call of the subject holds every rank, so a mask built per rank is
fused: tensors that differ between ranks become LocalTensors (one value per rank), equal ones
stay plain, tuples, NamedTuples, lists and dicts are fused field by field, and a flex
``BlockMask`` keeps each rank's ``mask_mod`` (``_compat.fuse_block_masks``). Under a real
process group the mask is this rank's own.

Which rows and chunk a rank holds follows DTensor's ``Shard``: over several axes sharding one
dim, the first axis is the outermost (rank coordinate ``c0 * size1 + c1``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh

from dtensor_attn import _compat
from dtensor_attn._compat import maybe_disable_local_tensor_mode
from dtensor_attn.layout import Dim
from dtensor_attn.testing.kit.spec import CaseInfo, RankView


def _chunk_index(coords: Sequence[int], sizes: Sequence[int], axis_dims: Sequence[Dim | None], dim: Dim) -> tuple[int, int]:
    """(index, count) of the rank's chunk of ``dim`` over the axes that shard it, outermost first."""
    index, count = 0, 1
    for coord, size, axis_dim in zip(coords, sizes, axis_dims):
        if axis_dim is dim:
            index, count = index * size + coord, count * size
    return index, count


def rank_view(coords: Sequence[int], rank: int, mesh: DeviceMesh, axis_dims: Sequence[Dim | None],
              positions_BL: torch.Tensor | None, case: CaseInfo, device: torch.device) -> RankView:
    """What rank ``rank`` (at ``coords`` of ``mesh``) holds of a case's global inputs."""
    sizes, shapes = tuple(mesh.shape), case.shapes
    row, rows = _chunk_index(coords, sizes, axis_dims, Dim.B)
    chunk, chunks = _chunk_index(coords, sizes, axis_dims, Dim.L)
    local_batch, local_seq = shapes.batch // rows, shapes.seq // chunks
    positions = None
    if positions_BL is not None:
        positions = positions_BL[row * local_batch:(row + 1) * local_batch].to(device)
    return RankView(
        rank=rank, coords=dict(zip(mesh.mesh_dim_names or (), coords)), positions_BL=positions,
        q_index_L=torch.arange(chunk * local_seq, (chunk + 1) * local_seq, device=device),
        kv_index_L=torch.arange(shapes.seq, device=device), cp_rank=chunk, cp_size=chunks, case=case, device=device,
    )


def simulated_rank_views(mesh: DeviceMesh, axis_dims, positions_BL, case: CaseInfo, device,
                         root: DeviceMesh | None = None) -> dict[int, RankView]:
    """Every simulated rank's view, by global rank. For a submesh (``mesh = root["tp"]``) every
    rank of ``root`` is in one of its groups: its coordinates are its root coordinates on the
    submesh's axes."""
    root = root if root is not None else mesh
    with maybe_disable_local_tensor_mode():
        grid = root.mesh
        names = list(root.mesh_dim_names or ())
        keep = [names.index(name) for name in (mesh.mesh_dim_names or ())] if root is not mesh else range(grid.ndim)
        views = {}
        for flat, rank in enumerate(grid.flatten().tolist()):
            coords = [int(c) for c in torch.unravel_index(torch.tensor(flat), tuple(grid.shape))]
            views[rank] = rank_view([coords[i] for i in keep], rank, mesh, axis_dims, positions_BL, case, device)
        return views


def real_rank_view(mesh: DeviceMesh, axis_dims, positions_BL, case: CaseInfo, device) -> RankView:
    """This process's view on a real mesh."""
    coords = mesh.get_coordinate()
    if coords is None:
        raise ValueError("check_attention: this rank is not in the mesh passed as mesh=; expected a mesh of every rank "
                         "that calls check_attention. Fix: call it on the ranks of that mesh only")
    return rank_view(coords, torch.distributed.get_rank(), mesh, axis_dims, positions_BL, case, device)


def build_per_rank(make_mask: Callable[[RankView], object], views: Mapping[int, RankView]):
    """make_mask on every rank's view, fused into one value for simulated ranks."""
    with maybe_disable_local_tensor_mode():
        masks = {rank: make_mask(view) for rank, view in views.items()}
        if len(masks) == 1:
            return next(iter(masks.values()))
        return fuse(masks)


def fuse(values: Mapping[int, object], where: str = "mask"):
    """One value holding each rank's: see the module docstring."""
    ranks = sorted(values)
    first = values[ranks[0]]
    if all(v is None for v in values.values()):
        return None
    if type(first).__name__ == "BlockMask" and hasattr(first, "mask_mod"):
        return _compat.fuse_block_masks(values)
    if isinstance(first, torch.Tensor):
        tensors = {r: values[r] for r in ranks}
        if all(t.shape == first.shape and torch.equal(t, first) for t in tensors.values()):
            return first
        return _compat.LocalTensor({r: t.detach() for r, t in tensors.items()})
    if isinstance(first, Mapping):
        return type(first)({key: fuse({r: values[r][key] for r in ranks}, f"{where}[{key!r}]") for key in first})
    if isinstance(first, (tuple, list)):
        fields = [fuse({r: values[r][i] for r in ranks}, f"{where}[{i}]") for i in range(len(first))]
        return type(first)(*fields) if hasattr(first, "_fields") else type(first)(fields)
    if any(values[r] != first for r in ranks):
        raise ValueError(
            f"check_attention: {where} differs between simulated ranks ({ {r: values[r] for r in ranks[:4]} }) and is "
            "not a tensor, so one simulated call cannot hold every rank's value; expected equal values. Fix: run this "
            "case under torchrun (check_attention(..., mesh=<real DeviceMesh>)), or make the value a tensor"
        )
    return first
