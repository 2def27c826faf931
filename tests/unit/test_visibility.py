"""Visibility: one value, three kernel forms (dense mask, flex mask_mod, varlen segments) that agree.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dtensor_attn import AttentionConfig, SeqOrder, Visibility, make_attention_masks
from dtensor_attn.backends.varlen_segments import pack_segments
from dtensor_attn.load_balance import global_seq_index, permute_mask

CPU = torch.device("cpu")
POSITIONS_BL = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]])


def _rank_visibility(is_causal, documents, cp, rank, order):
    """CP rank ``rank``'s view of POSITIONS_BL (L=8) over ``cp`` ranks in ``order``."""
    mask = make_attention_masks(AttentionConfig(backend="flex"), POSITIONS_BL) if documents else None
    index_L = global_seq_index(order, 8, cp)
    rows = slice(rank * 8 // cp, (rank + 1) * 8 // cp)
    if mask is not None:
        mask = permute_mask(mask, index_L)
        mask = mask.with_tensors(mask.q_document_ids_BL[:, rows], mask.kv_document_ids_BL)
    if cp == 1:
        return Visibility(is_causal, mask)
    return Visibility(is_causal, mask, index_L[rows], index_L)


def _cases():
    for is_causal, documents, (cp, order) in itertools.product(
        (True, False), (True, False), ((1, SeqOrder.CONTIGUOUS), (2, SeqOrder.CONTIGUOUS), (2, SeqOrder.HEAD_TAIL))
    ):
        for rank in range(cp):
            yield pytest.param(is_causal, documents, cp, rank, order,
                               id=f"{'causal' if is_causal else 'full'}-{'docs' if documents else 'nodocs'}-cp{cp}-{order.value}-rank{rank}")


@pytest.mark.parametrize("is_causal,documents,cp,rank,order", list(_cases()))
def test_mask_mod_and_segments_agree_with_the_dense_mask(is_causal, documents, cp, rank, order):
    visibility = _rank_visibility(is_causal, documents, cp, rank, order)
    num_q, num_kv = 8 // cp, 8
    dense_BQK = visibility.dense_mask(num_q, num_kv, CPU)
    if dense_BQK is None:
        dense_BQK = torch.ones(1, num_q, num_kv, dtype=torch.bool)
    dense_BQK = dense_BQK.expand(2, num_q, num_kv)
    mask_mod = visibility.mask_mod(num_q, num_kv, CPU)
    assert (mask_mod is None) is visibility.sees_everything
    if mask_mod is not None:
        for b, q, kv in itertools.product(range(2), range(num_q), range(num_kv)):
            assert bool(mask_mod(b, 0, torch.tensor(q), torch.tensor(kv))) == bool(dense_BQK[b, q, kv])
    # varlen: with flash's bottom-right causal alignment (query i of a run of Lq sees its first
    # i + Lk - Lq + 1 keys of Lk), each query sees exactly what the dense mask lets it see.
    segments = pack_segments(visibility, batch=2, num_q=num_q, num_kv=num_kv, device=CPU)
    kv_tokens_T = torch.arange(2 * num_kv) if segments.kv_token_index_T is None else segments.kv_token_index_T
    cu_q, cu_kv = segments.cu_seq_q.tolist(), segments.cu_seq_kv.tolist()
    covered = 0
    for s in range(len(cu_q) - 1):
        keys = kv_tokens_T[cu_kv[s]:cu_kv[s + 1]].tolist()
        num_run_q, num_run_kv = cu_q[s + 1] - cu_q[s], len(keys)
        for i, token in enumerate(range(cu_q[s], cu_q[s + 1])):
            b, q = divmod(token, num_q)
            sees = keys[: i + num_run_kv - num_run_q + 1] if is_causal else keys
            assert set(sees) == {b * num_kv + kv for kv in range(num_kv) if dense_BQK[b, q, kv]}, (s, token)
            covered += 1
    assert covered == 2 * num_q  # every query in exactly one run


def test_sharded_means_seq_positions_were_given():
    assert not Visibility(True).sharded
    assert Visibility(True, None, torch.arange(4), torch.arange(8)).sharded
    assert Visibility(False).sees_everything and not Visibility(True).sees_everything


def test_inner_attention_refuses_a_mask_beside_a_visibility_and_a_causality_mismatch():
    module = AttentionConfig(backend="flex").build()
    mask = make_attention_masks(AttentionConfig(backend="flex"), POSITIONS_BL)
    q = torch.randn(2, 8, 2, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="got a mask and a visibility; the visibility carries the mask"):
        module(q, q, q, mask, visibility=Visibility(True, mask))
    with pytest.raises(ValueError, match=r"visibility must be a Visibility with is_causal=True \(this module's\)"):
        module(q, q, q, visibility=Visibility(False, mask))
    torch.testing.assert_close(module(q, q, q, visibility=Visibility(True, mask)), module(q, q, q, mask))
