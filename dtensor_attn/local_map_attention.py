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
shapes and head counts, never a rank's: the inner module's own checks (``check_qkv``,
``check_mask_type``, ``check_mask_shapes``) on the DTensors, then the CP-only ones here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.experimental import local_map

from dtensor_attn import _compat
from dtensor_attn._compat import Partial, Placement, Replicate, Shard, StridedShard
from dtensor_attn.backends.base import batch_seq, check_mask_type, check_qkv
from dtensor_attn.context_parallel import hooks_cp_mesh
from dtensor_attn.errors import PlacementError
from dtensor_attn.layout import Dim, Layout
from dtensor_attn.load_balance import SeqOrder, global_seq_index
from dtensor_attn.masks import DocumentMask, check_mask_shapes
from dtensor_attn.protocol import InnerAttentionProtocol, check_inner_attention
from dtensor_attn.visibility import Visibility
from dtensor_attn.placements import (
    Placements,
    format_placements,
    infer_out_placements,
    normalize_placements,
)


@dataclasses.dataclass(frozen=True, slots=True)
class AttentionPlacements:
    """Everything LocalMapAttention states at its local_map boundary, for one input signature."""

    q: Placements
    kv: Placements  # as the kernel sees k/v: gathered (Replicate) on context-parallel axes
    out: Placements
    lse: Placements | None
    q_grad: Placements
    kv_grad: Placements  # Partial on context-parallel axes
    cp_axes: tuple[int, ...]


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
            self._check_mask_shapes(q, k, mask, cp=bool(placements.cp_axes))
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
            self._check_local_shapes(local_q_shape, result, expected_shapes)
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
        """Validate q/k/v and infer every placement at the boundary (pure over their metadata)."""
        inner, layout = self.inner, self.inner.in_layout
        mesh = q.device_mesh
        for name, t in (("k", k), ("v", v)):
            if t.device_mesh != mesh:
                raise PlacementError(
                    f"{self.name}: q is on {mesh} but {name} is on {t.device_mesh}. "
                    f"Fix: put q, k and v on the same mesh."
                )
        ndim = layout.ndim
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.dim() != ndim:
                raise PlacementError(
                    f"{self.name}: {name} must be {layout.name} ({ndim} dims), got global shape "
                    f"{tuple(t.shape)}. Fix: reshape to {layout.name}."
                )
        q_pl = normalize_placements(q.placements, ndim)
        k_pl = normalize_placements(k.placements, ndim)
        v_pl = normalize_placements(v.placements, ndim)
        for name, pl in (("q", q_pl), ("k", k_pl), ("v", v_pl)):
            self._check_placement_kinds(name, pl, layout)
        if k_pl != v_pl:
            raise PlacementError(
                f"{self.name}: k and v must have the same placements in {layout.name}; expected "
                f"v {format_placements(k_pl)}, got {format_placements(v_pl)}. Fix: distribute v like k."
            )
        seq_dim = layout.seq_dim
        cp_axes = tuple(i for i, p in enumerate(q_pl) if p == Shard(seq_dim))
        expected_kv = tuple(p if i not in cp_axes else Shard(seq_dim) for i, p in enumerate(q_pl))
        if k_pl != expected_kv:
            raise PlacementError(
                f"{self.name}: k/v placements must match q's in {layout.name} (heads sharded "
                f"alike for TP, seq sharded alike for CP); expected {format_placements(expected_kv)}, "
                f"got {format_placements(k_pl)} (q {format_placements(q_pl)}). "
                f"Fix: distribute k and v with q's placements."
            )
        self._check_divisible(q, k, q_pl, layout, mesh)
        self._check_shapes(q, k, v, q_pl, cp_axes)
        kv_pl = tuple(Replicate() if i in cp_axes else p for i, p in enumerate(k_pl))
        mesh_shape = tuple(mesh.shape)
        out_pl = infer_out_placements(
            q_pl, layout, inner.out_layout, global_shape=q.shape, mesh_shape=mesh_shape, module=self.name
        )
        lse_pl = None
        if inner.lse_layout is not None:
            lse_pl = infer_out_placements(
                q_pl, layout, inner.lse_layout, global_shape=q.shape, mesh_shape=mesh_shape, module=self.name
            )
        strided = [p for p in (*out_pl, *(lse_pl or ())) if isinstance(p, StridedShard)]
        if strided and not _compat.packed_strided_shard_usable():
            raise PlacementError(
                f"{self.name}: the packed {inner.out_layout.name} output under context parallel is "
                f"placed {format_placements(out_pl)}, which this torch cannot redistribute or "
                f"full_tensor() ({_compat.packed_strided_shard_probe()[1]}). Fix: "
                f"varlen_output=Layout.BLNH, or a local batch of 1 (placement Shard(0))."
            )
        kv_grad = tuple(Partial() if i in cp_axes else p for i, p in enumerate(k_pl))
        return AttentionPlacements(q_pl, kv_pl, out_pl, lse_pl, q_pl, kv_grad, cp_axes)

    def _check_placement_kinds(self, name: str, placements: Placements, layout: Layout) -> None:
        allowed = {Shard(layout.index(d)) for d in (Dim.B, Dim.L, Dim.N)}
        for axis, p in enumerate(placements):
            if isinstance(p, Replicate) or p in allowed:
                continue
            if isinstance(p, Partial):
                why = "Partial is a pending reduction; attention is not linear in q/k/v"
                fix = f"redistribute {name} to Replicate or Shard before attention"
            elif isinstance(p, Shard) and p.dim == layout.index(Dim.H):
                why = "head_dim is contracted inside the kernel and cannot be split"
                fix = f"shard heads (Shard({layout.heads_dim})) for TP or seq (Shard({layout.seq_dim})) for CP"
            else:
                why = "only batch, seq (CP) and heads (TP) may be sharded"
                fix = f"use Shard({layout.heads_dim}) for heads or Shard({layout.seq_dim}) for seq"
            raise PlacementError(
                f"{self.name}: {name} in {layout.name} has {p} on mesh axis {axis} "
                f"(placements {format_placements(placements)}); {why}. Expected Replicate, "
                f"Shard({layout.index(Dim.B)}), Shard({layout.seq_dim}) or Shard({layout.heads_dim}). Fix: {fix}."
            )

    def _check_divisible(self, q, k, q_pl, layout: Layout, mesh) -> None:
        for dim, what in ((layout.heads_dim, "heads"), (layout.seq_dim, "seq"), (layout.index(Dim.B), "batch")):
            ways = 1
            for axis, p in enumerate(q_pl):
                if p == Shard(dim):
                    ways *= mesh.shape[axis]
            for name, t in (("q", q), ("k/v", k)):
                if t.shape[dim] % ways:
                    axes = _axis_names(mesh, [a for a, p in enumerate(q_pl) if p == Shard(dim)])
                    raise PlacementError(
                        f"{self.name}: {name} has {t.shape[dim]} {what} in {layout.name}, not divisible by "
                        f"the {ways} ranks of mesh axes {axes} that shard it. Fix: choose a "
                        f"{what} count divisible by {ways}, or a smaller degree on {axes}."
                    )

    def _check_shapes(self, q, k, v, q_pl: Placements, cp_axes: tuple[int, ...]) -> None:
        """The inner module's input checks on global shapes, then what CP adds: one seq length."""
        layout, mesh = self.inner.in_layout, q.device_mesh
        heads_axes = [a for a, p in enumerate(q_pl) if p == Shard(layout.heads_dim)]
        config = getattr(self.inner, "config", None)
        check_qkv(self.name, layout, q, k, v, enable_gqa=getattr(config, "enable_gqa", None), scope="global",
                  heads_sharding=(_axis_names(mesh, heads_axes), math.prod(mesh.shape[a] for a in heads_axes)))
        seq_dim = layout.seq_dim
        if cp_axes and q.shape[seq_dim] != k.shape[seq_dim]:
            raise ValueError(
                f"{self.name}: q has seq {q.shape[seq_dim]} but k/v seq {k.shape[seq_dim]} (global), with "
                f"seq sharded over mesh axes {_axis_names(mesh, cp_axes)} (context parallel); the wrapper "
                f"gives k/v the sequence positions of q. Fix: give q, k and v one seq length, or do not "
                f"shard seq (no Shard({seq_dim}) in q's placements)."
            )

    def _check_mask_shapes(self, q, k, mask: DocumentMask, *, cp: bool) -> None:
        """The mask covers q's global (batch, seq); with context-parallel hooks on the inner
        module (apply_context_parallel), the whole sequence of which q is one CP chunk."""
        layout = self.inner.in_layout
        (q_batch, q_seq), (kv_batch, kv_seq) = batch_seq(q, layout), batch_seq(k, layout)
        hooks_mesh = hooks_cp_mesh(self.inner)
        scope, note = "global", ""
        if hooks_mesh is not None:
            degree = hooks_mesh.size()
            scope = f"the whole sequence: {q_seq} per rank x the {degree} ranks of the context-parallel hooks"
            q_seq, kv_seq = q_seq * degree, kv_seq * degree
        if cp or hooks_mesh is not None:
            note = ", with the global positions (permute_mask if load-balanced), not a CP shard's"
        check_mask_shapes(self.name, mask, q_BL=(q_batch, q_seq), kv_BL=(kv_batch, kv_seq), scope=scope, fix_note=note)

    def _check_local_shapes(self, local_q_shape, result, expected_shapes) -> None:
        if len(expected_shapes) == 2:
            if not (isinstance(result, tuple) and len(result) == 2):
                raise PlacementError(
                    f"{self.name}: the kernel declares an LSE (lse_layout {expected_shapes[1][1].name}), so it "
                    f"must return (out, lse); got a {type(result).__name__}. Fix: return (out, lse), or "
                    f"declare lse_layout = None."
                )
            outputs = result
        elif isinstance(result, (tuple, list)):
            raise PlacementError(
                f"{self.name}: the kernel returned a {type(result).__name__} of {len(result)} where it declares "
                f"one output (out_layout {expected_shapes[0][1].name}, no lse_layout). Fix: return the output "
                f"tensor alone, or declare an lse_layout for a second output (return_lse=True)."
            )
        else:
            outputs = (result,)
        for t, (what, layout, expected) in zip(outputs, expected_shapes):
            if not isinstance(t, torch.Tensor):
                raise PlacementError(
                    f"{self.name}: the kernel returned a {type(t).__name__} as its {what}; it declares a "
                    f"{layout.name} tensor. Fix: return a tensor in {layout.name}."
                )
            if tuple(t.shape) != expected:
                raise PlacementError(
                    f"{self.name}: the kernel returned a local {what} of shape {tuple(t.shape)}, but "
                    f"it declares {layout.name}, which for local q {local_q_shape} is "
                    f"{expected}. Fix: make the kernel return {layout.name}, or declare the "
                    f"layout it returns (out_layout/lse_layout)."
                )


def _axis_names(mesh, axes) -> list:
    """Mesh axes by name where the mesh names them (``['tp']``), else by index."""
    return [mesh.mesh_dim_names[a] if mesh.mesh_dim_names else a for a in axes]


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
