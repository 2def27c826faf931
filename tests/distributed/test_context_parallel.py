"""Context parallelism, both ways, for every backend, alone and with TP.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

``fullmesh``: q/k/v DTensors on the (cp[, tp]) mesh through LocalMapAttention. ``hooks``: each
rank's local seq chunk through torch's ``_ContextParallel`` hooks (apply_context_parallel), with
TP DTensors on the tp axis through LocalMapAttention. Every case compares the output and the
q/k/v gradients, as every rank holds them in full, with a float64 single-device reference built
from the same global tensors (in shard order when load-balanced).

Tolerance: ``precision_for(mesh.device_type)`` (testing/reference.py). On CPU, inputs, kernel
and reference are float64 (1e-9: reduction order only), and every CP mistake (a missing rank
offset, a gather along the wrong dim, an unreduced k/v gradient) moves values by O(0.1). On CUDA
the kernels need bf16 (flash, varlen) and head_dim 16 (compiled flex): the reference starts from
the same bf16-rounded inputs, and 5e-2 covers a few bf16 ulps.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import parallelize_module

from dtensor_attn import AttentionConfig, Layout, LocalMapAttention, PlacementError, make_attention_masks
from dtensor_attn import _compat
from dtensor_attn._compat import StridedShard
from dtensor_attn.backends import REGISTRY
from dtensor_attn.config import Backend
from dtensor_attn.context_parallel import (
    ContextParallelError,
    CPStrategy,
    apply_context_parallel,
    attach_boundary_check,
)
from dtensor_attn.load_balance import SeqOrder, permute_mask, permute_seq, seq_permutation
from dtensor_attn.testing import assert_dtensor_close, assert_golden, assert_placements, format_table, rank_values
from dtensor_attn.testing.reference import (
    AttentionInputs, cp_rank_view, make_mesh_inputs, precision_for, reference_attention, to_layout,
)

B, L, H = 2, 16, 8
EXACT = dict(rtol=0.0, atol=0.0)  # integers moved between ranks: any device, bit for bit
PATHS = ("fullmesh", "hooks")
MESHES = {"cp2": dict(cp=2), "cp4": dict(cp=4), "cp2xtp2": dict(cp=2, tp=2), "cp2xtp4": dict(cp=2, tp=4)}


def _cases():
    """path x backend x mesh x {causal, packed documents} x {MHA, GQA} x {load balance}: ids like
    ``hooks-flex-cp2xtp2-docs-gqa-lb``. Documents only for backends that apply document masks."""
    for path, (backend, cls), (mesh_name, axes) in itertools.product(PATHS, REGISTRY.items(), MESHES.items()):
        mask_kinds = (False, True) if cls.mask_type else (False,)
        for documents, gqa, lb in itertools.product(mask_kinds, (False, True), (False, True)):
            words = [path, str(backend), mesh_name, "docs" if documents else "causal", "gqa" if gqa else "mha"]
            case_id = "-".join(words + (["lb"] if lb else []))
            yield pytest.param(path, backend, documents, gqa, lb, marks=pytest.mark.mesh(**axes), id=case_id)


def mesh_inputs(mesh, *, batch: int = B, **kwargs) -> AttentionInputs:
    return make_mesh_inputs(mesh, batch=batch, seq=L, head_dim=H, **kwargs)


def tol(mesh) -> dict:
    return precision_for(mesh.device_type).tol


def seq_heads_placements(mesh) -> tuple:
    """BLNH placements of the full mesh: seq on cp, heads on tp."""
    return tuple(Shard(1) if name == "cp" else Shard(2) for name in mesh.mesh_dim_names)


_RING_PROBES = pytest.StashKey[dict]()


def skip_unless_ring_runs(request, mesh) -> None:
    """Skip where torch's ring attention (the sdpa CP hooks) cannot run: CPU meshes (torch has no
    ring for the CPU sdpa op), and simulated ranks where torch's ring gives wrong numbers or
    fails. That is decided by behaviour, once per session and mesh: the simplest correct case
    (causal, MHA, the layout's seq_dim), forward and backward, against the reference. Under
    torchrun nothing is skipped: a real rank's failure is a failure."""
    if mesh.device_type != "cuda":
        pytest.skip(
            f"torch's ring attention (sdpa CP hooks) runs only on CUDA, this mesh is {mesh.device_type}; "
            "test_ring_on_cpu_raises_up_front covers the error"
        )
    runs, why = _ring_probe(request, mesh)
    if not runs:
        pytest.skip(f"torch's ring attention does not run on simulated ranks ({why}); real ranks run "
                    "these cases: scripts/run_torchrun.sh --backend nccl with 2 or more GPUs")


def ring_gives_the_reference(request, mesh) -> bool:
    return _ring_probe(request, mesh)[0]


def _ring_probe(request, mesh) -> tuple[bool, str]:
    if not _compat.local_tensor_mode_active():
        return True, "real ranks"
    probes = request.config.stash.setdefault(_RING_PROBES, {})
    key = tuple(zip(mesh.mesh_dim_names, mesh.shape))
    if key not in probes:
        probes[key] = _probe_ring_on_simulated_ranks(mesh)
    return probes[key]


def _probe_ring_on_simulated_ranks(mesh) -> tuple[bool, str]:
    inputs = mesh_inputs(mesh, num_q_heads=4, num_kv_heads=4)
    with _compat.maybe_disable_local_tensor_mode():
        leaves = [t.double().clone().requires_grad_() for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]
        out_ref, _ = reference_attention(AttentionInputs(*leaves, None))
        out_ref.sum().backward()
    qkv = [t.to(mesh.device_type) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]
    try:
        out, grads = _run_hooks(mesh, AttentionConfig(backend=Backend.SDPA), qkv, None, False)
    except (ContextParallelError, PlacementError):
        raise  # ours, not torch's ring: a bug to see, never a reason to skip
    except Exception as error:  # noqa: BLE001 - the probe's verdict is the reason of the skips
        return False, f"causal MHA at seq_dim 1 raised {type(error).__name__}: {str(error).splitlines()[0][:200]}"
    for name, actual, expected in (("output", out, out_ref), *zip(("grad q", "grad k", "grad v"), grads, (l.grad for l in leaves))):
        try:
            assert_dtensor_close(actual, expected, **tol(mesh), msg=name)
        except AssertionError as error:
            return False, f"causal MHA at seq_dim 1: {str(error).splitlines()[0][:200]}"
    return True, "causal MHA at seq_dim 1 equals the reference, forward and backward"


@pytest.mark.parametrize("path,backend,documents,gqa,lb", list(_cases()))
def test_cp_matrix(request, mesh, path, backend, documents, gqa, lb):
    if path == "hooks" and REGISTRY[backend].cp_strategy is CPStrategy.RING:
        skip_unless_ring_runs(request, mesh)
    inputs = mesh_inputs(mesh, num_q_heads=8, num_kv_heads=4 if gqa else 8, documents=documents)
    with _compat.maybe_disable_local_tensor_mode():  # one reference, not one per simulated rank
        leaves = [t.double().clone().requires_grad_() for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]
        out_ref, _ = reference_attention(AttentionInputs(*leaves, inputs.positions_BL))
        out_ref.sum().backward()

    degree = mesh["cp"].size()
    perm_L = seq_permutation(SeqOrder.HEAD_TAIL if lb else SeqOrder.CONTIGUOUS, L, degree)
    config = AttentionConfig(backend=backend, enable_gqa=gqa)
    mask = permute_mask(make_attention_masks(config, inputs.positions_BL), perm_L) if documents else None
    qkv = [permute_seq(t, perm_L, 1).to(mesh.device_type) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]
    run = _run_fullmesh if path == "fullmesh" else _run_hooks
    out, grads = run(mesh, config, qkv, mask, lb)

    placements = seq_heads_placements(mesh)
    assert_placements(out, placements)
    assert_dtensor_close(out, permute_seq(out_ref, perm_L, 1), **tol(mesh), msg="output")
    for name, grad, leaf in zip("qkv", grads, leaves):
        assert_placements(grad, placements)
        assert_dtensor_close(grad, permute_seq(leaf.grad, perm_L, 1), **tol(mesh), msg=f"grad {name}")


def _run_fullmesh(mesh, config, qkv, mask, lb):
    attention = LocalMapAttention(config.build(), seq_order=SeqOrder.HEAD_TAIL if lb else SeqOrder.CONTIGUOUS)
    q, k, v = (distribute_tensor(t, mesh, seq_heads_placements(mesh)).requires_grad_() for t in qkv)
    out = attention(q, k, v, mask)
    out.sum().backward()
    return out, (q.grad, k.grad, v.grad)


def _run_hooks(mesh, config, qkv, mask, lb):
    """Each rank holds its seq chunk (and heads chunk) as a plain local tensor, or as a TP
    DTensor on the tp axis; the hooks do the CP. Results are relabelled on the full mesh."""
    placements = seq_heads_placements(mesh)
    inner = config.build()
    apply_context_parallel(inner, mesh["cp"], seq_order=SeqOrder.HEAD_TAIL if lb else SeqOrder.CONTIGUOUS)
    locals_ = [distribute_tensor(t, mesh, placements).to_local() for t in qkv]
    if "tp" in mesh.mesh_dim_names:
        tp_mesh = mesh["tp"]
        leaves = [DTensor.from_local(t, tp_mesh, (Shard(2),)).requires_grad_() for t in locals_]
        out_tp = LocalMapAttention(inner)(*leaves, mask)
        assert_placements(out_tp, (Shard(2),))
        out_local = out_tp.to_local()
        out_tp.sum().backward()
        grads = [leaf.grad.to_local() for leaf in leaves]
    else:
        leaves = [t.requires_grad_() for t in locals_]
        out_local = inner(*leaves, mask)
        out_local.sum().backward()
        grads = [leaf.grad for leaf in leaves]
    relabel = lambda t: DTensor.from_local(t, mesh, placements, run_check=False)  # noqa: E731
    return relabel(out_local), tuple(relabel(g) for g in grads)


# -- the boundary: golden table, stale seq_dim (docs/bugs.md row 2) ----------------------------------


class _ReachedKernel(Exception):
    """Raised by a hook placed after every CP hook: the boundary checks passed."""


def _stop_at_kernel(module, args, kwargs):
    raise _ReachedKernel


def _local_qkv(mesh, layout: Layout, *, num_q_heads=4, num_kv_heads=4):
    inputs = mesh_inputs(mesh, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads)
    qkv = [to_layout(t, layout) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)]
    return inputs, [distribute_tensor(t, mesh, (Shard(layout.seq_dim),)).to_local() for t in qkv]


