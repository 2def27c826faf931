"""Float64 single-device references for attention tests, built from the same global tensors.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Tests make global q/k/v here (in the dtype and head_dim the mesh's device needs:
``precision_for``), distribute them, and compare every rank's full result with the reference
computed here, unsharded, by the math kernel in float64. ``cp_rank_view`` is what one
context-parallel rank hands its kernel, for tests of a kernel path on one rank.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from dtensor_attn._compat import maybe_disable_local_tensor_mode
from dtensor_attn.backends.math_kernel import math_attention
from dtensor_attn.layout import Layout
from dtensor_attn.load_balance import SeqOrder, global_seq_index, permute_mask, permute_seq, seq_permutation
from dtensor_attn.masks import DocumentMask
from dtensor_attn.visibility import Visibility


@dataclasses.dataclass(frozen=True, slots=True)
class AttentionInputs:
    """Global q/k/v in BLNH (float64), and per-token positions for packed documents."""

    q_BLNH: torch.Tensor
    k_BLNH: torch.Tensor
    v_BLNH: torch.Tensor
    positions_BL: torch.Tensor | None


@dataclasses.dataclass(frozen=True, slots=True)
class Precision:
    """The input dtype, smallest head_dim and tolerance of a distributed test on one device.

    The reference is always float64, computed from the same (rounded) input values."""

    dtype: torch.dtype
    min_head_dim: int
    rtol: float
    atol: float

    def head_dim(self, wanted: int) -> int:
        return max(wanted, self.min_head_dim)

    @property
    def tol(self) -> dict[str, float]:
        return dict(rtol=self.rtol, atol=self.atol)


# CPU (gloo or simulated ranks): inputs, kernels and reference are float64; only reduction order
# differs (~1e-15 relative), so 1e-9 leaves six orders of margin, and any placement or CP
# mistake moves values by O(0.1).
CPU_PRECISION = Precision(torch.float64, 1, 1e-9, 1e-9)
# CUDA: flash sdpa and varlen_attn take bf16/fp16 only, compiled flex needs head_dim >= 16
# ("NYI: embedding dimension ... must be at least 16", seen on the H200 with torch 2.11). The
# kernels round P and the output to bf16 (2^-8 relative) and accumulate in fp32: outputs
# (|out| <= max |v| ~ 4) and gradients of a sum loss keep a few bf16 ulps, so 5e-2 absolute and
# relative, while a placement mistake still moves values by O(1).
CUDA_PRECISION = Precision(torch.bfloat16, 16, 5e-2, 5e-2)


def precision_for(device_type: str) -> Precision:
    """The precision a test on a ``device_type`` mesh uses (``mesh.device_type``)."""
    return CUDA_PRECISION if device_type == "cuda" else CPU_PRECISION


def make_inputs(
    *,
    batch: int = 2,
    seq: int = 8,
    num_q_heads: int = 8,
    num_kv_heads: int = 8,
    head_dim: int = 8,
    documents: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> AttentionInputs:
    """Deterministic inputs (the same on every rank). With ``documents``, each row is packed
    with documents of uneven lengths, cut at different places in each row."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        # Simulated ranks draw random numbers per rank: draw outside them, once, for all ranks.
        with maybe_disable_local_tensor_mode():
            return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)

    q_BLNH = randn(batch, seq, num_q_heads, head_dim)
    k_BLNH = randn(batch, seq, num_kv_heads, head_dim)
    v_BLNH = randn(batch, seq, num_kv_heads, head_dim)
    positions_BL = None
    if documents:
        rows = []
        for b in range(batch):
            cut_a, cut_b = (seq * (b + 1)) // (batch + 3) + 1, (seq * 2) // 3 + b % 2
            starts = sorted({0, cut_a, max(cut_a + 1, cut_b)} - {seq})
            row = torch.arange(seq)
            for start in starts:
                row[start:] = torch.arange(seq - start)
            rows.append(row)
        positions_BL = torch.stack(rows)
    return AttentionInputs(q_BLNH, k_BLNH, v_BLNH, positions_BL)


