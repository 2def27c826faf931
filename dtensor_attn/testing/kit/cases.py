"""One call of a subject in the conformance matrix: its inputs and every comparison.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Global float64 q/k/v in BLNH are made outside the simulated ranks (every rank holds the same
values) and distributed with one placement per mesh axis: ``dp`` shards batch, ``cp`` the
sequence, ``tp`` the heads. The subject's output is judged in the layout its global shape
implies (BLNH or TNH; the LSE: BLN, BNL or TN):
- shape: it must be one of those layouts' shapes;
- placements: those the layout implies for the inputs' sharding (the table below, written out
  from docs/design.md, "Layouts and placements", not computed by the code under test);
- values: every rank's ``full_tensor()`` equals the float64 reference; where it does not, each
  rank's own shard is compared with the slice of the reference its placements name;
- gradients of sum(out * w) (+ sum(lse * w')), w random: each input's gradient is placed like
  the input and equals the reference gradient on every rank.

Expected placements, per mesh axis that shards (B, L, N) of the BLNH inputs::

    BLNH, BLN: S(0), S(1), S(2)     BNL: S(0), S(2), S(1)
    TNH, TN:   S(0), _S(0, sf=B/batch shards of earlier axes) (S(0) when sf is 1), S(1)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from dtensor_attn import _compat
from dtensor_attn._compat import Partial, Replicate, Shard, maybe_disable_local_tensor_mode
from dtensor_attn.layout import Dim, Layout
from dtensor_attn.placements import Placements, format_placements, normalize_placements
from dtensor_attn.testing.asserts import rank_values
from dtensor_attn.testing.kit.result import CaseFailure, FailureKind
from dtensor_attn.testing.reference import AttentionInputs, make_inputs, reference_attention, to_layout

OUT_LAYOUTS = (Layout.BLNH, Layout.TNH)
LSE_LAYOUTS = (Layout.BLN, Layout.BNL, Layout.TN)
_ERROR_CHARS = 600


@dataclasses.dataclass(frozen=True, slots=True)
class CallSettings:
    """Shapes, precision and tolerance of every call (float64 by default: see ConformanceOptions)."""

    batch: int = 2
    seq: int = 16  # != heads, so that BLN and BNL shapes differ
    num_q_heads: int = 8
    num_kv_heads_gqa: int = 4
    head_dim: int = 4
    dtype: torch.dtype = torch.float64
    rtol: float = 1e-9
    atol: float = 1e-9
    backward: bool = True
    seed: int = 0

    def sizes(self) -> dict[Dim, int]:
        return {Dim.B: self.batch, Dim.L: self.seq, Dim.N: self.num_q_heads, Dim.H: self.head_dim}


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """Where one call's inputs live: a mesh and, per mesh axis, the BLNH dim it shards."""

    case: str
    mesh: DeviceMesh
    axis_dims: tuple[Dim | None, ...]  # None: the inputs are replicated on that axis

    def in_placements(self) -> Placements:
        return tuple(Replicate() if d is None else Shard(Layout.BLNH.index(d)) for d in self.axis_dims)

    def expected(self, layout: Layout, batch: int) -> Placements:
        return expected_placements(layout, self.axis_dims, tuple(self.mesh.shape), batch)


@dataclasses.dataclass(slots=True)
class Observed:
    failures: list[CaseFailure]
    in_placements: str = ""
    out_placements: str = ""
    expected_out: str = ""


def expected_placements(layout: Layout, axis_dims: Sequence[Dim | None], mesh_shape: Sequence[int], batch: int) -> Placements:
    """The placements of a tensor in ``layout`` holding attention results for inputs sharded by
    ``axis_dims`` (see the table in the module docstring)."""
    out, batch_shards = [], 1
    for dim, size in zip(axis_dims, mesh_shape):
        if dim is None:
            out.append(Replicate())
            continue
        index = layout.index(dim)
        if layout.dims[index] is Dim.T and dim is Dim.L:
            rows = batch // batch_shards  # each seq shard spans this many rows of packed tokens
            out.append(_compat.strided_shard(index, rows) if rows > 1 else Shard(index))
        else:
            out.append(Shard(index))
        if dim is Dim.B:
            batch_shards *= size
    return tuple(out)


def make_call_inputs(settings: CallSettings, *, gqa: bool, documents: bool) -> AttentionInputs:
    with maybe_disable_local_tensor_mode():
        return make_inputs(
            batch=settings.batch, seq=settings.seq, num_q_heads=settings.num_q_heads,
            num_kv_heads=settings.num_kv_heads_gqa if gqa else settings.num_q_heads,
            head_dim=settings.head_dim, documents=documents, seed=settings.seed, dtype=settings.dtype,
        )


