"""LocalMapAttention's checks that read DTensors or what a kernel returned (the pure placement
checks are in dtensor_attn.boundary).

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Global shapes, head counts, dtypes and the mask's (batch, seq) are checked before ``local_map``
(which all-gathers k/v under CP), with the inner module's own checks run on the DTensors; what
the kernel returns is checked inside the mapped function, against the declared layouts.
"""

from __future__ import annotations

import math

import torch

from dtensor_attn._compat import Shard
from dtensor_attn.backends.base import batch_seq, check_qkv
from dtensor_attn.boundary import axis_names_of
from dtensor_attn.context_parallel import hooks_cp_mesh
from dtensor_attn.errors import PlacementError
from dtensor_attn.masks import DocumentMask, check_mask_shapes
from dtensor_attn.placements import Placements


def check_global_shapes(module: str, inner, q, k, v, q_pl: Placements, cp_axes: tuple[int, ...]) -> None:
    """The inner module's input checks on global shapes, then what CP adds: one seq length."""
    layout, mesh = inner.in_layout, q.device_mesh
    heads_axes = [a for a, p in enumerate(q_pl) if p == Shard(layout.heads_dim)]
    config = getattr(inner, "config", None)
    check_qkv(module, layout, q, k, v, enable_gqa=getattr(config, "enable_gqa", None), scope="global",
              heads_sharding=(axis_names_of(mesh.mesh_dim_names, heads_axes), math.prod(mesh.shape[a] for a in heads_axes)))
    seq_dim = layout.seq_dim
    if cp_axes and q.shape[seq_dim] != k.shape[seq_dim]:
        raise ValueError(
            f"{module}: q has seq {q.shape[seq_dim]} but k/v seq {k.shape[seq_dim]} (global), with "
            f"seq sharded over mesh axes {axis_names_of(mesh.mesh_dim_names, cp_axes)} (context parallel); the wrapper "
            f"gives k/v the sequence positions of q. Fix: give q, k and v one seq length, or do not "
            f"shard seq (no Shard({seq_dim}) in q's placements)."
        )


def check_global_mask_shapes(module: str, inner, q, k, mask: DocumentMask, *, cp: bool) -> None:
    """The mask covers q's global (batch, seq); with context-parallel hooks on the inner
    module (apply_context_parallel), the whole sequence of which q is one CP chunk."""
    layout = inner.in_layout
    (q_batch, q_seq), (kv_batch, kv_seq) = batch_seq(q, layout), batch_seq(k, layout)
    hooks_mesh = hooks_cp_mesh(inner)
    scope, note = "global", ""
    if hooks_mesh is not None:
        degree = hooks_mesh.size()
        scope = f"the whole sequence: {q_seq} per rank x the {degree} ranks of the context-parallel hooks"
        q_seq, kv_seq = q_seq * degree, kv_seq * degree
    if cp or hooks_mesh is not None:
        note = ", with the global positions (permute_mask if load-balanced), not a CP shard's"
    check_mask_shapes(module, mask, q_BL=(q_batch, q_seq), kv_BL=(kv_batch, kv_seq), scope=scope, fix_note=note)


def check_kernel_outputs(module: str, local_q_shape, result, expected_shapes) -> None:
    """What the kernel returned, against what it declares: one output or (out, lse), tensors of the
    declared layouts' local shapes."""
    if len(expected_shapes) == 2:
        if not (isinstance(result, tuple) and len(result) == 2):
            raise PlacementError(
                f"{module}: the kernel declares an LSE (lse_layout {expected_shapes[1][1].name}), so it "
                f"must return (out, lse); got a {type(result).__name__}. Fix: return (out, lse), or "
                f"declare lse_layout = None."
            )
        outputs = result
    elif isinstance(result, (tuple, list)):
        raise PlacementError(
            f"{module}: the kernel returned a {type(result).__name__} of {len(result)} where it declares "
            f"one output (out_layout {expected_shapes[0][1].name}, no lse_layout). Fix: return the output "
            f"tensor alone, or declare an lse_layout for a second output (return_lse=True)."
        )
    else:
        outputs = (result,)
    for t, (what, layout, expected) in zip(outputs, expected_shapes):
        if not isinstance(t, torch.Tensor):
            raise PlacementError(
                f"{module}: the kernel returned a {type(t).__name__} as its {what}; it declares a "
                f"{layout.name} tensor. Fix: return a tensor in {layout.name}."
            )
        if tuple(t.shape) != expected:
            raise PlacementError(
                f"{module}: the kernel returned a local {what} of shape {tuple(t.shape)}, but "
                f"it declares {layout.name}, which for local q {local_q_shape} is "
                f"{expected}. Fix: make the kernel return {layout.name}, or declare the "
                f"layout it returns (out_layout/lse_layout)."
            )
