"""LocalMapAttention's boundary is local_map's, to the stride, on the first call and every later one.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

``AttentionPlan`` replaces torch's ``local_map`` with cached DTensor specs
(``dtensor_attn._compat.LocalBoundary``). The oracle here is torch's own ``local_map`` with the
same three placements stated, the same kernel and the same per-rank visibility: every output
and every input gradient must have the same placements, global shape and global stride, and
bit-identical local values on every rank (the same kernel on the same local tensors; no
tolerance is needed, so none is given). Each module is called three times: the first call
derives the specs, the later ones reuse them.
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.experimental import local_map

from dtensor_attn import AttentionConfig, Layout, LocalMapAttention, make_attention_masks
from dtensor_attn import _compat
from dtensor_attn._compat import rank_tensors
from dtensor_attn.backends import REGISTRY
from dtensor_attn.local_map_attention import _bl_placements
from dtensor_attn.testing.reference import make_mesh_inputs
from dtensor_attn.visibility import Visibility

B, L, NQ, NKV, H = 2, 8, 4, 2, 8

MESHES = [  # q/k/v placements in BLNH: dp shards batch, cp the sequence, tp the heads
    pytest.param((Shard(2),), marks=pytest.mark.mesh(tp=2), id="tp2"),
    pytest.param((Shard(1),), marks=pytest.mark.mesh(cp=2), id="cp2"),
    pytest.param((Shard(1), Shard(2)), marks=pytest.mark.mesh(cp=2, tp=2), id="cp2xtp2"),
    pytest.param((Shard(0), Shard(2)), marks=pytest.mark.mesh(dp=2, tp=2), id="dp2xtp2"),
]


def _configs():
    for backend in REGISTRY:
        layouts = (Layout.BLNH, Layout.TNH) if backend.value == "varlen" else (Layout.BLNH,)
        for layout in layouts:
            for lse in (False, True):
                yield pytest.param(
                    backend, layout, lse, id=f"{backend.value}-{layout.name}{'-lse' if lse else ''}"
                )


def _oracle(attention: LocalMapAttention, q, k, v, mask):
    """torch's local_map with the placements LocalMapAttention infers and the visibility it builds."""
    placements = attention.infer_placements(q, k, v)
    inner, mesh = attention.inner, q.device_mesh
    layout = inner.in_layout
    seq_index = attention._plans[attention._key(q, k, v, mask)].seq_index_locals
    mask_pl = (_bl_placements(placements.q, layout), _bl_placements(placements.kv, layout))

    def run(q_local, k_local, v_local, *doc_locals):
        local_mask = None if mask is None else type(mask)(*doc_locals)
        return inner(q_local, k_local, v_local, visibility=Visibility(inner.is_causal, local_mask, *seq_index))

    in_pl = [placements.q, placements.kv, placements.kv]
    grad_pl = [placements.q_grad, placements.kv_grad, placements.kv_grad]
    args = [q, k, v]
    if mask is not None:
        in_pl += mask_pl
        grad_pl += mask_pl
        args += [
            DTensor.from_local(ids, mesh, [Replicate()] * mesh.ndim, run_check=False)
            for ids in (mask.q_document_ids_BL, mask.kv_document_ids_BL)
        ]
    out_pl = (placements.out, placements.lse) if placements.lse is not None else list(placements.out)
    mapped = local_map(
        run, out_placements=out_pl, in_placements=tuple(in_pl), in_grad_placements=tuple(grad_pl),
        device_mesh=mesh, redistribute_inputs=True,
    )
    return mapped(*args)


def _run(fn, leaves, mask):
    q, k, v = (t.detach().requires_grad_() for t in leaves)
    result = fn(q, k, v, mask) if mask is not None else fn(q, k, v)
    outs = result if isinstance(result, tuple) else (result,)
    loss = sum((o * (i + 2)).sum() for i, o in enumerate(outs))  # every output gets a gradient
    loss.backward()
    return outs, (q.grad, k.grad, v.grad)


