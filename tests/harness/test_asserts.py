"""assert_dtensor_close checks every rank; assert_placements compares normalised placements.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import re

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard, distribute_tensor

from dtensor_attn import _compat
from dtensor_attn._compat import LocalTensor, StridedShard
from dtensor_attn.testing import assert_dtensor_close, assert_placements, rank_values

EXACT = dict(rtol=0.0, atol=0.0)
# Tests that build LocalTensors by hand run outside simulated ranks (no mesh marker): inside
# LocalTensorMode, torch.ones and friends would already return LocalTensors.


def _x_BLNH() -> torch.Tensor:
    return torch.arange(2 * 4 * 8 * 2, dtype=torch.float32).reshape(2, 4, 8, 2)


@pytest.mark.mesh(cp=2, tp=2)
def test_sharded_dtensor_matches_on_every_rank(mesh):
    x_BLNH = _x_BLNH()
    x_dt = distribute_tensor(x_BLNH, mesh, [Shard(1), Shard(2)])
    assert_dtensor_close(x_dt, x_BLNH.double(), **EXACT)  # any reference dtype, float64 compare
    values = rank_values(x_dt)
    assert sorted(values) == [0, 1, 2, 3]
    assert all(type(v) is torch.Tensor and torch.equal(v, x_BLNH) for v in values.values())


def test_a_wrong_value_on_one_rank_names_that_rank():
    x_BLNH = _x_BLNH()
    wrong = {r: x_BLNH.clone() for r in range(4)}
    wrong[2][1, 3, 5, 0] += 0.5
    with pytest.raises(AssertionError) as error:
        assert_dtensor_close(LocalTensor(wrong), x_BLNH, rtol=1e-6, atol=1e-6, msg="out_BLNH")
    text = str(error.value)
    assert text.splitlines()[0] == (
        "assert_dtensor_close: out_BLNH: ranks [2] of [0, 1, 2, 3] differ from the reference "
        "(rtol=1e-06, atol=1e-06)"
    )
    assert "rank 2: 1 of 128 elements outside tolerance; max abs err 5.000e-01 at (1, 3, 5, 0) " \
           "(actual 122.5, expected 122); max rel err 4.098e-03" in text
    assert "ranks [0, 1, 3] match the reference: a rank-dependent mistake" in text


def test_shape_mismatch_and_nan_are_reported_per_rank():
    x = torch.ones(3, 4)
    with pytest.raises(AssertionError) as error:
        assert_dtensor_close(LocalTensor({0: torch.ones(3, 2), 1: torch.ones(3, 2)}), x, **EXACT)
    assert "rank 0: shape (3, 2), expected (3, 4)" in str(error.value)
    assert "rank 1: shape (3, 2), expected (3, 4)" in str(error.value)
    per_rank = {0: torch.ones(3, 4), 1: torch.full((3, 4), float("nan"))}
    with pytest.raises(AssertionError) as error:
        assert_dtensor_close(LocalTensor(per_rank), x, **EXACT)
    assert re.search(r"ranks \[1\] of \[0, 1\] differ.*\n  rank 1: 12 of 12 elements outside "
                     r"tolerance; max abs err inf", str(error.value))


def test_nan_in_both_is_equal_and_tolerance_is_atol_plus_rtol():
    reference = torch.tensor([float("nan"), 100.0, 0.0], dtype=torch.float64)
    close = torch.tensor([float("nan"), 100.1, 5e-4], dtype=torch.float64)
    assert_dtensor_close(close, reference, rtol=1e-3, atol=1e-3)
    far = torch.tensor([float("nan"), 100.0, 2e-3], dtype=torch.float64)
    with pytest.raises(AssertionError, match=r"1 of 3 elements .* max rel err inf"):
        assert_dtensor_close(far, reference, rtol=1e-3, atol=1e-3)


def test_per_rank_reference_is_compared_rank_by_rank():
    actual = LocalTensor({0: torch.zeros(2), 1: torch.ones(2)})
    assert_dtensor_close(actual, LocalTensor({0: torch.zeros(2), 1: torch.ones(2)}), **EXACT)
    with pytest.raises(AssertionError, match=r"ranks \[0\] of \[0, 1\] differ"):
        assert_dtensor_close(actual, LocalTensor({0: torch.ones(2), 1: torch.ones(2)}), **EXACT)


def test_plain_tensor_is_this_process_rank():
    assert list(rank_values(torch.zeros(1))) == [0]
    assert_dtensor_close(torch.zeros(2, dtype=torch.bfloat16), torch.zeros(2), **EXACT)


@pytest.mark.parametrize(
    "actual, expected, ndim",
    [
        ((Shard(-1),), [Shard(3)], 4),
        ([StridedShard(0, split_factor=1), Replicate()], (Shard(0), Replicate()), 4),
        ((Shard(1), Shard(2)), [Shard(1), Shard(2)], None),
        ((StridedShard(0, split_factor=2), Shard(-2)), (StridedShard(0, split_factor=2), Shard(1)),
         3),
    ],
    ids=["negative-dim", "strided-sf1", "list-vs-tuple", "strided-sf2"],
)
def test_placements_equal_after_normalisation(actual, expected, ndim):
    assert_placements(actual, expected, ndim=ndim)


@pytest.mark.mesh(cp=2, tp=2)
def test_placements_of_a_dtensor_use_its_ndim(mesh):
    x_dt = distribute_tensor(_x_BLNH(), mesh, [Shard(1), Shard(2)])
    assert_placements(x_dt, [Shard(-3), Shard(-2)])
    with pytest.raises(AssertionError) as error:
        assert_placements(x_dt, [Shard(1), Shard(3)])
    assert str(error.value) == (
        "assert_placements: placements differ (ndim=4)\n"
        "  actual:   (S(1), S(2))  normalised (S(1), S(2))\n"
        "  expected: (S(1), S(3))  normalised (S(1), S(3))"
    )


def test_placement_mismatches_print_short_forms():
    with pytest.raises(AssertionError) as error:
        assert_placements([StridedShard(0, split_factor=2), Shard(1)], [Shard(0), Partial()],
                          ndim=3)
    assert "actual:   (_S(0, 2), S(1))" in str(error.value)
    assert "expected: (S(0), P(sum))" in str(error.value)
    with pytest.raises(AssertionError):
        assert_placements([Shard(0)], [Shard(0), Replicate()], ndim=2)


def test_negative_dims_without_ndim_are_a_caller_error():
    with pytest.raises(ValueError, match=r"use negative dims, which need the tensor's ndim.*Fix"):
        assert_placements([Shard(-1)], [Shard(3)])


@pytest.mark.mesh(cp=2, tp=2)
def test_a_replicate_that_differs_across_ranks_is_caught_on_the_ranks_that_differ(mesh):
    # The docs/bugs.md row 11 shape: rank 0 holds the right values, so a rank-0-only check passes.
    from torch.distributed.tensor import DTensor

    with _compat.maybe_disable_local_tensor_mode():
        right_BLNH = _x_BLNH()
        per_rank = {r: right_BLNH + (r % 2) for r in range(4)}  # odd ranks off by one
    out_dt = DTensor.from_local(LocalTensor(per_rank), mesh, [Replicate(), Replicate()],
                                run_check=False)
    assert torch.equal(rank_values(out_dt)[0], right_BLNH)
    with pytest.raises(AssertionError, match=r"ranks \[1, 3\] of \[0, 1, 2, 3\] differ"):
        assert_dtensor_close(out_dt, right_BLNH, **EXACT)


@pytest.mark.mesh(tp=4)
def test_a_partial_dtensor_is_compared_after_its_reduction(mesh):
    from torch.distributed.tensor import DTensor

    with _compat.maybe_disable_local_tensor_mode():
        ones = torch.ones(2, 3)
    partial_dt = DTensor.from_local(LocalTensor({r: ones for r in range(4)}), mesh, [Partial()],
                                    run_check=False)
    assert_dtensor_close(partial_dt, 4 * ones, **EXACT)
    with pytest.raises(AssertionError, match="max abs err 3.000e"):
        assert_dtensor_close(partial_dt, ones, **EXACT, msg="Partial read as Replicate")
