"""The kit's comparisons of one returned DTensor: shape, placements, every rank's values.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Tolerance: ``|actual - reference| <= atol * max(1, max|reference|) + rtol * |reference|``: the
absolute part scales with the tensor's magnitude, so one rule fits outputs (|out| <= max|v|),
LSEs (~log L) and gradients of a sum loss (which grow with L). In float64 (the default) only
reduction order differs (~1e-15 relative) and 1e-9 leaves six orders of margin; see
``ConformanceOptions`` for bf16. A placement mistake moves values by O(1) relative.

Placements are compared as torch reads them: normalised (``_S(d, 1)`` is ``S(d)``), and any
placement on a mesh axis of size 1 is ``Replicate`` (torch and torchtitan normalise a shard or
partial on a 1-rank axis to Replicate: it splits nothing and sums one value).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from dtensor_attn import _compat
from dtensor_attn._compat import Partial, Replicate, maybe_disable_local_tensor_mode
from dtensor_attn.placements import Placements, format_placements, normalize_placements
from dtensor_attn.testing.kit.result import CaseFailure, FailureKind

_ERROR_CHARS = 600


def on_mesh(placements: Sequence, ndim: int, mesh_shape: Sequence[int]) -> Placements:
    """``placements`` normalised, with every placement on a size-1 axis read as Replicate."""
    normal = normalize_placements(tuple(placements), ndim)
    return tuple(Replicate() if size == 1 else p for p, size in zip(normal, mesh_shape))


def error_failure(case: str, what: str, phase: str, error: BaseException) -> CaseFailure:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    if len(text) > _ERROR_CHARS:
        text = text[: _ERROR_CHARS - 3] + "..."
    return CaseFailure(case, FailureKind.ERROR, what, f"{phase} to succeed", "an exception", detail=text)


def tolerance_exceeded(value: torch.Tensor, reference: torch.Tensor, rtol: float, atol: float) -> tuple[bool, float]:
    """(any element outside the tolerance, max abs error); NaN counts as infinitely wrong."""
    value = value.detach().double().cpu()
    err = (value - reference).abs().nan_to_num(nan=float("inf"))
    bound = atol * max(1.0, float(reference.abs().max()) if reference.numel() else 1.0) + rtol * reference.abs()
    return bool((err > bound).any()), float(err.max()) if err.numel() else 0.0


def compare_ranks(case: str, kind: FailureKind, what: str, t: DTensor, per_rank, reference, rtol, atol) -> CaseFailure | None:
    """Every rank's full value against the reference; on a difference, also each rank's shard."""
    with maybe_disable_local_tensor_mode():
        bad, worst = [], 0.0
        for rank, value in sorted(per_rank.items()):
            exceeded, err = tolerance_exceeded(value, reference, rtol, atol)
            if exceeded:
                bad.append(rank)
            worst = max(worst, err)
        if not bad:
            return None
        notes = [ratio_note(per_rank[bad[0]].double().cpu(), reference)]
        good = sorted(set(per_rank) - set(bad))
        if good:
            notes.append(f"ranks {good} hold the right full tensor: the error depends on the rank")
    shard_ranks = wrong_shards(t, reference, rtol, atol)
    if shard_ranks and len(shard_ranks) < len(per_rank):
        right = sorted(set(per_rank) - set(shard_ranks))
        notes.append(f"the shards of ranks {right} are right: a check of those ranks' shards alone would pass")
    return CaseFailure(case, kind, what, "the float64 reference", "different values", ranks=tuple(bad),
                       shard_ranks=shard_ranks, max_err=worst, detail="; ".join(n for n in notes if n))


def ratio_note(value: torch.Tensor, reference: torch.Tensor) -> str:
    """'actual = 2 x expected' where the whole tensor is off by one factor (a sum too many or few)."""
    denom = float((reference * reference).sum())
    if denom == 0 or not bool(value.isfinite().all()):
        return ""
    factor = float((value * reference).sum()) / denom
    if float((value - factor * reference).abs().max()) > 1e-6 * float(reference.abs().max()) or abs(factor - 1) < 1e-6:
        return ""
    return f"actual = {factor:.4g} x expected everywhere: summed over ranks too often or too rarely (Partial vs Replicate?)"


def wrong_shards(t: DTensor, reference: torch.Tensor, rtol: float, atol: float) -> tuple[int, ...]:
    """Simulated ranks whose local shard differs from the slice of ``reference`` that t's placements name."""
    if any(isinstance(p, Partial) for p in t.placements) or not isinstance(t.to_local(), _compat.LocalTensor):
        return ()
    if any(isinstance(p, _compat.StridedShard) for p in t.placements):
        # simulated ranks split a plain tensor by _StridedShard as rank 0 would, on every rank:
        # no per-rank expectation to hold the shards to (the full-tensor comparison still runs)
        return ()
    try:
        with torch.no_grad():
            expected = distribute_tensor(reference.to(t.dtype).to(t.device), t.device_mesh, t.placements).to_local()
            actual = t.to_local()
    except Exception:  # the full-tensor comparison already reported the difference
        return ()
    with maybe_disable_local_tensor_mode():
        actual_by_rank = _compat.rank_tensors(actual)
        # a replicated reference comes back as one plain tensor: every rank expects it
        expected_by_rank = (
            _compat.rank_tensors(expected) if isinstance(expected, _compat.LocalTensor)
            else dict.fromkeys(actual_by_rank, expected)
        )
        return tuple(
            rank for rank, value in sorted(actual_by_rank.items())
            if value.shape != expected_by_rank[rank].shape
            or tolerance_exceeded(value, expected_by_rank[rank].double().cpu(), rtol, atol)[0]
        )


def placements_failure(case: str, what: str, t: DTensor, expected: Placements, detail: str) -> CaseFailure | None:
    mesh_shape = tuple(t.device_mesh.shape)
    actual = on_mesh(t.placements, t.ndim, mesh_shape)
    if actual == on_mesh(expected, t.ndim, mesh_shape):
        return None
    return CaseFailure(case, FailureKind.PLACEMENTS, what, format_placements(expected), format_placements(actual), detail=detail)