def _assert_same(ours: DTensor, theirs: DTensor, what: str) -> None:
    assert isinstance(ours, DTensor), f"{what}: a {type(ours).__name__}, expected a DTensor"
    assert ours.placements == theirs.placements, f"{what}: placements {ours.placements} != local_map's {theirs.placements}"
    assert ours.shape == theirs.shape, f"{what}: global shape {tuple(ours.shape)} != local_map's {tuple(theirs.shape)}"
    assert ours.stride() == theirs.stride(), f"{what}: global stride {ours.stride()} != local_map's {theirs.stride()}"
    ours_local, theirs_local = ours.to_local(), theirs.to_local()
    assert ours_local.stride() == theirs_local.stride(), f"{what}: local stride differs"
    ours_ranks, theirs_ranks = rank_tensors(ours_local), rank_tensors(theirs_local)
    assert ours_ranks.keys() == theirs_ranks.keys()
    for rank, local in ours_ranks.items():
        assert torch.equal(local, theirs_ranks[rank]), f"{what}: rank {rank}'s local values differ from local_map's"


@pytest.mark.parametrize("placements", MESHES)
@pytest.mark.parametrize("backend,layout,lse", list(_configs()))
def test_every_call_matches_local_map(mesh, placements, backend, layout, lse):
    if layout is Layout.TNH and Shard(1) in placements and not _compat.packed_strided_shard_usable():
        pytest.skip(  # the wrapper refuses this case on such a torch (test_local_map_attention.py)
            f"packed TNH under CP is a _StridedShard this torch cannot redistribute: "
            f"{_compat.packed_strided_shard_probe()[1]}"
        )
    config = AttentionConfig(backend=backend, enable_gqa=True, return_lse=lse, varlen_output=layout)
    attention = LocalMapAttention(config.build())
    inputs = make_mesh_inputs(mesh, batch=B, seq=L, num_q_heads=NQ, num_kv_heads=NKV, head_dim=H, documents=True)
    masks = [None]
    if config.build().mask_type is not None:
        masks.append(make_attention_masks(config, inputs.positions_BL.to(mesh.device_type)))
    leaves = [distribute_tensor(t, mesh, placements) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]
    for mask in masks:
        for call in range(3):
            outs, grads = _run(attention, leaves, mask)
            oracle_outs, oracle_grads = _run(lambda q, k, v, m=None: _oracle(attention, q, k, v, m), leaves, mask)
            where = f"call {call}, {'documents' if mask is not None else 'causal'}"
            assert len(outs) == len(oracle_outs)
            for name, ours, theirs in zip(("out", "lse"), outs, oracle_outs):
                _assert_same(ours, theirs, f"{name}, {where}")
            for name, ours, theirs in zip("qkv", grads, oracle_grads):
                _assert_same(ours, theirs, f"grad {name}, {where}")


def _tp_leaves(mesh):
    inputs = make_mesh_inputs(mesh, batch=B, seq=L, num_q_heads=NQ, num_kv_heads=NQ, head_dim=H)
    return [distribute_tensor(t, mesh, (Shard(2),)) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]


@pytest.mark.mesh(tp=2)
def test_hooks_registered_after_the_first_call_run_on_every_later_call(mesh):
    """From a signature's second call the plan skips the inner's input checks (``attend``), but
    only where calling the module is calling its forward: a hook of the module's own or a global
    one makes every call go through ``module(...)`` again."""
    attention = LocalMapAttention(AttentionConfig(backend="sdpa").build())
    leaves = _tp_leaves(mesh)
    attention(*leaves)
    seen = []
    handle = attention.inner.register_forward_pre_hook(lambda module, args: seen.append("own"))
    attention(*leaves)
    attention(*leaves)
    assert seen == ["own", "own"]
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: seen.append(type(module).__name__)
    )
    try:
        attention(*leaves)
    finally:
        handle.remove()
    assert seen[2:] == ["LocalMapAttention", type(attention.inner).__name__]
    attention(*leaves)
    assert len(seen) == 4


@pytest.mark.mesh(tp=2)
def test_a_subclass_forward_runs_on_every_call(mesh):
    """A backend subclass whose forward does more than check and attend keeps its forward."""
    base = type(AttentionConfig(backend="sdpa").build())
    calls = []

    class Counting(base):
        def forward(self, q, k, v, mask=None, *, visibility=None):
            calls.append(tuple(q.shape))
            return super().forward(q, k, v, mask, visibility=visibility)

    attention = LocalMapAttention(Counting(AttentionConfig(backend="sdpa")))
    leaves = _tp_leaves(mesh)
    for _ in range(3):
        attention(*leaves)
    assert calls == [tuple(leaves[0].to_local().shape)] * 3
