"""dtensor_attn: placement-correct attention for DTensor, its test harness, and a placement debugger."""

from dtensor_attn.backends import make_attention_masks
from dtensor_attn.config import AttentionConfig, Backend, Kernel
from dtensor_attn.context_parallel import ContextParallelError, apply_context_parallel
from dtensor_attn.errors import PlacementError
from dtensor_attn.layout import Dim, Layout
from dtensor_attn.load_balance import SeqOrder
from dtensor_attn.boundary import AttentionPlacements, infer_attention_placements
from dtensor_attn.local_map_attention import LocalMapAttention
from dtensor_attn.placements import infer_out_placements
from dtensor_attn.protocol import InnerAttentionProtocol
from dtensor_attn.visibility import Visibility

__all__ = [
    "AttentionConfig",
    "AttentionPlacements",
    "Backend",
    "ContextParallelError",
    "Dim",
    "InnerAttentionProtocol",
    "Kernel",
    "Layout",
    "LocalMapAttention",
    "PlacementError",
    "SeqOrder",
    "Visibility",
    "apply_context_parallel",
    "infer_attention_placements",
    "infer_out_placements",
    "make_attention_masks",
]