def _torch_style(backend, seq_dim: int):
    """torch's own style, built by hand (as a model before the refactor did)."""
    style = _compat.context_parallel_style()
    ring = REGISTRY[backend].cp_strategy is CPStrategy.RING
    return style(seq_dim=seq_dim, attention_type=style.AttentionType.SDPA if ring else style.AttentionType.FLEX)


@pytest.mark.mesh(cp=2)
def test_boundary_golden(mesh):
    """seq_dim and the placements the kernel gets on the cp axis, per layout, seen at the boundary."""
    rows = [("layout", "backend", "strategy", "seq_dim", "q", "k/v")]
    for layout in (Layout.BLNH, Layout.BNLH):
        for backend in REGISTRY:
            inner = AttentionConfig(backend=backend, layout=layout).build()
            if REGISTRY[backend].cp_strategy is CPStrategy.RING:  # apply_context_parallel refuses CPU meshes
                parallelize_module(inner, mesh, _torch_style(backend, inner.in_layout.seq_dim))
            else:
                apply_context_parallel(inner, mesh)
            seen = []
            attach_boundary_check(inner, mesh, on_boundary=seen.append)
            inner.register_forward_pre_hook(_stop_at_kernel, with_kwargs=True)
            with pytest.raises(_ReachedKernel):
                inner(*_local_qkv(mesh, layout)[1])
            rows.append((layout.name, str(backend), *seen[-1].row()))
    assert_golden(format_table(rows), "cp_boundary")


