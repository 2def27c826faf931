"""Pure parts of context parallel: the strategy per backend, the boundary per layout, the probe.

No mesh, no process group: milliseconds.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.distributed as dist

from dtensor_attn import AttentionConfig, _compat
from dtensor_attn.backends import REGISTRY
from dtensor_attn.backends.base import CPStrategy
from dtensor_attn.context_parallel import apply_context_parallel, expected_boundary
from dtensor_attn.layout import Layout
from dtensor_attn.testing import assert_golden_inline, format_table

# Written out by hand, not computed: the seq dim of each public layout.
SEQ_DIM = {Layout.BLNH: 1, Layout.BNLH: 2}

TORCH_2_11_ERROR = (
    "use_strided_shard_as_shard_order is True, but placements: (_StridedShard(dim=0, sf=2),) is "
    "unable to be interpreted into a corresponding shard_order"
)


def test_every_backend_declares_a_cp_strategy():
    """Adding a backend is one file and one registry entry: its class says how CP runs it."""
    missing = [str(b) for b, cls in REGISTRY.items() if not isinstance(getattr(cls, "cp_strategy", None), CPStrategy)]
    assert not missing, f"backends without a cp_strategy class attribute: {missing}"


def test_seq_dim_is_read_from_the_layout():
    for layout, seq_dim in SEQ_DIM.items():
        for backend in REGISTRY:
            assert expected_boundary(layout, backend).seq_dim == seq_dim == layout.seq_dim


def test_no_caller_can_pass_a_seq_dim():
    """A stale seq_dim is impossible through our API: it has no seq_dim to pass."""
    assert "seq_dim" not in inspect.signature(apply_context_parallel).parameters


def test_expected_boundary_table():
    rows = [("layout", "backend", *("strategy", "seq_dim", "q", "k/v"))]
    rows += [
        (layout.name, str(backend), *expected_boundary(layout, backend).row())
        for layout in SEQ_DIM
        for backend in REGISTRY
    ]
    assert_golden_inline(format_table(rows), """\
layout  backend  strategy    seq_dim  q       k/v
BLNH    sdpa     ring        1        (S(1))  (S(1))
BLNH    flex     all_gather  1        (S(1))  (R)
BLNH    varlen   all_gather  1        (S(1))  (R)
BNLH    sdpa     ring        2        (S(2))  (S(2))
BNLH    flex     all_gather  2        (S(2))  (R)
BNLH    varlen   all_gather  2        (S(2))  (R)
""")


def test_probe_flags_a_torch_that_cannot_decode_the_strided_shard():
    def plan_like_torch_2_11(src, dst):
        raise ValueError(TORCH_2_11_ERROR)

    usable, why = _compat.probe_strided_shard_redistribution(plan_like_torch_2_11)
    assert not usable
    assert TORCH_2_11_ERROR in why


def test_probe_needs_no_process_group():
    was_initialized = dist.is_initialized()
    usable, why = _compat.packed_strided_shard_probe.__wrapped__()  # uncached: really runs here
    assert isinstance(usable, bool) and why
    assert dist.is_initialized() == was_initialized, "the probe must not create a process group"
    assert _compat.packed_strided_shard_probe() is _compat.packed_strided_shard_probe()  # run once


def test_ring_input_check_takes_the_plain_visibility_tp_hands_it():
    """LocalMapAttention over the ring hooks (TP x ring CP) calls the inner attention with the
    module's own causality as a Visibility and no mask: the ring check must let that through
    (seen on the H200: it refused it, and the simulated-ranks probe took it for torch's failure),
    and still refuse a mask or seq positions, which torch's ring cannot apply."""
    from dtensor_attn import Visibility
    from dtensor_attn.context_parallel import ContextParallelError, _RingInputCheck

    check = _RingInputCheck(_compat.ring_load_balance())
    module = AttentionConfig(backend="sdpa").build()
    q = torch.zeros(1, 4, 2, 8)
    assert check(module, (q, q, q), {"visibility": Visibility(True)}) == ((q, q, q), {"visibility": Visibility(True)})
    with pytest.raises(ContextParallelError, match="takes q, k, v"):
        check(module, (q, q, q), {"visibility": Visibility(True, None, torch.arange(4), torch.arange(4))})