def make_mesh_inputs(mesh, *, head_dim: int = 8, **kwargs) -> AttentionInputs:
    """``make_inputs`` in the dtype and (at least) the head_dim that the native kernels on the
    mesh's device take (``precision_for(mesh.device_type)``)."""
    precision = precision_for(mesh.device_type)
    return make_inputs(head_dim=precision.head_dim(head_dim), dtype=precision.dtype, **kwargs)


@dataclasses.dataclass(frozen=True, slots=True)
class CPRankView:
    """What one context-parallel rank hands the inner attention's kernel: its query chunk of
    the sequence in shard order with their global seq indices, and every key and value (as
    all-gathered) with theirs; the document mask's query rows of the rank, all key rows.
    Without CP (one rank, contiguous order) the indices are None, as LocalMapAttention passes."""

    q_BLNH: torch.Tensor
    k_BLNH: torch.Tensor
    v_BLNH: torch.Tensor
    mask: DocumentMask | None
    q_seq_index_L: torch.Tensor | None
    kv_seq_index_L: torch.Tensor | None

    def visibility(self, is_causal: bool) -> Visibility:
        """What this rank's queries may see, as the CP paths hand it to the inner attention."""
        return Visibility(is_causal, self.mask, self.q_seq_index_L, self.kv_seq_index_L)


def cp_rank_view(
    inputs: AttentionInputs, mask: DocumentMask | None, *, cp_degree: int, rank: int, order: SeqOrder
) -> CPRankView:
    """Rank ``rank``'s view of global ``inputs`` and the mask made from their positions (in
    the original order), with the sequence laid out by ``order`` over ``cp_degree`` ranks.
    tests/distributed/test_context_parallel.py checks that LocalMapAttention hands exactly this."""
    index_L = global_seq_index(order, inputs.q_BLNH.shape[1], cp_degree)
    permutation_L = seq_permutation(order, inputs.q_BLNH.shape[1], cp_degree)
    chunk_L = index_L.chunk(cp_degree)[rank]
    rows = slice(rank * chunk_L.numel(), (rank + 1) * chunk_L.numel())
    q_BLNH, k_BLNH, v_BLNH = (permute_seq(t, permutation_L, 1) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    if mask is not None:
        mask = permute_mask(mask, permutation_L)
        mask = mask.with_tensors(mask.q_document_ids_BL[:, rows], mask.kv_document_ids_BL)
    sharded = cp_degree > 1
    return CPRankView(q_BLNH[:, rows], k_BLNH, v_BLNH, mask,
                      chunk_L if sharded else None, index_L if sharded else None)


def reference_attention(
    inputs: AttentionInputs,
    *,
    is_causal: bool = True,
    scale: float | None = None,
    use_documents: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_BLNH, lse_BLN) in float64, unsharded."""
    q_BNLH, k_BNLH, v_BNLH = (t.double().transpose(1, 2) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    mask = None
    if use_documents and inputs.positions_BL is not None:
        mask = DocumentMask.from_positions(inputs.positions_BL)
    seq = q_BNLH.shape[2]
    allowed_BLL = Visibility(is_causal, mask).dense_mask(seq, seq, q_BNLH.device)
    scale = scale if scale is not None else 1.0 / math.sqrt(q_BNLH.shape[-1])
    out_BNLH, lse_BNL = math_attention(q_BNLH, k_BNLH, v_BNLH, allowed_BLL, scale=scale, enable_gqa=True)
    return out_BNLH.transpose(1, 2), lse_BNL.transpose(1, 2)


def to_layout(t_BLNH: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A BLNH tensor (or a BLN LSE) in another layout of the same values."""
    if layout in (Layout.BLNH, Layout.BLN):
        return t_BLNH
    if layout in (Layout.BNLH, Layout.BNL):
        return t_BLNH.transpose(1, 2)
    if layout in (Layout.TNH, Layout.TN):
        return t_BLNH.reshape(t_BLNH.shape[0] * t_BLNH.shape[1], *t_BLNH.shape[2:])
    raise ValueError(f"no conversion from BLNH to {layout!r}")
