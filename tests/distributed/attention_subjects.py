"""Subjects for the conformance kit's tests: a tiny correct attention wrapper, and variants
that each carry one bug of docs/bugs.md (each docstring names its row).

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

``TinyAttention`` is written the way a user writes one on torch's ``local_map``, independently
of LocalMapAttention: an axis whose q placement shards seq (Shard(1)) is context parallel, one
that shards heads (Shard(2)) tensor parallel. k/v are gathered over CP axes in the style of
torch's ``_ContextParallel`` hook (each rank's chunk labelled Shard(seq_dim), redistributed to
Replicate), their gradients are Partial there, and each query is masked by its global position.
Every variant overrides one small method, so the kit's verdict on the base (it passes) and on
the variant (it is flagged) isolate that one mistake.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import local_map

from dtensor_attn import AttentionConfig, Layout, LocalMapAttention, infer_out_placements
from dtensor_attn.backends import SDPAAttention
from dtensor_attn.config import Backend
from dtensor_attn.masks import DocumentMask
from dtensor_attn.visibility import Visibility

BLNH = Layout.BLNH


class TinyAttention(nn.Module):
    """Correct full-mesh CP x TP attention on local_map (no document masks)."""

    seq_dim = 1  # the dim the CP gather concatenates: seq in BLNH

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        self.inner = config.build()

    def forward(self, q, k, v, mask=None):
        if mask is not None:
            raise ValueError("TinyAttention applies no document masks; run the kit with masks=('causal',)")
        k, v = self.gather_kv(k, q), self.gather_kv(v, q)
        return self.local_map(q)(q, k, v, *self.seq_index(q, k))

    def cp_axes(self, q) -> tuple[int, ...]:
        return tuple(i for i, p in enumerate(q.placements) if p == Shard(BLNH.seq_dim))

    def gather_kv(self, t: DTensor, q: DTensor) -> DTensor:
        cp, mesh = self.cp_axes(q), t.device_mesh
        if not cp:
            return t
        chunks = DTensor.from_local(t.to_local(), mesh, [Shard(self.seq_dim) if i in cp else p for i, p in enumerate(t.placements)])
        return chunks.redistribute(mesh, [Replicate() if i in cp else p for i, p in enumerate(t.placements)])

    def seq_index(self, q, k) -> tuple[DTensor, DTensor]:
        """Global position of each query (sharded like q's seq) and of each gathered key."""
        mesh, cp = q.device_mesh, self.cp_axes(q)
        q_index_L = distribute_tensor(torch.arange(q.shape[1]), mesh, [Shard(0) if i in cp else Replicate() for i in range(mesh.ndim)])
        kv_index_L = distribute_tensor(torch.arange(k.shape[1]), mesh, [Replicate()] * mesh.ndim)
        return q_index_L, kv_index_L

    def out_placements(self, q):
        mesh = q.device_mesh
        out = infer_out_placements(q.placements, BLNH, self.inner.out_layout, global_shape=q.shape, mesh_shape=mesh.shape)
        if self.inner.lse_layout is None:
            return list(out)  # local_map: a list is one output's placements
        lse = infer_out_placements(q.placements, BLNH, self.inner.lse_layout, global_shape=q.shape, mesh_shape=mesh.shape)
        return (out, lse)

    def grad_placements(self, q_pl, kv_pl, index_pl, cp):
        kv_grad = tuple(Partial() if i in cp else p for i, p in enumerate(kv_pl))
        return (q_pl, kv_grad, kv_grad, *index_pl)

    def local_map(self, q):
        mesh, cp, q_pl = q.device_mesh, self.cp_axes(q), tuple(q.placements)
        kv_pl = tuple(Replicate() if i in cp else p for i, p in enumerate(q_pl))
        index_pl = (tuple(Shard(0) if i in cp else Replicate() for i in range(mesh.ndim)), (Replicate(),) * mesh.ndim)
        return local_map(
            self.kernel, out_placements=self.out_placements(q), in_placements=(q_pl, kv_pl, kv_pl, *index_pl),
            in_grad_placements=self.grad_placements(q_pl, kv_pl, index_pl, cp), device_mesh=mesh, redistribute_inputs=True,
        )

    def kernel(self, q, k, v, q_index_L, kv_index_L):
        return self.inner(q, k, v, visibility=Visibility(self.inner.is_causal, None, q_index_L, kv_index_L))


class CopiedOutputPlacements(TinyAttention):
    """docs/bugs.md row 1: varlen's packed TNH output labelled with the BLNH input placements."""

    def out_placements(self, q):
        return list(q.placements)


class StaleSeqDimGather(TinyAttention):
    """docs/bugs.md row 2: the CP gather still uses seq_dim=2 (BNLH) after the move to BLNH, so it
    concatenates heads: an error with MHA, silently wrong values with GQA."""

    seq_dim = 2


class StaleSeqDimLabel(TinyAttention):
    """docs/bugs.md row 2, sdpa's symptom: numbers computed right, the CP boundary labelled Shard(2)."""

    def out_placements(self, q):
        cp = self.cp_axes(q)
        return [Shard(2) if i in cp else p for i, p in enumerate(super().out_placements(q))]


class LSEWithQPlacements(TinyAttention):
    """docs/bugs.md row 3: the LSE (BNL for sdpa) labelled with q's BLNH placements."""

    def out_placements(self, q):
        out, _ = super().out_placements(q)
        return (out, tuple(q.placements))


class MissingGradPlacements(TinyAttention):
    """docs/bugs.md row 4: in_grad_placements left out, so k/v gradients default to the forward
    placements (Replicate on CP) instead of Partial: under-reduced, silent."""

    def grad_placements(self, q_pl, kv_pl, index_pl, cp):
        return None


class PartialGradLabelledReplicate(TinyAttention):
    """docs/bugs.md row 5, Partial labelled Replicate: k/v gradients stated Replicate on CP."""

    def grad_placements(self, q_pl, kv_pl, index_pl, cp):
        return (q_pl, kv_pl, kv_pl, *index_pl)


class ReplicatedLabelledPartial(TinyAttention):
    """docs/bugs.md row 5, the reverse: a result computed whole on every rank declared Partial, so
    redistributing it sums world-size copies."""

    def forward(self, q, k, v, mask=None):
        mesh = q.device_mesh
        whole = super().forward(*(t.redistribute(mesh, [Replicate()] * mesh.ndim) for t in (q, k, v)), mask)
        return DTensor.from_local(whole.to_local(), mesh, [Partial()] * mesh.ndim).redistribute(mesh, q.placements)


class FirstCallCache(TinyAttention):
    """docs/bugs.md row 6: the local_map (and its placements and mesh) built on the first call and
    reused for every later call."""

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__(config)
        self._cached = None

    def forward(self, q, k, v, mask=None):
        if self._cached is None:
            self._cached = (self.local_map(q), self.seq_index(q, self.gather_kv(k, q)))
        fn, index = self._cached
        return fn(q, self.gather_kv(k, q), self.gather_kv(v, q), *index)


class _SDPASwallowingMasks(SDPAAttention):
    mask_type = DocumentMask  # accepts any document mask, as a kernel taking **kwargs does

    def forward(self, q, k, v, mask=None, *, visibility=None):
        if visibility is not None:
            visibility = visibility.with_mask(None)  # the mask vanishes here
        return super().forward(q, k, v, None, visibility=visibility)


def configured_flex_built_sdpa(config: AttentionConfig) -> LocalMapAttention:
    """docs/bugs.md row 7: the configured backend is not passed to the builder (sdpa is built), and
    sdpa drops the document mask it is handed."""
    return LocalMapAttention(_SDPASwallowingMasks(dataclasses.replace(config, backend=Backend.SDPA)))


def gqa_flag_dropped(config: AttentionConfig) -> LocalMapAttention:
    """docs/bugs.md row 8: enable_gqa not forwarded to the kernel: an error for Hq != Hkv."""
    return LocalMapAttention(dataclasses.replace(config, enable_gqa=False).build())


class TiledHeadExpansion(TinyAttention):
    """docs/bugs.md row 8, wrong values: head expansion moved into the wrapper by a refactor, tiled
    (repeat) where GQA groups neighbouring q heads (repeat_interleave)."""

    def kernel(self, q, k, v, q_index_L, kv_index_L):
        groups = q.shape[2] // k.shape[2]
        return super().kernel(q, k.repeat(1, 1, groups, 1), v.repeat(1, 1, groups, 1), q_index_L, kv_index_L)


class FlattenWithoutStride(TinyAttention):
    """docs/bugs.md row 10: packing seq-sharded (B, L) into T propagated as a plain Shard(0) of T,
    where the tokens of each rank are strided (_StridedShard(0, sf=B)): right shape, wrong values."""

    def out_placements(self, q):
        cp = self.cp_axes(q)
        return [Shard(0) if i in cp else p for i, p in enumerate(super().out_placements(q))]


class ForgetsCPOffset(TinyAttention):
    """docs/bugs.md row 11: queries masked by their local position; right only on the first CP rank,
    whose chunk starts at 0: a test that checks rank 0 alone passes."""

    def kernel(self, q, k, v, q_index_L, kv_index_L):
        return self.inner(q, k, v, visibility=Visibility(self.inner.is_causal, None, None, kv_index_L))
