"""The conformance kit: ``check_attention`` runs an attention module over the placement matrix.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

The subject is any callable that takes BLNH q/k/v DTensors and returns a DTensor, BLNH or
packed TNH, or ``(out, lse)`` (LSE in BLN, BNL or TN), of causal self-attention with the
default scale 1/sqrt(head_dim). Two ways to hand it over:

- ``check_attention(module, make_mask=...)``: one module (or function). Each case gets a fresh
  ``copy.deepcopy`` of a module (a function is shared by every case). Packed-document cases
  call ``module(q, k, v, mask=make_mask(positions_BL))``, with ``positions_BL`` the global
  (B, L) positions of each token inside its document (0 where one starts): the mask holds
  plain global tensors, and the subject shards it as it shards q. Without ``make_mask`` those
  cases are skipped, with that reason.
- ``check_attention(factory=lambda config: MyAttention(config))``: a fresh subject per case
  from an ``AttentionConfig`` (backend, ``enable_gqa``, ``return_lse``, ``varlen_output``), so
  the matrix covers every backend of the registry and masks come from that backend
  (``make_attention_masks(config, positions_BL)``), as a model makes them.

Every case runs on simulated ranks (one process), forward and backward, in float64, and is
compared on every rank with the float64 reference (see cases.py). A cached-state
probe calls ONE subject on a sequence of placements and meshes, and reports a call that fails
where a fresh subject passes. Case ids read ``varlen-TNH-cp2xtp2-gqa-docs-lse``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import types
from collections.abc import Callable, Mapping, Sequence

import torch

from dtensor_attn import _compat
from dtensor_attn._compat import maybe_disable_local_tensor_mode
from dtensor_attn.config import AttentionConfig, Backend
from dtensor_attn.layout import Layout
from dtensor_attn.testing.kit.cases import Call, CallSettings, make_call_inputs, run_call
from dtensor_attn.testing.harness.meshspec import AXIS_DIMS
from dtensor_attn.testing.kit.result import (
    CaseFailure, CaseOutcome, ConformanceResult, FailureKind, Status,
)
from dtensor_attn.testing.kit.subjects import Variant, factory_variants, kernel_label, subject_variant
from dtensor_attn.testing.harness.meshspec import mesh_id, num_ranks, validate_axes
from dtensor_attn.testing.harness.simulate import build_simulated_mesh, simulated_ranks

# Every mesh the kit knows, by id; ``meshes=`` takes these ids or axis dicts in this form.
MESHES: Mapping[str, Mapping[str, int]] = types.MappingProxyType({
    mesh_id(axes): types.MappingProxyType(axes)
    for axes in (
        {"tp": 1}, {"tp": 2}, {"tp": 4}, {"tp": 8}, {"cp": 2}, {"cp": 4}, {"cp": 8},
        {"cp": 2, "tp": 2}, {"cp": 2, "tp": 4}, {"cp": 4, "tp": 2}, {"dp": 2, "cp": 2, "tp": 2},
    )
})
# World sizes 1, 2, 4, 4, 8: TP alone, 4-way CP alone (ranks past the second need the right
# offsets too), and CP x TP with 2 and 4 heads shards (a GQA group inside one rank).
DEFAULT_MESHES = ("tp1", "tp2", "cp4", "cp2xtp2", "cp2xtp4")
MASKS = ("causal", "docs")


@dataclasses.dataclass(kw_only=True, slots=True)
class ConformanceOptions:
    """The matrix and its precision. Narrow any axis to run fewer cases.

    Tolerance: inputs, subject and reference run in float64, so only reduction order differs
    (~1e-15 relative); 1e-9 leaves six orders of margin and every placement mistake moves
    values by O(0.1). A subject that computes in lower precision sets ``dtype`` and widens the
    tolerance; the reference then starts from the same rounded inputs.
    """

    meshes: tuple = DEFAULT_MESHES  # ids of MESHES, or axis dicts such as {"cp": 2, "tp": 2}
    gqa: tuple[bool, ...] = (False, True)  # True: 8 q heads and 4 k/v heads
    masks: tuple[str, ...] = MASKS  # "causal"; "docs": causal within packed documents
    lse: tuple[bool, ...] = (False, True)  # factory only: AttentionConfig.return_lse
    backends: tuple = ()  # factory only: Backend values or names; () is the whole registry
    outputs: tuple[Layout, ...] = (Layout.BLNH, Layout.TNH)  # factory only: varlen_output, where offered
    combinations: str = "pairwise"  # of (gqa, masks, lse) per variant and mesh; or "all"
    backward: bool = True
    cache_check: bool = True
    dtype: torch.dtype = torch.float64
    rtol: float = 1e-9
    atol: float = 1e-9
    seed: int = 0

    def __post_init__(self) -> None:
        self.meshes = tuple(self._mesh(m) for m in self.meshes)
        if self.combinations not in ("pairwise", "all"):
            raise ValueError(f"check_attention: combinations={self.combinations!r}; expected 'pairwise' or 'all'")
        unknown = sorted(set(self.masks) - set(MASKS))
        if unknown:
            raise ValueError(f"check_attention: masks {unknown} unknown; expected a subset of {MASKS}")
        self.backends = tuple(Backend(b) if isinstance(b, str) else b for b in self.backends)
        for name in ("gqa", "lse", "masks", "outputs"):
            setattr(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise ValueError(f"check_attention: {name}=() selects no case. Fix: keep at least one value.")

    @staticmethod
    def _mesh(mesh: str | Mapping[str, int]) -> tuple[str, dict[str, int]]:
        if isinstance(mesh, str):
            if mesh not in MESHES:
                raise ValueError(f"check_attention: unknown mesh {mesh!r}; expected one of {sorted(MESHES)} or an axis dict")
            return mesh, dict(MESHES[mesh])
        axes = validate_axes(dict(mesh), "check_attention")
        unknown = sorted(set(axes) - set(AXIS_DIMS))
        if unknown:
            raise ValueError(
                f"check_attention: mesh axes {unknown} have no meaning here; expected axes named "
                f"{sorted(AXIS_DIMS)} (dp shards batch, cp the sequence, tp the heads)"
            )
        return mesh_id(axes), axes

    def settings(self) -> CallSettings:
        return CallSettings(dtype=self.dtype, rtol=self.rtol, atol=self.atol, backward=self.backward, seed=self.seed)


def check_attention(
    subject: Callable | None = None,
    *,
    factory: Callable[[AttentionConfig], Callable] | None = None,
    make_mask: Callable[[torch.Tensor], object] | None = None,
    name: str | None = None,
    **options,
) -> ConformanceResult:
    """Run ``subject`` (or subjects from ``factory``) over the matrix; see ConformanceOptions
    for ``options`` (by default: DEFAULT_MESHES, and pairwise combinations of GQA, masks and
    LSE). Exceptions of the subject become failures of their case. Simulation only: the kit
    builds its own meshes on the fake process group, so call it from a test without a mesh
    marker, in a process without a real process group."""
    if (subject is None) == (factory is None):
        raise ValueError("check_attention: pass exactly one of subject or factory=. Fix: "
                         "check_attention(my_module) or check_attention(factory=lambda config: ...)")
    opts = ConformanceOptions(**options)
    if factory is not None:
        variants = factory_variants(factory, backends=opts.backends, outputs=opts.outputs, lse=opts.lse)
        label = name or getattr(factory, "__name__", "factory")
    else:
        variants = [subject_variant(subject, make_mask, name)]
        label = variants[0].name
    if not variants:
        raise ValueError(
            f"check_attention: no backend of {[str(b) for b in opts.backends] or 'the registry'} offers "
            f"the outputs {[layout.name for layout in opts.outputs]}. Fix: add Layout.BLNH to outputs."
        )
    settings = opts.settings()
    outcomes: list[CaseOutcome] = []
    with maybe_disable_local_tensor_mode():
        for mesh_name, axes in opts.meshes:
            with contextlib.ExitStack() as stack:
                mesh = build_simulated_mesh(axes)
                stack.enter_context(simulated_ranks(num_ranks(axes)))
                axis_dims = tuple(AXIS_DIMS[a] for a in axes)
                for variant in variants:
                    for gqa, mask, lse in _combinations((opts.gqa, opts.masks, variant.lse_values), opts.combinations):
                        outcomes.append(_run_case(variant, mesh_name, mesh, axis_dims, gqa, mask, lse, settings))
        if opts.cache_check:
            outcomes += [_cache_probe(v, opts, settings) for v in variants]
    return ConformanceResult(label, tuple(outcomes))


def assert_conforms(subject: Callable | None = None, **kwargs) -> ConformanceResult:
    """check_attention(...).raise_for_failures(): for pytest, a table of the failing cases."""
    __tracebackhide__ = True
    return check_attention(subject, **kwargs).raise_for_failures()


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


def _run_case(variant, mesh_name, mesh, axis_dims, gqa, mask, lse, settings) -> CaseOutcome:
    case_id = _case_id(variant, mesh_name, gqa, mask, lse)
    coords = dict(id=case_id, variant=variant.name, mesh=mesh_name, heads="gqa" if gqa else "mha", mask=mask, lse=lse)
    try:
        subject = variant.build(gqa, lse)
    except Exception as error:
        failure = CaseFailure(case_id, FailureKind.ERROR, "subject", "the subject to build", "an exception",
                              detail=f"{type(error).__name__}: {error}")
        return CaseOutcome(kernel="", status=Status.FAIL, failures=(failure,), **coords)
    kernel = kernel_label(subject)
    inputs = make_call_inputs(settings, gqa=gqa, documents=mask == "docs")
    mask_value = None
    if mask == "docs":
        if variant.make_mask is None:
            return CaseOutcome(kernel=kernel, status=Status.SKIP, reason=variant.no_mask_reason, **coords)
        try:
            with maybe_disable_local_tensor_mode():
                mask_value = variant.make_mask(gqa, lse, inputs.positions_BL)
        except ValueError as error:  # the backend applies no document masks: a fact, not a failure
            return CaseOutcome(kernel=kernel, status=Status.SKIP, reason=" ".join(str(error).split()), **coords)
    observed = run_call(subject, Call(case_id, mesh, axis_dims), inputs, mask_value, settings)
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


def _probe_calls(mesh, axes: dict[str, int]) -> list[tuple[str, object, tuple]]:
    """(label, mesh, axis dims): all axes sharded, then each axis replicated in turn, then the
    last axis's own submesh, then all sharded again."""
    dims = tuple(AXIS_DIMS[a] for a in axes)
    calls = [("sharded", mesh, dims)]
    for i, axis in enumerate(axes):
        if len(axes) > 1 or axes[axis] > 1:
            calls.append((f"{axis} replicated", mesh, dims[:i] + (None,) + dims[i + 1:]))
    if len(axes) > 1:
        last = list(axes)[-1]
        calls.append((f"{last} submesh", mesh[last], (AXIS_DIMS[last],)))
    calls.append(("sharded again", mesh, dims))
    return calls


