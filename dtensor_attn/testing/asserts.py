"""Assertions for distributed tests: values on every rank, and normalised placements.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Checking rank 0 only hides bugs (with CP, rank 0's causal chunk needs no other rank's keys), so
``assert_dtensor_close`` compares the full tensor of every rank: each simulated rank's entry of
a LocalTensor, or this rank's full tensor under torchrun, where the harness's outcome agreement
turns one rank's failure into a failure on all ranks, naming that rank.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dtensor_attn import _compat
from dtensor_attn._compat import Placement
from dtensor_attn.placements import format_placements, normalize_placements

_MAX_RANKS_LISTED = 8


def _this_rank() -> int:
    """This process's rank under a real process group; 0 otherwise (one process, one rank)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() != "fake":
        return dist.get_rank()
    return 0


def rank_values(tensor: torch.Tensor) -> dict[int, torch.Tensor]:
    """{rank: plain tensor}: a DTensor's full tensor (or a tensor) as each rank holds it.

    A LocalTensor (simulated ranks) gives one entry per simulated rank; a plain tensor gives
    this process's rank only.
    """
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    if isinstance(tensor, _compat.AsyncCollectiveTensor):
        # RowwiseParallel's default output: unwaited, it would show this rank's value only.
        tensor = tensor.wait()
    with _compat.maybe_disable_local_tensor_mode():
        if isinstance(tensor, _compat.LocalTensor):
            return {rank: t.detach() for rank, t in sorted(_compat.rank_tensors(tensor).items())}
        return {_this_rank(): tensor.detach()}


def _rank_mismatch(
    actual: torch.Tensor, reference: torch.Tensor, rtol: float, atol: float
) -> str | None:
    """One line describing how ``actual`` differs from ``reference``, or None if close."""
    if tuple(actual.shape) != tuple(reference.shape):
        return f"shape {tuple(actual.shape)}, expected {tuple(reference.shape)}"
    actual64 = actual.detach().to(device="cpu", dtype=torch.float64)
    reference64 = reference.detach().to(device="cpu", dtype=torch.float64)
    abs_err = (actual64 - reference64).abs()
    both_nan = actual64.isnan() & reference64.isnan()
    abs_err = torch.where(both_nan, torch.zeros_like(abs_err), abs_err)
    bad = ~((abs_err <= atol + rtol * reference64.abs()) | both_nan)  # one-sided NaN is bad
    num_bad = int(bad.sum())
    if num_bad == 0:
        return None
    finite_err = torch.where(abs_err.isnan(), torch.full_like(abs_err, float("inf")), abs_err)
    worst = int(finite_err.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), actual64.shape))
    # Where the reference is 0 (or NaN) any error is infinitely large in relative terms.
    nonzero = (reference64 != 0) & ~reference64.isnan()
    rel_err = torch.where(
        nonzero,
        finite_err / reference64.abs(),
        torch.where(finite_err == 0, 0.0, float("inf")),
    )
    return (
        f"{num_bad} of {actual64.numel()} elements outside tolerance; max abs err "
        f"{float(finite_err.max()):.3e} at {index} (actual {float(actual64[index]):.6g}, "
        f"expected {float(reference64[index]):.6g}); max rel err {float(rel_err.max()):.3e}"
    )


def assert_dtensor_close(
    actual: torch.Tensor,
    reference: torch.Tensor,
    *,
    rtol: float,
    atol: float,
    msg: str = "",
) -> None:
    """Every rank's full ``actual`` equals ``reference`` within ``atol + rtol * |reference|``.

    ``actual``: a DTensor (its ``full_tensor()`` is taken), a LocalTensor or a tensor.
    ``reference``: a plain single-device tensor of any dtype, or per-rank values (a LocalTensor,
    e.g. built inside simulated ranks) compared rank by rank; both are compared in float64.
    The error names the ranks that differ, the worst element and the shapes.
    """
    __tracebackhide__ = True
    per_rank = rank_values(actual)
    reference_per_rank = rank_values(reference)
    if len(reference_per_rank) == 1:
        only = next(iter(reference_per_rank.values()))
        reference_per_rank = {rank: only for rank in per_rank}
    missing = sorted(set(per_rank) - set(reference_per_rank))
    if missing:
        raise ValueError(
            f"assert_dtensor_close: the reference holds ranks {sorted(reference_per_rank)}, the "
            f"actual value ranks {sorted(per_rank)}; no reference for ranks {missing}. Fix: pass "
            "a plain tensor as the reference (one global value for every rank)."
        )
    with _compat.maybe_disable_local_tensor_mode():
        failures = {
            rank: line
            for rank, value in per_rank.items()
            if (line := _rank_mismatch(value, reference_per_rank[rank], rtol, atol)) is not None
        }
    if not failures:
        return
    ranks = sorted(per_rank)
    lines = [
        f"assert_dtensor_close: {msg + ': ' if msg else ''}ranks {sorted(failures)} of "
        f"{ranks} differ from the reference (rtol={rtol:g}, atol={atol:g})"
    ]
    for rank in sorted(failures)[:_MAX_RANKS_LISTED]:
        lines.append(f"  rank {rank}: {failures[rank]}")
    if len(failures) > _MAX_RANKS_LISTED:
        lines.append(f"  ... and {len(failures) - _MAX_RANKS_LISTED} more ranks")
    agreeing = [r for r in ranks if r not in failures]
    if agreeing:
        lines.append(f"  ranks {agreeing} match the reference: a rank-dependent mistake")
    raise AssertionError("\n".join(lines))


def assert_placements(
    dtensor_or_placements: DTensor | Sequence[Placement],
    expected: Sequence[Placement],
    *,
    ndim: int | None = None,
) -> None:
    """Placements equal ``expected`` after normalisation (negative dims, ``_StridedShard`` with
    split factor 1 is ``Shard``, list vs tuple). ``ndim`` defaults to the DTensor's; pass it
    when comparing bare placements that use negative dims."""
    __tracebackhide__ = True
    if isinstance(dtensor_or_placements, DTensor):
        actual = tuple(dtensor_or_placements.placements)
        ndim = dtensor_or_placements.ndim if ndim is None else ndim
    else:
        actual = tuple(dtensor_or_placements)
    expected = tuple(expected)
    negative = [p for p in actual + expected if getattr(p, "dim", 0) < 0]
    if ndim is None and negative:
        raise ValueError(
            f"assert_placements: {format_placements(negative)} use negative dims, which need the "
            "tensor's ndim to compare. Fix: pass a DTensor, or ndim=<tensor ndim>."
        )
    actual_norm = normalize_placements(actual, ndim or 0)
    expected_norm = normalize_placements(expected, ndim or 0)
    if actual_norm == expected_norm:
        return
    raise AssertionError(
        f"assert_placements: placements differ{f' (ndim={ndim})' if ndim is not None else ''}\n"
        f"  actual:   {format_placements(actual)}  normalised {format_placements(actual_norm)}\n"
        f"  expected: {format_placements(expected)}  normalised {format_placements(expected_norm)}"
    )