def _error(case: str, what: str, phase: str, error: BaseException) -> CaseFailure:
    text = " ".join(f"{type(error).__name__}: {error}".split())
    if len(text) > _ERROR_CHARS:
        text = text[: _ERROR_CHARS - 3] + "..."
    return CaseFailure(case, FailureKind.ERROR, what, f"{phase} to succeed", "an exception", detail=text)


def run_call(subject: Callable, call: Call, inputs: AttentionInputs, mask, settings: CallSettings) -> Observed:
    """Call ``subject`` once on ``call``'s mesh; every difference becomes a CaseFailure."""
    documents = mask is not None
    with maybe_disable_local_tensor_mode():
        out_ref_BLNH, lse_ref_BLN = (t.detach() for t in reference_attention(inputs, use_documents=documents))
        generator = torch.Generator().manual_seed(settings.seed + 1)
        w_out_BLNH = torch.randn(out_ref_BLNH.shape, generator=generator, dtype=torch.float64)
        w_lse_BLN = torch.randn(lse_ref_BLN.shape, generator=generator, dtype=torch.float64)
    in_pl = call.in_placements()
    observed = Observed([], in_placements=format_placements(in_pl))
    q, k, v = (distribute_tensor(t, call.mesh, in_pl).requires_grad_() for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    try:
        result = subject(q, k, v) if mask is None else subject(q, k, v, mask=mask)
    except Exception as error:  # the subject's own exception is the finding
        observed.failures.append(_error(call.case, "subject", "the call", error))
        return observed
    out, lse = result if isinstance(result, tuple) and len(result) == 2 else (result, None)
    for what, t in (("output", out), ("lse", lse)):
        if t is not None and not isinstance(t, DTensor):
            observed.failures.append(CaseFailure(call.case, FailureKind.ERROR, what, "a DTensor", type(t).__name__,
                                                 detail="the subject must return DTensors (out, or (out, lse))"))
    if observed.failures:
        return observed
    observed.out_placements = format_placements(out.placements)
    out_layout, out_full = _check(call, "output", out, OUT_LAYOUTS, out_ref_BLNH, settings, observed)
    lse_layout, lse_full = (None, None)
    if lse is not None:
        lse_layout, lse_full = _check(call, "lse", lse, LSE_LAYOUTS, lse_ref_BLN, settings, observed)
    if not settings.backward or out_full is None or (lse is not None and lse_full is None):
        return observed
    try:
        loss = (out_full * to_layout(w_out_BLNH, out_layout).to(out_full.dtype)).sum()
        if lse is not None:
            loss = loss + (lse_full * to_layout(w_lse_BLN, lse_layout).to(lse_full.dtype)).sum()
        loss.backward()
    except Exception as error:
        observed.failures.append(_error(call.case, "backward", "backward", error))
        return observed
    ref_grads = _reference_grads(inputs, documents, w_out_BLNH, w_lse_BLN if lse is not None else None)
    for name, t, ref in zip("qkv", (q, k, v), ref_grads):
        _check_grad(call, f"grad {name}", t, ref, settings, observed)
    return observed


def _check(call, what, t: DTensor, layouts, reference, settings, observed):
    """Shape, placements and values of one returned tensor; (layout, differentiable full) or (None, None)."""
    sizes, shape = settings.sizes(), tuple(t.shape)
    layout = next((lay for lay in layouts if lay.shape(sizes) == shape), None)
    if layout is None:
        allowed = " or ".join(f"{lay.name} {lay.shape(sizes)}" for lay in layouts)
        detail = (f"local shape {tuple(t.to_local().shape)} with placements {format_placements(t.placements)}; "
                  "placements of another layout scale the wrong dims")
        if Layout.BNLH.shape(sizes) == shape:
            detail = (f"BNLH's shape: a legacy BNLH output, or placements {format_placements(t.placements)} "
                      "that scale the wrong dims; the contract is BLNH in, BLNH or TNH out")
        observed.failures.append(CaseFailure(call.case, FailureKind.SHAPE, what, allowed, str(shape), detail=detail))
        return None, None
    expected = call.expected(layout, settings.batch)
    actual = normalize_placements(t.placements, t.ndim)
    if what == "output":
        observed.expected_out = format_placements(expected)
    if actual != normalize_placements(expected, t.ndim):
        observed.failures.append(CaseFailure(call.case, FailureKind.PLACEMENTS, what, format_placements(expected),
                                             format_placements(actual), detail=f"{layout.name} output of inputs {format_placements(call.in_placements())}"))
    try:
        full = t.full_tensor()
        per_rank = rank_values(full)
    except Exception as error:
        observed.failures.append(_error(call.case, what, "full_tensor()", error))
        return None, None
    reference = to_layout(reference, layout)
    _compare(call, FailureKind.VALUES, f"{what} ({layout.name})", t, per_rank, reference, settings, observed)
    return layout, full


def _check_grad(call, what, t: DTensor, reference, settings, observed) -> None:
    grad = t.grad
    if grad is None:
        observed.failures.append(CaseFailure(call.case, FailureKind.GRAD, what, "a gradient", "None",
                                             detail="no gradient reached this input: the graph is cut"))
        return
    expected, actual = normalize_placements(t.placements, t.ndim), normalize_placements(grad.placements, grad.ndim)
    if expected != actual:
        observed.failures.append(CaseFailure(call.case, FailureKind.GRAD_PLACEMENTS, what, format_placements(expected),
                                             format_placements(actual), detail="a gradient is placed like its input"))
    try:
        per_rank = rank_values(grad)
    except Exception as error:
        observed.failures.append(_error(call.case, what, "full_tensor()", error))
        return
    _compare(call, FailureKind.GRAD, what, grad, per_rank, reference, settings, observed)


def _compare(call, kind, what, t: DTensor, per_rank, reference, settings, observed) -> None:
    """Every rank's full value against the reference; on a difference, also each rank's shard."""
    with maybe_disable_local_tensor_mode():
        bad, worst, worst_rank = [], 0.0, None
        for rank, value in sorted(per_rank.items()):
            err = (value.double() - reference).abs().nan_to_num(nan=float("inf"))
            if bool((err > settings.atol + settings.rtol * reference.abs()).any()):
                bad.append(rank)
            if worst_rank is None or float(err.max()) > worst:
                worst, worst_rank = float(err.max()), rank
        if not bad:
            return
        notes = [_ratio_note(per_rank[bad[0]].double(), reference)]
        good = sorted(set(per_rank) - set(bad))
        if good:
            notes.append(f"ranks {good} hold the right full tensor: the error depends on the rank")
    shard_ranks = _wrong_shards(t, reference, settings)
    if shard_ranks and len(shard_ranks) < len(per_rank):
        right = sorted(set(per_rank) - set(shard_ranks))
        notes.append(f"the shards of ranks {right} are right: a check of those ranks' shards alone would pass")
    observed.failures.append(CaseFailure(
        call.case, kind, what, "the float64 reference", "different values", ranks=tuple(bad),
        shard_ranks=shard_ranks, max_err=worst, detail="; ".join(n for n in notes if n),
    ))


def _ratio_note(value: torch.Tensor, reference: torch.Tensor) -> str:
    """'actual = 2 x expected' where the whole tensor is off by one factor (a sum too many or few)."""
    denom = float((reference * reference).sum())
    if denom == 0 or not bool(value.isfinite().all()):
        return ""
    factor = float((value * reference).sum()) / denom
    if float((value - factor * reference).abs().max()) > 1e-6 * float(reference.abs().max()) or abs(factor - 1) < 1e-6:
        return ""
    return f"actual = {factor:.4g} x expected everywhere: summed over ranks too often or too rarely (Partial vs Replicate?)"


def _wrong_shards(t: DTensor, reference: torch.Tensor, settings) -> tuple[int, ...]:
    """Ranks whose local shard differs from the slice of ``reference`` that t's placements name."""
    if any(isinstance(p, Partial) for p in t.placements):
        return ()
    try:
        with torch.no_grad():
            expected = distribute_tensor(reference.to(t.dtype), t.device_mesh, t.placements).to_local()
            actual = t.to_local()
    except Exception:  # the full-tensor comparison already reported the difference
        return ()
    with maybe_disable_local_tensor_mode():
        expected_by_rank, actual_by_rank = _compat.rank_tensors(expected), _compat.rank_tensors(actual)
        return tuple(
            rank for rank, value in sorted(actual_by_rank.items())
            if value.shape != expected_by_rank[rank].shape
            or not torch.allclose(value.double(), expected_by_rank[rank].double(), rtol=settings.rtol, atol=settings.atol)
        )


def _reference_grads(inputs: AttentionInputs, documents: bool, w_out_BLNH, w_lse_BLN):
    with maybe_disable_local_tensor_mode():
        q, k, v = (t.detach().double().requires_grad_() for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
        out_BLNH, lse_BLN = reference_attention(AttentionInputs(q, k, v, inputs.positions_BL), use_documents=documents)
        loss = (out_BLNH * w_out_BLNH).sum()
        if w_lse_BLN is not None:
            loss = loss + (lse_BLN * w_lse_BLN).sum()
        return torch.autograd.grad(loss, (q, k, v))