def _cache_probe(variant: Variant, opts: ConformanceOptions, settings: CallSettings) -> CaseOutcome:
    """One subject, called on several placements and meshes in turn: a call that fails where a
    fresh subject passes it shows state kept from an earlier call (docs/bugs.md row 6)."""
    multi = [(n, a) for n, a in opts.meshes if len(a) > 1] or sorted(opts.meshes, key=lambda m: -num_ranks(m[1]))
    mesh_name, axes = multi[0]
    lse = variant.lse_values[0]
    case_id = f"{variant.name}-cache-{mesh_name}"
    coords = dict(id=case_id, variant=variant.name, mesh=f"cache-{mesh_name}", heads="mha", mask="causal", lse=lse)
    if not variant.fresh or num_ranks(axes) == 1:
        reason = ("a function cannot be copied: pass an nn.Module or a factory to check cached state"
                  if not variant.fresh else "the cached-state probe needs a mesh of at least 2 ranks")
        return CaseOutcome(kernel="", status=Status.SKIP, reason=reason, **coords)
    with contextlib.ExitStack() as stack:
        mesh = build_simulated_mesh(axes)
        stack.enter_context(simulated_ranks(num_ranks(axes)))
        inputs = make_call_inputs(settings, gqa=False, documents=False)
        try:
            shared = variant.build(False, lse)
        except Exception as error:  # the matrix cases report it as a failure
            return CaseOutcome(kernel="", status=Status.SKIP, reason=f"the subject could not be built: {error}", **coords)
        calls = _probe_calls(mesh, axes)
        history: list[str] = []
        for index, (label, call_mesh, dims) in enumerate(calls):
            what = f"call {index + 1} of {len(calls)} ({label})"
            failures = run_call(shared, Call(case_id, call_mesh, dims), inputs, None, settings).failures
            history.append(label)
            if not failures or index == 0:
                continue
            if run_call(variant.build(False, lse), Call(case_id, call_mesh, dims), inputs, None, settings).failures:
                continue  # a fresh subject fails this call too: not state, and reported by the matrix
            failure = CaseFailure(
                case_id, FailureKind.CACHED_STATE, what, "what a fresh subject returns (it passes)",
                f"{failures[0].kind} of {failures[0].what}",
                ranks=failures[0].ranks, max_err=failures[0].max_err,
                detail=f"after calls {history[:-1]}; {failures[0].describe()}",
            )
            return CaseOutcome(kernel=kernel_label(shared), status=Status.FAIL, failures=(failure,), **coords)
    return CaseOutcome(kernel=kernel_label(shared), status=Status.PASS, **coords)
