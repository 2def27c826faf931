"""varlen's packed sequences (backends/varlen_segments.py) over random documents and every CP
rank of cp 1 to 4, contiguous and head-tail, against the dense mask read as a brute force.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

What a set of segments means, with flash's bottom-right causal alignment: query i of a run of
Lq queries whose keys are Lk tokens sees the first i + Lk - Lq + 1 of them (all of them when
not causal). Every query must see exactly the keys the dense mask allows, and the segments'
structure (cumulative lengths, maxima, the gathered key order) must be consistent.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from dtensor_attn import SeqOrder, Visibility
from dtensor_attn.backends.varlen_segments import pack_segments
from dtensor_attn.load_balance import global_seq_index, permute_mask
from dtensor_attn.masks import DocumentMask

CPU = torch.device("cpu")
BATCH, SEQ = 2, 16


def random_positions(seed: int) -> torch.Tensor:
    """(BATCH, SEQ) positions: documents of random lengths, restarting at 0."""
    rng = random.Random(seed)
    rows = []
    for _ in range(BATCH):
        row = []
        while len(row) < SEQ:
            row += list(range(rng.randint(1, SEQ)))
        rows.append(row[:SEQ])
    return torch.tensor(rows)


def rank_view(positions_BL, is_causal, documents, cp, rank, order):
    """CP rank ``rank``'s Visibility, and its numbers of local queries and gathered keys."""
    mask = DocumentMask.from_positions(positions_BL) if documents else None
    index_L = global_seq_index(order, SEQ, cp)
    rows = slice(rank * SEQ // cp, (rank + 1) * SEQ // cp)
    if mask is not None:
        mask = permute_mask(mask, index_L)
        mask = mask.with_tensors(mask.q_document_ids_BL[:, rows], mask.kv_document_ids_BL)
    if cp == 1:
        return Visibility(is_causal, mask), SEQ, SEQ
    return Visibility(is_causal, mask, index_L[rows], index_L), SEQ // cp, SEQ


def _cases():
    for seed, is_causal, documents in itertools.product(range(3), (True, False), (True, False)):
        for cp, order in ((1, SeqOrder.CONTIGUOUS), (2, SeqOrder.HEAD_TAIL), (4, SeqOrder.CONTIGUOUS),
                          (4, SeqOrder.HEAD_TAIL)):
            for rank in range(cp):
                yield pytest.param(seed, is_causal, documents, cp, rank, order, id=(
                    f"seed{seed}-{'causal' if is_causal else 'full'}-"
                    f"{'docs' if documents else 'nodocs'}-cp{cp}-{order.value}-rank{rank}"))


@pytest.mark.parametrize("seed,is_causal,documents,cp,rank,order", list(_cases()))
def test_segments_give_each_query_exactly_the_keys_the_dense_mask_allows(
    seed, is_causal, documents, cp, rank, order
):
    visibility, num_q, num_kv = rank_view(random_positions(seed), is_causal, documents, cp, rank,
                                          order)
    segments = pack_segments(visibility, batch=BATCH, num_q=num_q, num_kv=num_kv, device=CPU)
    allowed_BQK = visibility.dense_mask(num_q, num_kv, CPU)
    allowed_BQK = (torch.ones(1, num_q, num_kv, dtype=torch.bool) if allowed_BQK is None
                   else allowed_BQK).expand(BATCH, num_q, num_kv)
    cu_q, cu_kv = segments.cu_seq_q.tolist(), segments.cu_seq_kv.tolist()
    kv_T = (list(range(BATCH * num_kv)) if segments.kv_token_index_T is None
            else segments.kv_token_index_T.tolist())
    # structure: cumulative lengths from 0 to every token, maxima, dtypes flash expects
    assert cu_q[0] == cu_kv[0] == 0 and cu_q[-1] == BATCH * num_q and cu_kv[-1] == len(kv_T)
    assert len(cu_q) == len(cu_kv)
    q_lens = [b - a for a, b in zip(cu_q, cu_q[1:])]
    kv_lens = [b - a for a, b in zip(cu_kv, cu_kv[1:])]
    assert min(q_lens) > 0 and (segments.max_q, segments.max_kv) == (max(q_lens), max(kv_lens))
    assert segments.cu_seq_q.dtype == segments.cu_seq_kv.dtype == torch.int32
    # meaning: each query sees exactly what the dense mask allows
    for s, (q_len, kv_len) in enumerate(zip(q_lens, kv_lens)):
        keys = kv_T[cu_kv[s]:cu_kv[s + 1]]
        for i, token in enumerate(range(cu_q[s], cu_q[s + 1])):
            b, q = divmod(token, num_q)
            sees = keys[: i + kv_len - q_len + 1] if is_causal else keys
            expected = {b * num_kv + k for k in range(num_kv) if allowed_BQK[b, q, k]}
            assert set(sees) == expected and len(sees) == len(expected), (s, token)


@pytest.mark.parametrize("seed", range(3))
def test_without_context_parallel_nothing_is_gathered(seed):
    mask = DocumentMask.from_positions(random_positions(seed))
    segments = pack_segments(Visibility(True, mask), batch=BATCH, num_q=SEQ, num_kv=SEQ, device=CPU)
    assert segments.kv_token_index_T is None and segments.cu_seq_kv is segments.cu_seq_q
    # one segment per (row, document): the document starts, row by row
    starts = [b * SEQ + i for b in range(BATCH) for i in range(SEQ)
              if i == 0 or mask.q_document_ids_BL[b, i] != mask.q_document_ids_BL[b, i - 1]]
    assert segments.cu_seq_q.tolist() == [*starts, BATCH * SEQ]


def test_without_documents_each_batch_row_is_one_sequence():
    segments = pack_segments(Visibility(True), batch=3, num_q=5, num_kv=5, device=CPU)
    assert segments.cu_seq_q.tolist() == [0, 5, 10, 15] and (segments.max_q, segments.max_kv) == (5, 5)
    assert segments.kv_token_index_T is None
