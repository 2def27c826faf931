"""LocalMapAttention: run an inner attention on DTensors with every placement inferred.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Given DTensor q/k/v, the wrapper validates their placements, infers the output (and LSE)
placements by mapping q's placements through the inner module's declared layouts, states the
gradient placements, and runs the kernel on local tensors with all three stated, as torch's
``local_map`` does (dtensor_attn.attention_plan, without local_map's per-call work). A mesh axis that shards
the sequence is context parallelism: k/v are all-gathered over it at the boundary (q stays
sharded), each rank's queries are masked by their global sequence index, and the k/v local
gradients are Partial on that axis. Plans are cached per (mesh, placements, shapes).

Every input check runs before the boundary (which all-gathers k/v under CP) and compares global
shapes and head counts, never a rank's: the pure placement inference of dtensor_attn.boundary,
then the checks of dtensor_attn.local_map_checks (the inner module's own, on the DTensors).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from dtensor_attn import _compat
from dtensor_attn._compat import Placement, Replicate, Shard, StridedShard
from dtensor_attn.attention_plan import AttentionPlan
from dtensor_attn.backends.base import check_mask_type
from dtensor_attn.boundary import AttentionPlacements, infer_attention_placements
from dtensor_attn.errors import PlacementError
from dtensor_attn.layout import Dim, Layout
from dtensor_attn.load_balance import SeqOrder, global_seq_index
from dtensor_attn.local_map_checks import check_global_mask_shapes, check_global_shapes
from dtensor_attn.masks import DocumentMask
from dtensor_attn.placements import Placements, format_placements
from dtensor_attn.protocol import InnerAttentionProtocol, check_inner_attention


class LocalMapAttention(nn.Module):
    """Wraps an inner attention; plain tensors pass through, DTensors get inferred placements."""

    def __init__(self, inner: InnerAttentionProtocol, *, seq_order: SeqOrder = SeqOrder.CONTIGUOUS) -> None:
        super().__init__()
        self.seq_order = seq_order
        check_inner_attention(inner, "LocalMapAttention")
        self.inner = inner
        if not isinstance(seq_order, SeqOrder):  # a string would select head-tail silently
            hint = {o.value: o for o in SeqOrder}.get(str(seq_order).lower(), SeqOrder.CONTIGUOUS)
            raise ValueError(
                f"{self.name}: seq_order must be SeqOrder.CONTIGUOUS or SeqOrder.HEAD_TAIL, got "
                f"{seq_order!r}. Fix: seq_order=SeqOrder.{hint.name} (from dtensor_attn import SeqOrder)."
            )
        self._plans: dict[tuple, AttentionPlan] = {}

    @property
    def name(self) -> str:
        backend = getattr(self.inner, "backend", type(self.inner).__name__)
        return f"LocalMapAttention({backend})"

    def forward(self, q, k, v, mask: DocumentMask | None = None, **kwargs):
        for key, value in kwargs.items():
            if isinstance(value, DTensor):
                raise PlacementError(
                    f"{self.name}: keyword argument {key!r} is a DTensor; the wrapper maps only "
                    f"positional q, k, v and the mask, so the kernel would get a DTensor. "
                    f"Fix: pass it positionally or as a plain tensor."
                )
        is_dtensor = [isinstance(t, DTensor) for t in (q, k, v)]
        if not any(is_dtensor):
            return self.inner(q, k, v, mask, **kwargs)
        if not all(is_dtensor):
            kinds = ", ".join(
                f"{n}={'DTensor' if d else type(t).__name__}" for n, t, d in zip("qkv", (q, k, v), is_dtensor)
            )
            raise PlacementError(
                f"{self.name}: q, k and v must all be DTensors or all plain tensors, got {kinds}. "
                f"Fix: distribute k and v on q's mesh (or pass all three as local tensors)."
            )
        if kwargs:
            raise TypeError(
                f"{self.name}: unexpected keyword arguments {sorted(kwargs)} with DTensor inputs; "
                f"the wrapper derives sequence offsets itself. Fix: drop them (pass the mask "
                f"positionally)."
            )
        if mask is not None:  # before the key, which reads the mask's tensors
            inner = self.inner
            who = f"{self.name}: {type(inner).__name__}" + (f" ({inner.backend})" if hasattr(inner, "backend") else "")
            check_mask_type(who, mask, getattr(inner, "mask_type", DocumentMask))
        key = self._key(q, k, v, mask)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(q, k, v, mask)
        if mask is None:
            return plan(q, k, v)
        mesh = q.device_mesh
        q_doc_BL = _as_dtensor(mask.q_document_ids_BL, mesh)
        same = mask.kv_document_ids_BL is mask.q_document_ids_BL
        return plan(q, k, v, q_doc_BL, q_doc_BL if same else _as_dtensor(mask.kv_document_ids_BL, mesh))

    # -- planning (once per signature) ----------------------------------------------------
    @staticmethod
    def _key(q, k, v, mask) -> tuple:
        """What fixes a plan: meshes, placements, global shapes and dtypes (hence local shapes),
        and the mask's kind and shapes. Flat, as it is built on every call."""
        key = (
            q.device_mesh, k.device_mesh, v.device_mesh, q.placements, k.placements, v.placements,
            q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype,
        )
        if mask is None:
            return key
        return key + (type(mask),) + tuple(
            (t.device_mesh, t.placements, t.shape, t.dtype) if isinstance(t, DTensor) else (t.shape, t.dtype)
            for t in (mask.q_document_ids_BL, mask.kv_document_ids_BL)
        )

    def _plan(self, q: DTensor, k: DTensor, v: DTensor, mask) -> AttentionPlan:
        placements = self.infer_placements(q, k, v)
        inner, layout = self.inner, self.inner.in_layout
        if mask is not None:
            check_global_mask_shapes(self.name, inner, q, k, mask, cp=bool(placements.cp_axes))
        seq_index_locals: tuple[torch.Tensor, ...] = ()
        if placements.cp_axes:
            seq_index_locals = self._seq_index_locals(q, placements.cp_axes)
        # Local shapes are fixed by the key (global shapes and placements): derive them once.
        local_q_shape = tuple(q.to_local().shape)
        sizes = layout.atom_sizes(local_q_shape)
        expected_shapes = tuple(
            (what, out_layout, out_layout.shape(sizes))
            for what, out_layout in (("output", inner.out_layout), ("lse", inner.lse_layout))
            if out_layout is not None
        )
        out_placements = (placements.out,) if placements.lse is None else (placements.out, placements.lse)
        return AttentionPlan(
            module=self.name,
            placements=placements,
            mesh=q.device_mesh,
            inner=inner,
            is_causal=inner.is_causal,
            mask_type=None if mask is None else type(mask),
            mask_placements=(_bl_placements(placements.q, layout), _bl_placements(placements.kv, layout)),
            seq_index_locals=seq_index_locals,
            local_q_shape=local_q_shape,
            expected_shapes=expected_shapes,
            out_placements=out_placements,
            redistribute_qkv=(q.placements, k.placements, v.placements)
            != (placements.q, placements.kv, placements.kv),
        )

    def _seq_index_locals(self, q: DTensor, cp_axes: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's global sequence index of each local q token (sharded like q's seq) and of
        each gathered k/v token (all of them): causal masks compare these, so every rank masks
        correctly. Computed once per plan, as local tensors."""
        mesh = q.device_mesh
        seq_len = q.shape[self.inner.in_layout.seq_dim]
        cp_degree = 1
        for axis in cp_axes:
            cp_degree *= mesh.shape[axis]
        with torch.no_grad():
            index_L = global_seq_index(self.seq_order, seq_len, cp_degree, device=mesh.device_type)
            q_placements = [Shard(0) if i in cp_axes else Replicate() for i in range(mesh.ndim)]
            q_index_L = distribute_tensor(index_L, mesh, q_placements).to_local()
            kv_index_L = distribute_tensor(index_L, mesh, [Replicate()] * mesh.ndim).to_local()
        return q_index_L, kv_index_L

    def infer_placements(self, q: DTensor, k: DTensor, v: DTensor) -> AttentionPlacements:
        """Validate q/k/v and infer every placement at the boundary (from their metadata)."""
        inner, mesh = self.inner, q.device_mesh
        for name, t in (("k", k), ("v", v)):
            if t.device_mesh != mesh:
                raise PlacementError(
                    f"{self.name}: q is on {mesh} but {name} is on {t.device_mesh}. "
                    f"Fix: put q, k and v on the same mesh."
                )
        placements = infer_attention_placements(
            q.placements, k.placements, v.placements, q_shape=tuple(q.shape), kv_shape=tuple(k.shape),
            mesh_shape=tuple(mesh.shape), axis_names=mesh.mesh_dim_names, in_layout=inner.in_layout,
            out_layout=inner.out_layout, lse_layout=inner.lse_layout, module=self.name,
        )
        check_global_shapes(self.name, inner, q, k, v, placements.q, placements.cp_axes)
        strided = [p for p in (*placements.out, *(placements.lse or ())) if isinstance(p, StridedShard)]
        if strided and not _compat.packed_strided_shard_usable():
            raise PlacementError(
                f"{self.name}: the packed {inner.out_layout.name} output under context parallel is "
                f"placed {format_placements(placements.out)}, which this torch cannot redistribute or "
                f"full_tensor() ({_compat.packed_strided_shard_probe()[1]}). Fix: "
                f"varlen_output=Layout.BLNH, or a local batch of 1 (placement Shard(0))."
            )
        return placements


def _bl_placements(placements: Placements, layout: Layout) -> Placements:
    """Placements of a (B, L) per-token tensor that lines up with a tensor of ``layout``."""
    batch_dim, seq_dim = layout.index(Dim.B), layout.seq_dim
    out: list[Placement] = []
    for p in placements:
        if p == Shard(batch_dim):
            out.append(Shard(0))
        elif p == Shard(seq_dim):
            out.append(Shard(1))
        else:
            out.append(Replicate())
    return tuple(out)


def _as_dtensor(t: torch.Tensor, mesh) -> DTensor:
    """A global (B, L) tensor, the same on every rank, as a replicated DTensor; the plan slices
    it as needed. from_local, not distribute_tensor: no broadcast on every forward."""
    if isinstance(t, DTensor):
        return t
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)
