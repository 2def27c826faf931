"""Attention kernels and context parallel: varlen's ops, flex's LSE keyword, torch's _ContextParallel and ring switches.

Part of dtensor_attn._compat, the one home of private torch imports; import names from the
package, not from here."""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from dtensor_attn._compat.simulation import LocalTensorMode, maybe_disable_local_tensor_mode


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
def simulate_cp_all_gather() -> None:
    """Teach simulated ranks torch's CP all-gather (once per process).

    Under LocalTensorMode, torch runs its custom op ``cplib::flex_cp_allgather`` (and its
    backward) once per rank on the fake group, so each rank silently gets its own chunk
    repeated instead of every rank's keys (measured, torch 2.13). These rules run the same
    gather / reduce-scatter through functional collectives, which LocalTensorMode simulates;
    under a real process group torch's op runs unchanged. all_gather_tensor and
    reduce_scatter_tensor exist on torch 2.11 and 2.13; 2.13 deprecates them for the *_single
    forms (same arguments), used where present.

    The backward keeps the real op's strictest contract: torch's op chunks each gradient along
    seq_dim and concatenates the chunks (a copy that keeps an unusual memory format, e.g. the
    math kernel's channels-last-like key gradient), then reduce-scatters it; torch 2.11's
    reduce-scatter refuses a non-contiguous input, 2.13's accepts it. Measured under torchrun
    (gloo, torch 2.11): the flex hooks path failed its backward there while these rules, which
    made the input contiguous, passed on simulated ranks. Now they refuse it alike."""
    import torch.distributed._functional_collectives as funcol

    _cp_attention_module()  # imports and registers torch's cplib ops
    all_gather = getattr(funcol, "all_gather_single", funcol.all_gather_tensor)
    reduce_scatter = getattr(funcol, "reduce_scatter_single", funcol.reduce_scatter_tensor)

    def gather_rule(mode, func, types, args, kwargs):
        k, v, seq_dim, group_name = args
        return tuple(all_gather(t.contiguous(), seq_dim, group_name) for t in (k, v))

    def reduce_scatter_rule(mode, func, types, args, kwargs):
        grad_k, grad_v, seq_dim, group_name = args
        size = torch.distributed.distributed_c10d._get_group_size_by_name(group_name)
        for name, grad in (("k", grad_k), ("v", grad_v)):
            if not torch.cat(torch.chunk(grad, size, dim=seq_dim)).is_contiguous():
                raise RuntimeError(
                    f"cplib::flex_cp_allgather_backward (simulated): the gradient of the gathered {name}, "
                    f"shape {tuple(grad.shape)} strides {grad.stride()}, is not contiguous once chunked along "
                    f"seq_dim {seq_dim} and concatenated; torch 2.11's reduce-scatter refuses it (\"Expected "
                    "input.is_contiguous() to be true\"), so simulated ranks do too. Fix: make the gradient "
                    "contiguous before torch's op (apply_context_parallel's hook does)"
                )
        return tuple(reduce_scatter(t, "sum", seq_dim, group_name) for t in (grad_k, grad_v))

    torch.library.register_torch_dispatch("cplib::flex_cp_allgather", LocalTensorMode, gather_rule)
    torch.library.register_torch_dispatch("cplib::flex_cp_allgather_backward", LocalTensorMode, reduce_scatter_rule)
