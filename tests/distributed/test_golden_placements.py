"""Golden placement tables: what LocalMapAttention states at its local_map boundary, per layout
and backend, on tp, cp, cp x tp and dp x cp x tp meshes (golden/placements_<mesh>.txt).

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

A layout change (a kernel that moves heads, an output that becomes packed, an LSE in another
order) changes a row of these tables, and the test prints the change as a unified diff. Accept
a reviewed change with ``EXPECTTEST_ACCEPT=1 pytest tests/distributed/test_golden_placements.py``.
Rows: each registry backend in its BLNH and legacy BNLH layouts, and with varlen's packed TNH
output where the backend offers it; every module returns the LSE, so its row shows too.
"""

from __future__ import annotations

import pytest

from dtensor_attn._compat import packed_strided_shard_usable
import torch
from torch.distributed.tensor import Shard, distribute_tensor

from dtensor_attn import AttentionConfig, Dim, Layout, LocalMapAttention
from dtensor_attn.backends import REGISTRY, VarlenAttention
from dtensor_attn.placements import format_placements
from dtensor_attn.testing import assert_golden, format_table, mesh_id
from dtensor_attn.testing.harness.meshspec import AXIS_DIMS, mesh_params
from dtensor_attn.testing.kit.subjects import offered_outputs
from dtensor_attn.testing.golden import ACCEPT_ENV

SIZES = {Dim.B: 2, Dim.L: 8, Dim.N: 4, Dim.H: 4}
MESHES = mesh_params({"tp": 2}, {"cp": 2}, {"cp": 2, "tp": 2}, {"dp": 2, "cp": 2, "tp": 2})
HEADER = ("in->out", "backend", "q/k/v", "k/v at kernel", "out", "lse", "q grad", "k/v grad", "seq_dim")


def _inner_modules() -> list:
    """Each backend in BLNH and legacy BNLH, and with each other output layout it offers."""
    configs = [
        dict(backend=b, layout=layout) for b in REGISTRY for layout in (Layout.BLNH, Layout.BNLH)
    ] + [dict(backend=b, varlen_output=out) for b in REGISTRY for out in offered_outputs(b) if out is not Layout.BLNH]
    modules = [AttentionConfig(return_lse=True, enable_gqa=True, **c).build() for c in configs]
    return sorted(modules, key=lambda m: (m.in_layout.name, m.out_layout.name, list(REGISTRY).index(m.backend)))


def _row(inner, mesh, axes) -> tuple[str, ...]:
    layout = inner.in_layout
    placements = [Shard(layout.index(AXIS_DIMS[a])) for a in axes]
    shape = layout.shape(SIZES)
    q, k, v = (distribute_tensor(torch.zeros(shape), mesh, placements) for _ in range(3))
    p = LocalMapAttention(inner).infer_placements(q, k, v)
    lse = "-" if p.lse is None else f"{inner.lse_layout.name} {format_placements(p.lse)}"
    return (
        f"{layout.name}->{inner.out_layout.name}", str(inner.backend), format_placements(p.q), format_placements(p.kv),
        format_placements(p.out), lse, format_placements(p.q_grad), format_placements(p.kv_grad), str(layout.seq_dim),
    )


def _table(inners, mesh, axes) -> str:
    title = f"LocalMapAttention placements on mesh {' x '.join(f'{a}={n}' for a, n in axes.items())}"
    return f"{title}, global B={SIZES[Dim.B]} L={SIZES[Dim.L]} N={SIZES[Dim.N]} H={SIZES[Dim.H]}\n" + format_table(
        [HEADER] + [_row(inner, mesh, axes) for inner in inners]
    )


@pytest.mark.parametrize("axes", MESHES)
def test_golden_placements(mesh, axes):
    if "cp" in axes and not packed_strided_shard_usable():
        pytest.skip("this torch cannot use a _StridedShard downstream (torch 2.11): LocalMapAttention refuses packed output under CP there")
    assert_golden(_table(_inner_modules(), mesh, axes), f"placements_{mesh_id(axes)}")


class _PackedButDeclaredBLNH(VarlenAttention):
    """The seed bug as a declaration: returns packed TNH, declares BLNH."""

    @property
    def out_layout(self) -> Layout:
        return Layout.BLNH

    @property
    def lse_layout(self) -> Layout:
        return Layout.BLN


@pytest.mark.mesh(tp=2)
def test_a_layout_change_is_a_readable_diff(mesh, monkeypatch):
    """The same table with varlen's packed output declared BLNH: the test names the row."""
    monkeypatch.delenv(ACCEPT_ENV, raising=False)  # compare even in an accepting run: never write this table
    inners = [
        _PackedButDeclaredBLNH(inner.config) if inner.out_layout is Layout.TNH else inner for inner in _inner_modules()
    ]
    with pytest.raises(AssertionError) as failure:
        assert_golden(_table(inners, mesh, {"tp": 2}), "placements_tp2")
    diff = str(failure.value)
    assert "golden mismatch" in diff
    removed = [line for line in diff.splitlines() if line.startswith("-BLNH->TNH")]
    added = [line for line in diff.splitlines() if line.startswith("+BLNH->BLNH") and "varlen" in line]
    assert len(removed) == 1 and "(S(1))" in removed[0] and "TN (S(1))" in removed[0]
    assert len(added) == 1 and "(S(2))" in added[0]
