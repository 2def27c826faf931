"""The rank table, the shard-order decoding and the flatten reading, as pure functions.

The rank tables are checked against real local tensors in tests/distributed/test_explain_ranks.py;
here: torch's docstring example, uneven chunks, and the decoding against torch's own decoder.
"""

from __future__ import annotations

import doctest
import random

import pytest

from dtensor_attn import _compat
from dtensor_attn._compat import Partial, Replicate, Shard
from dtensor_attn.errors import PlacementError
from dtensor_attn.explain import explain_placements, rank_table
from dtensor_attn.explain.rank_table import format_indices


def test_torch_docstring_example():
    """torch's _StridedShard docstring: [8, 8], 2x2 mesh, [_S(0, 2), S(0)] -> rows 0-1, 4-5, 2-3, 6-7."""
    explained = explain_placements([_compat.strided_shard(0, 2), Shard(0)], (2, 2), (8, 8))
    rows = [shard.indices[0] for shard in explained.ranks]
    assert rows == [(0, 1), (4, 5), (2, 3), (6, 7)]
    assert [shard.indices[1] for shard in explained.ranks] == [tuple(range(8))] * 4
    assert explained.decodes and explained.shard_order == ((0, (1, 0)),)


def test_left_to_right_without_strided_shard():
    explained = explain_placements("S(0), S(0)", (2, 2), (8, 8))
    assert [shard.indices[0] for shard in explained.ranks] == [(0, 1), (2, 3), (4, 5), (6, 7)]


