"""The typed backend registry: one entry per backend, iterated by tests, CLI and README."""

from dtensor_attn.backends.base import BNLHKernelAttention, InnerAttention
from dtensor_attn.backends.flex import FlexAttention, FlexDocumentMask
from dtensor_attn.backends.sdpa import SDPAAttention
from dtensor_attn.backends.varlen import VarlenAttention, VarlenDocumentMask
from dtensor_attn.config import Backend

REGISTRY: dict[Backend, type[InnerAttention]] = {
    Backend.SDPA: SDPAAttention,
    Backend.FLEX: FlexAttention,
    Backend.VARLEN: VarlenAttention,
}

__all__ = [
    "REGISTRY",
    "BNLHKernelAttention",
    "FlexAttention",
    "FlexDocumentMask",
    "InnerAttention",
    "SDPAAttention",
    "VarlenAttention",
    "VarlenDocumentMask",
]
