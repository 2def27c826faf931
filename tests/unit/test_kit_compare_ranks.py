"""The kit's comparisons (kit/compare.py) on DTensors of simulated ranks whose shards the tests
plant by hand (one rank's shard off by one, a replicated value that differs on one rank, a
doubled tensor), so which ranks are wrong, and which shards, is known in advance; the tolerance
rule at its edges; error texts cut to length; placements as torch reads them."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from dtensor_attn import _compat
from dtensor_attn.testing.asserts import rank_values
from dtensor_attn.testing.harness.simulate import simulated_mesh
from dtensor_attn.testing.kit.compare import (
    compare_ranks, error_failure, on_mesh, placements_failure, ratio_note, tolerance_exceeded, wrong_shards,
)
from dtensor_attn.testing.kit.result import FailureKind

REFERENCE = torch.arange(1.0, 25.0, dtype=torch.float64).view(4, 6)


def planted(mesh, placements, plant):
    """A DTensor of REFERENCE on ``mesh`` whose rank-r shard is ``plant(r, correct shard)``."""
    right = _compat.rank_tensors(distribute_tensor(REFERENCE.clone(), mesh, placements).to_local())
    with _compat.maybe_disable_local_tensor_mode():  # a replicated local tensor is one plain tensor
        local = _compat.LocalTensor({r: plant(r, right.get(r, right[0]).clone()) for r in range(mesh.size())})
    return DTensor.from_local(local, mesh, placements, run_check=False)


def add_to(ranks, amount=1.0):
    return lambda r, t: t + amount if r in ranks else t


# (placements on cp=2, which ranks' shards are planted wrong) -> (ranks with a wrong full tensor,
# wrong shards, the note that names the right ones)
PLANTS = [
    ("sharded-rank1-off", [Shard(0)], add_to({1}), [0, 1], (1,),
     "the shards of ranks [0] are right: a check of those ranks' shards alone would pass"),
    ("sharded-both-off", [Shard(1)], add_to({0, 1}), [0, 1], (0, 1), None),
]


@pytest.mark.parametrize("placements,plant,bad,shards,note", [p[1:] for p in PLANTS], ids=[p[0] for p in PLANTS])
def test_the_ranks_and_shards_that_are_wrong_are_named(placements, plant, bad, shards, note):
    with simulated_mesh({"cp": 2}) as mesh:
        t = planted(mesh, placements, plant)
        failure = compare_ranks("c", FailureKind.VALUES, "output", t, rank_values(t), REFERENCE, 1e-9, 1e-9)
    assert (failure.case, failure.kind, failure.what, failure.expected, failure.actual) == (
        "c", FailureKind.VALUES, "output", "the float64 reference", "different values")
    assert (list(failure.ranks), failure.shard_ranks, failure.max_err) == (bad, shards, 1.0)
    assert (note in failure.detail) if note else "are right" not in failure.detail


def test_a_replicated_value_that_differs_on_one_rank_is_reported():
    with simulated_mesh({"cp": 2}) as mesh:
        t = planted(mesh, [Replicate()], add_to({1}))
        failure = compare_ranks("c", FailureKind.VALUES, "output", t, rank_values(t), REFERENCE, 1e-9, 1e-9)
    assert (failure.ranks, failure.shard_ranks) == ((1,), (1,))
    assert "ranks [0] hold the right full tensor: the error depends on the rank" in failure.detail


def test_right_shards_on_every_rank_are_no_failure():
    with simulated_mesh({"cp": 2}) as mesh:
        t = planted(mesh, [Shard(0)], add_to(set()))
        assert compare_ranks("c", FailureKind.VALUES, "o", t, rank_values(t), REFERENCE, 0.0, 0.0) is None
        assert wrong_shards(t, REFERENCE, 0.0, 0.0) == ()


def test_a_tensor_summed_once_too_often_says_so():
    with simulated_mesh({"cp": 2}) as mesh:
        t = planted(mesh, [Shard(0)], lambda r, x: 2 * x)
        failure = compare_ranks("c", FailureKind.GRAD, "grad k", t, rank_values(t), REFERENCE, 1e-9, 1e-9)
    assert failure.detail.startswith("actual = 2 x expected everywhere: summed over ranks too often or too "
                                     "rarely (Partial vs Replicate?)")


def test_a_partial_tensor_has_no_shards_to_compare():
    with simulated_mesh({"cp": 2}) as mesh:
        t = DTensor.from_local(_compat.LocalTensor({0: REFERENCE / 2, 1: REFERENCE / 2 + 1}), mesh, [Partial()],
                               run_check=False)
        assert wrong_shards(t, REFERENCE, 1e-9, 1e-9) == ()


def test_the_right_shards_of_a_strided_tensor_are_not_called_wrong():
    if not (_compat.view_flattens_sharded_dims() and _compat.packed_strided_shard_usable()):
        pytest.skip("this torch's DTensor cannot view a sharded dim into a flattened one (torch 2.11 "
                    f"refuses) or gather the _StridedShard it makes: {_compat.packed_strided_shard_probe()[1]}")
    reference_T = torch.arange(24.0, dtype=torch.float64)  # made outside the ranks, as the kit's are
    with simulated_mesh({"cp": 2}) as mesh:
        packed = distribute_tensor(reference_T.view(4, 6), mesh, [Shard(1)]).view(24)
        assert isinstance(packed.placements[0], _compat.StridedShard)
        assert all(torch.equal(v, reference_T) for v in rank_values(packed).values())  # every rank right
        assert wrong_shards(packed, reference_T, 1e-9, 1e-9) == ()


@pytest.mark.parametrize("value,factor_note", [
    (3 * REFERENCE, "actual = 3 x expected everywhere"),
    (0.5 * REFERENCE, "actual = 0.5 x expected everywhere"),
    (REFERENCE + 1, ""),  # not one factor
    (REFERENCE.clone(), ""),  # factor 1 is no note
    (REFERENCE * float("nan"), ""),  # not finite
], ids=["three", "half", "offset", "equal", "nan"])
def test_a_ratio_is_named_only_for_one_factor_everywhere(value, factor_note):
    note = ratio_note(value, REFERENCE)
    assert note.startswith(factor_note) and bool(note) is bool(factor_note)
    assert ratio_note(value, torch.zeros(4, 6, dtype=torch.float64)) == ""  # a zero reference has no ratio


# bound = atol * max(1, max|ref|) + rtol * |ref|, worked out by hand for each element
@pytest.mark.parametrize("reference,error,rtol,atol,exceeded", [  # values exact in binary
    ([0.5, 0.0], [0.25, 0.0], 0.0, 0.25, False),  # max|ref| < 1: atol unscaled, error at the bound
    ([0.5, 0.0], [0.0, 0.375], 0.0, 0.25, True),
    ([8.0, 0.0], [0.0, 2.0], 0.0, 0.25, False),  # max|ref| = 8: atol 2 for every element
    ([8.0, 0.0], [0.0, 2.5], 0.0, 0.25, True),
    ([8.0, 1.0], [1.0, 0.0], 0.125, 0.0, False),  # rtol per element: 0.125 * 8, at the bound
    ([8.0, 1.0], [0.0, 0.25], 0.125, 0.0, True),  # 0.125 * 1 < 0.25
    ([-8.0, 2.0], [0.0, 2.0], 0.0, 0.25, False),  # the magnitude, not the sign
], ids=["small-at-bound", "small-past", "scaled-at-bound", "scaled-past", "relative-within",
        "relative-past", "negative"])
def test_the_tolerance_bound_at_its_edges(reference, error, rtol, atol, exceeded):
    reference = torch.tensor(reference, dtype=torch.float64)
    result = tolerance_exceeded(reference + torch.tensor(error, dtype=torch.float64), reference, rtol, atol)
    assert result[0] is exceeded and result[1] == pytest.approx(max(error), abs=1e-12)


def test_an_empty_tensor_is_within_any_tolerance():
    empty = torch.zeros(0, dtype=torch.float64)
    assert tolerance_exceeded(empty, empty, 0.0, 0.0) == (False, 0.0)


@pytest.mark.parametrize("message,detail", [
    ("short   message\n with  breaks", "ValueError: short message with breaks"),
    ("x" * 700, "ValueError: " + "x" * (600 - len("ValueError: ") - 3) + "..."),
], ids=["collapsed", "cut"])
def test_an_exception_is_one_line_of_at_most_600_characters(message, detail):
    failure = error_failure("c", "subject", "the call", ValueError(message))
    assert (failure.kind, failure.what, failure.expected, failure.actual, failure.detail) == (
        FailureKind.ERROR, "subject", "the call to succeed", "an exception", detail)
    assert len(failure.detail) <= 600


@pytest.mark.parametrize("placements,mesh_shape,expected", [
    ((Shard(-1), Replicate()), (2, 2), (Shard(2), Replicate())),
    ((_compat.strided_shard(0, 1), Shard(1)), (2, 2), (Shard(0), Shard(1))),
    ((_compat.strided_shard(0, 2), Partial()), (2, 1), (_compat.strided_shard(0, 2), Replicate())),
    ((Shard(0), Shard(1)), (1, 1), (Replicate(), Replicate())),
], ids=["negative-dim", "split-factor-1", "partial-on-size-1", "all-size-1"])
def test_placements_are_read_as_torch_reads_them(placements, mesh_shape, expected):
    assert on_mesh(placements, 3, mesh_shape) == expected


def test_a_placements_failure_compares_on_the_mesh_and_prints_both():
    with simulated_mesh({"cp": 2, "tp": 1}) as mesh:
        t = distribute_tensor(REFERENCE.clone(), mesh, [Shard(0), Replicate()])
        assert placements_failure("c", "output", t, (Shard(-2), Shard(1)), "d") is None  # tp has 1 rank
        failure = placements_failure("c", "output", t, (Shard(1), Replicate()), "from the layout")
    assert (failure.kind, failure.expected, failure.actual, failure.detail) == (
        FailureKind.PLACEMENTS, "(S(1), R)", "(S(0), R)", "from the layout")
