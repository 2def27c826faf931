"""DTensor's local boundary with the specs computed once: ``to_local``/``from_local`` without their per-call work.

Part of dtensor_attn._compat, the one home of private torch imports; import names from the
package, not from here.

``DTensor.to_local(grad_placements=...)`` and ``DTensor.from_local(..., run_check=False)`` build a
``DTensorSpec`` on every call (shard order, hash reset), and ``to_local``'s backward derives each
gradient's global stride with ``compute_global_tensor_info`` again: about 30 µs per output and
40 µs per input gradient on a desktop CPU, paid on every attention call. A ``LocalBoundary``
does the same two jobs with torch's own results cached per signature:

- ``wrap(index, local, mesh, placements)``: the spec is the one ``DTensor.from_local`` derives
  (once per local shape, stride and dtype); every call gets a copy of it, in an autograd node
  whose backward is from_local's (the gradient redistributed to the forward placements, Partial
  read as Replicate, then local);
- ``unwrap(dtensors, grad_placements)``: every input's local view in one autograd node whose
  backward is ``to_local``'s (the global stride from ``compute_global_tensor_info``, cached by the
  gradient's local shape and stride; the forward spec itself where stride and placements agree).

Under ``torch.compile`` the public calls run instead (a compiled graph has no host cost per call).
``plain_module_call`` says whether calling a module is exactly calling its ``forward`` (no hooks,
not compiled, not traced), so that a caller may call a method of it directly.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Placement, Replicate
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor._utils import compute_global_tensor_info

from torch.nn.modules import module as _nn_module

from dtensor_attn._compat.tracing import AsyncCollectiveTensor


def _copy_spec(spec: DTensorSpec) -> DTensorSpec:
    """``copy.copy(spec)`` (every DTensor gets its own spec, as from_local gives it: sharding
    propagation may set fields of an output's spec), without copy's protocol: 0.3 µs, not 2.5."""
    if not hasattr(spec, "__dict__"):
        return copy.copy(spec)
    new = object.__new__(type(spec))
    new.__dict__.update(spec.__dict__)
    return new


def _new_dtensor(local: torch.Tensor, spec: DTensorSpec, requires_grad: bool) -> DTensor:
    """``DTensor(local, spec, requires_grad=...)`` without ``DTensor.__init__``, which does nothing
    but is wrapped to keep dynamo out (about 5 µs a call on a GPU host); never under compile."""
    return DTensor.__new__(DTensor, local, spec, requires_grad=requires_grad)


def _grad_placements_of(placements: Sequence[Placement]) -> tuple[Placement, ...]:
    """from_local's gradient placements for its forward placements: Partial reads as Replicate."""
    return tuple(Replicate() if p.is_partial() else p for p in placements)


@dataclasses.dataclass(slots=True)
class _Wrapped:
    local_shape: torch.Size
    local_stride: tuple[int, ...]
    dtype: torch.dtype
    spec: DTensorSpec
    grad_placements: tuple[Placement, ...]  # what from_local's backward redistributes the gradient to


class _FromLocal(torch.autograd.Function):
    """``DTensor.from_local`` with a spec computed before (forward and backward as torch's)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, wrapped: _Wrapped) -> DTensor:  # type: ignore[override]
        ctx.wrapped = wrapped
        ctx.set_materialize_grads(False)
        return _new_dtensor(local.view_as(local), _copy_spec(wrapped.spec), local.requires_grad)

    @staticmethod
    def backward(ctx, grad: DTensor | None):  # type: ignore[override]
        if grad is None:
            return None, None
        wrapped: _Wrapped = ctx.wrapped
        if grad.placements != wrapped.grad_placements:
            grad = grad.redistribute(wrapped.spec.mesh, wrapped.grad_placements)
        return grad.to_local(), None


class _ToLocal(torch.autograd.Function):
    """``to_local(grad_placements=...)`` of several DTensors in one autograd node."""

    @staticmethod
    def forward(ctx, boundary: LocalBoundary, grad_placements, *dtensors: DTensor):  # type: ignore[override]
        ctx.boundary = boundary
        ctx.specs = tuple(t._spec for t in dtensors)
        ctx.grad_placements = grad_placements
        ctx.set_materialize_grads(False)
        locals_ = []
        for t in dtensors:
            local = t._local_tensor
            if isinstance(local, AsyncCollectiveTensor):  # a redistribution still in flight
                local = local.wait()
            locals_.append(local.view_as(local))
        # one node for all inputs, but an input without a gradient gives a local without one, as
        # its own to_local would
        ctx.mark_non_differentiable(*(x for x, t in zip(locals_, dtensors) if not t.requires_grad))
        return tuple(locals_)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        boundary: LocalBoundary = ctx.boundary
        out = [None, None]
        for index, (grad, spec, placements) in enumerate(zip(grads, ctx.specs, ctx.grad_placements)):
            if grad is None:
                out.append(None)
                continue
            grad_spec = boundary.grad_spec(index, grad, spec, placements)
            # to_local's backward wraps a view of the gradient; without a graph to build
            # (create_graph=False) nothing is recorded on it, so the gradient itself will do
            local = grad.view_as(grad) if grad.requires_grad else grad
            out.append(_new_dtensor(local, _copy_spec(grad_spec), grad.requires_grad))
        return tuple(out)


class LocalBoundary:
    """The DTensor boundary of one call signature: specs of its outputs and input gradients,
    computed by torch once and reused while the local shapes and strides stay the same."""

    __slots__ = ("_outputs", "_grad_specs")

    def __init__(self) -> None:
        self._outputs: dict[int, _Wrapped] = {}
        self._grad_specs: dict[tuple, DTensorSpec] = {}

    def unwrap(self, dtensors: Sequence[DTensor], grad_placements: Sequence[tuple[Placement, ...]]) -> tuple:
        """Each DTensor's local tensor, as ``to_local(grad_placements=...)`` gives it."""
        if torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return tuple(_public_to_local(t, p) for t, p in zip(dtensors, grad_placements))
        return _ToLocal.apply(self, tuple(grad_placements), *dtensors)

    def wrap(self, index: int, local: torch.Tensor, mesh, placements: tuple[Placement, ...]) -> DTensor:
        """``DTensor.from_local(local, mesh, placements, run_check=False)``."""
        if torch.compiler.is_compiling():
            return DTensor.from_local(local, mesh, placements, run_check=False)
        known = self._outputs.get(index)
        if not (
            known is not None and known.local_shape == local.shape and known.local_stride == local.stride()
            and known.dtype == local.dtype
        ):
            with torch.no_grad():  # torch derives the spec: global shape and stride from the local ones
                derived = DTensor.from_local(local.detach(), mesh, placements, run_check=False)
            if derived._local_tensor.shape != local.shape:  # a rank outside the mesh holds nothing
                return DTensor.from_local(local, mesh, placements, run_check=False)
            known = self._outputs[index] = _Wrapped(
                local.shape, local.stride(), local.dtype, derived._spec, _grad_placements_of(placements)
            )
        return _FromLocal.apply(local, known)

    def grad_spec(self, index: int, grad: torch.Tensor, spec: DTensorSpec, placements) -> DTensorSpec:
        """The spec ``to_local``'s backward gives the local gradient ``grad`` of input ``index``."""
        # the plan fixes each input's placements, grad placements and dtype: index stands for them
        key = (index, grad.shape, grad.stride(), spec.tensor_meta.shape, spec.tensor_meta.stride)
        known = self._grad_specs.get(key)
        if known is not None:
            return known
        _, stride = compute_global_tensor_info(grad, spec.mesh, spec.placements)
        stride = tuple(stride)
        meta = spec.tensor_meta
        if stride == meta.stride and tuple(placements) == spec.placements:
            grad_spec = _copy_spec(spec)
        else:
            grad_spec = DTensorSpec(
                spec.mesh, tuple(placements), tensor_meta=TensorMeta(meta.shape, stride, meta.dtype)
            )
        self._grad_specs[key] = grad_spec
        return grad_spec


def _public_to_local(t: DTensor, grad_placements) -> torch.Tensor:
    local = t.to_local(grad_placements=grad_placements)
    if isinstance(local, AsyncCollectiveTensor):
        local = local.wait()
    return local


def plain_module_call(module: nn.Module) -> bool:
    """Whether ``module(...)`` would run ``module.forward(...)`` and nothing else: no hook of its
    own or global, not compiled with ``module.compile()``, no JIT trace, no dynamo trace."""
    return not (
        module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
        or module._backward_hooks or module._compiled_call_impl is not None
        or _nn_module._has_any_global_hook() or torch._C._get_tracing_state()
        or torch.compiler.is_compiling()
    )
