"""The ``placement_trace`` fixture: a failing test's report carries the trace; a passing one not.

Runs real pytest on a tiny suite, once per module, with the plugin registered by ``-p``. It calls
``pytest.main`` directly rather than through ``pytester``: pytester drops the torch submodules
the inner run imported, and importing them again in one process crashes (measured: a segfault
on the second run); a subprocess works too but pays a torch import (~3 s).
"""

from __future__ import annotations

import contextlib
import io
from types import SimpleNamespace

import pytest

from dtensor_attn import _compat

SUITE = '''
import torch
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.experimental import local_map

from dtensor_attn.testing.harness.simulate import simulated_mesh


def kernel(x_BLNH):
    return (x_BLNH * 2).flatten(0, 1)  # packed TNH


def run(placements, placement_trace):
    with simulated_mesh({"tp": 2}) as mesh:
        x = distribute_tensor(torch.arange(64.0).view(2, 2, 4, 4), mesh, [Shard(2)])
        fn = local_map(kernel, out_placements=(placements,), in_placements=((Shard(2),),),
                       in_grad_placements=((Shard(2),),), device_mesh=mesh)
        out = placement_trace(lambda t: fn(t).view(2, 2, -1), x)
        return out.full_tensor()


def test_buggy(placement_trace):
    out = run((Shard(2),), placement_trace)
    assert torch.equal(out, torch.arange(64.0).view(2, 2, 16) * 2)


def test_fixed(placement_trace):
    out = run((Shard(1),), placement_trace)
    assert torch.equal(out, torch.arange(64.0).view(2, 2, 16) * 2)


def test_raises(placement_trace):
    placement_trace(lambda: 1 / 0)
'''


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("suite")
    (root / "test_suite.py").write_text(SUITE)
    (root / "pytest.ini").write_text("[pytest]\n")
    junit = root / "junit.xml"
    args = [
        "-p", "dtensor_attn.explain.pytest_trace", "-p", "no:cacheprovider",
        f"--rootdir={root}", f"--junitxml={junit}", str(root / "test_suite.py"),
    ]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # only this plugin, not what is installed
        code = pytest.main(args)
    return SimpleNamespace(code=int(code), out=out.getvalue(), xml=junit.read_text())


def test_failing_test_gets_the_trace_section(result):
    assert result.code == 1 and "2 failed, 1 passed" in result.out, result.out
    buggy = result.out.split("_ test_buggy _")[1].split("_ test_raises _")[0]
    section = buggy.split(" placement trace ")[1]
    assert section.lstrip("-\n").startswith("placement trace of run.<locals>.<lambda>: 1 DTensor op, 1 local_map call; 2 errors")
    # torch 2.13 views the mislabelled dim into a _StridedShard; torch 2.11 refuses the view.
    headline = "first _StridedShard" if _compat.view_flattens_sharded_dims() else "propagation failed"
    assert f"PROBLEM: {headline} at #1 aten.view.default" in section
    assert "in the packed TNH layout heads is dim 1, so the output should be Shard(1) on tp" in section


def test_passing_test_prints_no_trace(result):
    assert "_ test_fixed _" not in result.out
    assert result.out.count(" placement trace ---") == 2  # test_buggy and test_raises


def test_exception_of_the_traced_call_is_reraised(result):
    raises = result.out.split("_ test_raises _")[1]
    assert "ZeroDivisionError: division by zero" in raises
    assert "the call raised ZeroDivisionError: division by zero" in raises


def test_junit_xml_gets_the_trace_as_a_property(result):
    assert result.xml.count('<property name="placement_trace"') == 2
