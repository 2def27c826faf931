"""One call of a subject in the conformance matrix: its inputs and every comparison.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Global q/k/v in BLNH are made outside the simulated ranks (every rank holds the same values,
rounded to the case's dtype) and distributed with one placement per mesh axis, by what the
axis shards (``axis_roles``: batch, sequence or heads; ``Replicate`` on an axis of size 1, as
torch normalises it). The subject's output is judged in the layout its global shape implies
(BLNH or TNH; the LSE: BLN, BNL or TN):
- shape: it must be one of those layouts' shapes;
- placements: those the layout implies for the inputs' sharding (the table below, written out
  from docs/design.md, "Layouts and placements", not computed by the code under test);
- values: every rank's ``full_tensor()`` equals the float64 reference (from the same rounded
  inputs); where it does not, each rank's own shard is compared with the slice of the
  reference its placements name. A document case whose output equals the causal-only
  reference (where the documents change it) is ``mask_no_effect``: the mask was not applied;
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
from dtensor_attn._compat import Replicate, Shard, maybe_disable_local_tensor_mode
from dtensor_attn.layout import Dim, Layout
from dtensor_attn.placements import Placements, format_placements
from dtensor_attn.testing.asserts import rank_values
from dtensor_attn.testing.kit.compare import (
    compare_ranks, error_failure, on_mesh, placements_failure, tolerance_exceeded,
)
from dtensor_attn.testing.kit.result import CaseFailure, FailureKind
from dtensor_attn.testing.kit.spec import CallingConvention, CaseInfo, Shapes
from dtensor_attn.testing.reference import AttentionInputs, make_inputs, reference_attention, to_layout

OUT_LAYOUTS = (Layout.BLNH, Layout.TNH)
LSE_LAYOUTS = (Layout.BLN, Layout.BNL, Layout.TN)


@dataclasses.dataclass(frozen=True, slots=True)
class CallSettings:
    """Shapes, device, precision and tolerance of every call (float64 on CPU by default)."""

    shapes: Shapes = Shapes()
    dtype: torch.dtype = torch.float64
    rtol: float = 1e-9
    atol: float = 1e-9
    backward: bool = True
    seed: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def batch(self) -> int:
        return self.shapes.batch

    @property
    def seq(self) -> int:
        return self.shapes.seq

    @property
    def num_q_heads(self) -> int:
        return self.shapes.num_q_heads

    def sizes(self) -> dict[Dim, int]:
        return self.shapes.sizes()


@dataclasses.dataclass(frozen=True, slots=True)
class Call:
    """Where one call's inputs live: a mesh and, per mesh axis, the BLNH dim it shards."""

    case: str
    mesh: DeviceMesh
    axis_dims: tuple[Dim | None, ...]  # None: the inputs are replicated on that axis

    def in_placements(self) -> Placements:
        """Shard by role; Replicate on a replicated axis and on an axis of size 1 (torch's normal form)."""
        return tuple(Replicate() if d is None or size == 1 else Shard(Layout.BLNH.index(d))
                     for d, size in zip(self.axis_dims, tuple(self.mesh.shape)))

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
    shapes = settings.shapes
    with maybe_disable_local_tensor_mode():
        return make_inputs(
            batch=shapes.batch, seq=shapes.seq, num_q_heads=shapes.num_q_heads,
            num_kv_heads=shapes.num_kv_heads_gqa if gqa else shapes.num_q_heads,
            head_dim=shapes.head_dim, documents=documents, seed=settings.seed, dtype=settings.dtype,
        )


def reference(inputs: AttentionInputs, documents: bool, settings: CallSettings, transform: Callable | None):
    """(out_BLNH, lse_BLN) in float64 on CPU, through the subject's out_transform if it has one."""
    out_BLNH, lse_BLN = reference_attention(inputs, use_documents=documents, scale=settings.shapes.scale)
    if transform is not None:
        out_BLNH = transform(out_BLNH, lse_BLN)
    return out_BLNH, lse_BLN


