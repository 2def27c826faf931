"""Head-tail load balancing for causal context parallelism.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

With a causal mask the last sequence chunk does the most work. Head-tail splits the sequence
into 2 * cp chunks and gives rank r chunks r and 2 * cp - 1 - r, so every rank does the same
work. The global tensor is permuted once (``permute_seq``) before it is sharded with
``Shard(seq_dim)``; LocalMapAttention(seq_order=SeqOrder.HEAD_TAIL) then masks each token by
its original position, and ``unpermute_seq`` restores the order of the output.

    L = 8, cp = 2: chunks of 2; order [c0, c3, c1, c2]
    permutation_L = [0, 1, 6, 7, 2, 3, 4, 5]; rank 0 holds positions 0, 1, 6, 7.
"""

from __future__ import annotations

import enum

import torch


class SeqOrder(enum.Enum):
    """How the sequence is laid out along the context-parallel shards."""

    CONTIGUOUS = "contiguous"
    HEAD_TAIL = "head_tail"


def head_tail_permutation(seq_len: int, cp_degree: int, device=None) -> torch.Tensor:
    """Original position of each index of the permuted sequence: (L,) int64."""
    num_chunks = 2 * cp_degree
    if seq_len % num_chunks:
        raise ValueError(
            f"head-tail load balancing splits seq into 2 * cp = {num_chunks} chunks; seq length "
            f"{seq_len} is not divisible by {num_chunks}. Fix: pad seq to a multiple of {num_chunks}."
        )
    chunk = seq_len // num_chunks
    order = []
    for rank in range(cp_degree):
        order += [rank, num_chunks - 1 - rank]
    chunks_L = torch.arange(seq_len, device=device).view(num_chunks, chunk)
    return chunks_L[order].reshape(seq_len)


def seq_permutation(order: SeqOrder, seq_len: int, cp_degree: int, device=None) -> torch.Tensor | None:
    """The permutation for ``order`` (None for the identity)."""
    if order is SeqOrder.CONTIGUOUS or cp_degree == 1:
        return None
    return head_tail_permutation(seq_len, cp_degree, device)


def global_seq_index(order: SeqOrder, seq_len: int, cp_degree: int, device=None) -> torch.Tensor:
    """Original position of each index of the sequence as sharded: the permutation, or arange."""
    permutation_L = seq_permutation(order, seq_len, cp_degree, device)
    return torch.arange(seq_len, device=device) if permutation_L is None else permutation_L


def permute_seq(x: torch.Tensor, permutation_L: torch.Tensor | None, seq_dim: int) -> torch.Tensor:
    """Reorder a global tensor's seq dim into shard order (a copy)."""
    return x if permutation_L is None else x.index_select(seq_dim, permutation_L.to(x.device))


def unpermute_seq(x: torch.Tensor, permutation_L: torch.Tensor | None, seq_dim: int) -> torch.Tensor:
    """Restore the original seq order of a tensor laid out by ``permute_seq``."""
    if permutation_L is None:
        return x
    inverse_L = torch.empty_like(permutation_L)
    inverse_L[permutation_L] = torch.arange(permutation_L.numel(), device=permutation_L.device)
    return x.index_select(seq_dim, inverse_L.to(x.device))


def permute_mask(mask, permutation_L: torch.Tensor | None):
    """A document mask made from the original positions, reordered like ``permute_seq``.

    Make masks before permuting: document ids come from where positions restart, which a
    permuted order no longer shows.
    """
    if mask is None or permutation_L is None:
        return mask
    return mask.with_tensors(
        permute_seq(mask.q_document_ids_BL, permutation_L, 1),
        permute_seq(mask.kv_document_ids_BL, permutation_L, 1),
    )