@pytest.mark.mesh(cp=2)
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
@pytest.mark.parametrize("backend", list(REGISTRY))
def test_stale_seq_dim_is_flagged_at_the_boundary(mesh, backend, gqa):
    """A style built with the pre-refactor seq_dim=2 on BLNH shards or gathers heads: the check
    names it; the same style with the layout's seq_dim passes to the kernel."""
    for seq_dim, outcome in ((2, pytest.raises(ContextParallelError, match="got seq_dim 2")),
                             (Layout.BLNH.seq_dim, pytest.raises(_ReachedKernel))):
        inner = AttentionConfig(backend=backend, enable_gqa=gqa).build()
        parallelize_module(inner, mesh, _torch_style(backend, seq_dim))
        attach_boundary_check(inner, mesh)
        inner.register_forward_pre_hook(_stop_at_kernel, with_kwargs=True)
        with outcome:
            inner(*_local_qkv(mesh, Layout.BLNH, num_q_heads=4, num_kv_heads=2 if gqa else 4)[1])


@pytest.mark.mesh(cp=2)
def test_stale_seq_dim_flex_errors_without_gqa(mesh):
    """Without the check, a gather along heads doubles k/v heads: an error, but a late, puzzling one."""
    _compat.simulate_cp_all_gather()
    inner = AttentionConfig(backend=Backend.FLEX).build()
    parallelize_module(inner, mesh, _torch_style(Backend.FLEX, 2))
    with pytest.raises(ValueError, match="heads"):
        inner(*_local_qkv(mesh, Layout.BLNH, num_q_heads=4, num_kv_heads=4)[1])


