"""Trace placements through a run: every DTensor op and local_map boundary, with module paths.

``trace_placements(fn_or_module, *args, **kwargs)`` runs the call once and returns a
``PlacementTrace``: the events, the findings (``diagnose``), the call's output or the exception
it raised (never re-raised: a failing run is what you trace). It works on simulated ranks
(inside ``simulated_mesh``) and on real ones. How it sees each thing:

- DTensor ops: a TorchDispatchMode that records the input and output placements of every op
  with a DTensor argument (ops on plain or per-rank tensors inside kernels are skipped);
- module paths: global forward pre/post hooks, named from the traced module's ``named_modules``;
- local_map boundaries: a profile hook that sees torch's local_map wrapper frame, reading the
  declared placements there, because the wrapper's ``DTensor.from_local`` dispatches no DTensor
  op: without it the labelled output would look like it came from nowhere.

Placements are recorded as values and printed with ``str``, so an undecodable ``_StridedShard``
is recorded like any other placement.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.utils.weak import WeakIdKeyDictionary

from dtensor_attn import _compat
from dtensor_attn._compat import TorchDispatchMode, tree_leaves
from dtensor_attn.explain.diagnose import diagnose
from dtensor_attn.explain.records import Finding, Severity, TensorRecord, TraceEvent, headline_order


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


class _Recorder(TorchDispatchMode):
    def __init__(self, module_names: dict[int, str]):
        super().__init__()
        self.events: list[TraceEvent] = []
        self.producers = WeakIdKeyDictionary()
        self.module_names = module_names
        self.module_stack: list[str] = []
        self.local_maps: list[tuple[Any, TraceEvent]] = []

    def record(self, tensor: DTensor, placements=None, name: str = "") -> TensorRecord:
        mesh = tensor.device_mesh
        names = mesh.mesh_dim_names
        return TensorRecord(
            tuple(placements if placements is not None else tensor.placements),
            tuple(int(s) for s in tensor.shape),
            tuple(int(s) for s in mesh.shape),
            tuple(names) if names else None,
            self.producers.get(tensor),
            name,
        )

    def path(self) -> str:
        return self.module_stack[-1] if self.module_stack else ""

    def _finish(self, event: TraceEvent, out) -> None:
        for tensor in tree_leaves(out):
            if isinstance(tensor, DTensor):
                event.outputs.append(self.record(tensor))
                self.producers[tensor] = event.index

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = [t for t in tree_leaves((args, kwargs)) if isinstance(t, DTensor)]
        if not inputs:
            return func(*args, **kwargs)
        records = [self.record(t) for t in inputs]
        event = TraceEvent(len(self.events), str(func), self.path(), records)
        self.events.append(event)
        try:
            out = func(*args, **kwargs)
        except Exception as exc:
            event.error = _first_line(exc)
            raise
        self._finish(event, out)
        return out

    # -- module paths ---------------------------------------------------------------------
    def enter_module(self, module, _args) -> None:
        name = self.module_names.get(id(module))
        kind = type(module).__name__
        self.module_stack.append(f"{name} ({kind})" if name else kind)

    def exit_module(self, _module, _args, _out) -> None:
        if self.module_stack:
            self.module_stack.pop()

    # -- local_map boundaries ---------------------------------------------------------------
    def profile(self, frame, what: str, arg) -> None:
        if what == "call":
            call = _compat.local_map_call(frame)
            if call is not None:
                self._enter_local_map(frame, call)
        elif what == "return" and self.local_maps and self.local_maps[-1][0] is frame:
            _, event = self.local_maps.pop()
            if arg is None:
                event.error = ""  # raised: trace_placements fills in the exception
            self._finish(event, arg)

    def _enter_local_map(self, frame, call: dict) -> None:
        func = call["func"]
        kernel = getattr(func, "__qualname__", None) or type(func).__name__
        try:
            params = list(inspect.signature(func).parameters)
        except (TypeError, ValueError):
            params = []
        flat = tree_leaves(call["args"] or ())
        declared_in = call["in_placements"]
        inputs = []
        for i, arg in enumerate(flat):
            if isinstance(arg, DTensor):
                spec = declared_in[i] if declared_in is not None and i < len(declared_in) else None
                name = params[i] if i < len(params) else f"arg {i}"
                inputs.append(self.record(arg, spec, name))
        name = f"local_map({kernel})"
        event = TraceEvent(len(self.events), name, self.path(), inputs, is_local_map=True)
        self.events.append(event)
        self.local_maps.append((frame, event))


@dataclass
class PlacementTrace:
    """What ``trace_placements`` saw. ``ok``: no error finding; ``render()`` prints the report."""

    target: str
    events: list[TraceEvent]
    findings: list[Finding]
    output: Any = None
    error: BaseException | None = None
    boundaries_seen: bool = True

    @property
    def ok(self) -> bool:
        return not any(f.severity is Severity.ERROR for f in self.findings)

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.severity is Severity.ERROR]

    @property
    def first_problem(self) -> Finding | None:
        """The report's headline: the first op where a _StridedShard appeared or propagation
        failed (``cause``: the local_map event behind it), else the first error."""
        return min(self.problems, key=headline_order, default=None)

    def render(self, max_events: int = 60) -> str:
        from dtensor_attn.explain.report import render_trace

        return render_trace(self, max_events=max_events)

    __str__ = render


def _module_names(target) -> dict[int, str]:
    if isinstance(target, torch.nn.Module):
        return {id(m): name for name, m in target.named_modules() if name}
    return {}


def trace_placements(fn_or_module: Callable, *args, **kwargs) -> PlacementTrace:
    """Run ``fn_or_module(*args, **kwargs)`` once, recording placements; never raises for the
    call's own exception (it is in ``.error`` and in the report)."""
    recorder = _Recorder(_module_names(fn_or_module))
    nn_module = torch.nn.modules.module
    hooks = [
        nn_module.register_module_forward_pre_hook(recorder.enter_module),
        nn_module.register_module_forward_hook(recorder.exit_module, always_call=True),
    ]
    previous = sys.getprofile()
    # Another profiler (cProfile, a debugger) owns the hook: keep it, say boundaries went unseen.
    watch = previous is None
    output = error = None
    try:
        if watch:
            sys.setprofile(recorder.profile)
        with recorder:
            output = fn_or_module(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the failure is the finding
        error = exc
    finally:
        if watch:
            sys.setprofile(previous)
        for hook in hooks:
            hook.remove()
    for event in recorder.events:
        if event.error == "":
            event.error = _first_line(error) if error is not None else "returned None"
    target = getattr(fn_or_module, "__qualname__", None) or type(fn_or_module).__name__
    return PlacementTrace(target, recorder.events, diagnose(recorder.events), output, error, watch)


__all__ = ["PlacementTrace", "trace_placements"]
