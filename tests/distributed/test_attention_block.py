"""An attention block as users run it, parallelized, against a single-device copy of itself.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

q/k/v projections with torch's ``ColwiseParallel(use_local_output=False)``, GQA attention
through LocalMapAttention, ``view(B, L, -1)`` of its output (BLNH, or varlen's packed TNH:
where torchtitan PR #2761's seed bug surfaced), and the output projection with
``RowwiseParallel`` (``use_local_output=False``: the default local output is an
AsyncCollectiveTensor, which ``rank_values`` reads as rank 0 alone). TP: projections parallelized on the tp axis. CP: each rank holds its seq chunk
of x (torchtitan's way), and the block places its q/k/v chunks on the whole mesh for attention
and the attention output back on the tp axis for the output projection; weight gradients are
then partial over cp and summed as data parallelism would.

Measured on torch 2.13: varlen's TNH output under CP is ``(_StridedShard(0, sf=B), ...)``, and
its ``view(B, L, -1)`` is a plain seq shard again with no collective; the pin is below. With
the seed bug (the TNH output labelled Shard(2)) the view gives ``_StridedShard(2, sf=4)`` on tp=2
and the output projection runs an extra all-gather: the collective count catches it. Every
kernel, the math kernel included, returns BLNH memory, so ``view(B, L, -1)`` works.

Tolerance: ``precision_for(mesh.device_type)``. On CPU ranks the block is float64 end to end
(1e-9: reduction order only). On CUDA it runs in bf16 with head_dim 16, the real kernels'
dtype, against a float64 copy holding the same bf16-rounded weights and input (5e-2).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from dtensor_attn import AttentionConfig, Layout, LocalMapAttention
from dtensor_attn import _compat
from dtensor_attn.backends import REGISTRY
from dtensor_attn.testing import assert_dtensor_close, assert_placements
from dtensor_attn.testing.kit.subjects import offered_outputs
from dtensor_attn.testing.harness.meshspec import mesh_params
from dtensor_attn.testing.reference import precision_for

B, L, D, NUM_Q_HEADS, NUM_KV_HEADS, H = 2, 16, 16, 8, 4, 4
STRIDED = _compat.strided_shard(0, B)  # each CP rank's tokens: its seq chunk of every batch row

MESHES = mesh_params({"tp": 2}, {"cp": 2}, {"cp": 2, "tp": 2})
# Per mesh axis: the attention output's placement (BLNH, TNH), then that of view(B, L, -1).
OUT_PLACEMENTS = {"cp": {Layout.BLNH: Shard(1), Layout.TNH: STRIDED}, "tp": {Layout.BLNH: Shard(2), Layout.TNH: Shard(1)}}
VIEW_PLACEMENTS = {"cp": Shard(1), "tp": Shard(2)}


VARIANTS = [pytest.param(b, layout, id=f"{b}-{layout.name}") for b in REGISTRY for layout in offered_outputs(b)]


class AttentionBlock(nn.Module):
    """x -> q/k/v projections -> LocalMapAttention -> view(B, L, -1) -> output projection."""

    def __init__(self, config: AttentionConfig, generator: torch.Generator, *, head_dim: int = H,
                 rounded_to: torch.dtype = torch.float64) -> None:
        """float64 weights, holding values of ``rounded_to`` (the parallel copy's dtype)."""
        super().__init__()
        self.head_dim = head_dim

        def linear(d_in: int, d_out: int) -> nn.Linear:
            layer = nn.Linear(d_in, d_out, bias=False, dtype=torch.float64)
            with torch.no_grad():
                weight = torch.randn(d_out, d_in, generator=generator, dtype=torch.float64) / d_in**0.5
                layer.weight.copy_(weight.to(rounded_to))
            return layer

        h = head_dim
        self.wq, self.wk, self.wv = linear(D, NUM_Q_HEADS * h), linear(D, NUM_KV_HEADS * h), linear(D, NUM_KV_HEADS * h)
        self.wo = linear(NUM_Q_HEADS * h, D)
        self.attention = LocalMapAttention(config.build())
        self.mesh = None  # the mesh attention runs on, once parallelized

    def parallelize(self, mesh) -> AttentionBlock:
        self.mesh = mesh
        if "tp" in mesh.mesh_dim_names:
            colwise = ColwiseParallel(use_local_output=False)
            plan = {"wq": colwise, "wk": colwise, "wv": colwise, "wo": RowwiseParallel(use_local_output=False)}
            parallelize_module(self, mesh["tp"], plan)
        return self

    def forward(self, x_BLD):
        """x_BLD: the whole batch on one device, or this rank's seq chunk under CP."""
        return self.rows(self.project(self.attend(x_BLD), x_BLD.shape[0], x_BLD.shape[1] * self._cp_degree()))

    def attend(self, x_BLD):
        def heads(t_BLD):
            return self._on_mesh(t_BLD.view(t_BLD.shape[0], t_BLD.shape[1], -1, self.head_dim), Shard(2))

        return self.attention(heads(self.wq(x_BLD)), heads(self.wk(x_BLD)), heads(self.wv(x_BLD)))

    def project(self, out, batch: int, seq: int):
        out_BLD = out.view(batch, seq, -1)
        if self._cp_degree() > 1:  # the tp-axis projection takes this rank's chunk
            local_BLD = out_BLD.to_local()
            out_BLD = DTensor.from_local(local_BLD, self.mesh["tp"], [Shard(2)]) if "tp" in self.mesh.mesh_dim_names else local_BLD
        return self.wo(out_BLD)

    def rows(self, y_BLD):
        """Under CP, each rank's output chunk as one DTensor on the whole mesh."""
        return self._on_mesh(y_BLD, Replicate())

    def _cp_degree(self) -> int:
        names = self.mesh.mesh_dim_names if self.mesh is not None else ()
        return self.mesh["cp"].size() if "cp" in names else 1

    def _on_mesh(self, t, tp_placement):
        if self._cp_degree() == 1:
            return t
        local = t.to_local() if isinstance(t, DTensor) else t
        placements = [Shard(1) if name == "cp" else tp_placement for name in self.mesh.mesh_dim_names]
        return DTensor.from_local(local, self.mesh, placements)


@pytest.mark.parametrize("axes", MESHES)
@pytest.mark.parametrize("backend,layout", VARIANTS)
def test_parallel_block_matches_single_device(mesh, axes, backend, layout):
    precision = precision_for(mesh.device_type)
    if layout is Layout.TNH and "cp" in axes and not _compat.packed_strided_shard_usable():
        pytest.skip(f"this torch cannot redistribute varlen's _StridedShard TNH output under CP: {_compat.packed_strided_shard_probe()[1]}")
    config = AttentionConfig(backend=backend, enable_gqa=True, varlen_output=layout)
    generator = torch.Generator().manual_seed(0)
    with _compat.maybe_disable_local_tensor_mode():  # the same single-device reference on every rank
        reference = AttentionBlock(config, generator, head_dim=precision.head_dim(H), rounded_to=precision.dtype)
        block = copy.deepcopy(reference).to(device=mesh.device_type, dtype=precision.dtype)
        x_ref_BLD = torch.randn(B, L, D, generator=generator, dtype=torch.float64).to(precision.dtype).double().requires_grad_()
        w_BLD = torch.randn(B, L, D, generator=generator, dtype=torch.float64)
        out_ref = reference.attend(x_ref_BLD.detach())
        assert out_ref.is_contiguous()  # every kernel returns BLNH memory: view(B, L, -1) works
        (reference(x_ref_BLD) * w_BLD).sum().backward()

    block.parallelize(mesh)
    x_BLD = distribute_tensor(x_ref_BLD.detach().to(precision.dtype), mesh, [Shard(1) if a == "cp" else Replicate() for a in axes]).requires_grad_()
    out = block.attend(x_BLD.to_local())
    assert_placements(out, [OUT_PLACEMENTS[a][layout] for a in axes])
    with CommDebugMode() as comm:  # from the attention output to the output projection's result
        projected_BLD = block.project(out, B, L)
    expected_comm = {"all_reduce": 1} if "tp" in axes else {}  # RowwiseParallel's own reduction, only
    assert {op.__name__.split(".")[-1]: n for op, n in comm.get_comm_counts().items()} == expected_comm
    assert_placements(out.view(B, L, -1), [VIEW_PLACEMENTS[a] for a in axes])

    y_BLD = block.rows(projected_BLD)
    assert_dtensor_close(y_BLD, reference(x_ref_BLD.detach()).detach(), **precision.tol, msg="block output")
    (y_BLD.full_tensor() * w_BLD.to(y_BLD.device, y_BLD.dtype)).sum().backward()
    assert_dtensor_close(x_BLD.grad, x_ref_BLD.grad, **precision.tol, msg="grad x")
    reduce_cp = [Partial() if a == "cp" else Replicate() for a in axes]  # what data parallelism over cp does
    for name in ("wq", "wk", "wv", "wo"):
        grad = getattr(block, name).weight.grad
        full = grad.full_tensor() if isinstance(grad, DTensor) else grad
        if "cp" in axes:
            full = DTensor.from_local(full, mesh, reduce_cp).full_tensor()
        expected = getattr(reference, name).weight.grad
        assert_dtensor_close(full, expected, **_sum_tol(precision, expected), msg=f"grad {name}.weight")


def _sum_tol(precision, reference) -> dict:
    """Weight gradients are sums over the B*L = 32 tokens and reach |20|; in bf16 their absolute
    error scales with that size (bf16's step at 20 is 0.125), so atol is rtol times the largest
    entry (float64 on CPU: 2e-8, still far below any placement mistake)."""
    return dict(rtol=precision.rtol, atol=max(precision.atol, precision.rtol * float(reference.abs().max())))
