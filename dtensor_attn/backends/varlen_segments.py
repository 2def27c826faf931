"""Turn a batch (and its document mask) into varlen's packed sequences: cu_seqlens and maxima.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

One varlen sequence per run of query tokens of one (batch row, document) with consecutive
global indices. Its keys are that document's keys of the row, causal ones up to the run's last
query: with varlen's bottom-right causal alignment that is exactly "a key at or before the
query". Without context parallelism the keys of a run are the run itself, so cu_seq_kv is
cu_seq_q and nothing is gathered; under context parallelism the keys are gathered into a new
packed tensor (``kv_token_index_T``).
"""

from __future__ import annotations

import dataclasses

import torch

from dtensor_attn.visibility import Visibility


@dataclasses.dataclass(frozen=True, slots=True)
class Segments:
    cu_seq_q: torch.Tensor
    cu_seq_kv: torch.Tensor
    max_q: int
    max_kv: int
    kv_token_index_T: torch.Tensor | None  # None: k/v are packed as they are


def pack_segments(visibility: Visibility, *, batch: int, num_q: int, num_kv: int, device: torch.device) -> Segments:
    """varlen's sequences for ``visibility`` on a batch of ``num_q`` queries and ``num_kv`` keys per row."""
    mask = visibility.mask
    unsharded = not visibility.sharded and num_q == num_kv
    if unsharded and mask is None:
        cu_T = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * num_q
        return Segments(cu_T, cu_T, num_q, num_q, None)
    if unsharded:
        cu_T = _document_boundaries(mask.q_document_ids_BL)
        max_len = int((cu_T[1:] - cu_T[:-1]).max().item())
        return Segments(cu_T, cu_T, max_len, max_len, None)
    return _gathered_segments(batch, num_q, num_kv, visibility, device)


def _document_boundaries(document_ids_BL: torch.Tensor) -> torch.Tensor:
    """Cumulative starts of each (row, document) run, ending with the token count."""
    batch, seq = document_ids_BL.shape
    ids_T = document_ids_BL.reshape(-1)
    new_row_T = (torch.arange(batch * seq, device=ids_T.device) % seq) == 0
    change_T = torch.ones_like(new_row_T)
    change_T[1:] = ids_T[1:] != ids_T[:-1]
    starts = torch.nonzero(change_T | new_row_T).flatten()
    end = torch.tensor([batch * seq], device=ids_T.device)
    return torch.cat([starts, end]).to(torch.int32)


def _gathered_segments(batch, num_q, num_kv, visibility: Visibility, device):
    is_causal, mask = visibility.is_causal, visibility.mask
    q_index_L, kv_index_L = visibility.seq_indices(num_q, num_kv, device)
    q_index, kv_index = q_index_L.tolist(), kv_index_L.tolist()
    q_docs = [[0] * num_q] * batch if mask is None else mask.q_document_ids_BL.tolist()
    kv_docs = [[0] * num_kv] * batch if mask is None else mask.kv_document_ids_BL.tolist()
    q_lens, kv_tokens, kv_lens = [], [], []
    for b in range(batch):
        start = 0
        for i in range(1, num_q + 1):
            run_ends = i == num_q or q_docs[b][i] != q_docs[b][start] or q_index[i] != q_index[i - 1] + 1
            if not run_ends:
                continue
            doc, last = q_docs[b][start], q_index[i - 1]
            keys = [
                b * num_kv + j
                for j in sorted(range(num_kv), key=kv_index.__getitem__)
                if kv_docs[b][j] == doc and (not is_causal or kv_index[j] <= last)
            ]
            q_lens.append(i - start)
            kv_lens.append(len(keys))
            kv_tokens.extend(keys)
            start = i
    cu_q = torch.tensor([0, *_cumsum(q_lens)], dtype=torch.int32, device=device)
    cu_kv = torch.tensor([0, *_cumsum(kv_lens)], dtype=torch.int32, device=device)
    identity = kv_tokens == list(range(batch * num_kv))
    kv_token_index_T = None if identity else torch.tensor(kv_tokens, device=device)
    return Segments(cu_q, cu_kv, max(q_lens), max(kv_lens), kv_token_index_T)


def _cumsum(values: list[int]) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out
