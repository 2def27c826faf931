"""The one module that imports private torch symbols, and absorbs torch-version differences.

Every other module imports these names from here. Features are detected by behaviour or by
signature (a keyword of ``varlen_attn``, an attribute), never by comparing version strings.
Supported: torch 2.11 (the GPU image) and 2.13 (CPU here).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Sequence

import torch
from torch.distributed.tensor import Partial, Placement, Replicate, Shard

# _StridedShard: a shard of a dim that was flattened from several dims (see dtensor_attn.explain).
from torch.distributed.tensor.placement_types import _StridedShard as StridedShard

# DTensor's view algebra: the rules DTensor itself uses to propagate placements through a view.
from torch.distributed.tensor._ops import _view_ops as _view_ops

# Simulated ranks: LocalTensor holds one tensor per rank inside one process.
from torch.distributed._local_tensor import (  # noqa: F401  (re-exported)
    LocalTensor,
    LocalTensorMode,
    maybe_disable_local_tensor_mode,
)
from torch.testing._internal.distributed.fake_pg import FakeStore  # noqa: F401

# What RowwiseParallel returns by default: its value is only final after .wait().
from torch.distributed._functional_collectives import AsyncCollectiveTensor  # noqa: F401

__all__ = [
    "AsyncCollectiveTensor",
    "FLEX_CP_HOOK_TRAILING_ARGS",
    "enable_ring_attention",
    "packed_strided_shard_probe",
    "packed_strided_shard_usable",
    "probe_strided_shard_redistribution",
    "ring_attention_runs_on",
    "ring_load_balance",
    "simulate_cp_all_gather",
    "collective_counts",
    "FakeStore",
    "accepts_keyword",
    "LocalTensor",
    "LocalTensorMode",
    "Partial",
    "Placement",
    "Replicate",
    "Shard",
    "StridedShard",
    "TorchDispatchMode",
    "context_parallel_style",
    "flex_attention_with_lse",
    "input_dim",
    "local_tensor_mode_active",
    "maybe_disable_local_tensor_mode",
    "local_map_call",
    "propagate_view_placements",
    "rank_tensors",
    "split_factor",
    "strided_shard",
    "torch_shard_order",
    "tree_leaves",
    "VarlenOps",
    "varlen_attn_or_none",
    "varlen_kernels_for",
    "varlen_ops",
    "varlen_lse_heads_first",
    "view_flattens_sharded_dims",
    "view_groups",
    "view_sources",
]

InputDim = _view_ops.InputDim
view_groups = _view_ops.view_groups


def input_dim(index: int):
    """One entry of a DimMap: output dim i is input dim ``index`` unchanged."""
    return InputDim(index)


def split_factor(placement: Placement) -> int:
    """The split factor of a _StridedShard (attribute name differs across versions)."""
    for name in ("split_factor", "sf"):
        value = getattr(placement, name, None)
        if value is not None:
            return int(value)
    raise AssertionError(f"{placement!r} has no split factor")


def strided_shard(dim: int, factor: int) -> StridedShard:
    return StridedShard(dim, split_factor=factor)


@functools.cache
def _propagate_accepts_strict_view() -> bool:
    params = inspect.signature(_view_ops.propagate_shape_and_sharding).parameters
    return "strict_view" in params


def propagate_view_placements(
    placements: Sequence[Placement],
    global_shape: Sequence[int],
    rule,
    mesh_shape: Sequence[int],
) -> tuple[list[Placement], list[Placement]]:
    """Run DTensor's own view propagation as a pure function over values.

    ``strict_view=True`` asks DTensor for the placement a view produces without redistribution
    (a seq shard folded into tokens becomes ``_StridedShard``), instead of the redistribution it
    would request. Returns (input placements DTensor needs, output placements).
    """
    kwargs = {"strict_view": True} if _propagate_accepts_strict_view() else {}
    needed, out = _view_ops.propagate_shape_and_sharding(
        list(placements), tuple(global_shape), tuple(rule), tuple(mesh_shape), **kwargs
    )
    return list(needed), list(out)


@functools.cache
def view_flattens_sharded_dims() -> bool:
    """Whether DTensor's view algebra folds a sharded non-leading dim into a flattened one,
    answering with a ``_StridedShard`` (torch 2.13), rather than refusing ("Attempted to flatten
    multiple dimensions, with dimension 1 being sharded", torch 2.11). Probed once, by behaviour."""
    try:
        propagate_view_placements([Shard(1)], (2, 4), view_groups((2, 4), (8,)), (2,))
    except RuntimeError:
        return False
    return True


def local_tensor_mode_active() -> bool:
    """True inside a simulated-ranks region (a LocalTensorMode is on the dispatch stack)."""
    from torch.distributed._local_tensor import local_tensor_mode

    return local_tensor_mode() is not None


def varlen_attn_or_none():
    """torch.nn.attention.varlen.varlen_attn, or None where this torch has none."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


class VarlenOps:
    """torch's custom ops under ``varlen_attn`` (``torch_attn::_varlen_attn`` and its backward),
    called by argument name: the schemas differ between torch versions (2.11 has no
    ``enable_gqa``), so each call passes what the installed op takes. The schemas are read once,
    here, so that a call is a plain op call that torch.compile traces without a graph break."""

    # What dtensor_attn passes; anything else an op requires is an error at construction.
    FORWARD_GIVEN = frozenset(
        ("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal", "scale",
         "window_size", "enable_gqa")
    )
    BACKWARD_GIVEN = frozenset(
        ("grad_out", "query", "key", "value", "out", "lse", "cu_seq_q", "cu_seq_k", "max_q", "max_k",
         "is_causal", "rng_state", "scale", "window_size")
    )

    def __init__(self, forward, backward) -> None:
        self.forward_op, self.backward_op = forward, backward
        self.forward_names = _schema_names(forward, self.FORWARD_GIVEN)
        self.backward_names = _schema_names(backward, self.BACKWARD_GIVEN)
        self.takes_gqa = "enable_gqa" in self.forward_names
        self.lse_heads_first = varlen_lse_heads_first()

    def forward(self, **arguments):
        """(out_TNH, lse, rng_state): the kernel's LSE as it returns it (see varlen_lse_heads_first)."""
        return self.forward_op(**{n: arguments[n] for n in self.forward_names if n in arguments})

    def backward(self, **arguments):
        """(grad_q, grad_k, grad_v) from grad_out and the saved forward values."""
        return self.backward_op(**{n: arguments[n] for n in self.backward_names if n in arguments})


def _schema_names(op, given: frozenset) -> tuple[str, ...]:
    names = []
    for argument in op.default._schema.arguments:
        if argument.name not in given and not argument.has_default_value():
            raise TypeError(
                f"{op}: this torch's op requires '{argument.name}', which dtensor_attn does not "
                f"pass (schema: {op.default._schema}). Fix: teach dtensor_attn._compat this "
                f"torch's varlen ops."
            )
        names.append(argument.name)
    return tuple(names)


@functools.cache
def varlen_ops() -> VarlenOps | None:
    """The ops under varlen_attn, or None where this torch has none (the module registers them)."""
    try:
        import torch.nn.attention.varlen  # noqa: F401  (defines torch.ops.torch_attn.*)
    except ImportError:
        return None
    namespace = torch.ops.torch_attn
    forward = getattr(namespace, "_varlen_attn", None)
    backward = getattr(namespace, "_varlen_attn_backward", None)
    if forward is None or backward is None:
        return None
    return VarlenOps(forward, backward)


@contextlib.contextmanager
def varlen_kernels_for(dispatch_key: str, *, forward, backward):
    """Register ``forward`` and ``backward`` as the ``dispatch_key`` (e.g. "CPU") kernels of
    torch's varlen ops for the duration of the block, so that torch's own ``varlen_attn`` wrapper
    and its registered autograd formula run there; removed on exit. Each kernel is called with
    the op's schema arguments by name."""
    ops = varlen_ops()
    if ops is None:
        raise RuntimeError("this torch has no torch_attn varlen ops to register kernels for")
    library = torch.library.Library("torch_attn", "IMPL")
    try:
        for op, kernel in ((ops.forward_op, forward), (ops.backward_op, backward)):
            names = [a.name for a in op.default._schema.arguments]
            library.impl(
                op.default._schema.name.split("::")[1],
                functools.partial(_call_by_name, kernel, names),
                dispatch_key,
            )
        yield
    finally:
        library._destroy()


def _call_by_name(kernel, names, *args, **kwargs):
    return kernel(**dict(zip(names, args)), **kwargs)


@functools.cache
def varlen_lse_heads_first() -> bool | None:
    """Whether ``varlen_attn``'s LSE is (N, T) rather than the documented (T, N), read once off
    torch's own fake (meta) kernel with T != N, which needs no GPU; None where that cannot run.
    On torch 2.13 it is (N, T) ("logsumexp shape: (num_heads, total_q)")."""
    try:  # torch's own function, never a stand-in that tests put behind varlen_attn_or_none
        from torch.nn.attention.varlen import AuxRequest, varlen_attn
    except ImportError:
        return None
    try:
        with maybe_disable_local_tensor_mode():
            q_TNH = torch.empty(3, 2, 8, device="meta", dtype=torch.bfloat16)
            cu_T = torch.tensor([0, 3], device="meta", dtype=torch.int32)
            _, lse = varlen_attn(q_TNH, q_TNH, q_TNH, cu_T, cu_T, 3, 3, return_aux=AuxRequest(lse=True))
    except Exception:  # noqa: BLE001 - no fake kernel on this torch: the caller reads the shape
        return None
    return tuple(lse.shape) == (2, 3)


@functools.lru_cache(maxsize=16)
def accepts_keyword(fn, keyword: str) -> bool:
    """Whether ``fn`` takes ``keyword`` (torch 2.11's varlen_attn has no ``enable_gqa``)."""
    return keyword in inspect.signature(fn).parameters


def flex_attention_with_lse(flex_fn, *args, **kwargs):
    """Call flex_attention asking for the LSE: ``return_aux`` where this torch has it, else the
    older ``return_lse`` keyword. Returns (out, lse)."""
    from torch.nn.attention import flex_attention as flex_module

    if "return_aux" in inspect.signature(flex_module.flex_attention).parameters:
        out, aux = flex_fn(*args, return_aux=flex_module.AuxRequest(lse=True), **kwargs)
        return out, aux.lse
    return flex_fn(*args, return_lse=True, **kwargs)


def context_parallel_style():
    """torch's private ``_ContextParallel`` parallel style and its attention-type enum."""
    from torch.distributed.tensor.experimental._context_parallel._attention import (
        _ContextParallel,
    )

    return _ContextParallel


# --- context parallel: torch's CP switches and the _StridedShard probe ---------------------

# torch's flex CP hook reads q, k, v at flex_attention's positions (query, key, value,
# score_mod, block_mask); some versions assert that block_mask is a BlockMask or a tuple.
# Padding the call with these satisfies every version; the hook user drops them afterwards.
FLEX_CP_HOOK_TRAILING_ARGS = (None, ())


def _cp_attention_module():
    from torch.distributed.tensor.experimental._context_parallel import _attention

    return _attention


def enable_ring_attention(*, load_balance: bool) -> None:
    """Route DTensor sdpa to torch's ring attention, with or without head-tail load balance.

    Both are process-wide switches inside torch (its dispatcher table and ``_cp_options``)."""
    attention = _cp_attention_module()
    attention._enable_context_parallel_dispatcher()
    attention._cp_options.enable_load_balance = load_balance


def ring_load_balance() -> bool:
    """torch's process-wide ring-attention load-balance switch, as it is now."""
    return bool(_cp_attention_module()._cp_options.enable_load_balance)


def ring_attention_runs_on(device_type: str) -> bool:
    """Whether torch's CP dispatcher reroutes this device's sdpa op to ring attention (not CPU:
    it handles the flash/efficient/cudnn CUDA ops only)."""
    handled = {str(op) for op in getattr(_cp_attention_module(), "custom_ops", {})}
    op = {"cpu": "aten._scaled_dot_product_flash_attention_for_cpu.default"}.get(device_type)
    return op is not None and op in handled


@functools.cache
def packed_strided_shard_probe() -> tuple[bool, str]:
    """(usable, why): can this torch redistribute (e.g. ``full_tensor()``) a tensor placed
    ``_StridedShard(0, sf=2)`` on a 1-D mesh of 2, the placement of varlen's packed TNH output
    under CP with a local batch of 2? Run once, by behaviour: DTensor plans that redistribution
    on a mesh built without process groups. torch 2.11 raises "use_strided_shard_as_shard_order
    is True, but placements: (_StridedShard(dim=0, sf=2),) is unable to be interpreted into a
    corresponding shard_order"; torch 2.13 falls back to a plan that works."""
    from torch.distributed.tensor import _redistribute

    plan = getattr(_redistribute, "_gen_transform_infos_non_cached", None) or _redistribute._gen_transform_infos
    return probe_strided_shard_redistribution(plan)


def probe_strided_shard_redistribution(plan) -> tuple[bool, str]:
    """The probe behind packed_strided_shard_probe, with DTensor's planner passed in (tests
    hand it one that fails as torch 2.11's does)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta

    with maybe_disable_local_tensor_mode():
        try:
            mesh = DeviceMesh("cpu", torch.arange(2), _init_backend=False, _rank=0)
        except TypeError:  # no _rank keyword: the rank comes from the (initialised) default group
            mesh = DeviceMesh("cpu", torch.arange(2), _init_backend=False)
        meta = TensorMeta(torch.Size([8]), (1,), torch.float32)
        try:
            src = DTensorSpec(mesh, (strided_shard(0, 2),), tensor_meta=meta)
            plan(src, DTensorSpec(mesh, (Replicate(),), tensor_meta=meta))
        except (ValueError, RuntimeError, NotImplementedError, AssertionError) as error:
            return False, f"{type(error).__name__}: {error}"
    return True, "DTensor plans the redistribution of _StridedShard(0, sf=2)"


def packed_strided_shard_usable() -> bool:
    """True where a _StridedShard(0, sf=B) packed output can be used downstream (see the probe)."""
    return packed_strided_shard_probe()[0]


@functools.cache
def simulate_cp_all_gather() -> None:
    """Teach simulated ranks torch's CP all-gather (once per process).

    Under LocalTensorMode, torch runs its custom op ``cplib::flex_cp_allgather`` (and its
    backward) once per rank on the fake group, so each rank silently gets its own chunk
    repeated instead of every rank's keys (measured, torch 2.13). These rules run the same
    gather / reduce-scatter through functional collectives, which LocalTensorMode simulates;
    under a real process group torch's op runs unchanged. all_gather_tensor and
    reduce_scatter_tensor exist on torch 2.11 and 2.13 (the *_single forms only on 2.13)."""
    import torch.distributed._functional_collectives as funcol

    _cp_attention_module()  # imports and registers torch's cplib ops

    def gather(mode, func, types, args, kwargs):
        k, v, seq_dim, group_name = args
        return tuple(funcol.all_gather_tensor(t.contiguous(), seq_dim, group_name) for t in (k, v))

    def reduce_scatter(mode, func, types, args, kwargs):
        grad_k, grad_v, seq_dim, group_name = args
        return tuple(
            funcol.reduce_scatter_tensor(t.contiguous(), "sum", seq_dim, group_name) for t in (grad_k, grad_v)
        )

    torch.library.register_torch_dispatch("cplib::flex_cp_allgather", LocalTensorMode, gather)
    torch.library.register_torch_dispatch("cplib::flex_cp_allgather_backward", LocalTensorMode, reduce_scatter)



# --- dtensor_attn.explain: the debugger's windows into torch internals ---------------------

# The tracer records DTensor ops with a dispatch mode and walks nested op arguments.
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402


@functools.cache
def _local_map_codes() -> frozenset:
    """Code objects of the function ``local_map`` runs per call: ``_local_map_wrapped`` behind a
    functools.partial (2.13), or the closure ``wrapped`` inside ``local_map`` (older torch)."""
    from torch.distributed.tensor.experimental import _func_map

    codes = {c for c in _func_map.local_map.__code__.co_consts if inspect.iscode(c)}
    codes = {c for c in codes if c.co_name == "wrapped"}
    wrapped = getattr(_func_map, "_local_map_wrapped", None)
    if wrapped is not None:
        codes.add(wrapped.__code__)
    return frozenset(codes)


def local_map_call(frame) -> dict | None:
    """The kernel, declared placements, mesh and arguments of a local_map call, read from the
    frame of torch's wrapper (None for any other frame). Older torch keeps them as closure
    variables, which ``f_locals`` also shows."""
    if frame.f_code not in _local_map_codes():
        return None
    names = ("func", "out_placements", "in_placements", "in_grad_placements", "device_mesh", "args")
    local_vars = frame.f_locals
    return {name: local_vars.get(name) for name in names}


def view_sources(from_shape: Sequence[int], to_shape: Sequence[int]) -> tuple:
    """For each dim of a view ``from_shape -> to_shape``, the input dims it is made of, read from
    DTensor's view rule: ``(i,)`` kept, ``(i, j)`` flattened, None part of a split or unknown.
    Size-1 input dims the rule drops are paired, in order, with size-1 output dims."""
    rule = view_groups(tuple(from_shape), tuple(to_shape))
    sources: list = []
    for spec in rule:
        if isinstance(spec, InputDim):
            sources.append((spec.input_dim,))
        elif isinstance(spec, _view_ops.Flatten) and all(
            isinstance(d, InputDim) for d in spec.input_dims
        ):
            sources.append(tuple(d.input_dim for d in spec.input_dims))
        elif isinstance(spec, _view_ops.Singleton):
            sources.append(())
        else:
            sources.append(None)
    used = {i for s in sources if s for i in s}
    dropped = [i for i, size in enumerate(from_shape) if size == 1 and i not in used]
    for j, s in enumerate(sources):
        if s == ():
            sources[j] = (dropped.pop(0),) if dropped else None
    return tuple(sources)


def rank_tensors(tensor: torch.Tensor) -> dict[int, torch.Tensor]:
    """Each simulated rank's tensor inside a LocalTensor; ``{0: tensor}`` for a plain tensor."""
    if isinstance(tensor, LocalTensor):
        return dict(tensor._local_tensors)
    return {0: tensor}


def torch_shard_order(placements: Sequence[Placement], mesh_shape: Sequence[int]):
    """torch's own decoding of _StridedShard placements into a shard order, as
    ``((dim, axes), ...)``, or None where torch cannot decode it (to check the explainer)."""
    from torch.distributed.tensor._dtensor_spec import DTensorSpec

    class _Sizes:  # the decoder only asks the mesh for axis sizes
        def size(self, axis: int) -> int:
            return mesh_shape[axis]

    order = DTensorSpec._maybe_convert_StridedShard_to_shard_order(tuple(placements), _Sizes())
    return None if order is None else tuple((e.tensor_dim, tuple(e.mesh_dims)) for e in order)


def collective_counts() -> list[tuple[tuple[int, ...], int]]:
    """(global ranks, collectives issued so far) of every process group this rank belongs to,
    in creation order; [] where this torch cannot tell. Ranks compare these after each test:
    members of one group that issued different numbers of collectives are out of step."""
    from torch.distributed.distributed_c10d import _world, get_process_group_ranks

    counts = []
    for group in list(_world.pg_names):
        try:
            counts.append((tuple(get_process_group_ranks(group)), group._get_sequence_number_for_group()))
        except (AttributeError, RuntimeError, ValueError):
            continue
    return counts
