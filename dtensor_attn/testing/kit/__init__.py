"""The conformance kit: check_attention runs a user's attention module over the placement matrix."""

from dtensor_attn.testing.kit.check import DEFAULT_MESHES, MESHES, assert_conforms, check_attention
from dtensor_attn.testing.kit.result import CaseFailure, ConformanceError, ConformanceResult, FailureKind

__all__ = [
    "DEFAULT_MESHES",
    "MESHES",
    "CaseFailure",
    "ConformanceError",
    "ConformanceResult",
    "FailureKind",
    "assert_conforms",
    "check_attention",
]