def test_the_module_docstring_table_is_what_the_tool_prints():
    """The worked example in rank_table's docstring is run as a doctest: it cannot drift."""
    result = doctest.testmod(rank_table, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted == 1 and result.failed == 0


def test_uneven_chunks_follow_torch_chunk():
    """5 rows on 4 ranks: torch.chunk gives 2, 2, 1 and an empty last shard."""
    explained = explain_placements("S(0)", (4,), (5,))
    assert [s.indices[0] for s in explained.ranks] == [(0, 1), (2, 3), (4,), ()]
    assert [s.local_shape for s in explained.ranks] == [(2,), (2,), (1,), (0,)]


def test_uneven_strided_shard_matches_torch_docstring_of_to_replicate():
    """torch's _to_replicate_tensor docstring: 9 elements, _S(0, 2) on 4 ranks -> [0,1,5], [2,3,6], [4,7], [8]."""
    explained = explain_placements("_S(0, 2)", (4,), (9,))
    assert [s.indices[0] for s in explained.ranks] == [(0, 1, 5), (2, 3, 6), (4, 7), (8,)]


def test_replicate_and_partial_hold_everything():
    explained = explain_placements([Partial("sum"), Replicate()], (2, 2), (3, 2))
    assert all(s.indices == ((0, 1, 2), (0, 1)) for s in explained.ranks)
    assert "P(sum) on axis 0, 2 ranks: every rank holds all indices, as addends" in explained.render()


def test_seed_placement_does_not_decode_and_names_the_flatten():
    explained = explain_placements("(_StridedShard(dim=1, sf=8),)", "8", "8,256")
    assert not explained.decodes
    (note,) = explained.strided
    assert "split factor 8 is not a product of the sizes of later mesh axes sharding dim 1" in note.reason
    assert "flatten of (8, 32) with the 32 sharded" in note.flatten
    # the pre-view reading is checked with DTensor's own view rule before it is printed
    assert "a DTensor view of a (8, 8, 32) tensor with placements (S(2)) as (8, 256) produces exactly this" in note.flatten
    assert "Shard(1) (heads)" in note.hint
    assert explained.ranks[1].indices[1][:8] == (4, 5, 6, 7, 36, 37, 38, 39)


def test_packed_tokens_under_cp_read_as_seq_shard_of_batch_rows():
    explained = explain_placements("(_S(0, 4), S(1))", "cp=2,tp=4", (32, 8, 3))
    (note,) = explained.strided
    assert "a DTensor view of a (4, 8, 8, 3) tensor with placements (S(1), S(2))" in note.flatten
    assert "the seq shard of a (B=4, L=8, ...) tensor viewed as (B*L, ...)" in note.hint
    assert explained.ranks[4].indices[0] == (4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31)


def test_three_axes_decode_in_torch_docstring_order():
    """torch's own example: mesh (4, 3, 2), (_S(0, 2), _S(0, 2), S(0)) is dim 0 on axes 2, 0, 1."""
    explained = explain_placements("_S(0, 2), _S(0, 2), S(0)", (4, 3, 2), (48,))
    assert explained.shard_order == ((0, (2, 0, 1)),)
    assert [n.decodes for n in explained.strided] == [True, True]
    assert "shard order (torch decodes it): dim 0 on axis 2, then axis 0, then axis 1" in explained.render()


def test_split_factor_that_does_not_divide_has_no_flatten_reading():
    (note,) = explain_placements("_S(0, 3)", (2,), (8,)).strided
    assert not note.decodes and note.hint is None
    assert note.flatten == (
        "no flatten of dim 0 gives it: rank 0 holds 8 of dim 0 before axis 0, 2 ranks, "
        "not a multiple of the split factor 3"
    )


def test_an_earlier_shard_of_the_merged_dim_splits_the_outer_part():
    """(S(0), _S(0, 2)) on 2x2: batch rows split on axis 0, seq inside them on axis 1."""
    explained = explain_placements("S(0), _S(0, 2)", "dp=2,cp=2", (24, 3))
    (note,) = explained.strided
    assert "a DTensor view of a (4, 6, 3) tensor with placements (S(0), S(1)) as (24, 3)" in note.flatten
    assert "context parallelism on cp" in note.hint
    assert [s.indices[0] for s in explained.ranks][:2] == [(0, 1, 2, 6, 7, 8), (3, 4, 5, 9, 10, 11)]


def test_axis_names_show_in_the_report_and_must_match_the_mesh():
    text = explain_placements("R, S(0)", (2, 2), (4,), mesh_names=("dp", "tp")).render()
    assert text.startswith("placements (R, S(0)) on mesh (dp=2, tp=2), global shape (4,)")
    with pytest.raises(PlacementError, match="1 axis names"):
        explain_placements("R, S(0)", (2, 2), (4,), mesh_names=("dp",))


def _random_placements(rng: random.Random, num_axes: int, ndim: int):
    choices = []
    for _ in range(num_axes):
        kind = rng.random()
        dim = rng.randrange(ndim)
        if kind < 0.2:
            choices.append(Replicate())
        elif kind < 0.55:
            choices.append(Shard(dim))
        else:
            choices.append(_compat.strided_shard(dim, rng.choice([2, 3, 4, 6, 8])))
    return choices


def test_decoding_agrees_with_torch_on_random_placements():
    """Our pure decoder gives torch's answer (decodes or not, and the order) on 500 cases."""
    rng = random.Random(0)
    num_undecodable = 0
    for _ in range(500):
        mesh = tuple(rng.choice([2, 3, 4]) for _ in range(rng.randint(1, 4)))
        placements = _random_placements(rng, len(mesh), rng.randint(1, 3))
        ours = explain_placements(placements, mesh, (48,) * 3).shard_order
        assert ours == _compat.torch_shard_order(placements, mesh), (placements, mesh)
        num_undecodable += ours is None
    assert 50 < num_undecodable < 450  # both answers were exercised


@pytest.mark.parametrize(
    "indices, size, expected",
    [
        (tuple(range(8)), 8, "all"),
        ((), 8, "none"),
        ((3,), 8, "3"),
        ((0, 1, 4, 5), 8, "0-1, 4-5"),
        (tuple(i for i in range(64) if i % 8 < 2), 64, "0-1, 8-9, ..., 56-57 (8 runs of 2, every 8)"),
        ((0, 2, 3, 7, 9, 20), 32, "0, 2-3, ..., 20 (5 runs, 6 indices)"),
    ],
)
def test_format_indices(indices, size, expected):
    assert format_indices(indices, size) == expected


@pytest.mark.parametrize(
    "placements, mesh_shape, shape, needle",
    [
        ("S(0), R", (8,), (8,), "2 placements (S(0), R) for a 1-D mesh (8,): expected one placement per mesh axis"),
        ("S(2)", (8,), (8, 256), "S(2) shards dim 2, but the global shape (8, 256) has 2 dims"),
    ],
)
def test_mismatches_raise_placement_error_with_a_fix(placements, mesh_shape, shape, needle):
    with pytest.raises(PlacementError) as info:
        explain_placements(placements, mesh_shape, shape)
    assert needle in str(info.value) and "Fix:" in str(info.value)


READINGS = [  # (placements, mesh, global shape): each has a flatten reading
    ("(_StridedShard(dim=1, sf=8),)", "8", "8,256"),
    ("(_S(0, 4), S(1))", "cp=2,tp=4", (32, 8, 3)),
    ("S(0), _S(0, 2)", "dp=2,cp=2", (24, 3)),
    ("S(1), _S(0, 2)", "tp=2,cp=2", (8, 6)),
    ("_S(1, 2), _S(0, 3)", (2, 2), (12, 8)),
]


@pytest.mark.parametrize("placements,mesh_text,shape", READINGS, ids=lambda x: str(x))
def test_flatten_readings_are_the_same_where_torch_refuses_the_view(request, placements, mesh_text, shape):
    """torch 2.11 refuses to flatten a sharded inner dim; the explainer then checks its flatten
    reading with the rule infer_out_placements uses, and must print the same report."""
    with_torch = explain_placements(placements, mesh_text, shape).render()
    assert "produces exactly this" in with_torch
    request.getfixturevalue("torch211_view_algebra")
    assert explain_placements(placements, mesh_text, shape).render() == with_torch


def test_a_large_mesh_table_elides_the_middle_ranks_and_keeps_every_rank_on_demand():
    explained = explain_placements("S(0)", (16,), (32,))
    rows = explained.table().splitlines()
    assert [row.split()[0] for row in rows[1:]] == ["0", "1", "2", "3", "...", "14", "15"]
    assert rows[5] == "... 10 more ranks"
    assert len(explained.ranks) == 16 and explained.rank(9).indices == ((18, 19),)


def test_plain_shards_stay_ranges_and_print_without_walking_the_indices():
    held = explain_placements("S(0), S(1)", (2, 2), (4_000_000, 8)).rank(3).held
    assert held == (range(2_000_000, 4_000_000), range(4, 8))
    assert format_indices(held[0], 4_000_000) == "2000000-3999999"


def test_a_split_factor_larger_than_the_dim_costs_no_more_than_the_dim():
    """torch.chunk of 8 into 2**31 - 1 pieces is 8 pieces of 1; each goes to rank 0 of 2."""
    explained = explain_placements("_S(0, 2147483647)", (2,), (8,))
    assert [s.indices[0] for s in explained.ranks] == [tuple(range(8)), ()]
