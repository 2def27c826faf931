"""Named layouts (layout.py) against a direct reading of their dims, for every layout.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import itertools
import math

import pytest

from dtensor_attn.layout import Dim, Layout

# The layouts by hand, as docs/design.md's table lists them.
DIMS = {
    Layout.BLNH: "B L N H", Layout.BNLH: "B N L H", Layout.TNH: "T N H",
    Layout.BLN: "B L N", Layout.BNL: "B N L", Layout.TN: "T N",
}
SEQ_DIM = {Layout.BLNH: 1, Layout.BNLH: 2, Layout.TNH: 0, Layout.BLN: 1, Layout.BNL: 2, Layout.TN: 0}
HEADS_DIM = {Layout.BLNH: 2, Layout.BNLH: 1, Layout.TNH: 1, Layout.BLN: 2, Layout.BNL: 1, Layout.TN: 1}
SIZES = [dict(zip((Dim.B, Dim.L, Dim.N, Dim.H), values))
         for values in itertools.product((1, 2, 3), (1, 4), (2, 3), (1, 5))]


def _id(value) -> str:
    return getattr(value, "name", str(value))


def test_every_layout_is_listed_here():
    assert set(Layout) == set(DIMS)


@pytest.mark.parametrize("layout", list(Layout), ids=_id)
def test_dims_ndim_and_atoms(layout):
    names = DIMS[layout].split()
    assert [d.name for d in layout.dims] == names and layout.ndim == len(names)
    atoms = [a for name in names for a in (("B", "L") if name == "T" else (name,))]
    assert [a.name for a in layout.atoms] == atoms
    assert repr(layout) == f"Layout.{layout.name}"


@pytest.mark.parametrize("layout", list(Layout), ids=_id)
def test_seq_and_heads_dims(layout):
    assert (layout.seq_dim, layout.heads_dim) == (SEQ_DIM[layout], HEADS_DIM[layout])
    # B sits in T too: in a packed layout batch and seq share dim 0
    assert layout.index(Dim.B) == (0 if Dim.T in layout.dims else layout.dims.index(Dim.B))


@pytest.mark.parametrize("layout", list(Layout), ids=_id)
def test_a_dim_the_layout_lacks_is_a_value_error(layout):
    missing = [d for d in (Dim.B, Dim.L, Dim.N, Dim.H) if d not in layout.atoms]
    for dim in missing:
        with pytest.raises(ValueError, match=f"{layout.name} has no {dim.value} dim"):
            layout.index(dim)
    lse_layouts = (Layout.BLN, Layout.BNL, Layout.TN)  # an LSE has no head_dim
    assert missing == ([Dim.H] if layout in lse_layouts else [])


@pytest.mark.parametrize("layout", list(Layout), ids=_id)
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "-".join(f"{d.name}{n}" for d, n in s.items()))
def test_shape_and_atom_sizes_round_trip(layout, sizes):
    shape = layout.shape(sizes)
    expected = tuple(sizes[Dim.B] * sizes[Dim.L] if d is Dim.T else sizes[d] for d in layout.dims)
    assert shape == expected
    assert math.prod(shape) == math.prod(sizes[a] for a in layout.atoms)
    batch = sizes[Dim.B] if Dim.T in layout.dims else None
    assert layout.atom_sizes(shape, batch=batch) == {a: sizes[a] for a in layout.atoms}


@pytest.mark.parametrize("layout", [Layout.TNH, Layout.TN], ids=_id)
@pytest.mark.parametrize("batch", [None, 3, 5], ids=lambda b: f"batch{b}")
def test_packed_tokens_need_a_batch_that_divides_them(layout, batch):
    shape = (8, *([2, 4][: layout.ndim - 1]))
    with pytest.raises(ValueError, match=f"cannot split 8 packed tokens into batch {batch}"):
        layout.atom_sizes(shape, batch=batch)


@pytest.mark.parametrize("layout", list(Layout), ids=_id)
def test_a_shape_of_the_wrong_rank_is_refused(layout):
    shape = (2,) * (layout.ndim + 1)
    with pytest.raises(ValueError, match=f"a {layout.name} tensor has {layout.ndim} dims"):
        layout.atom_sizes(shape, batch=2)


def test_dims_print_by_their_letter_and_t_is_batch_then_seq():
    assert [repr(d) for d in Dim] == ["B", "L", "N", "H", "T"]
    assert Dim.T.atoms == (Dim.B, Dim.L) and all(d.atoms == (d,) for d in Dim if d is not Dim.T)