@pytest.mark.mesh(cp=2)
def test_stale_seq_dim_flex_is_silent_with_gqa(mesh):
    """Without the check, with GQA (k/v heads x cp == q heads) a gather along heads raises
    nothing and returns the right shape with wrong values: only the boundary check sees it."""
    _compat.simulate_cp_all_gather()
    inputs, qkv = _local_qkv(mesh, Layout.BLNH, num_q_heads=4, num_kv_heads=2)
    out_ref, _ = reference_attention(inputs)
    inner = AttentionConfig(backend=Backend.FLEX, enable_gqa=True).build()
    parallelize_module(inner, mesh, _torch_style(Backend.FLEX, 2))
    out_local = inner(*qkv)  # no error
    out = DTensor.from_local(out_local, mesh, (Shard(1),), run_check=False)
    assert tuple(out.shape) == tuple(out_ref.shape)
    with pytest.raises(AssertionError, match="differ from the reference"):
        assert_dtensor_close(out, out_ref, **tol(mesh))


@pytest.mark.mesh(cp=2)
def test_stale_seq_dim_sdpa_numbers_match_but_boundary_is_wrong(request, mesh):
    """torch's ring attention rotates k/v along its own seq dim, whatever seq_dim the style says:
    a stale seq_dim=2 gives the numbers of the layout's seq_dim=1, with q/k/v labelled Shard(2)
    (heads). Only the placement check at the boundary sees it. Where the ring gives the
    reference's numbers (real ranks; simulated ranks where the probe says so), they are the
    reference's; elsewhere (torch's ring on simulated CUDA ranks) the two runs still agree."""
    if mesh.device_type != "cuda":
        pytest.skip(f"torch's ring attention runs only on CUDA, this mesh is {mesh.device_type}")
    _compat.enable_ring_attention(load_balance=False)
    inputs = mesh_inputs(mesh, num_q_heads=4, num_kv_heads=4)
    out_ref, _ = reference_attention(inputs)
    qkv = [
        distribute_tensor(t.to("cuda"), mesh, (Shard(1),)).to_local()
        for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH)
    ]
    outs = {}
    for seq_dim in (2, Layout.BLNH.seq_dim):
        inner = AttentionConfig(backend=Backend.SDPA).build()
        parallelize_module(inner, mesh, _torch_style(Backend.SDPA, seq_dim))
        outs[seq_dim] = DTensor.from_local(inner(*qkv), mesh, (Shard(1),), run_check=False)
        attach_boundary_check(inner, mesh)
        if seq_dim == 2:  # the point of the test: the boundary names the stale seq_dim
            with pytest.raises(ContextParallelError, match=r"got seq_dim 2 \(q \(S\(2\)\)"):
                inner(*qkv)
    assert_dtensor_close(outs[2], outs[Layout.BLNH.seq_dim], **EXACT, msg="stale seq_dim vs the layout's")
    if ring_gives_the_reference(request, mesh):
        assert_dtensor_close(outs[2], out_ref, **tol(mesh))


