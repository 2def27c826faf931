"""Head-tail load balancing (load_balance.py) against a direct construction, over small cases.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

The oracle is the rule stated in the module's docstring, built position by position: split L
into 2 * cp chunks; rank r holds chunk r then chunk 2 * cp - 1 - r.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dtensor_attn.load_balance import (
    SeqOrder, global_seq_index, head_tail_permutation, permute_mask, permute_seq, seq_permutation,
    unpermute_seq,
)
from dtensor_attn.masks import DocumentMask

CASES = [(seq_len, cp) for cp in (1, 2, 3, 4) for seq_len in (2 * cp, 4 * cp, 6 * cp)]


def _case_id(case) -> str:
    return f"L{case[0]}-cp{case[1]}"


def direct_permutation(seq_len: int, cp: int) -> list[int]:
    """Original position of each index of the permuted sequence, by the docstring's rule."""
    chunk = seq_len // (2 * cp)
    order = []
    for rank in range(cp):
        for c in (rank, 2 * cp - 1 - rank):
            order += [c * chunk + i for i in range(chunk)]
    return order


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_permutation_is_the_docstring_rule(case):
    seq_len, cp = case
    assert head_tail_permutation(seq_len, cp).tolist() == direct_permutation(seq_len, cp)


def test_the_docstring_example():
    assert head_tail_permutation(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_every_rank_does_the_same_causal_work(case):
    """Causal work of a query is its position + 1 keys; head-tail makes the per-rank sums equal."""
    seq_len, cp = case
    permutation_L = head_tail_permutation(seq_len, cp)
    per_rank = (permutation_L + 1).view(cp, seq_len // cp).sum(dim=1)
    assert per_rank.unique().numel() == 1
    if cp > 1:  # contiguous chunks would not be balanced: the point of the permutation
        contiguous = (torch.arange(seq_len) + 1).view(cp, seq_len // cp).sum(dim=1)
        assert contiguous.unique().numel() == cp


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_permutation_is_a_permutation_and_unpermute_inverts_it(case):
    seq_len, cp = case
    permutation_L = head_tail_permutation(seq_len, cp)
    assert sorted(permutation_L.tolist()) == list(range(seq_len))
    x_BLNH = torch.randn(2, seq_len, 3, 2)
    for seq_dim in (1,):
        permuted = permute_seq(x_BLNH, permutation_L, seq_dim)
        assert torch.equal(permuted[:, 0], x_BLNH[:, permutation_L[0]])
        assert torch.equal(unpermute_seq(permuted, permutation_L, seq_dim), x_BLNH)
    x_BNLH = x_BLNH.transpose(1, 2)
    assert torch.equal(unpermute_seq(permute_seq(x_BNLH, permutation_L, 2), permutation_L, 2), x_BNLH)


@pytest.mark.parametrize("seq_len,cp", [(6, 2), (5, 1), (10, 3), (7, 4)], ids=lambda v: str(v))
def test_a_seq_not_divisible_by_twice_cp_is_refused_with_the_fix(seq_len, cp):
    with pytest.raises(ValueError, match=rf"2 \* cp = {2 * cp} chunks; seq length {seq_len} is not "
                                         rf"divisible by {2 * cp}\. Fix: pad seq"):
        head_tail_permutation(seq_len, cp)


@pytest.mark.parametrize("order,cp", list(itertools.product(SeqOrder, (1, 2, 4))),
                         ids=lambda v: getattr(v, "name", str(v)))
def test_seq_permutation_is_none_exactly_where_the_order_is_the_identity(order, cp):
    permutation_L = seq_permutation(order, 16, cp)
    identity = order is SeqOrder.CONTIGUOUS or cp == 1
    assert (permutation_L is None) == identity
    index_L = global_seq_index(order, 16, cp)
    expected = list(range(16)) if identity else direct_permutation(16, cp)
    assert index_L.tolist() == expected and index_L.dtype == torch.int64


def test_the_identity_permutation_returns_its_input_unchanged():
    x = torch.randn(2, 4)
    assert permute_seq(x, None, 1) is x and unpermute_seq(x, None, 1) is x
    assert permute_mask(None, head_tail_permutation(4, 2)) is None


def test_a_permuted_mask_keeps_each_tokens_document():
    positions_BL = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2], [0, 1, 2, 3, 4, 5, 6, 7]])
    mask = DocumentMask.from_positions(positions_BL)
    permutation_L = head_tail_permutation(8, 2)
    permuted = permute_mask(mask, permutation_L)
    for b, i in itertools.product(range(2), range(8)):
        original = int(permutation_L[i])
        assert permuted.q_document_ids_BL[b, i] == mask.q_document_ids_BL[b, original]
        assert permuted.kv_document_ids_BL[b, i] == mask.kv_document_ids_BL[b, original]
    # made before permuting: the ids are those of the original positions, not recomputed
    assert not torch.equal(permuted.q_document_ids_BL,
                           DocumentMask.from_positions(positions_BL[:, permutation_L]).q_document_ids_BL)
