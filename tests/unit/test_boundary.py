"""infer_attention_placements: the local_map boundary from metadata alone (no mesh, no DTensor).

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

The distributed tests check these placements on real and simulated meshes against the values;
here the same rules run as a pure function, so each case costs microseconds.
"""

from __future__ import annotations

import pytest

from dtensor_attn import Layout, PlacementError, infer_attention_placements
from dtensor_attn._compat import Partial, Replicate, Shard, StridedShard

Q_BLNH, KV_BLNH = (2, 16, 8, 4), (2, 16, 4, 4)


def _infer(q_pl, kv_pl=None, *, mesh_shape, names, out=Layout.BLNH, lse=None, layout=Layout.BLNH,
           q_shape=Q_BLNH, kv_shape=KV_BLNH):
    kv_pl = q_pl if kv_pl is None else kv_pl
    return infer_attention_placements(
        q_pl, kv_pl, kv_pl, q_shape=q_shape, kv_shape=kv_shape, mesh_shape=mesh_shape, axis_names=names,
        in_layout=layout, out_layout=out, lse_layout=lse, module="LocalMapAttention(test)",
    )


def test_tp_keeps_heads_sharded_through_every_layout():
    tp = dict(mesh_shape=(2,), names=("tp",))
    assert _infer((Shard(2),), **tp).out == (Shard(2),)
    assert _infer((Shard(2),), out=Layout.TNH, **tp).out == (Shard(1),)  # the seed bug's answer
    placements = _infer((Shard(2),), out=Layout.TNH, lse=Layout.TN, **tp)
    assert placements.lse == (Shard(1),) and placements.kv_grad == (Shard(2),) and placements.cp_axes == ()


def test_cp_gathers_kv_and_makes_their_grads_partial():
    placements = _infer((Shard(1), Shard(2)), mesh_shape=(2, 2), names=("cp", "tp"), lse=Layout.BNL)
    assert placements.cp_axes == (0,)
    assert placements.kv == (Replicate(), Shard(2))
    assert placements.kv_grad == (Partial(), Shard(2))
    assert placements.q_grad == placements.q == (Shard(1), Shard(2))
    assert placements.lse == (Shard(2), Shard(1))


def test_cp_packed_output_is_strided_by_the_local_batch():
    placements = _infer((Shard(1), Shard(2)), mesh_shape=(2, 2), names=("cp", "tp"), out=Layout.TNH)
    assert placements.out == (StridedShard(0, split_factor=2), Shard(1))


def test_legacy_layout_shards_its_own_dims():
    q_BNLH, kv_BNLH = (2, 8, 16, 4), (2, 4, 16, 4)
    placements = _infer((Shard(2), Shard(1)), mesh_shape=(2, 2), names=("cp", "tp"), layout=Layout.BNLH,
                        out=Layout.BNLH, q_shape=q_BNLH, kv_shape=kv_BNLH)
    assert placements.out == (Shard(2), Shard(1)) and placements.kv == (Replicate(), Shard(1))


def test_negative_dims_are_normalised():
    assert _infer((Shard(-2),), mesh_shape=(2,), names=("tp",)).out == (Shard(2),)


@pytest.mark.parametrize(
    "q_pl, kv_pl, mesh_shape, message",
    [
        ((Shard(3),), None, (2,), r"q in BLNH has S\(3\) on mesh axis 0 .*head_dim is contracted"),
        ((Partial(),), None, (2,), r"Partial is a pending reduction"),
        ((Shard(2),), (Replicate(),), (2,), r"k/v placements must match q's .*expected \(S\(2\)\), got \(R\)"),
        ((Shard(2),), None, (8,), r"k/v has 4 heads in BLNH, not divisible by the 8 ranks of mesh axes \['tp'\]"),
        ((Shard(0),), None, (4,), r"q has 2 batch in BLNH, not divisible by the 4 ranks"),
    ],
)
def test_bad_placements_are_named_with_the_fix(q_pl, kv_pl, mesh_shape, message):
    with pytest.raises(PlacementError, match=message) as error:
        _infer(q_pl, kv_pl, mesh_shape=mesh_shape, names=("tp",))
    assert "LocalMapAttention(test)" in str(error.value) and "Fix:" in str(error.value)


def test_wrong_rank_is_refused_before_placements_are_read():
    with pytest.raises(PlacementError, match=r"q must be BLNH \(4 dims\), got global shape \(32, 8, 4\)"):
        _infer((Shard(1),), mesh_shape=(2,), names=("tp",), q_shape=(32, 8, 4))
