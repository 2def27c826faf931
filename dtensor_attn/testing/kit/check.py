"""The conformance kit: ``check_attention`` runs an attention module over the placement matrix.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

The subject is any callable that takes BLNH q/k/v DTensors and returns a DTensor, BLNH or
packed TNH, or ``(out, lse)`` (LSE in BLN, BNL or TN), of causal self-attention with
``Shapes.scale`` (default 1/sqrt(head_dim)). Ways to hand it over:

- ``check_attention(module, make_mask=...)``: one module (or function). Each case gets a fresh
  ``copy.deepcopy`` of a module (a function is shared by every case). Packed-document cases
  call ``module(q, k, v, mask=make_mask(positions_BL))``, with ``positions_BL`` the global
  (B, L) positions of each token inside its document (0 where one starts). Without a mask
  builder those cases are skipped, with that reason.
- ``check_attention(module, convention=CallingConvention(...), prepare=..., shapes=Shapes(...))``:
  a module with its own calling convention (``attention_masks=``, a mask built per rank in its
  own type, ``enable_gqa=``/``scale=`` per case), set up per mesh by ``prepare`` (see spec.py).
- ``check_attention(factory=lambda config: MyAttention(config))``: a fresh subject per case
  from an ``AttentionConfig``, over every backend of the registry, masks from that backend.

By default every case runs on simulated ranks (one process) on CPU in float64, forward and
backward, compared on every rank with the float64 reference (cases.py); ``device="cuda"``
runs the simulated ranks on one GPU with the real kernels in bf16 (options.py). A
third-party ``flex_attention`` call runs per rank there (``_compat.flex_on_simulated_ranks``).
``mesh=<DeviceMesh>`` runs the cases on that mesh instead: under torchrun a real one (every rank
calls check_attention; each rank checks its own full tensors), in plain pytest the harness's
simulated one. A cached-state probe calls ONE
subject on a sequence of placements and meshes (probe.py). Case ids read
``varlen-TNH-cp2xtp2-gqa-docs-lse``.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Sequence

import torch
from torch.distributed.device_mesh import DeviceMesh

from dtensor_attn import _compat
from dtensor_attn._compat import flex_on_simulated_ranks, maybe_disable_local_tensor_mode
from dtensor_attn.config import AttentionConfig
from dtensor_attn.testing.harness.meshspec import mesh_id, num_ranks
from dtensor_attn.testing.harness.simulate import build_simulated_mesh, simulated_ranks
from dtensor_attn.testing.kit.cases import Call, make_call_inputs, run_call
from dtensor_attn.testing.kit.options import DEFAULT_MESHES, MASKS, MESHES, ConformanceOptions  # noqa: F401
from dtensor_attn.testing.kit.probe import _probe_calls, cache_probe  # noqa: F401
from dtensor_attn.testing.kit.result import CaseFailure, CaseOutcome, ConformanceResult, FailureKind, Status
from dtensor_attn.testing.kit.setup import CaseSkipped, Placed, case_mask, mesh_axes, place
from dtensor_attn.testing.kit.spec import CallingConvention, CaseInfo
from dtensor_attn.testing.kit.subjects import Variant, factory_variants, kernel_label, subject_variant


def check_attention(
    subject: Callable | None = None,
    *,
    factory: Callable[[AttentionConfig], Callable] | None = None,
    make_mask: Callable[[torch.Tensor], object] | None = None,
    convention: CallingConvention | None = None,
    name: str | None = None,
    mesh: DeviceMesh | None = None,
    **options,
) -> ConformanceResult:
    """Run ``subject`` (or subjects from ``factory``) over the matrix; see ConformanceOptions
    for ``options`` (by default: DEFAULT_MESHES, and pairwise combinations of GQA, masks and
    LSE). Exceptions of the subject become failures of their case. Without ``mesh`` the kit
    builds simulated meshes on the fake process group (call it where no real group is
    initialised); with ``mesh`` (a real DeviceMesh with named axes), ``meshes=`` is not used."""
    if (subject is None) == (factory is None):
        raise ValueError("check_attention: pass exactly one of subject or factory=. Fix: "
                         "check_attention(my_module) or check_attention(factory=lambda config: ...)")
    if mesh is not None:
        options.setdefault("device", mesh.device_type)
    opts = ConformanceOptions(**options)
    if factory is not None:
        if convention is not None:
            raise ValueError("check_attention: convention= is for a subject; a factory's masks come from the registry")
        variants = factory_variants(factory, backends=opts.backends, outputs=opts.outputs, lse=opts.lse)
        label = name or getattr(factory, "__name__", "factory")
    else:
        variants = [subject_variant(subject, make_mask, name, convention)]
        label = variants[0].name
    if not variants:
        raise ValueError(
            f"check_attention: no backend of {[str(b) for b in opts.backends] or 'the registry'} offers "
            f"the outputs {[layout.name for layout in opts.outputs]}. Fix: add Layout.BLNH to outputs."
        )
    meshes = opts.meshes if mesh is None else ((mesh_id(mesh_axes(mesh)), mesh_axes(mesh)),)
    # a mesh given inside simulated ranks (the harness's mesh fixture in plain pytest) stays simulated
    simulated = mesh is None or _compat.local_tensor_mode_active()
    outcomes: list[CaseOutcome] = []
    outside = maybe_disable_local_tensor_mode() if mesh is None else contextlib.nullcontext()
    with outside, (flex_on_simulated_ranks() if simulated else contextlib.nullcontext()):
        for mesh_name, axes in meshes:
            with _mesh_for(axes, mesh, opts) as case_mesh:
                for variant in variants:
                    for gqa, mask, lse in _combinations((opts.gqa, opts.masks, variant.lse_values), opts.combinations):
                        outcomes.append(_run_case(variant, mesh_name, case_mesh, gqa, mask, lse, opts, simulated))
        if opts.cache_check:
            outcomes += [_probe(v, opts, mesh, simulated) for v in variants]
    return ConformanceResult(label, tuple(outcomes))


def assert_conforms(subject: Callable | None = None, **kwargs) -> ConformanceResult:
    """check_attention(...).raise_for_failures(): for pytest, a table of the failing cases."""
    __tracebackhide__ = True
    return check_attention(subject, **kwargs).raise_for_failures()


@contextlib.contextmanager
def _mesh_for(axes, real_mesh, opts):
    """The given mesh, or a simulated one with its ranks entered."""
    if real_mesh is not None:
        yield real_mesh
        return
    simulated = build_simulated_mesh(axes, opts.device.type)
    with simulated_ranks(num_ranks(axes)):
        yield simulated


def _combinations(factors: Sequence[Sequence], mode: str) -> list[tuple]:
    """The product of the factors, or (pairwise) a subset in which every pair of values of two
    factors still appears: for three yes/no factors, 4 combinations instead of 8."""
    product = list(itertools.product(*factors))
    if mode == "all":
        return product

    def pairs(combination):
        return {(i, a, j, b) for (i, a), (j, b) in itertools.combinations(enumerate(combination), 2)}

    uncovered = set().union(*(pairs(c) for c in product))
    chosen = []
    while uncovered:  # greedy: the combination that covers most uncovered pairs, first on ties
        best = max(product, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return sorted(chosen, key=product.index) or product[:1]


def _case_id(variant: Variant, mesh_name: str, gqa: bool, mask: str, lse: bool | None) -> str:
    words = [variant.name, mesh_name, "gqa" if gqa else "mha"]
    return "-".join(words + (["docs"] if mask == "docs" else []) + (["lse"] if lse else []))


def _run_case(variant, mesh_name, mesh, gqa, mask, lse, opts, simulated) -> CaseOutcome:
    case_id = _case_id(variant, mesh_name, gqa, mask, lse)
    coords = dict(id=case_id, variant=variant.name, mesh=mesh_name, heads="gqa" if gqa else "mha", mask=mask, lse=lse)
    settings = opts.settings()
    try:
        placed = place(variant.build(gqa, lse), opts.prepare, mesh, opts.axis_roles, opts.device)
    except Exception as error:
        failure = CaseFailure(case_id, FailureKind.ERROR, "subject", "the subject to build (and prepare)", "an exception",
                              detail=f"{type(error).__name__}: {error}")
        return CaseOutcome(kernel="", status=Status.FAIL, failures=(failure,), **coords)
    kernel = kernel_label(placed.subject)
    convention = variant.convention(gqa, lse)
    documents = mask == "docs"
    inputs = make_call_inputs(settings, gqa=gqa, documents=documents)
    case = CaseInfo(gqa=gqa, documents=documents, lse=lse, shapes=opts.shapes)
    try:
        mask_value = case_mask(convention, documents=documents, positions_BL=inputs.positions_BL, placed=placed, case=case,
                               simulated=simulated, no_mask_reason=variant.no_mask_reason, device=opts.device)
    except CaseSkipped as skipped:
        return CaseOutcome(kernel=kernel, status=Status.SKIP, reason=str(skipped), **coords)
    except Exception as error:
        failure = CaseFailure(case_id, FailureKind.ERROR, "mask", "make_mask to succeed", "an exception",
                              detail=f"{type(error).__name__}: {error}")
        return CaseOutcome(kernel=kernel, status=Status.FAIL, failures=(failure,), **coords)
    observed = run_call(placed.subject, Call(case_id, placed.mesh, placed.axis_dims), inputs, mask_value, settings, convention, case)
    untestable = _strided_shard_untestable(observed.failures)
    if untestable:
        return CaseOutcome(kernel=kernel, status=Status.SKIP, reason=untestable, **coords)
    return CaseOutcome(
        kernel=kernel, status=Status.FAIL if observed.failures else Status.PASS,
        in_placements=observed.in_placements, out_placements=observed.out_placements,
        expected_out_placements=observed.expected_out, failures=tuple(observed.failures), **coords,
    )


STRIDED_SHARD_ERRORS = ("use_strided_shard_as_shard_order", "cannot be decoded into a corresponding shard_order",
                         "cannot redistribute or full_tensor()")


def _strided_shard_untestable(failures) -> str:
    """Where this torch cannot full_tensor() a _StridedShard (torch 2.11), a packed output under
    CP cannot be checked (and LocalMapAttention refuses it up front): a skip with the reason."""
    if not failures or _compat.packed_strided_shard_usable():
        return ""
    for failure in failures:
        if failure.kind is FailureKind.ERROR and any(text in failure.detail for text in STRIDED_SHARD_ERRORS):
            return "this torch cannot full_tensor() or redistribute a _StridedShard placement, so a packed output under CP cannot be checked here"
    return ""


def _probe(variant: Variant, opts: ConformanceOptions, real_mesh, simulated: bool) -> CaseOutcome:
    """The cached-state probe on the first multi-axis mesh (else the largest), or the real mesh."""
    multi = [(n, a) for n, a in opts.meshes if len(a) > 1] or sorted(opts.meshes, key=lambda m: -num_ranks(m[1]))
    mesh_name, axes = (mesh_id(mesh_axes(real_mesh)), mesh_axes(real_mesh)) if real_mesh is not None else multi[0]
    lse = variant.lse_values[0]
    coords = dict(id=f"{variant.name}-cache-{mesh_name}", variant=variant.name, mesh=f"cache-{mesh_name}",
                  heads="mha", mask="causal", lse=lse)
    if not variant.fresh or num_ranks(axes) == 1:
        reason = ("a function cannot be copied: pass an nn.Module or a factory to check cached state"
                  if not variant.fresh else "the cached-state probe needs a mesh of at least 2 ranks")
        return CaseOutcome(kernel="", status=Status.SKIP, reason=reason, **coords)
    convention = variant.convention(False, lse)
    case = CaseInfo(gqa=False, documents=False, lse=lse, shapes=opts.shapes)
    with _mesh_for(axes, real_mesh, opts) as mesh:

        def build_placed() -> Placed:
            return place(variant.build(False, lse), opts.prepare, mesh, opts.axis_roles, opts.device)

        def mask_for(call_mesh, dims, root):
            return case_mask(convention, documents=False, positions_BL=None, placed=Placed(None, call_mesh, dims, root),
                             case=case, simulated=simulated, no_mask_reason="", device=opts.device)

        return cache_probe(
            build_placed, mask_for, opts.settings(), opts.axis_roles, coords, convention, _strided_shard_untestable
        )
