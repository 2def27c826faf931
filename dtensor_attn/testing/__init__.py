"""dtensor_attn.testing: test helpers by job: ``harness`` (the pytest plugin: simulated or torchrun
ranks), ``kit`` (the conformance kit), and here the shared asserts, golden tables and references."""

from dtensor_attn.testing.kit import (
    MESHES,
    CallingConvention,
    CaseFailure,
    ConformanceError,
    ConformanceResult,
    FailureKind,
    MaskScope,
    Prepared,
    RankView,
    Shapes,
    Status,
    assert_conforms,
    check_attention,
)
from dtensor_attn.testing.asserts import assert_dtensor_close, assert_placements, rank_values
from dtensor_attn.testing.golden import assert_golden, assert_golden_inline, format_table
from dtensor_attn.testing.harness.meshspec import mesh_id
from dtensor_attn.testing.harness.simulate import simulated_mesh

__all__ = [
    "MESHES",
    "CallingConvention",
    "CaseFailure",
    "ConformanceError",
    "ConformanceResult",
    "FailureKind",
    "MaskScope",
    "Prepared",
    "RankView",
    "Shapes",
    "Status",
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
