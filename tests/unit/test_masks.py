"""Document masks as values (masks.py): ids from positions against a by-hand reading, over
every small position row; the shape checks and their messages.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from dtensor_attn.masks import (
    DocumentMask, check_mask_shapes, check_positions, describe, document_ids_from_positions,
)


def by_hand(row: list[int]) -> list[int]:
    """Document index of each token: it counts the document starts (position 0) so far."""
    ids, count = [], 0
    for position in row:
        count += position == 0
        ids.append(count)
    return ids


def position_rows(length: int):
    """Every row of ``length`` positions that restart at 0 or count up by one."""
    for starts in itertools.product((True, False), repeat=length - 1):
        row, position = [0], 0
        for start in starts:
            position = 0 if start else position + 1
            row.append(position)
        yield row


ROWS = [row for length in (1, 2, 3, 4, 5) for row in position_rows(length)]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: "".join(map(str, r)))
def test_document_ids_count_the_starts(row):
    ids_BL = document_ids_from_positions(torch.tensor([row, row[::-1]]))
    assert ids_BL[0].tolist() == by_hand(row)
    assert ids_BL[1].tolist() == by_hand(row[::-1])  # each batch row on its own


def test_a_row_that_does_not_start_at_zero_begins_with_document_zero():
    # a row continuing a document from a previous batch: its first tokens are document 0
    assert document_ids_from_positions(torch.tensor([[3, 4, 0, 1]])).tolist() == [[0, 0, 1, 1]]


def test_a_mask_from_positions_holds_the_same_ids_for_queries_and_keys():
    mask = DocumentMask.from_positions(torch.tensor([[0, 1, 0, 1, 2]]))
    assert mask.q_document_ids_BL is mask.kv_document_ids_BL
    assert mask.q_document_ids_BL.tolist() == [[1, 1, 2, 2, 2]]


def test_with_tensors_keeps_the_mask_type():
    class FlexMask(DocumentMask):
        pass

    mask = FlexMask.from_positions(torch.tensor([[0, 1]]))
    other = mask.with_tensors(torch.zeros(1, 1), torch.ones(1, 2))
    assert type(other) is FlexMask
    assert (other.q_document_ids_BL.shape, other.kv_document_ids_BL.shape) == ((1, 1), (1, 2))


@pytest.mark.parametrize("positions,error,needle", [
    ([0, 1, 2], TypeError, "positions_BL must be a (batch, seq) tensor or None, got list"),
    (torch.arange(3), ValueError, "positions_BL must be (batch, seq), got shape (3,). Fix: positions_BL[None]"),
    (torch.zeros(1, 2, 3), ValueError, "got shape (1, 2, 3)"),
    ("0,1,2", TypeError, "got str ('0,1,2')"),
], ids=["list", "1-d", "3-d", "str"])
def test_positions_that_are_not_a_batch_of_rows_are_refused(positions, error, needle):
    with pytest.raises(error) as raised:
        check_positions(positions)
    assert needle in str(raised.value)


MASK = DocumentMask(torch.zeros(2, 4, dtype=torch.int32), torch.zeros(2, 8, dtype=torch.int32))


@pytest.mark.parametrize("q_BL,kv_BL,bad", [
    ((2, 4), (2, 8), None),
    ((1, 4), (2, 8), "query"),
    ((2, 5), (2, 8), "query"),
    ((2, 4), (2, 4), "key/value"),
    ((2, 4), (1, 8), "key/value"),
], ids=["matches", "q-batch", "q-seq", "kv-seq", "kv-batch"])
def test_mask_shapes_are_held_to_q_and_kv(q_BL, kv_BL, bad):
    if bad is None:
        check_mask_shapes("attn", MASK, q_BL=q_BL, kv_BL=kv_BL)  # no error
    else:
        with pytest.raises(ValueError) as raised:
            check_mask_shapes("attn", MASK, q_BL=q_BL, kv_BL=kv_BL, scope="global",
                              fix_note=" (note)")
        text = str(raised.value)
        actual, expected = ((2, 4), q_BL) if bad == "query" else ((2, 8), kv_BL)
        assert text.startswith(f"attn: the mask's {bad} document ids are (batch, seq) = {actual}, ")
        assert f"= {expected} (global)" in text
        assert text.endswith(f"positions_BL of shape {expected}: make_attention_masks(config, "
                             "positions_BL) (note).")


@pytest.mark.parametrize("value,text", [
    (torch.zeros(2, 8, dtype=torch.bool), "Tensor of shape (2, 8) and dtype torch.bool"),
    ("abc", "str ('abc')"), (3, "int"), (None, "NoneType"), ([1], "list"),
], ids=["tensor", "str", "int", "none", "list"])
def test_values_are_described_by_kind(value, text):
    assert describe(value) == text
