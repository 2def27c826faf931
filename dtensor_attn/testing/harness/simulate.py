"""Simulated ranks: a device mesh on a fake process group, every rank in one process.

Inside ``simulated_mesh`` every DTensor's local tensor is a LocalTensor holding one shard per
rank, and collectives are computed in memory, so a test sees every rank's values without
processes. One fake process group of ``MAX_SIMULATED_RANKS`` ranks serves every test, and each
mesh takes ranks 0..n-1 of it: re-creating the group when the world size changes left DTensor
holding meshes of destroyed groups ("Could not resolve the process group registered under the
name 11", seen in the attention matrix).

The pytest plugin uses ``SimulatedMeshes``: the same thing split at test boundaries, with the
meshes cached per axes (for as long as the fake group they were built on is the default group).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from dtensor_attn._compat import FakeStore, LocalTensorMode, maybe_disable_local_tensor_mode, simulate_cp_all_gather
from dtensor_attn.testing.harness.meshspec import mesh_axes_of, num_ranks, validate_axes

MAX_SIMULATED_RANKS = 1024


def ensure_fake_process_group(world_size: int) -> None:
    """Make sure the default group is a fake one with at least ``world_size`` ranks."""
    if world_size > MAX_SIMULATED_RANKS:
        raise ValueError(
            f"simulated meshes have at most {MAX_SIMULATED_RANKS} ranks, asked for {world_size}."
        )
    if dist.is_initialized():
        if dist.get_backend() != "fake":
            raise RuntimeError(
                "simulated ranks need the fake process group, but a real one "
                f"({dist.get_backend()}) is initialised in this process"
            )
        if dist.get_world_size() < world_size:
            raise RuntimeError(
                f"a fake process group of {dist.get_world_size()} ranks is initialised; the "
                f"simulated mesh needs {world_size}. Fix: let simulated_mesh create the group."
            )
        return
    dist.init_process_group("fake", rank=0, world_size=MAX_SIMULATED_RANKS, store=FakeStore())


def build_simulated_mesh(axes: Mapping[str, int], device_type: str = "cpu") -> DeviceMesh:
    """A mesh on ranks 0..n-1 of the shared fake group (n = the product of the axis sizes)."""
    validate_axes(axes, "simulated_mesh")
    world_size = num_ranks(axes)
    ensure_fake_process_group(world_size)
    with maybe_disable_local_tensor_mode():
        ranks = torch.arange(world_size).view(tuple(axes.values()))
        return DeviceMesh(device_type, ranks, mesh_dim_names=tuple(axes))


@contextlib.contextmanager
def simulated_ranks(world_size: int) -> Iterator[None]:
    """Run the body on ``world_size`` simulated ranks (LocalTensorMode).

    torch's CP all-gather op runs per rank on the fake group and would repeat each rank's own
    chunk: the simulation rule for it is registered first (once per process)."""
    simulate_cp_all_gather()
    with LocalTensorMode(frozenset(range(world_size))):
        yield


@contextlib.contextmanager
def simulated_mesh(axes: Mapping[str, int], device_type: str = "cpu") -> Iterator[DeviceMesh]:
    """A mesh with named axes, e.g. ``{"cp": 2, "tp": 4}``, on simulated ranks.

    The body runs under LocalTensorMode: results of collectives hold every rank's value.
    """
    mesh = build_simulated_mesh(axes, device_type)
    with simulated_ranks(mesh.size()):
        yield mesh


class SimulatedMeshes:
    """Meshes cached per axes; the cache is dropped if the default group is no longer the one
    the meshes were built on (someone destroyed and re-created it in this process)."""

    def __init__(self, device_type: str = "cpu") -> None:
        self.device_type = device_type
        self._meshes: dict[tuple[tuple[str, int], ...], DeviceMesh] = {}
        self._group: object = None

    def get(self, axes: Mapping[str, int]) -> DeviceMesh:
        ensure_fake_process_group(num_ranks(axes))
        group = dist.group.WORLD
        if group is not self._group:
            self._meshes.clear()
            self._group = group
        key = tuple(axes.items())
        mesh = self._meshes.get(key)
        if mesh is None:
            mesh = build_simulated_mesh(axes, self.device_type)
            self._meshes[key] = mesh
        return mesh

    def enter(self, axes: Mapping[str, int], stack: contextlib.ExitStack) -> DeviceMesh:
        """Build (or reuse) the mesh, then enter simulated ranks until ``stack`` closes."""
        mesh = self.get(axes)
        stack.enter_context(simulated_ranks(mesh.size()))
        return mesh


class SimulatedMode:
    """The harness's mode for plain pytest: each test's mesh on simulated ranks, entered at its
    setup and left at its teardown (``TorchrunPlugin`` answers the same questions under torchrun)."""

    _STACK = pytest.StashKey[contextlib.ExitStack]()

    def __init__(self, device_type: str) -> None:
        self.meshes = SimulatedMeshes(device_type)

    def header(self) -> str:
        return (f"dtensor_attn: simulated ranks (LocalTensorMode on a fake process group), "
                f"{self.meshes.device_type} meshes")

    def skip_reason(self, axes: dict[str, int] | None) -> str | None:
        return None  # any world size fits

    def mesh(self, item: pytest.Item, axes: dict[str, int]) -> DeviceMesh:
        stack = contextlib.ExitStack()
        item.stash[self._STACK] = stack
        return self.meshes.enter(axes, stack)

    def close_test(self, item: pytest.Item) -> None:
        stack = item.stash.get(self._STACK, None)
        if stack is not None:
            del item.stash[self._STACK]
            stack.close()

    def world_size(self, item: pytest.Item) -> int:
        axes = mesh_axes_of(item)
        return 1 if axes is None else num_ranks(axes)
