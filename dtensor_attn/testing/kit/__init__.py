"""The conformance kit: check_attention runs a user's attention module over the placement matrix."""

from dtensor_attn.testing.kit.check import assert_conforms, check_attention
from dtensor_attn.testing.kit.options import DEFAULT_MESHES, HALF_TOLERANCE, MESHES, ConformanceOptions
from dtensor_attn.testing.kit.result import CaseFailure, CaseOutcome, ConformanceError, ConformanceResult, FailureKind, Status
from dtensor_attn.testing.kit.spec import (
    CallingConvention, CaseInfo, MaskScope, MeshContext, Prepared, RankView, Shapes,
)

__all__ = [
    "DEFAULT_MESHES",
    "HALF_TOLERANCE",
    "MESHES",
    "CallingConvention",
    "CaseFailure",
    "CaseInfo",
    "CaseOutcome",
    "ConformanceError",
    "ConformanceOptions",
    "ConformanceResult",
    "FailureKind",
    "MaskScope",
    "MeshContext",
    "Prepared",
    "RankView",
    "Shapes",
    "Status",
    "assert_conforms",
    "check_attention",
]
