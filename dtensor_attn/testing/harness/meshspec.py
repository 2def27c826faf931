"""Which mesh a test asks for: the ``mesh`` marker or an indirect ``mesh`` parameter.

A test names its mesh axes and sizes in order, e.g. ``@pytest.mark.mesh(cp=2, tp=4)``, or per
parameter, ``pytest.param(..., marks=pytest.mark.mesh(tp=2))``, or indirectly,
``@pytest.mark.parametrize("mesh", [{"tp": 2}, {"cp": 2, "tp": 2}], indirect=True, ids=mesh_id)``.
Both launchers read the axes from here, so a skip reason or a test id reads the same everywhere.
"""

from __future__ import annotations

import math
import types
from collections.abc import Mapping

import pytest

from dtensor_attn.layout import Dim

MESH_MARKER = "mesh"
MESH_FIXTURE = "mesh"
# What each mesh axis name shards in attention inputs: batch (data parallel), seq (context
# parallel), heads (tensor parallel). The conformance kit and the golden tables read it here.
AXIS_DIMS = types.MappingProxyType({"dp": Dim.B, "cp": Dim.L, "tp": Dim.N})

Axes = dict[str, int]


def validate_axes(axes: Mapping[str, object], where: str) -> Axes:
    """Axis names to positive int sizes, in the given order; ValueError naming the fix otherwise."""
    if not axes:
        raise ValueError(
            f"{where}: a mesh needs at least one axis, got none. Fix: e.g. mesh(tp=2), or drop "
            "the marker for a single-process test."
        )
    checked: Axes = {}
    for name, size in axes.items():
        if not name.isidentifier():
            raise ValueError(f"{where}: mesh axis name {name!r} is not an identifier, e.g. 'tp'.")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"{where}: mesh axis {name}={size!r}: expected a positive int size, "
                f"e.g. {name}=2."
            )
        checked[name] = size
    return checked


def mesh_axes_of(item: pytest.Item) -> Axes | None:
    """The axes a test item asks for, or None for a test without a mesh."""
    callspec = getattr(item, "callspec", None)
    if callspec is not None and MESH_FIXTURE in callspec.params:
        param = callspec.params[MESH_FIXTURE]
        if not isinstance(param, Mapping):
            raise ValueError(
                f"{item.nodeid}: an indirect 'mesh' parameter must be a dict of axis sizes, "
                f"got {param!r}. Fix: parametrize('mesh', [{{'tp': 2}}], indirect=True)."
            )
        return validate_axes(param, item.nodeid)
    marker = item.get_closest_marker(MESH_MARKER)
    if marker is None:
        return None
    if marker.args:
        raise ValueError(
            f"{item.nodeid}: mesh marker takes axis sizes as keywords, got positional "
            f"{marker.args!r}. Fix: @pytest.mark.mesh(cp=2, tp=4)."
        )
    return validate_axes(marker.kwargs, item.nodeid)


def num_ranks(axes: Mapping[str, int]) -> int:
    return math.prod(axes.values())


def describe_axes(axes: Mapping[str, int]) -> str:
    """``cp=2 x tp=4``: the form skip reasons and reports use."""
    return " x ".join(f"{name}={size}" for name, size in axes.items())


def mesh_id(axes: Mapping[str, int]) -> str:
    """``cp2xtp4``: a readable test id for a parametrized mesh."""
    return "x".join(f"{name}{size}" for name, size in axes.items())


def mesh_params(*meshes: Mapping[str, int]) -> list:
    """One ``pytest.param(axes)`` per mesh, marked ``mesh(**axes)`` and named by ``mesh_id``."""
    return [pytest.param(dict(axes), marks=pytest.mark.mesh(**axes), id=mesh_id(axes)) for axes in meshes]


def world_size_skip_reason(axes: Mapping[str, int], world_size: int) -> str | None:
    """Why a mesh cannot be built on ``world_size`` ranks, or None if it fits exactly."""
    needed = num_ranks(axes)
    if needed == world_size:
        return None
    return f"mesh {describe_axes(axes)} needs {needed} ranks, this run has {world_size}"
