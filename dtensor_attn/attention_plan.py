"""One input signature's call of an inner attention on local tensors: LocalMapAttention's hot path.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

An ``AttentionPlan`` is built once per (mesh, placements, global shapes, dtype) and then does,
on every call, what torch's ``local_map`` does with all three placements stated, and nothing
more: inputs whose placements differ from what the kernel needs are redistributed (under
context parallelism, k/v are all-gathered over the sequence axes), every input is unwrapped as
``to_local(grad_placements=...)`` would, the kernel runs on a ``Visibility`` whose sequence
positions were computed at planning time, and every output is wrapped as
``DTensor.from_local(..., run_check=False)`` would. What ``local_map`` and those two calls redo on
every call (the pytree of arguments, per-argument placement lookups, a DTensorSpec per tensor,
each gradient's global stride) is done once, by torch, and reused
(``dtensor_attn._compat.LocalBoundary``). ``benchmarks/wrapper_host.py`` measures the difference.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor

from dtensor_attn._compat import LocalBoundary, plain_module_call
from dtensor_attn.backends.base import InnerAttention
from dtensor_attn.boundary import AttentionPlacements
from dtensor_attn.local_map_checks import check_kernel_outputs
from dtensor_attn.placements import Placements
from dtensor_attn.visibility import Visibility


@dataclasses.dataclass(slots=True)
class AttentionPlan:
    """Placements, kernel and cached metadata for one input signature (see the module doc)."""

    module: str
    placements: AttentionPlacements
    mesh: object
    inner: Callable
    is_causal: bool
    mask_type: type | None
    mask_placements: tuple[Placements, Placements]  # (B, L) document ids of q, of k/v
    seq_index_locals: tuple[torch.Tensor, ...]  # (q_seq_index_L, kv_seq_index_L) under CP, else ()
    local_q_shape: tuple[int, ...]
    expected_shapes: tuple  # (what, layout, local shape) per output, for check_kernel_outputs
    out_placements: tuple[Placements, ...]  # one per output
    redistribute_qkv: bool  # under CP: k/v are gathered (the key fixes the input placements)
    boundary: LocalBoundary = dataclasses.field(default_factory=LocalBoundary)
    # The inner's ``attend`` (forward without its input checks), once a call through ``forward``
    # proved the checks for this signature: local shapes, dtypes and devices are fixed by it.
    _attend: Callable | None = None
    _visibility: Visibility | None = None  # without a mask it is the same on every call

    def __post_init__(self) -> None:
        self._visibility = Visibility(self.is_causal, None, *self.seq_index_locals)

    def __call__(self, q: DTensor, k: DTensor, v: DTensor, q_doc_BL=None, kv_doc_BL=None):
        pl = self.placements
        inputs, grads = [q, k, v], [pl.q_grad, pl.kv_grad, pl.kv_grad]
        if self.redistribute_qkv:  # local_map's redistribute_inputs=True: CP all-gathers k/v here
            inputs = _redistributed(inputs, (pl.q, pl.kv, pl.kv))
        visibility = self._visibility
        if self.mask_type is not None:
            # integer ids: no gradient flows, so their grad placements are a formality
            inputs += _redistributed((q_doc_BL, kv_doc_BL), self.mask_placements)
            grads += self.mask_placements
        q_local, k_local, v_local, *doc_locals = self.boundary.unwrap(inputs, grads)
        if self.mask_type is not None:
            local_mask = self.mask_type(q_document_ids_BL=doc_locals[0], kv_document_ids_BL=doc_locals[1])
            visibility = Visibility(self.is_causal, local_mask, *self.seq_index_locals)
        if self._attend is not None and plain_module_call(self.inner):
            result = self._attend(q_local, k_local, v_local, visibility)
        else:
            result = self.inner(q_local, k_local, v_local, visibility=visibility)
            self._attend = _unchecked_attend(self.inner)
        check_kernel_outputs(self.module, self.local_q_shape, result, self.expected_shapes)
        wrap, mesh = self.boundary.wrap, self.mesh
        if len(self.out_placements) == 1:
            return wrap(0, result, mesh, self.out_placements[0])
        return tuple(wrap(i, t, mesh, p) for i, (t, p) in enumerate(zip(result, self.out_placements)))


def _redistributed(dtensors, placements) -> list[DTensor]:
    """Each DTensor with ``placements`` (local_map's ``redistribute_inputs=True``)."""
    return [t if t.placements == p else t.redistribute(t.device_mesh, p) for t, p in zip(dtensors, placements)]


def _unchecked_attend(inner) -> Callable | None:
    """``inner.attend`` where calling it is ``inner.forward`` without the input checks: a backend
    of ours whose ``forward`` is InnerAttention's (not overridden by a subclass or on the object)."""
    if not isinstance(inner, InnerAttention) or "forward" in vars(inner):
        return None
    if type(inner).forward is not InnerAttention.forward:
        return None
    return inner.attend