# -- docs/bugs.md row 11: a check on rank 0 alone misses a missing per-rank offset ---------------------


@pytest.mark.mesh(cp=2)
def test_rank0_only_check_misses_a_missing_causal_offset(mesh):
    """The planted bug: torch's all-gather hook alone, at the right seq_dim, without the hook
    that passes each rank's global seq offset; every rank masks as if its chunk started at 0."""
    _compat.simulate_cp_all_gather()
    inputs, qkv = _local_qkv(mesh, Layout.BLNH)
    out_ref, _ = reference_attention(inputs)
    inner = AttentionConfig(backend=Backend.FLEX).build()
    parallelize_module(inner, mesh, _torch_style(Backend.FLEX, inner.in_layout.seq_dim))
    out_local = inner(*qkv)
    ref_local = distribute_tensor(out_ref, mesh, (Shard(1),)).to_local()
    # Each rank's error, gathered so that every rank sees all of them (no rank branches).
    err_local = (out_local - ref_local).abs().amax().reshape(1)
    err_per_rank = DTensor.from_local(err_local, mesh, (Shard(0),), run_check=False).full_tensor()
    assert_dtensor_close(err_per_rank[:1], torch.zeros(1), **tol(mesh), msg="rank 0 alone: looks right")
    for values in rank_values(err_per_rank).values():
        assert float(values[1:].min()) > 0.1, f"rank 1's chunk should be visibly wrong, errors {values}"
    with pytest.raises(AssertionError, match="differ from the reference"):
        assert_dtensor_close(DTensor.from_local(out_local, mesh, (Shard(1),), run_check=False), out_ref, **tol(mesh))


# -- errors up front -------------------------------------------------------------------------------


@pytest.mark.mesh(cp=2)
def test_ring_on_cpu_raises_up_front(mesh):
    if mesh.device_type == "cuda":
        pytest.skip("the mesh is on CUDA, where torch's ring attention runs")
    inner = AttentionConfig(backend=Backend.SDPA).build()
    expected = r"runs only on\s+CUDA.*_scaled_dot_product_flash_attention_for_cpu.*LocalMapAttention"
    with pytest.raises(ContextParallelError, match=expected):
        apply_context_parallel(inner, mesh)
    assert not inner._forward_pre_hooks, "no hook may be left behind by a refused application"


@pytest.mark.mesh(cp=2, tp=2)
def test_apply_needs_the_1d_cp_mesh(mesh):
    with pytest.raises(ContextParallelError, match=r"mesh\['cp'\]"):
        apply_context_parallel(AttentionConfig(backend=Backend.FLEX).build(), mesh)


@pytest.mark.mesh(cp=2)
def test_apply_hooks_every_inner_once(mesh):
    all_gather = [b for b in REGISTRY if REGISTRY[b].cp_strategy is CPStrategy.ALL_GATHER]
    model = torch.nn.ModuleList([AttentionConfig(backend=b).build() for b in all_gather])
    assert apply_context_parallel(model, mesh) == list(model)
    with pytest.raises(ContextParallelError, match="already applied"):
        apply_context_parallel(model, mesh)
    with pytest.raises(ValueError, match="holds no inner attention"):
        apply_context_parallel(torch.nn.Linear(2, 2), mesh)


