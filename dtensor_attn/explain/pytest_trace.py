"""pytest plugin: attach the placement trace to a failing test's report.

Register it with ``-p dtensor_attn.explain.pytest_trace`` or, in the root conftest.py,
``pytest_plugins = ["dtensor_attn.explain.pytest_trace"]``. Then a test writes

    def test_attention(placement_trace):
        with simulated_mesh({"tp": 4}):
            out = placement_trace(model, q, k, v)   # the call's output; its exception re-raised
            assert_close(out.full_tensor(), reference)

and when it fails, pytest prints a "placement trace" section under the failure (the first op
where a _StridedShard appeared or propagation failed, its likely cause and fix) and the JUnit
XML gets the same text as the ``placement_trace`` property. Passing tests print nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dtensor_attn.explain.trace import PlacementTrace, trace_placements

TRACES = pytest.StashKey[list[PlacementTrace]]()


class PlacementTraceRunner:
    """The fixture's value: call it like the traced function; ``traces`` holds every trace."""

    def __init__(self, traces: list[PlacementTrace]):
        self.traces = traces

    def __call__(self, fn: Callable, *args, **kwargs):
        trace = trace_placements(fn, *args, **kwargs)
        self.traces.append(trace)
        if trace.error is not None:
            raise trace.error
        return trace.output


@pytest.fixture
def placement_trace(request: pytest.FixtureRequest) -> PlacementTraceRunner:
    """Run a function or module under ``trace_placements``; its report joins a failing test's."""
    traces: list[PlacementTrace] = []
    request.node.stash[TRACES] = traces
    return PlacementTraceRunner(traces)


def trace_report(traces: list[PlacementTrace]) -> str:
    return "\n\n".join(trace.render() for trace in traces)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    traces = item.stash.get(TRACES, None)
    if traces and report.failed and report.when == "call":
        text = trace_report(traces)
        report.sections.append(("placement trace", text))
        report.user_properties.append(("placement_trace", text))
        # JUnit XML reads the properties of the teardown report, made later from the item's
        item.user_properties.append(("placement_trace", text))
    return report
