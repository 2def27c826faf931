"""torchrun mode's process group: created once per session, the meshes built on it, its teardown.

The collective side of a torchrun session, apart from the agreement (``torchrun_session.py``),
which goes through the launcher's store so that no wedged collective can block it. Its timeout
is the session-level one (``RunSettings.sync_timeout_s``): longer than a phase, so a rank's
watchdog reports a blocked collective, with its stack, before gloo or NCCL time out.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from dtensor_attn.testing.harness.torchrun_env import (
    BackendChoice, RunSettings, TorchrunEnv, choose_backend,
)


class SessionGroup:
    """This rank's process group for the session and the meshes on it."""

    def __init__(self, env: TorchrunEnv, settings: RunSettings) -> None:
        self.env = env
        self.settings = settings
        self.backend: BackendChoice | None = None  # gloo or nccl once started
        self.device_type = "cpu"
        self.started = False
        self._meshes: dict[tuple[tuple[str, int], ...], DeviceMesh] = {}

    def start(self) -> None:
        """Create the process group: NCCL (with gloo for CPU tensors) where every local rank
        has a GPU or where asked, else gloo."""
        self.backend = choose_backend(self.settings.backend, self.env.local_world_size)
        pg_backend = "gloo"
        if self.backend is BackendChoice.NCCL:
            torch.cuda.set_device(self.env.local_rank)
            self.device_type, pg_backend = "cuda", "cpu:gloo,cuda:nccl"
        timeout = datetime.timedelta(seconds=self.settings.sync_timeout_s)
        dist.init_process_group(pg_backend, timeout=timeout)
        self.started = True

    def mesh(self, axes: Mapping[str, int]) -> DeviceMesh:
        """Cached per axes: every rank builds the same meshes in the same order (same tests)."""
        key = tuple(axes.items())
        if key not in self._meshes:
            self._meshes[key] = init_device_mesh(
                self.device_type, tuple(axes.values()), mesh_dim_names=tuple(axes)
            )
        return self._meshes[key]

    def close(self, *, healthy: bool) -> None:
        """Destroy the process group where this session made it and every rank is in step; a
        rank still inside a collective would hang the destroy."""
        if healthy and self.started:
            dist.destroy_process_group()


__all__ = ["SessionGroup"]
