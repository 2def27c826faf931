"""Simulated ranks outside the plugin: simulated_mesh, and the plugin's mesh cache.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.distributed.tensor import Shard, distribute_tensor

from dtensor_attn import _compat
from dtensor_attn.testing import assert_dtensor_close, simulated_mesh
from dtensor_attn.testing.harness.simulate import SimulatedMeshes, build_simulated_mesh


def test_simulated_mesh_runs_the_body_on_every_rank():
    x_BLNH = torch.arange(2 * 4 * 4 * 2, dtype=torch.float64).reshape(2, 4, 4, 2)
    assert not _compat.local_tensor_mode_active()
    with simulated_mesh({"cp": 2, "tp": 2}) as mesh:
        assert _compat.local_tensor_mode_active()
        assert mesh.mesh_dim_names == ("cp", "tp") and mesh.device_type == "cpu"
        x_dt = distribute_tensor(x_BLNH, mesh, [Shard(1), Shard(2)])
        assert sorted(_compat.rank_tensors(x_dt.to_local())) == [0, 1, 2, 3]
        assert tuple(x_dt.to_local().shape) == (2, 2, 2, 2)
        assert_dtensor_close(x_dt, x_BLNH, rtol=0, atol=0)
    assert not _compat.local_tensor_mode_active()


def test_meshes_are_cached_per_axes_and_outlive_other_world_sizes():
    meshes = SimulatedMeshes()
    tp2 = meshes.get({"tp": 2})
    big = meshes.get({"dp": 2, "cp": 2, "tp": 2})
    assert meshes.get({"tp": 2}) is tp2 and big.size() == 8
    assert meshes.get({"tp": 2, "cp": 1}) is not tp2  # other names or order: another mesh
    # The small mesh still works after a bigger one was built (its group was not destroyed).
    with contextlib.ExitStack() as stack:
        mesh = meshes.enter({"tp": 2}, stack)
        assert _compat.local_tensor_mode_active()
        x = torch.arange(4.0)
        assert_dtensor_close(distribute_tensor(x, mesh, [Shard(0)]), x, rtol=0, atol=0)
    assert not _compat.local_tensor_mode_active()


def test_bad_axes_are_rejected_with_the_fix():
    with pytest.raises(ValueError, match=r"mesh axis tp=-2: expected a positive int size"):
        build_simulated_mesh({"tp": -2})
    with pytest.raises(ValueError, match=r"a mesh needs at least one axis"):
        build_simulated_mesh({})
