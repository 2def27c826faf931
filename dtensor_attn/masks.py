"""Attention masks as values, made by the backend that will apply them.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

``positions_BL`` are per-token positions inside their document (0 where a document starts),
as packed-sequence training pipelines produce them. A mask holds document ids for the query
tokens and for the key/value tokens (the same tensor unless context parallel gathered k/v).
Each backend has its own mask type, so a mask handed to another backend is an error, and
``check_mask_shapes`` holds a mask to the q/k/v it is applied to: one row of document ids per
batch row and per token (a batch-1 mask would otherwise broadcast over every row).
"""

from __future__ import annotations

import dataclasses

import torch



def document_ids_from_positions(positions_BL: torch.Tensor) -> torch.Tensor:
    """Document index of each token: a new document starts wherever the position is 0."""
    check_positions(positions_BL)
    return torch.cumsum((positions_BL == 0).to(torch.int32), dim=1)


def check_positions(positions_BL) -> None:
    if not isinstance(positions_BL, torch.Tensor):
        raise TypeError(
            f"make_attention_masks: positions_BL must be a (batch, seq) tensor or None, got "
            f"{describe(positions_BL)}. Fix: torch.tensor(positions_BL), one row per batch row."
        )
    if positions_BL.dim() != 2:
        raise ValueError(
            f"make_attention_masks: positions_BL must be (batch, seq), got shape "
            f"{tuple(positions_BL.shape)}. Fix: positions_BL[None] for a single row; one row "
            f"per batch row of q."
        )


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


def check_mask_shapes(
    where: str,
    mask: DocumentMask,
    *,
    q_BL: tuple[int, int],
    kv_BL: tuple[int, int],
    scope: str = "",
    fix_note: str = "",
) -> None:
    """The mask's document ids are (batch, seq) of q (query ids) and of k/v (key/value ids).

    ``q_BL``/``kv_BL`` are (batch, seq) of q and k/v as the caller sees them: local in an inner
    attention, global in LocalMapAttention (``scope="global"`` says so in the message)."""
    tag = f" ({scope})" if scope else ""
    for what, name, ids_BL, expected in (
        ("query", "q is", mask.q_document_ids_BL, q_BL),
        ("key/value", "k/v are", mask.kv_document_ids_BL, kv_BL),
    ):
        actual = tuple(ids_BL.shape)
        if actual != tuple(expected):
            raise ValueError(
                f"{where}: the mask's {what} document ids are (batch, seq) = {actual}, but "
                f"{name} (batch, seq) = {tuple(expected)}{tag}; a mask holds one row of "
                f"document ids per batch row, one id per token. Fix: make the mask from "
                f"positions_BL of shape {tuple(expected)}: make_attention_masks(config, "
                f"positions_BL){fix_note}."
            )


def describe(value: object) -> str:
    """A value's kind for an error message: ``Tensor of shape (2, 8) and dtype torch.bool``."""
    if isinstance(value, torch.Tensor):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, str):
        return f"str ({value!r})"
    return type(value).__name__
