"""The typed backend registry: one entry per backend, iterated by tests, CLI and README; masks
are made by the same entry that builds the module, so a model and its masks cannot disagree."""

import torch

from dtensor_attn.backends.base import BNLHKernelAttention, InnerAttention
from dtensor_attn.backends.flex import FlexAttention, FlexDocumentMask
from dtensor_attn.backends.sdpa import SDPAAttention
from dtensor_attn.backends.varlen import VarlenAttention, VarlenDocumentMask
from dtensor_attn.config import AttentionConfig, Backend
from dtensor_attn.masks import check_positions, describe

REGISTRY: dict[Backend, type[InnerAttention]] = {
    Backend.SDPA: SDPAAttention,
    Backend.FLEX: FlexAttention,
    Backend.VARLEN: VarlenAttention,
}


def make_attention_masks(config: AttentionConfig, positions_BL: torch.Tensor | None):
    """The mask for ``config.backend``, from the same registry entry that builds the module."""
    if not isinstance(config, AttentionConfig):
        raise TypeError(
            f"make_attention_masks: config must be an AttentionConfig, got {describe(config)}. "
            f"Fix: make_attention_masks(AttentionConfig(backend='flex'), positions_BL), with the "
            f"config that built the module."
        )
    if positions_BL is not None:
        check_positions(positions_BL)
    return REGISTRY[config.backend].make_masks(config, positions_BL)


__all__ = [
    "REGISTRY",
    "BNLHKernelAttention",
    "FlexAttention",
    "FlexDocumentMask",
    "InnerAttention",
    "SDPAAttention",
    "VarlenAttention",
    "VarlenDocumentMask",
    "make_attention_masks",
]
