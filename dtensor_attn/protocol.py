"""The contract between LocalMapAttention (and the CP hooks) and an inner attention.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

An inner attention is any module with these members; the backends of ``dtensor_attn.backends``
are three. The wrapper reads only the declarations (to infer every placement) and calls the
module on local tensors with a ``Visibility`` (what each local query may see: causal or not,
documents, global seq positions under context parallelism). A new backend's author implements
this and nothing else. The backends of this package also offer ``attend(q, k, v, visibility)``,
their forward without its input checks: LocalMapAttention calls it from a signature's second
call on, where the first call's checks hold by construction, and only while calling the module
is calling its forward (no hooks, not compiled, forward not overridden).
"""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import torch

from dtensor_attn.layout import Layout
from dtensor_attn.masks import DocumentMask
from dtensor_attn.visibility import Visibility


@runtime_checkable
class InnerAttentionProtocol(Protocol):
    in_layout: Layout  # q/k/v, e.g. Layout.BLNH
    out_layout: Layout  # the output, e.g. Layout.BLNH, or Layout.TNH (packed)
    lse_layout: Layout | None  # the LSE when the module returns (out, lse), else None
    is_causal: bool

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: DocumentMask | None = None,
        *,
        visibility: Visibility | None = None,
    ): ...


MEMBERS = ("in_layout", "out_layout", "lse_layout", "is_causal")


def check_inner_attention(inner, who: str) -> None:
    """A TypeError naming what ``inner`` lacks of InnerAttentionProtocol, with the fix."""
    missing = [name for name in MEMBERS if not hasattr(inner, name)]
    forward = getattr(inner, "forward", None) or getattr(inner, "__call__", None)
    takes_visibility = False
    if forward is not None:
        try:
            parameters = inspect.signature(forward).parameters
        except (TypeError, ValueError):  # a builtin: nothing to read, trust the caller
            parameters = {"visibility": None}
        takes_visibility = "visibility" in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        )
    if not takes_visibility:
        missing.append("forward(q, k, v, mask=None, *, visibility=None)")
    if missing:
        raise TypeError(
            f"{who} needs an inner attention that follows InnerAttentionProtocol (declares "
            f"{', '.join(MEMBERS)} and takes visibility=); {type(inner).__name__} lacks "
            f"{', '.join(missing)}. Fix: wrap a module built by AttentionConfig(...).build(), or add "
            f"these members (dtensor_attn.protocol)."
        )
