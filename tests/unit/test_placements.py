"""The pure placement mapping: the table of docs/design.md ("Layouts and placements"), normalisation, and its errors.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import itertools

import expecttest
import pytest
from torch.distributed.tensor import Partial, Replicate, Shard

from dtensor_attn import Layout, PlacementError, infer_out_placements
from dtensor_attn._compat import StridedShard
from dtensor_attn.placements import format_placements, normalize_placements, placements_equal

B, L, N, H = 4, 16, 8, 32
BLNH_SHAPE = (B, L, N, H)

# (mesh shape, BLNH input placements, expected TNH placements): docs/design.md, "Layouts and placements", by hand.
TABLE = [
    ((8,), (Shard(2),), (Shard(1),)),  # TP shards heads: dim 2 in BLNH, dim 1 in TNH
    ((2,), (Shard(1),), (StridedShard(0, split_factor=B),)),  # CP: seq chunk of every row
    ((2, 4), (Shard(1), Shard(2)), (StridedShard(0, split_factor=B), Shard(1))),
    ((2, 2, 2), (Shard(0), Shard(1), Shard(2)), (Shard(0), StridedShard(0, split_factor=B // 2), Shard(1))),
    ((4,), (Replicate(),), (Replicate(),)),
]


@pytest.mark.parametrize("algebra", ["torch", "own-rules"])
@pytest.mark.parametrize("mesh_shape,blnh,tnh", TABLE, ids=lambda x: str(x))
def test_design_table_packed(request, mesh_shape, blnh, tnh, algebra):
    if algebra == "own-rules":
        request.getfixturevalue("torch211_view_algebra")
    got = infer_out_placements(blnh, Layout.BLNH, Layout.TNH, global_shape=BLNH_SHAPE, mesh_shape=mesh_shape)
    assert placements_equal(got, tnh, 3), (format_placements(got), format_placements(tnh))
    # Viewing the packed tensor back gives the BLNH placements again.
    back = infer_out_placements(got, Layout.TNH, Layout.BLNH, global_shape=(B * L, N, H), mesh_shape=mesh_shape, batch=B)
    assert placements_equal(back, blnh, 4)


def test_local_batch_of_one_packs_to_plain_shard():
    got = infer_out_placements((Shard(1),), Layout.BLNH, Layout.TNH, global_shape=(1, L, N, H), mesh_shape=(2,))
    assert got == (Shard(0),)
    got = infer_out_placements((Shard(0), Shard(1)), Layout.BLNH, Layout.TNH, global_shape=(2, L, N, H), mesh_shape=(2, 2))
    assert got == (Shard(0), Shard(0))


@pytest.mark.parametrize(
    "out_layout,expected",
    [(Layout.BNLH, (Shard(2), Shard(1))), (Layout.BLN, (Shard(1), Shard(2))), (Layout.BNL, (Shard(2), Shard(1))),
     (Layout.TN, (StridedShard(0, split_factor=B), Shard(1)))],
    ids=lambda x: getattr(x, "name", None),
)
def test_other_layouts_on_cp_tp(out_layout, expected):
    got = infer_out_placements((Shard(1), Shard(2)), Layout.BLNH, out_layout, global_shape=BLNH_SHAPE, mesh_shape=(2, 4))
    assert placements_equal(got, expected, out_layout.ndim)


def test_uneven_seq_folded_into_tokens_is_an_error():
    with pytest.raises(PlacementError, match=r"seq sharded 4 ways.*seq has 6 entries, not a multiple of 4.*Fix"):
        infer_out_placements((Shard(1),), Layout.BLNH, Layout.TNH, global_shape=(B, 6, N, H), mesh_shape=(4,))


def test_sharded_head_dim_cannot_reach_an_lse():
    with pytest.raises(PlacementError, match=r"BLNH shards head_dim .*which BLN does not have"):
        infer_out_placements((Shard(3),), Layout.BLNH, Layout.BLN, global_shape=BLNH_SHAPE, mesh_shape=(2,))


def test_partial_and_wrong_placement_count_are_errors():
    with pytest.raises(PlacementError, match="contain Partial"):
        infer_out_placements((Partial(),), Layout.BLNH, Layout.TNH, global_shape=BLNH_SHAPE, mesh_shape=(2,))
    with pytest.raises(PlacementError, match=r"1 placements \(S\(2\)\) for a 2-D mesh"):
        infer_out_placements((Shard(2),), Layout.BLNH, Layout.TNH, global_shape=BLNH_SHAPE, mesh_shape=(2, 2))


def test_normalisation_sees_through_spellings():
    """docs/bugs.md row 9: Shard(-1) vs Shard(3), _StridedShard(sf=1) vs Shard, list vs tuple."""
    assert placements_equal([Shard(-1)], (Shard(3),), 4)
    assert placements_equal((StridedShard(0, split_factor=1),), [Shard(0)], 3)
    assert not placements_equal((StridedShard(0, split_factor=2),), (Shard(0),), 3)
    assert normalize_placements([Shard(-2), Replicate()], 3) == (Shard(1), Replicate())


class TestGoldenTable(expecttest.TestCase):
    """Every layout change on 1-D, 2-D and 3-D meshes; EXPECTTEST_ACCEPT=1 rewrites the table."""

    def test_layout_table(self):
        inputs = [
            ("tp8", (8,), (Shard(2),)),
            ("cp2", (2,), (Shard(1),)),
            ("cp2xtp4", (2, 4), (Shard(1), Shard(2))),
            ("dp2xcp2xtp2", (2, 2, 2), (Shard(0), Shard(1), Shard(2))),
        ]
        outs = [Layout.BLNH, Layout.BNLH, Layout.TNH, Layout.BLN, Layout.BNL, Layout.TN]
        lines = []
        for (name, mesh_shape, placements), out in itertools.product(inputs, outs):
            got = infer_out_placements(placements, Layout.BLNH, out, global_shape=BLNH_SHAPE, mesh_shape=mesh_shape)
            lines.append(f"{name:12} BLNH {format_placements(placements):18} -> {out.name:4} {format_placements(got)}")
        self.assertExpectedInline("\n".join(lines), """\
