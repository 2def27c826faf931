"""LocalMapAttention: run an inner attention on DTensors with every placement inferred.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Given DTensor q/k/v, the wrapper validates their placements, infers the output (and LSE)
placements by mapping q's placements through the inner module's declared layouts, states the
gradient placements, and calls torch's ``local_map`` with all three. A mesh axis that shards
the sequence is context parallelism: k/v are all-gathered over it at the boundary (q stays
sharded), each rank's queries are masked by their global sequence index, and the k/v local
gradients are Partial on that axis. Plans are cached per (mesh, placements, shapes).

Every input check runs before ``local_map`` (which all-gathers k/v under CP) and compares global
shapes and head counts, never a rank's: the pure placement inference of dtensor_attn.boundary,
then the checks of dtensor_attn.local_map_checks (the inner module's own, on the DTensors).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.experimental import local_map

from dtensor_attn import _compat
from dtensor_attn._compat import Placement, Replicate, Shard, StridedShard
from dtensor_attn.backends.base import check_mask_type
from dtensor_attn.boundary import AttentionPlacements, infer_attention_placements
from dtensor_attn.errors import PlacementError
from dtensor_attn.layout import Dim, Layout
from dtensor_attn.load_balance import SeqOrder, global_seq_index
from dtensor_attn.local_map_checks import check_global_mask_shapes, check_global_shapes, check_kernel_outputs
from dtensor_attn.masks import DocumentMask
from dtensor_attn.placements import Placements, format_placements
from dtensor_attn.protocol import InnerAttentionProtocol, check_inner_attention
from dtensor_attn.visibility import Visibility


@dataclasses.dataclass(slots=True)
class _Plan:
    placements: AttentionPlacements
    fn: Callable
    seq_index_args: tuple[DTensor, ...]  # (q_seq_index_L, kv_seq_index_L) under CP, else ()


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
        self._plans: dict[tuple, _Plan] = {}

    @property
    def name(self) -> str:
        backend = getattr(self.inner, "backend", type(self.inner).__name__)
        return f"LocalMapAttention({backend})"

    def forward(self, q, k, v, mask: DocumentMask | None = None, **kwargs):
        for key, value in kwargs.items():
            if isinstance(value, DTensor):
                raise PlacementError(
                    f"{self.name}: keyword argument {key!r} is a DTensor; local_map maps only "
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
        args = [q, k, v]
        if mask is not None:
            q_doc_BL = _as_dtensor(mask.q_document_ids_BL, q.device_mesh)
            same = mask.kv_document_ids_BL is mask.q_document_ids_BL
            args += [q_doc_BL, q_doc_BL if same else _as_dtensor(mask.kv_document_ids_BL, q.device_mesh)]
        return plan.fn(*args, *plan.seq_index_args)

    # -- planning (once per signature) ----------------------------------------------------
    @staticmethod
    def _key(q, k, v, mask) -> tuple:
        def sig(t):
            return (t.device_mesh, tuple(t.placements), tuple(t.shape), t.dtype)

        mask_sig = None
        if mask is not None:
            mask_sig = tuple(
                (t.device_mesh, tuple(t.placements), tuple(t.shape)) if isinstance(t, DTensor) else tuple(t.shape)
                for t in (mask.q_document_ids_BL, mask.kv_document_ids_BL)
            ) + (type(mask),)
        return (sig(q), sig(k), sig(v), mask_sig)

    def _plan(self, q: DTensor, k: DTensor, v: DTensor, mask) -> _Plan:
        placements = self.infer_placements(q, k, v)
        mesh = q.device_mesh
        layout = self.inner.in_layout
        if mask is not None:
            check_global_mask_shapes(self.name, self.inner, q, k, mask, cp=bool(placements.cp_axes))
        seq_index_args: tuple[DTensor, ...] = ()
        if placements.cp_axes:
            seq_index_args = self._seq_index_args(q, placements.cp_axes)
        mask_placements = (
            _bl_placements(placements.q, layout),
            _bl_placements(placements.kv, layout),
        )
        num_out = 2 if placements.lse is not None else 1
        # local_map reads a tuple as one entry per output: a single output's placements go as a list.
        out_placements = (placements.out, placements.lse) if num_out == 2 else list(placements.out)
        mask_type = None if mask is None else type(mask)
        cp = bool(placements.cp_axes)
        # Local shapes are fixed by the key (global shapes and placements): derive them once.
        local_q_shape = tuple(q.to_local().shape)
        sizes = self.inner.in_layout.atom_sizes(local_q_shape)
        expected_shapes = tuple(
            (what, layout, layout.shape(sizes))
            for what, layout in (("output", self.inner.out_layout), ("lse", self.inner.lse_layout))
            if layout is not None
        )

        is_causal = self.inner.is_causal

        def run(q_local, k_local, v_local, *extra_locals):
            extra = list(extra_locals)
            local_mask = None
            if mask_type is not None:
                local_mask = mask_type(q_document_ids_BL=extra.pop(0), kv_document_ids_BL=extra.pop(0))
            visibility = Visibility(is_causal, local_mask, *(extra if cp else ()))
            result = self.inner(q_local, k_local, v_local, visibility=visibility)
            check_kernel_outputs(self.name, local_q_shape, result, expected_shapes)
            return result

        in_pl = [placements.q, placements.kv, placements.kv]
        grad_pl = [placements.q_grad, placements.kv_grad, placements.kv_grad]
        if mask is not None:
            in_pl += list(mask_placements)
            grad_pl += list(mask_placements)  # integer ids: no gradient flows; local_map wants one
        for index in seq_index_args:
            in_pl.append(tuple(index.placements))
            grad_pl.append(tuple(index.placements))
        mapped = local_map(
            run,
            out_placements=out_placements,
            in_placements=tuple(in_pl),
            in_grad_placements=tuple(grad_pl),
            device_mesh=mesh,
            redistribute_inputs=True,
        )
        return _Plan(placements, mapped, seq_index_args)

    def _seq_index_args(self, q: DTensor, cp_axes: tuple[int, ...]) -> tuple[DTensor, DTensor]:
        """Global sequence index of each q token (sharded like q's seq) and of each gathered
        k/v token (replicated): causal masks compare these, so every rank masks correctly."""
        mesh = q.device_mesh
        seq_len = q.shape[self.inner.in_layout.seq_dim]
        cp_degree = 1
        for axis in cp_axes:
            cp_degree *= mesh.shape[axis]
        with torch.no_grad():
            index_L = global_seq_index(self.seq_order, seq_len, cp_degree, device=mesh.device_type)
            q_placements = [Shard(0) if i in cp_axes else Replicate() for i in range(mesh.ndim)]
            q_index_L = distribute_tensor(index_L, mesh, q_placements)
            kv_index_L = distribute_tensor(index_L, mesh, [Replicate()] * mesh.ndim)
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
    """A global (B, L) tensor, the same on every rank, as a replicated DTensor; local_map slices
    it as needed. from_local, not distribute_tensor: no broadcast on every forward."""
    if isinstance(t, DTensor):
        return t
    return DTensor.from_local(t, mesh, [Replicate()] * mesh.ndim, run_check=False)
