"""Each rank's view of a case (kit/rank_masks.py) against torch: the batch rows and sequence
indices a view says a rank holds must be those ``distribute_tensor`` gives that rank's shard
of the same (B, L) tensor on simulated ranks; and the fusion of per-rank mask values.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from dtensor_attn import _compat
from dtensor_attn.layout import Dim
from dtensor_attn.testing.harness.simulate import simulated_mesh
from dtensor_attn.testing.kit import CaseInfo, Shapes
from dtensor_attn.testing.kit.rank_masks import build_per_rank, fuse, real_rank_view, simulated_rank_views

CPU = torch.device("cpu")
ROLE_PLACEMENT = {Dim.B: Shard(0), Dim.L: Shard(1), Dim.N: Replicate(), None: Replicate()}  # of a (B, L) tensor


@pytest.mark.parametrize("axes,dims", [
    ({"dp": 2, "cp": 2, "tp": 2}, (Dim.B, Dim.L, Dim.N)),
    ({"cp": 4}, (Dim.L,)),
    ({"tp": 2, "cp": 2}, (Dim.N, Dim.L)),
    ({"cp": 2, "sp": 2}, (Dim.L, Dim.L)),  # two axes shard L: the first is the outer one
    ({"dp": 2, "ep": 2}, (Dim.B, None)),
], ids=["dp2xcp2xtp2", "cp4", "tp2xcp2", "cp2xsp2", "dp2xep2"])
def test_a_rank_view_holds_what_torch_places_on_that_rank(axes, dims):
    shapes = Shapes(batch=4, seq=16)
    positions_BL = torch.arange(4 * 16).view(4, 16) % 5
    row_BL = torch.arange(4).view(4, 1).expand(4, 16).contiguous()
    seq_BL = torch.arange(16).view(1, 16).expand(4, 16).contiguous()
    case = CaseInfo(gqa=False, documents=True, lse=None, shapes=shapes)
    with simulated_mesh(axes) as mesh:
        placements = [ROLE_PLACEMENT[d] for d in dims]
        rows = _compat.rank_tensors(distribute_tensor(row_BL, mesh, placements).to_local())
        seqs = _compat.rank_tensors(distribute_tensor(seq_BL, mesh, placements).to_local())
        views = simulated_rank_views(mesh, dims, positions_BL, case, CPU)
    assert sorted(views) == list(range(mesh.size()))
    cp_size = 1
    for name, d in zip(axes, dims):
        cp_size *= axes[name] if d is Dim.L else 1
    for rank, view in views.items():
        rows_r, seqs_r = rows.get(rank, rows[0]), seqs.get(rank, seqs[0])  # a replicated shard is one tensor
        assert view.q_index_L.tolist() == seqs_r[0].tolist(), rank
        assert torch.equal(view.positions_BL, positions_BL[rows_r[:, 0]]), rank
        assert view.kv_index_L.tolist() == list(range(16))
        assert (view.cp_size, view.cp_rank) == (cp_size, int(seqs_r[0, 0]) // (16 // cp_size))
        assert view.rank == rank and list(view.coords) == list(axes) and view.case is case


def test_a_submesh_gives_every_rank_of_the_root_its_place_on_the_submesh():
    case = CaseInfo(gqa=False, documents=False, lse=None, shapes=Shapes(batch=2, seq=16))
    with simulated_mesh({"cp": 2, "tp": 2}) as mesh:
        views = simulated_rank_views(mesh["cp"], (Dim.L,), None, case, CPU, root=mesh)
    # ranks 0, 1 are cp 0 and ranks 2, 3 cp 1 (row-major), whatever their tp coordinate
    assert {r: (v.coords, v.cp_rank, v.q_index_L.tolist()) for r, v in views.items()} == {
        0: ({"cp": 0}, 0, list(range(8))), 1: ({"cp": 0}, 0, list(range(8))),
        2: ({"cp": 1}, 1, list(range(8, 16))), 3: ({"cp": 1}, 1, list(range(8, 16)))}
    assert all(v.positions_BL is None for v in views.values())


class NotInMesh:
    shape, mesh_dim_names = (2,), ("cp",)

    def get_coordinate(self):
        return None


def test_a_rank_outside_the_mesh_is_told_to_call_on_the_meshs_ranks_only():
    case = CaseInfo(gqa=False, documents=False, lse=None, shapes=Shapes())
    with pytest.raises(ValueError, match="this rank is not in the mesh passed as mesh=.*Fix: call it on the ranks of that mesh only"):
        real_rank_view(NotInMesh(), (Dim.L,), None, case, CPU)


Meta = collections.namedtuple("Meta", "cu_seq max_len")


@pytest.mark.parametrize("values,expected", [
    ({0: [torch.tensor([1]), 3], 1: [torch.tensor([1]), 3]}, [[1], 3]),
    ({0: {"a": None, "b": (2, 5)}, 1: {"a": None, "b": (2, 5)}}, {"a": None, "b": (2, 5)}),
    ({0: Meta(torch.tensor([0, 4]), 4), 1: Meta(torch.tensor([0, 4]), 4)}, Meta([0, 4], 4)),
], ids=["list", "dict-of-tuple", "namedtuple"])
def test_equal_values_fuse_to_one_plain_value_of_the_same_type(values, expected):
    fused = fuse(values)
    assert type(fused) is type(expected)
    plain = [x.tolist() if isinstance(x, torch.Tensor) else x for x in (fused.values() if isinstance(fused, dict) else fused)]
    assert plain == list(expected.values() if isinstance(expected, dict) else expected)
    assert not any(isinstance(x, _compat.LocalTensor) for x in (fused.values() if isinstance(fused, dict) else fused))


def test_per_rank_masks_are_built_from_each_view_and_fused():
    views = {0: "v0", 1: "v1", 2: "v2"}
    fused = build_per_rank(lambda view: {"offset": torch.tensor([int(view[1]) * 8]), "window": 4}, views)
    assert fused["window"] == 4
    assert {r: t.tolist() for r, t in _compat.rank_tensors(fused["offset"]).items()} == {0: [0], 1: [8], 2: [16]}
    assert build_per_rank(lambda view: ("only", view), {5: "v5"}) == ("only", "v5")  # one rank: as made


def test_a_plain_value_that_differs_names_where_in_the_mask():
    with pytest.raises(ValueError, match=r"mask\['meta'\]\[1\] differs between simulated ranks \(\{0: 4, 1: 8\}\)"):
        fuse({0: {"meta": (None, 4)}, 1: {"meta": (None, 8)}})
