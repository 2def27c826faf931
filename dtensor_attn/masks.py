"""Attention masks as values, made by the backend that will apply them.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

``positions_BL`` are per-token positions inside their document (0 where a document starts),
as packed-sequence training pipelines produce them. A mask holds document ids for the query
tokens and for the key/value tokens (the same tensor unless context parallel gathered k/v).
Each backend has its own mask type, so a mask handed to another backend is an error.
"""

from __future__ import annotations

import dataclasses

import torch


def document_ids_from_positions(positions_BL: torch.Tensor) -> torch.Tensor:
    """Document index of each token: a new document starts wherever the position is 0."""
    if positions_BL.dim() != 2:
        raise ValueError(f"positions must be (batch, seq), got shape {tuple(positions_BL.shape)}")
    return torch.cumsum((positions_BL == 0).to(torch.int32), dim=1)


@dataclasses.dataclass(frozen=True)
class DocumentMask:
    """Packed documents: a token attends only to tokens of its own document (and, if causal,
    not to later ones). The subclass says which backend it is for."""

    q_document_ids_BL: torch.Tensor
    kv_document_ids_BL: torch.Tensor

    @classmethod
    def from_positions(cls, positions_BL: torch.Tensor) -> DocumentMask:
        ids_BL = document_ids_from_positions(positions_BL)
        return cls(q_document_ids_BL=ids_BL, kv_document_ids_BL=ids_BL)

    def with_tensors(self, q_document_ids_BL, kv_document_ids_BL) -> DocumentMask:
        return type(self)(q_document_ids_BL=q_document_ids_BL, kv_document_ids_BL=kv_document_ids_BL)


def make_attention_masks(config, positions_BL: torch.Tensor | None):
    """The mask for ``config.backend``, from the same registry entry that builds the module."""
    from dtensor_attn.backends import REGISTRY

    return REGISTRY[config.backend].make_masks(config, positions_BL)
