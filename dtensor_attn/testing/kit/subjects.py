"""How the conformance kit gets a fresh subject, and its masks, for each case.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

A variant is one way the subject is built, named in case ids: ``varlen-TNH`` for a factory
given ``AttentionConfig(backend=varlen, varlen_output=TNH, ...)``, or the subject's own name.
Factories build one subject per case, with ``enable_gqa`` and ``return_lse`` set for it, and
masks come from the same registry entry (``make_attention_masks``). A module is deep-copied
per case; a function is shared (nothing to copy). A subject's ``CallingConvention`` (how it
takes its mask and keywords) is the user's; ``make_mask=`` alone is the kit's own convention,
``mask=`` with a value of global tensors.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from dtensor_attn.config import AttentionConfig, Backend
from dtensor_attn.layout import Layout
from dtensor_attn.backends import make_attention_masks
from dtensor_attn.testing.kit.cases import OUT_LAYOUTS
from dtensor_attn.testing.kit.spec import CallingConvention


@dataclasses.dataclass(frozen=True, slots=True)
class Variant:
    name: str
    build: Callable[[bool, bool], Callable]  # (gqa, lse) -> a subject
    convention: Callable[[bool, bool], CallingConvention]  # (gqa, lse) -> how it takes masks and keywords
    lse_values: tuple[bool | None, ...]  # None: the subject decides whether it returns the LSE
    fresh: bool  # build() gives an independent subject (so the cache probe can compare)
    no_mask_reason: str = ""


def offered_outputs(backend: Backend) -> tuple[Layout, ...]:
    """The output layouts ``backend`` offers (varlen_output=TNH is varlen's), by asking the config."""
    offered = []
    for layout in OUT_LAYOUTS:
        try:
            AttentionConfig(backend=backend, varlen_output=layout)
        except ValueError:
            continue  # the config refuses this output for this backend
        offered.append(layout)
    return tuple(offered)


def factory_variants(factory, *, backends: Sequence[Backend], outputs: Sequence[Layout], lse: Sequence[bool]) -> list[Variant]:
    """One variant per (backend, output layout) it offers; every backend of the registry if none given."""
    from dtensor_attn.backends import REGISTRY

    variants = []
    for backend in backends or tuple(REGISTRY):
        for layout in (layout for layout in offered_outputs(backend) if layout in outputs):

            def config(gqa, with_lse, backend=backend, layout=layout):
                return AttentionConfig(backend=backend, enable_gqa=gqa, return_lse=with_lse, varlen_output=layout)

            def convention(gqa, with_lse, config=config):
                return CallingConvention(make_mask=lambda positions_BL: make_attention_masks(config(gqa, with_lse), positions_BL))

            variants.append(Variant(
                name=f"{backend}-{layout.name}",
                build=lambda gqa, with_lse, config=config: factory(config(gqa, with_lse)),
                convention=convention, lse_values=tuple(lse), fresh=True,
            ))
    return variants


def subject_variant(subject, make_mask, name: str | None, convention: CallingConvention | None = None) -> Variant:
    if make_mask is not None and convention is not None:
        raise ValueError("check_attention: pass make_mask= or convention=CallingConvention(make_mask=...), not both. "
                         "Fix: move make_mask into the convention")
    convention = convention or CallingConvention(make_mask=make_mask)
    is_module = isinstance(subject, nn.Module)
    pristine = copy.deepcopy(subject) if is_module else subject  # later calls by the user do not leak in
    return Variant(
        name=name or getattr(subject, "__name__", type(subject).__name__),
        build=(lambda gqa, with_lse: copy.deepcopy(pristine)) if is_module else (lambda gqa, with_lse: subject),
        convention=lambda gqa, with_lse: convention, lse_values=(None,), fresh=is_module,
        no_mask_reason="no make_mask given: pass make_mask=lambda positions_BL: ... to test packed documents",
    )


def kernel_label(subject) -> str:
    """``flex[math]`` where the subject's inner attention says which kernel runs; else ''."""
    inner = getattr(subject, "inner", subject)
    kernel_name = getattr(inner, "kernel_name", None)
    if not callable(kernel_name):
        return ""
    try:
        return kernel_name(torch.device("cpu"))
    except Exception:  # a subject's own kernel_name with another signature: not ours to judge
        return ""
