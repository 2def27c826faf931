"""Simulated ranks: a device mesh on a fake process group, every rank in one process.

Inside ``simulated_mesh`` every DTensor's local tensor is a LocalTensor holding one shard per
rank, and collectives are computed in memory, so a test sees every rank's values without
processes. The fake process group is the default group for the simulated world size; it is
re-created only when the world size changes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dtensor_attn._compat import FakeStore, LocalTensorMode, maybe_disable_local_tensor_mode


def ensure_fake_process_group(world_size: int) -> None:
    """Make the default group a fake one of ``world_size`` ranks (no-op if it already is)."""
    if dist.is_initialized():
        if dist.get_backend() == "fake" and dist.get_world_size() == world_size:
            return
        if dist.get_backend() != "fake":
            raise RuntimeError(
                "simulated ranks need the fake process group, but a real one "
                f"({dist.get_backend()}) is initialised in this process"
            )
        dist.destroy_process_group()
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())


@contextlib.contextmanager
def simulated_mesh(axes: Mapping[str, int], device_type: str = "cpu") -> Iterator[DeviceMesh]:
    """A mesh with named axes, e.g. ``{"cp": 2, "tp": 4}``, on simulated ranks.

    The body runs under LocalTensorMode: results of collectives hold every rank's value.
    """
    names = tuple(axes)
    shape = tuple(axes.values())
    world_size = math.prod(shape) if shape else 1
    ensure_fake_process_group(world_size)
    with LocalTensorMode(frozenset(range(world_size))):
        with maybe_disable_local_tensor_mode():
            mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        yield mesh
