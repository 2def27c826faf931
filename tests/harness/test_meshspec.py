"""Which mesh a test asks for (meshspec.py): validation, ids, skip reasons, as pure values.

``mesh_axes_of`` is read from real pytest items: a tiny suite run through ``pytester``.
"""

from __future__ import annotations

import itertools
import math

import pytest

from dtensor_attn.layout import Dim
from dtensor_attn.testing.harness.meshspec import (
    AXIS_DIMS, describe_axes, mesh_id, mesh_params, num_ranks, validate_axes,
    world_size_skip_reason,
)

MESHES = [{"tp": 2}, {"cp": 2, "tp": 4}, {"dp": 1, "cp": 3}, {"a": 2, "b": 2, "c": 2}]


def _id(axes) -> str:
    return "-".join(f"{k}{v}" for k, v in axes.items())


@pytest.mark.parametrize("axes", MESHES, ids=_id)
def test_valid_axes_keep_their_order_and_sizes(axes):
    checked = validate_axes(axes, "t.py::x")
    assert checked == axes and list(checked) == list(axes)


@pytest.mark.parametrize("axes,needle", [
    ({}, "a mesh needs at least one axis, got none. Fix: e.g. mesh(tp=2)"),
    ({"tp": 0}, "mesh axis tp=0: expected a positive int size, e.g. tp=2."),
    ({"tp": -2}, "mesh axis tp=-2"),
    ({"tp": 2.0}, "mesh axis tp=2.0"),
    ({"tp": True}, "mesh axis tp=True"),
    ({"tp": "2"}, "mesh axis tp='2'"),
    ({"2d": 2}, "mesh axis name '2d' is not an identifier"),
    ({"t p": 2}, "mesh axis name 't p' is not an identifier"),
], ids=["empty", "zero", "negative", "float", "bool", "str", "digit-name", "space-name"])
def test_invalid_axes_name_the_test_and_the_fix(axes, needle):
    with pytest.raises(ValueError) as error:
        validate_axes(axes, "t.py::x")
    assert str(error.value).startswith("t.py::x: ") and needle in str(error.value)


@pytest.mark.parametrize("axes", MESHES, ids=_id)
def test_ids_descriptions_and_rank_counts(axes):
    assert num_ranks(axes) == math.prod(axes.values())
    assert mesh_id(axes) == "x".join(f"{k}{v}" for k, v in axes.items())
    assert describe_axes(axes) == " x ".join(f"{k}={v}" for k, v in axes.items())


def test_the_examples_the_docstrings_give():
    assert (mesh_id({"cp": 2, "tp": 4}), describe_axes({"cp": 2, "tp": 4})) == ("cp2xtp4", "cp=2 x tp=4")


@pytest.mark.parametrize("axes", MESHES, ids=_id)
@pytest.mark.parametrize("world_size", [1, 2, 4, 8])
def test_a_mesh_runs_only_on_exactly_its_number_of_ranks(axes, world_size):
    reason = world_size_skip_reason(axes, world_size)
    needed = math.prod(axes.values())
    if needed == world_size:
        assert reason is None
    else:
        assert reason == (f"mesh {describe_axes(axes)} needs {needed} ranks, this run has "
                          f"{world_size}")


def test_mesh_params_mark_and_name_each_mesh():
    params = mesh_params(*MESHES)
    assert [p.id for p in params] == [mesh_id(m) for m in MESHES]
    for param, axes in zip(params, MESHES):
        assert param.values == (axes,) and param.values[0] is not axes  # a copy per param
        (mark,) = param.marks
        assert (mark.name, mark.args, mark.kwargs) == ("mesh", (), axes)


def test_axis_dims_say_what_each_axis_shards_and_cannot_be_changed():
    assert dict(AXIS_DIMS) == {"dp": Dim.B, "cp": Dim.L, "tp": Dim.N}
    with pytest.raises(TypeError):
        AXIS_DIMS["ep"] = Dim.N  # type: ignore[index]


@pytest.mark.parametrize("sizes", list(itertools.product((1, 2, 3), repeat=2)),
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_rank_counts_are_products_of_every_two_axis_mesh(sizes):
    axes = dict(zip(("cp", "tp"), sizes))
    assert num_ranks(axes) == sizes[0] * sizes[1]
    assert world_size_skip_reason(axes, sizes[0] * sizes[1]) is None


SUITE = '''
import pytest
from dtensor_attn.testing.harness.meshspec import mesh_axes_of, mesh_id

SEEN = {}

@pytest.fixture(autouse=True)
def _record(request):
    SEEN[request.node.name] = mesh_axes_of(request.node)

@pytest.fixture
def mesh(request):
    return None

@pytest.mark.mesh(cp=2, tp=4)
def test_marker(): pass

@pytest.mark.parametrize("x", [pytest.param(1, marks=pytest.mark.mesh(tp=2), id="tp2")])
def test_param_marker(x): pass

@pytest.mark.parametrize("mesh", [{"dp": 2}], indirect=True, ids=mesh_id)
def test_indirect(mesh): pass

def test_none(): pass

def test_zz_report():
    assert SEEN == {"test_marker": {"cp": 2, "tp": 4}, "test_param_marker[tp2]": {"tp": 2},
                    "test_indirect[dp2]": {"dp": 2}, "test_none": None,
                    "test_zz_report": None}, SEEN
'''

BAD_SUITE = '''
import pytest
from dtensor_attn.testing.harness.meshspec import mesh_axes_of

@pytest.fixture
def mesh(request):
    return None

@pytest.mark.mesh(2, 4)
def test_positional(request):
    mesh_axes_of(request.node)

@pytest.mark.parametrize("mesh", [[2, 4]], indirect=True)
def test_indirect_list(request, mesh):
    mesh_axes_of(request.node)
'''


def test_axes_are_read_from_markers_and_params_and_bad_ones_are_refused(pytester):
    """One pytester run (each costs seconds): the good suite passes, the bad one fails with
    the fix in the message."""
    pytester.makepyfile(test_good=SUITE, test_bad=BAD_SUITE)
    result = pytester.runpytest("-p", "no:dtensor_attn", "-p", "no:cacheprovider",
                                "-W", "ignore::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=5, failed=2)
    result.stdout.fnmatch_lines([
        "*mesh marker takes axis sizes as keywords, got positional (2, 4). Fix: @pytest.mark.mesh(cp=2, tp=4).*",
        "*an indirect 'mesh' parameter must be a dict of axis sizes, got [[]2, 4[]]*",
    ])
