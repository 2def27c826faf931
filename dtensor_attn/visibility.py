"""Visibility: which keys each local query may see, as one value.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

What a query sees depends on three things that travel together: whether attention is causal,
the packed documents (a ``DocumentMask``), and, under context parallelism, the global sequence
positions of the local queries and of the (gathered) keys. Each context-parallel path builds
one ``Visibility`` per call; every backend turns it into its kernel's form, here, in one place:
the dense (B, Lq, Lk) mask of the math kernel and sdpa, the ``mask_mod`` of flex's block mask,
the packed segments of varlen. Causality compares global positions, so a rank's query chunk
sees exactly the keys it would see unsharded, in any sequence order (head-tail included).
"""

from __future__ import annotations

import dataclasses

import torch

from dtensor_attn.masks import DocumentMask


@dataclasses.dataclass(frozen=True, slots=True)
class Visibility:
    """``q_seq_index_L`` / ``kv_seq_index_L``: global positions of the local queries and keys;
    None means 0..L-1 (the sequence is not sharded)."""

    is_causal: bool
    mask: DocumentMask | None = None
    q_seq_index_L: torch.Tensor | None = None
    kv_seq_index_L: torch.Tensor | None = None

    @property
    def sharded(self) -> bool:
        """Whether the queries or keys are a context-parallel view of a longer sequence."""
        return self.q_seq_index_L is not None or self.kv_seq_index_L is not None

    @property
    def sees_everything(self) -> bool:
        return not self.is_causal and self.mask is None

    def seq_indices(self, num_q: int, num_kv: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Global positions of the queries and keys (0..L-1 where not sharded)."""
        q_L = torch.arange(num_q, device=device) if self.q_seq_index_L is None else self.q_seq_index_L
        kv_L = torch.arange(num_kv, device=device) if self.kv_seq_index_L is None else self.kv_seq_index_L
        return q_L, kv_L

    def dense_mask(self, num_q: int, num_kv: int, device) -> torch.Tensor | None:
        """(1 or B, Lq, Lk) bool, True where the query may see the key; None for all keys."""
        allowed_BLL = None
        if self.is_causal:
            q_L, kv_L = self.seq_indices(num_q, num_kv, device)
            allowed_BLL = (kv_L[None, :] <= q_L[:, None])[None]
        if self.mask is not None:
            same_doc_BLL = self.mask.q_document_ids_BL[:, :, None] == self.mask.kv_document_ids_BL[:, None, :]
            allowed_BLL = same_doc_BLL if allowed_BLL is None else allowed_BLL & same_doc_BLL
        return allowed_BLL

    def mask_mod(self, num_q: int, num_kv: int, device):
        """flex_attention's ``mask_mod(b, h, q_idx, kv_idx)`` for this visibility, or None when
        every query sees every key."""
        if self.sees_everything:
            return None
        is_causal, mask = self.is_causal, self.mask
        q_L, kv_L = self.seq_indices(num_q, num_kv, device)

        def mask_mod(b, h, q_idx, kv_idx):
            ok = torch.ones((), dtype=torch.bool, device=device)
            if is_causal:
                ok = kv_L[kv_idx] <= q_L[q_idx]
            if mask is not None:
                ok = ok & (mask.q_document_ids_BL[b, q_idx] == mask.kv_document_ids_BL[b, kv_idx])
            return ok

        return mask_mod

    def with_mask(self, mask: DocumentMask | None) -> Visibility:
        return dataclasses.replace(self, mask=mask)