def run_call(subject: Callable, call: Call, inputs: AttentionInputs, mask, settings: CallSettings,
             convention: CallingConvention = CallingConvention(), case: CaseInfo | None = None) -> Observed:
    """Call ``subject`` once on ``call``'s mesh; every difference becomes a CaseFailure."""
    documents = case.documents if case is not None else mask is not None
    case = case or CaseInfo(gqa=inputs.k_BLNH.shape[2] != inputs.q_BLNH.shape[2], documents=documents, lse=None, shapes=settings.shapes)
    transform = convention.out_transform
    with maybe_disable_local_tensor_mode():
        out_ref_BLNH, lse_ref_BLN = (t.detach() for t in reference(inputs, documents, settings, transform))
        generator = torch.Generator().manual_seed(settings.seed + 1)
        w_out_BLNH = torch.randn(out_ref_BLNH.shape, generator=generator, dtype=torch.float64)
        w_lse_BLN = torch.randn(lse_ref_BLN.shape, generator=generator, dtype=torch.float64)
    in_pl = call.in_placements()
    observed = Observed([], in_placements=format_placements(in_pl))
    try:
        kwargs = convention.kwargs(case)
    except Exception as error:
        observed.failures.append(error_failure(call.case, "extra_kwargs", "the calling convention's extra_kwargs", error))
        return observed
    if mask is not None:
        kwargs[convention.mask_keyword] = mask
    q, k, v = (distribute_tensor(t.to(settings.device), call.mesh, in_pl).requires_grad_()
               for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    try:
        result = subject(q, k, v, **kwargs)
    except Exception as error:  # the subject's own exception is the finding
        observed.failures.append(error_failure(call.case, "subject", "the call", error))
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
    if documents and _mask_had_no_effect(call, out, out_layout, inputs, settings, transform, observed):
        return observed
    if not settings.backward or out_full is None or (lse is not None and lse_full is None):
        return observed
    try:
        loss = (out_full * to_layout(w_out_BLNH, out_layout).to(out_full.device, out_full.dtype)).sum()
        if lse is not None:
            loss = loss + (lse_full * to_layout(w_lse_BLN, lse_layout).to(lse_full.device, lse_full.dtype)).sum()
        loss.backward()
    except Exception as error:
        observed.failures.append(error_failure(call.case, "backward", "backward", error))
        return observed
    ref_grads = _reference_grads(inputs, documents, settings, transform, w_out_BLNH, w_lse_BLN if lse is not None else None)
    for name, t, ref in zip("qkv", (q, k, v), ref_grads):
        _check_grad(call, f"grad {name}", t, ref, settings, observed)
    return observed


def _mask_had_no_effect(call, out, layout, inputs, settings, transform, observed) -> bool:
    """A document case's wrong output that equals the causal-only result (where the documents
    change it) becomes one MASK_NO_EFFECT failure in place of the values failures it causes."""
    wrong = [f for f in observed.failures if f.kind is FailureKind.VALUES and f.what.startswith("output")]
    if not wrong or layout is None:
        return False
    with maybe_disable_local_tensor_mode():
        causal_BLNH, _ = reference(inputs, False, settings, transform)
        documents_BLNH, _ = reference(inputs, True, settings, transform)
        if not tolerance_exceeded(documents_BLNH, causal_BLNH, settings.rtol, settings.atol)[0]:
            return False  # these documents do not change the result: nothing to tell apart
    per_rank = rank_values(out)
    with maybe_disable_local_tensor_mode():
        causal = to_layout(causal_BLNH.detach(), layout)
        if any(tolerance_exceeded(value, causal, settings.rtol, settings.atol)[0] for value in per_rank.values()):
            return False
    observed.failures[:] = [f for f in observed.failures if f.kind is not FailureKind.VALUES] + [CaseFailure(
        call.case, FailureKind.MASK_NO_EFFECT, "output", "causal attention within the packed documents",
        "causal attention over the whole sequence", ranks=tuple(sorted(per_rank)),
        detail=("the output equals the causal-only result on every rank: the document mask was not applied. Is it "
                "passed under the keyword the module reads (CallingConvention(mask_keyword=...); the kit's default is "
                "mask=), or swallowed by **kwargs?"),
    )]
    return True


def _check(call, what, t: DTensor, layouts, ref, settings, observed):
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
    if what == "output":
        observed.expected_out = format_placements(expected)
    failure = placements_failure(call.case, what, t, expected, f"{layout.name} output of inputs {format_placements(call.in_placements())}")
    if failure is not None:
        observed.failures.append(failure)
    try:
        full = t.full_tensor()
        per_rank = rank_values(full)
    except Exception as error:
        observed.failures.append(error_failure(call.case, what, "full_tensor()", error))
        return None, None
    failure = compare_ranks(call.case, FailureKind.VALUES, f"{what} ({layout.name})", t, per_rank,
                            to_layout(ref, layout), settings.rtol, settings.atol)
    if failure is not None:
        observed.failures.append(failure)
    return layout, full


def _check_grad(call, what, t: DTensor, ref, settings, observed) -> None:
    grad = t.grad
    if grad is None:
        observed.failures.append(CaseFailure(call.case, FailureKind.GRAD, what, "a gradient", "None",
                                             detail="no gradient reached this input: the graph is cut"))
        return
    mesh_shape = tuple(t.device_mesh.shape)
    expected, actual = on_mesh(t.placements, t.ndim, mesh_shape), on_mesh(grad.placements, grad.ndim, mesh_shape)
    if expected != actual:
        observed.failures.append(CaseFailure(call.case, FailureKind.GRAD_PLACEMENTS, what, format_placements(expected),
                                             format_placements(actual), detail="a gradient is placed like its input"))
    try:
        per_rank = rank_values(grad)
    except Exception as error:
        observed.failures.append(error_failure(call.case, what, "full_tensor()", error))
        return
    failure = compare_ranks(call.case, FailureKind.GRAD, what, grad, per_rank, ref, settings.rtol, settings.atol)
    if failure is not None:
        observed.failures.append(failure)


def _reference_grads(inputs: AttentionInputs, documents: bool, settings, transform, w_out_BLNH, w_lse_BLN):
    with maybe_disable_local_tensor_mode():
        q, k, v = (t.detach().double().requires_grad_() for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
        out_BLNH, lse_BLN = reference(AttentionInputs(q, k, v, inputs.positions_BL), documents, settings, transform)
        loss = (out_BLNH * w_out_BLNH).sum()
        if w_lse_BLN is not None:
            loss = loss + (lse_BLN * w_lse_BLN).sum()
        return torch.autograd.grad(loss, (q, k, v))
