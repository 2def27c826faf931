"""The placement debugger: explain placements rank by rank, trace them through a run."""

from dtensor_attn.explain.records import Finding, FindingKind, Severity, TensorRecord, TraceEvent
from dtensor_attn.explain.parse import parse_mesh, parse_placement, parse_placements, parse_shape
from dtensor_attn.explain.rank_table import PlacementExplanation, RankShard, explain_placements
from dtensor_attn.explain.trace import PlacementTrace, trace_placements

__all__ = [
    "Finding",
    "FindingKind",
    "Severity",
    "PlacementExplanation",
    "PlacementTrace",
    "RankShard",
    "TensorRecord",
    "TraceEvent",
    "explain_placements",
    "parse_mesh",
    "parse_placement",
    "parse_placements",
    "parse_shape",
    "trace_placements",
]
