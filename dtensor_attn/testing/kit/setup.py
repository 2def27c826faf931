"""A case's set-up: the subject prepared for the case's mesh, and its mask built.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

``prepare(subject, MeshContext)`` (torchtitan: ``Module.parallelize``) may return the subject,
or ``Prepared(subject, mesh)`` with the mesh the subject is tied to: its axes must be the kit's
but for axes of size 1 (torchtitan keeps a ``dp_shard`` axis of size 1, and drops ``tp`` or
``cp`` of size 1), and the kit places the inputs on it. The mask follows the subject's
``CallingConvention``: none, one global value, or one per rank (fused on simulated ranks).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping

import torch
from torch.distributed.device_mesh import DeviceMesh

from dtensor_attn.layout import Dim
from dtensor_attn.testing.kit.rank_masks import build_per_rank, real_rank_view, simulated_rank_views
from dtensor_attn.testing.kit.spec import CallingConvention, CaseInfo, MaskScope, MeshContext, Prepared


class CaseSkipped(Exception):
    """The case does not apply (the subject applies no document masks): its reason."""


@dataclasses.dataclass(frozen=True, slots=True)
class Placed:
    subject: Callable
    mesh: DeviceMesh
    axis_dims: tuple[Dim | None, ...]
    root: DeviceMesh | None = None  # the mesh ``mesh`` was sliced from (the probe's submesh call)


def mesh_axes(mesh: DeviceMesh) -> dict[str, int]:
    names = mesh.mesh_dim_names
    if names is None:
        raise ValueError("check_attention: the mesh has no axis names; expected named axes such as ('cp', 'tp') so "
                         "the kit knows what each shards. Fix: init_device_mesh(..., mesh_dim_names=(...))")
    return dict(zip(names, tuple(mesh.shape)))


def place(subject, prepare, mesh: DeviceMesh, roles: Mapping[str, Dim | None], device: torch.device) -> Placed:
    """The subject prepared for ``mesh`` (if ``prepare`` is given) and the mesh its inputs go on."""
    axes = mesh_axes(mesh)
    if prepare is not None:
        prepared = prepare(subject, MeshContext(mesh=mesh, axes=axes, roles=dict(roles), device=device))
        if isinstance(prepared, Prepared):
            _check_same_axes(axes, mesh_axes(prepared.mesh))
            subject, mesh = prepared.subject, prepared.mesh
        elif prepared is not None:
            subject = prepared
    names = mesh.mesh_dim_names
    unknown = [name for name in names if name not in roles]
    if unknown:
        raise ValueError(f"check_attention: mesh axes {unknown} have no role; expected one of {sorted(roles)}. "
                         f"Fix: axis_roles={{'{unknown[0]}': 'batch' | 'seq' | 'heads' | 'replicate'}}")
    return Placed(subject, mesh, tuple(roles[name] for name in names))


def _check_same_axes(asked: Mapping[str, int], given: Mapping[str, int]) -> None:
    wide_asked = {name: size for name, size in asked.items() if size > 1}
    wide_given = {name: size for name, size in given.items() if size > 1}
    if wide_asked != wide_given:
        raise ValueError(
            f"check_attention: prepare returned a mesh with axes {given}, the case asked for {asked}; expected the "
            "same axes but for axes of size 1. Fix: build the subject's mesh from MeshContext.axes"
        )


def case_mask(convention: CallingConvention, *, documents: bool, positions_BL, placed: Placed, case: CaseInfo,
              simulated: bool, no_mask_reason: str, device: torch.device):
    """The value passed under ``convention.mask_keyword`` (None: no mask keyword at all).
    Raises CaseSkipped where a document case has no mask."""
    if not documents and not convention.mask_for_causal:
        return None
    if convention.make_mask is None:
        if documents:
            raise CaseSkipped(no_mask_reason)
        return None
    positions = positions_BL if documents else None
    try:
        if convention.mask_scope is MaskScope.GLOBAL:
            return convention.make_mask(positions)
        if simulated:
            views = simulated_rank_views(placed.mesh, placed.axis_dims, positions, case, device, placed.root)
        else:
            view = real_rank_view(placed.mesh, placed.axis_dims, positions, case, device)
            views = {view.rank: view}
        return build_per_rank(convention.make_mask, views)
    except ValueError as error:  # the subject applies no such masks: a fact, not a failure
        if documents:
            raise CaseSkipped(" ".join(str(error).split())) from error
        raise
