"""The kit on the harness's mesh: simulated ranks in plain pytest, real ranks under torchrun
(``scripts/run_torchrun.sh -n 2 --backend gloo -- tests/distributed/test_conformance_on_mesh.py``;
NCCL on GPUs), with ``check_attention(..., mesh=mesh)``.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Each rank runs the same cases on the mesh and checks its own full tensors; the harness agrees
on every test phase across ranks. Tolerance: the kit's default for the mesh's device (float64
on CPU; bf16 and HALF_TOLERANCE on CUDA, options.py).
"""

from __future__ import annotations

import pytest

import attention_subjects as subjects
from dtensor_attn import Layout, LocalMapAttention
from dtensor_attn.config import Backend
from dtensor_attn.testing.harness.meshspec import mesh_id
from dtensor_attn.testing.kit import FailureKind, Status, check_attention

MESHES = [{"tp": 2}, {"cp": 2}, {"cp": 2, "tp": 2}]


@pytest.mark.parametrize("mesh", MESHES, indirect=True, ids=mesh_id)
def test_local_map_attention_conforms_on_the_harness_mesh(mesh):
    result = check_attention(factory=lambda config: LocalMapAttention(config.build()), backends=[Backend.SDPA, Backend.FLEX],
                             outputs=[Layout.BLNH], mesh=mesh, lse=(False,))
    result.raise_for_failures()
    axes = dict(zip(mesh.mesh_dim_names, mesh.shape))
    assert {c.mesh for c in result.cases} == {mesh_id(axes), f"cache-{mesh_id(axes)}"}
    assert any(c.mask == "docs" and c.status is Status.PASS for c in result.cases)  # flex's documents ran


@pytest.mark.parametrize("mesh", [{"cp": 2}], indirect=True, ids=mesh_id)
def test_a_cp_offset_bug_is_flagged_on_every_rank_of_the_harness_mesh(mesh):
    result = check_attention(factory=subjects.ForgetsCPOffset, backends=[Backend.SDPA], mesh=mesh, masks=("causal",),
                             lse=(False,), cache_check=False)
    assert {c.status for c in result.cases} == {Status.FAIL}
    assert FailureKind.VALUES in {f.kind for f in result.failures}
