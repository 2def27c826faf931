"""The one home of private torch imports, and of the differences between torch versions.

Every other module imports these names from ``dtensor_attn._compat``. Features are detected by
behaviour or by signature (a keyword of ``varlen_attn``, an op's schema, an attribute), never
by comparing version strings. Supported: torch 2.11 (the GPU image) and 2.13 (CPU here).
The names live in four modules by what they reach into: ``dtensor`` (placements, the view
algebra, the redistribution planner), ``attention`` (varlen's ops, flex, context parallel),
``simulation`` (LocalTensor, the fake store), ``tracing`` (the debugger's windows).
"""

from torch.distributed.tensor import Partial, Placement, Replicate, Shard

from dtensor_attn._compat.attention import (
    FLEX_CP_HOOK_TRAILING_ARGS,
    VarlenOps,
    accepts_keyword,
    context_parallel_style,
    enable_ring_attention,
    flex_attention_with_lse,
    ring_attention_runs_on,
    ring_load_balance,
    simulate_cp_all_gather,
    varlen_attn_or_none,
    varlen_kernels_for,
    varlen_lse_heads_first,
    varlen_ops,
)
from dtensor_attn._compat.boundary import LocalBoundary, plain_module_call
from dtensor_attn._compat.dtensor import (
    StridedShard,
    input_dim,
    packed_strided_shard_probe,
    packed_strided_shard_usable,
    probe_strided_shard_redistribution,
    propagate_view_placements,
    split_factor,
    strided_shard,
    torch_shard_order,
    view_flattens_sharded_dims,
    view_groups,
    view_sources,
)
from dtensor_attn._compat.flex_ranks import PerRankMaskMod, flex_on_simulated_ranks, fuse_block_masks
from dtensor_attn._compat.simulation import (
    FakeStore,
    LocalTensor,
    LocalTensorMode,
    local_tensor_mode_active,
    maybe_disable_local_tensor_mode,
    rank_tensors,
)
from dtensor_attn._compat.tracing import (
    AsyncCollectiveTensor,
    TorchDispatchMode,
    collective_counts,
    local_map_call,
    tree_leaves,
)

__all__ = [
    "PerRankMaskMod",
    "flex_on_simulated_ranks",
    "fuse_block_masks",
    "AsyncCollectiveTensor",
    "FLEX_CP_HOOK_TRAILING_ARGS",
    "LocalBoundary",
    "plain_module_call",
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
