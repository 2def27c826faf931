"""The cached-state probe: one subject called on several placements and meshes in turn.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

A call that fails where a fresh subject passes it shows state kept from an earlier call
(docs/bugs.md row 6). A probe in which no call after the first could show it (the first call
failed, or every later call fails for a fresh subject too) tested nothing: it is reported as
NOT_EXERCISED with the reason, never as a pass.
"""

from __future__ import annotations

from collections.abc import Mapping

from dtensor_attn.layout import Dim
from dtensor_attn.testing.kit.cases import Call, make_call_inputs, run_call
from dtensor_attn.testing.kit.compare import error_failure
from dtensor_attn.testing.kit.result import CaseFailure, CaseOutcome, FailureKind, Status
from dtensor_attn.testing.kit.setup import mesh_axes
from dtensor_attn.testing.kit.spec import DEFAULT_AXIS_ROLES, CaseInfo


def _probe_calls(mesh, axes: Mapping[str, int], roles: Mapping[str, Dim | None] = DEFAULT_AXIS_ROLES) -> list[tuple[str, object, tuple]]:
    """(label, mesh, axis dims): all axes sharded, then each axis of more than one rank
    replicated in turn, then the last axis's own submesh, then all sharded again."""
    dims = tuple(roles[a] for a in axes)
    calls = [("sharded", mesh, dims)]
    for i, axis in enumerate(axes):
        if axes[axis] > 1:
            calls.append((f"{axis} replicated", mesh, dims[:i] + (None,) + dims[i + 1:]))
    if len(axes) > 1:
        last = list(axes)[-1]
        calls.append((f"{last} submesh", mesh[last], (roles[last],)))
    calls.append(("sharded again", mesh, dims))
    return calls


def cache_probe(build_placed, mask_for, settings, roles, coords: dict, convention, torch_limit) -> CaseOutcome:
    """``build_placed()``: a fresh subject, prepared, with its mesh; ``mask_for(mesh, axis_dims, root)``:
    the causal-case mask a call on that mesh (sliced from ``root``) takes (see check.py);
    ``torch_limit(failures)``: the reason where failures are this torch's limit, not the subject's
    (the matrix skips those cases with it; so does the probe whose first call hits it)."""
    from dtensor_attn.testing.kit.subjects import kernel_label

    case_id = coords["id"]
    try:
        shared = build_placed()
    except Exception as error:  # the matrix cases report it as a failure
        return CaseOutcome(kernel="", status=Status.SKIP, reason=f"the subject could not be built: {error}", **coords)
    inputs = make_call_inputs(settings, gqa=False, documents=False)
    case = CaseInfo(gqa=False, documents=False, lse=coords["lse"], shapes=settings.shapes)
    calls = _probe_calls(shared.mesh, mesh_axes(shared.mesh), roles)
    history, untestable = [], []
    exercised = 0
    kernel = kernel_label(shared.subject)

    def outcome(status, reason="", failures=()):
        return CaseOutcome(kernel=kernel, status=status, reason=reason, failures=tuple(failures), **coords)

    def call(placed, index):
        """The failures of call ``index`` on ``placed``'s mesh (an exception making its mask is one)."""
        _, call_mesh, dims = _probe_calls(placed.mesh, mesh_axes(placed.mesh), roles)[index]
        try:
            mask = mask_for(call_mesh, dims, placed.mesh)
        except Exception as error:
            return [error_failure(case_id, "mask", "make_mask", error)]
        return run_call(placed.subject, Call(case_id, call_mesh, dims), inputs, mask, settings, convention, case).failures

    for index, (label, _, _) in enumerate(calls):
        what = f"call {index + 1} of {len(calls)} ({label})"
        failures = call(shared, index)
        history.append(label)
        if index == 0 and failures:
            limit = torch_limit(failures)
            if limit:
                return outcome(Status.SKIP, limit)
            return outcome(Status.NOT_EXERCISED, f"the first call failed, so no state was set up to test: {failures[0].describe()}")
        if index == 0 or not failures:
            exercised += index > 0
            continue
        if call(build_placed(), index):
            untestable.append(label)  # a fresh subject fails this call too: not state, and tests nothing
            continue
        failure = CaseFailure(
            case_id, FailureKind.CACHED_STATE, what, "what a fresh subject returns (it passes)",
            f"{failures[0].kind} of {failures[0].what}", ranks=failures[0].ranks, max_err=failures[0].max_err,
            detail=f"after calls {history[:-1]}; {failures[0].describe()}",
        )
        return outcome(Status.FAIL, failures=(failure,))
    if not exercised:
        return outcome(Status.NOT_EXERCISED, f"every call after the first ({untestable}) failed for a fresh subject too")
    note = f"calls {untestable} failed for a fresh subject too and tested nothing" if untestable else ""
    return outcome(Status.PASS, note)