@pytest.mark.mesh(cp=2)
def test_mask_from_local_positions_is_refused(mesh):
    inputs, qkv = _local_qkv(mesh, Layout.BLNH)
    config = AttentionConfig(backend=Backend.FLEX)
    inner = config.build()
    apply_context_parallel(inner, mesh)
    local_positions_BL = torch.arange(L // 2).repeat(B, 1)
    with pytest.raises(ContextParallelError, match="whole\\s+sequence"):
        inner(*qkv, make_attention_masks(config, local_positions_BL))


@pytest.mark.mesh(cp=2)
def test_hooks_and_full_mesh_cp_together_are_refused(mesh):
    inputs = mesh_inputs(mesh, num_q_heads=4, num_kv_heads=4)
    inner = AttentionConfig(backend=Backend.FLEX).build()
    apply_context_parallel(inner, mesh)
    q, k, v = (distribute_tensor(t, mesh, (Shard(1),)) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    with pytest.raises(ContextParallelError, match="sharded twice"):
        LocalMapAttention(inner)(q, k, v)


# -- what each rank's kernel gets (tests/unit/test_native_paths.py runs the native paths on it) ---


@pytest.mark.parametrize("order", list(SeqOrder), ids=lambda o: o.value)
@pytest.mark.parametrize("mesh_name", [pytest.param(name, marks=pytest.mark.mesh(**MESHES[name]), id=name)
                                       for name in ("cp2", "cp4", "cp2xtp2")])
def test_each_rank_kernel_gets_its_cp_rank_view(mesh, mesh_name, order):
    """Full-mesh CP hands every rank's inner attention exactly ``cp_rank_view``: its query chunk
    with its global seq indices, all keys in shard order, its rows of the document mask (the
    unit tests check the native varlen and flex paths on those views)."""
    inputs = mesh_inputs(mesh, num_q_heads=4, num_kv_heads=4, documents=True)
    config = AttentionConfig(backend=Backend.VARLEN)
    seen = {}

    def record(module, args, kwargs):
        visibility = kwargs["visibility"]
        seen.update(q=args[0], k=args[1], q_ids=visibility.mask.q_document_ids_BL,
                    kv_ids=visibility.mask.kv_document_ids_BL, q_index=visibility.q_seq_index_L,
                    kv_index=visibility.kv_seq_index_L)

    inner = config.build()
    inner.register_forward_pre_hook(record, with_kwargs=True)
    cp = mesh["cp"].size()
    permutation_L = seq_permutation(order, L, cp)
    mask = make_attention_masks(config, inputs.positions_BL)
    q, k, v = (distribute_tensor(permute_seq(t, permutation_L, 1), mesh, seq_heads_placements(mesh))
               for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    LocalMapAttention(inner, seq_order=order)(q, k, v, permute_mask(mask, permutation_L))
    coords = _rank_coordinates(mesh)
    seen_per_rank = {name: rank_values(t) for name, t in seen.items()}
    # Simulated ranks show every rank's view at once; a torchrun rank shows its own.
    every_rank = set(coords) if _compat.local_tensor_mode_active() else {torch.distributed.get_rank()}
    assert set(seen_per_rank["q"]) == every_rank
    for rank, tensors in _by_rank(seen_per_rank).items():
        cp_rank, heads = coords[rank]
        view = cp_rank_view(inputs, mask, cp_degree=cp, rank=cp_rank, order=order)
        expected = dict(q=view.q_BLNH[:, :, heads], k=view.k_BLNH[:, :, heads],
                        q_ids=view.mask.q_document_ids_BL, kv_ids=view.mask.kv_document_ids_BL,
                        q_index=view.q_seq_index_L, kv_index=view.kv_seq_index_L)
        for name, want in expected.items():
            got = tensors[name]
            assert torch.equal(got.cpu(), want.to(got.dtype)), f"rank {rank}: {name} {got} != {want}"


def _rank_coordinates(mesh, num_heads: int = 4) -> dict[int, tuple[int, slice]]:
    """{global rank: (its cp coordinate, its slice of the heads)} of every rank of the mesh."""
    names = mesh.mesh_dim_names
    per_rank = num_heads // (mesh["tp"].size() if "tp" in names else 1)
    coords = {}
    for index in itertools.product(*(range(n) for n in mesh.shape)):
        position = dict(zip(names, index))
        tp = position.get("tp", 0)
        coords[int(mesh.mesh[index])] = (position["cp"], slice(tp * per_rank, (tp + 1) * per_rank))
    return coords


def _by_rank(seen_per_rank: dict[str, dict[int, torch.Tensor]]) -> dict[int, dict[str, torch.Tensor]]:
    ranks = next(iter(seen_per_rank.values()))
    return {rank: {name: values[rank] for name, values in seen_per_rank.items()} for rank in ranks}


# -- varlen's packed output under full-mesh CP, and the _StridedShard probe -----------------------


@pytest.mark.mesh(cp=2)
@pytest.mark.parametrize("batch", [2, 1], ids=["local-batch2-strided", "local-batch1-shard0"])
def test_packed_output_under_cp(mesh, batch):
    inputs = mesh_inputs(mesh, batch=batch, num_q_heads=4, num_kv_heads=4)
    out_ref, _ = reference_attention(inputs)
    attention = LocalMapAttention(AttentionConfig(backend=Backend.VARLEN, varlen_output=Layout.TNH).build())
    q, k, v = (distribute_tensor(t, mesh, (Shard(1),)) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    if batch > 1 and not _compat.packed_strided_shard_usable():
        with pytest.raises(PlacementError, match="BLNH"):
            attention(q, k, v)
    else:
        out_TNH = attention(q, k, v)
        assert_placements(out_TNH, (StridedShard(0, split_factor=batch),))
        assert_dtensor_close(out_TNH, to_layout(out_ref, Layout.TNH), **tol(mesh))


@pytest.mark.mesh(cp=2)
def test_strided_shard_probe_agrees_with_full_tensor(mesh):
    """The probe plans without a process group; a real full_tensor() of the same placement
    must agree with its verdict (both ways: works and is right, or raises)."""
    t_T = torch.arange(8, dtype=torch.float64)  # exact on every device
    local = distribute_tensor(t_T.view(2, 4), mesh, (Shard(1),)).to_local().reshape(-1)
    strided = DTensor.from_local(local, mesh, (StridedShard(0, split_factor=2),), run_check=False)
    if _compat.packed_strided_shard_usable():
        assert_dtensor_close(strided, t_T, **EXACT)
    else:
        with pytest.raises(ValueError, match="shard_order"):
            strided.full_tensor()


@pytest.mark.mesh(cp=2)
def test_view_probe_agrees_with_dtensor_view(mesh):
    """_compat.view_flattens_sharded_dims() asks DTensor's view algebra once; a real view of a
    seq-sharded (B, L) into tokens must agree with its verdict (right values, or a refusal)."""
    t_BL = torch.arange(8, dtype=torch.float64).view(2, 4)
    t_dt = distribute_tensor(t_BL, mesh, (Shard(1),))
    if _compat.view_flattens_sharded_dims():
        viewed = t_dt.view(8)
        assert_placements(viewed, (StridedShard(0, split_factor=2),))
        if _compat.packed_strided_shard_usable():
            assert_dtensor_close(viewed, t_BL.reshape(8), **EXACT)
    else:
        with pytest.raises(RuntimeError, match="flatten"):
            t_dt.view(8)


@pytest.mark.parametrize("mesh_name", [pytest.param(name, marks=pytest.mark.mesh(**MESHES[name]), id=name)
                                       for name in ("cp2", "cp2xtp2")])
def test_packing_a_cp_output_is_right_or_refused(mesh, mesh_name):
    """docs/bugs.md row 10: viewing the seq-sharded BLNH output as packed TNH needs a strided
    placement; DTensor must give the right values (torch 2.13) or refuse (torch 2.11), never
    silently wrong ones."""
    inputs = mesh_inputs(mesh, num_q_heads=4, num_kv_heads=4)
    out_ref, _ = reference_attention(inputs)
    placements = seq_heads_placements(mesh)
    q, k, v = (distribute_tensor(t, mesh, placements) for t in (inputs.q_BLNH, inputs.k_BLNH, inputs.v_BLNH))
    out_BLNH = LocalMapAttention(AttentionConfig(backend=Backend.FLEX).build())(q, k, v)
    try:
        out_TNH = out_BLNH.view(B * L, *out_BLNH.shape[2:])
    except (RuntimeError, ValueError, AssertionError) as error:  # refused: acceptable, with a reason
        assert "flatten" in str(error) or "shard" in str(error).lower(), f"unclear refusal: {error}"
    else:
        assert_dtensor_close(out_TNH, to_layout(out_ref, Layout.TNH), **tol(mesh))
