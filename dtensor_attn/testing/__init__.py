"""dtensor_attn.testing: the pytest plugin's helpers for distributed tests (see plugin.py)."""

from dtensor_attn.testing.conformance import MESHES, assert_conforms, check_attention
from dtensor_attn.testing.conformance_result import CaseFailure, ConformanceError, ConformanceResult, FailureKind
from dtensor_attn.testing.asserts import assert_dtensor_close, assert_placements, rank_values
from dtensor_attn.testing.golden import assert_golden, assert_golden_inline, format_table
from dtensor_attn.testing.meshspec import mesh_id
from dtensor_attn.testing.simulate import simulated_mesh

__all__ = [
    "MESHES",
    "CaseFailure",
    "ConformanceError",
    "ConformanceResult",
    "FailureKind",
    "assert_conforms",
    "check_attention",
    "assert_dtensor_close",
    "assert_golden",
    "assert_golden_inline",
    "assert_placements",
    "format_table",
    "mesh_id",
    "rank_values",
    "simulated_mesh",
]