tp8          BLNH (S(2))             -> BLNH (S(2))
tp8          BLNH (S(2))             -> BNLH (S(1))
tp8          BLNH (S(2))             -> TNH  (S(1))
tp8          BLNH (S(2))             -> BLN  (S(2))
tp8          BLNH (S(2))             -> BNL  (S(1))
tp8          BLNH (S(2))             -> TN   (S(1))
cp2          BLNH (S(1))             -> BLNH (S(1))
cp2          BLNH (S(1))             -> BNLH (S(2))
cp2          BLNH (S(1))             -> TNH  (_S(0, 4))
cp2          BLNH (S(1))             -> BLN  (S(1))
cp2          BLNH (S(1))             -> BNL  (S(2))
cp2          BLNH (S(1))             -> TN   (_S(0, 4))
cp2xtp4      BLNH (S(1), S(2))       -> BLNH (S(1), S(2))
cp2xtp4      BLNH (S(1), S(2))       -> BNLH (S(2), S(1))
cp2xtp4      BLNH (S(1), S(2))       -> TNH  (_S(0, 4), S(1))
cp2xtp4      BLNH (S(1), S(2))       -> BLN  (S(1), S(2))
cp2xtp4      BLNH (S(1), S(2))       -> BNL  (S(2), S(1))
cp2xtp4      BLNH (S(1), S(2))       -> TN   (_S(0, 4), S(1))
dp2xcp2xtp2  BLNH (S(0), S(1), S(2)) -> BLNH (S(0), S(1), S(2))
dp2xcp2xtp2  BLNH (S(0), S(1), S(2)) -> BNLH (S(0), S(2), S(1))
dp2xcp2xtp2  BLNH (S(0), S(1), S(2)) -> TNH  (S(0), _S(0, 2), S(1))
dp2xcp2xtp2  BLNH (S(0), S(1), S(2)) -> BLN  (S(0), S(1), S(2))
dp2xcp2xtp2  BLNH (S(0), S(1), S(2)) -> BNL  (S(0), S(2), S(1))
dp2xcp2xtp2  BLNH (S(0), S(1), S(2)) -> TN   (S(0), _S(0, 2), S(1))""")


FLATTEN_CASES = [
    ((8,), (Shard(2),)), ((2,), (Shard(1),)), ((2, 4), (Shard(1), Shard(2))),
    ((2, 2, 2), (Shard(0), Shard(1), Shard(2))), ((2, 2), (Shard(0), Shard(1))), ((4,), (Replicate(),)),
    ((2, 2), (Shard(1), Shard(0))), ((2, 2, 2), (Shard(1), Shard(0), Shard(2))), ((2, 2), (Shard(1), Shard(1))),
]


@pytest.mark.parametrize("batch", [1, 2, 4, 8])
@pytest.mark.parametrize("mesh_shape,placements", FLATTEN_CASES, ids=lambda x: format_placements(x) if isinstance(x[0], object) and not isinstance(x[0], int) else str(x))
def test_own_flatten_rule_equals_torch_view_algebra(request, mesh_shape, placements, batch):
    """torch 2.11's view algebra refuses to fold a sharded seq into tokens; our rule takes over
    there. Where torch answers (2.13), both must agree, errors included."""
    def run():
        try:
            return infer_out_placements(placements, Layout.BLNH, Layout.TNH, global_shape=(batch, 16, 8, 32), mesh_shape=mesh_shape)
        except PlacementError as e:
            return type(e)

    torch_answer = run()
    request.getfixturevalue("torch211_view_algebra")
    assert run() == torch_answer


GENERIC_FLATTENS = [  # (shape, out_shape, mesh_shape, placements): views that keep or flatten dims
    ((2, 8), (16,), (4,), (Shard(1),)),
    ((2, 8), (16,), (2,), (Shard(0),)),
    ((2, 3, 8), (2, 24), (2, 2), (Shard(2), Shard(2))),
    ((3, 18), (54,), (2, 3), (Shard(1), Shard(1))),
    ((3, 16, 2), (48, 2), (2, 4), (Shard(1), Shard(1))),
    ((2, 2, 6, 3), (2, 12, 3), (3,), (Shard(2),)),
    ((4, 8, 8, 2), (32, 8, 2), (2, 4), (Shard(1), Shard(2))),
    ((2, 4, 8, 3), (8, 8, 3), (2, 2), (Shard(0), Shard(1))),
    ((2, 4, 8, 3), (8, 8, 3), (2, 2), (Shard(1), Shard(0))),
    ((4, 4, 8, 3), (16, 24), (2, 2, 2), (Shard(0), Shard(1), Shard(2))),
    ((8, 4, 3), (8, 12), (2,), (Shard(1),)),
]


@pytest.mark.parametrize("shape,out_shape,mesh_shape,placements", GENERIC_FLATTENS, ids=lambda x: str(x))
def test_generic_flatten_rule_equals_torch_view_algebra(shape, out_shape, mesh_shape, placements):
    """The rule behind view_placements' torch 2.11 fallback, on views that are not attention
    layouts (the debugger judges any local_map boundary): where torch answers with a view that
    needs no redistribution (2.13), both agree."""
    from dtensor_attn import _compat
    from dtensor_attn.placements import flatten_placements

    ours = flatten_placements(placements, shape, _compat.view_sources(shape, out_shape), mesh_shape)
    assert ours is not None
    try:
        rule = _compat.view_groups(shape, out_shape)
        needed, theirs = _compat.propagate_view_placements(placements, shape, rule, mesh_shape)
    except RuntimeError as error:
        pytest.skip(f"this torch's view algebra refuses the view (torch 2.11): {error}")
    if tuple(needed) != placements:
        pytest.skip(f"torch redistributes first ({format_placements(needed)}): not a view of these placements")
    assert placements_equal(ours, theirs, len(out_shape)), (format_placements(ours), format_placements(theirs))


def test_view_placements_falls_back_where_torch_refuses(torch211_view_algebra):
    from dtensor_attn.placements import view_placements

    needed, out = view_placements((Shard(1), Shard(2)), (2, 4, 8, 3), (8, 8, 3), (2, 4))
    assert needed == (Shard(1), Shard(2))
    assert placements_equal(out, (StridedShard(0, split_factor=2), Shard(1)), 3)
    with pytest.raises(RuntimeError, match="Attempted to flatten"):  # a split too: no own rule
        view_placements((Shard(1),), (2, 4, 6), (8, 2, 3), (2,))
