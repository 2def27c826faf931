"""AttentionConfig: the one value that says which inner attention a model builds.

The backend is an enum, converted once here from its string form; everything downstream
(masks, the test matrix, the CLI) reads ``config.backend`` and looks it up in the registry
(``dtensor_attn.backends.REGISTRY``), so a model and its masks cannot disagree.
"""

from __future__ import annotations

import dataclasses
import enum
import math

from dtensor_attn.layout import Layout


class Backend(enum.Enum):
    SDPA = "sdpa"
    FLEX = "flex"
    VARLEN = "varlen"

    def __str__(self) -> str:
        return self.value


class Kernel(enum.Enum):
    """Which kernel runs: torch's own (``NATIVE``), or the math reference with the same contract.

    ``AUTO`` picks NATIVE where torch has it for the device and the run (sdpa everywhere; flex
    and varlen on CUDA) and MATH elsewhere (flex backward and varlen on CPU, simulated ranks).
    """

    AUTO = "auto"
    NATIVE = "native"
    MATH = "math"


@dataclasses.dataclass(kw_only=True, slots=True)
class AttentionConfig:
    """How to build an inner attention.

    ``layout`` is the public layout of q/k/v and the output: BLNH (after the refactor) or the
    legacy BNLH. ``varlen_output`` is BLNH (a zero-copy view of the packed output) or TNH (the
    packed 3-D output itself); only varlen takes TNH.
    """

    backend: Backend | str
    is_causal: bool = True
    scale: float | None = None
    enable_gqa: bool = False
    return_lse: bool = False
    varlen_output: Layout = Layout.BLNH
    layout: Layout = Layout.BLNH
    kernel: Kernel = Kernel.AUTO

    def __post_init__(self) -> None:
        self.backend = _backend(self.backend)
        if self.layout not in (Layout.BLNH, Layout.BNLH):
            raise ValueError(
                f"AttentionConfig: layout must be Layout.BLNH or the legacy Layout.BNLH, got "
                f"{self.layout!r}. Fix: leave layout at Layout.BLNH; for varlen's packed output "
                f"use backend='varlen', varlen_output=Layout.TNH."
            )
        if self.varlen_output not in (Layout.BLNH, Layout.TNH):
            raise ValueError(
                f"AttentionConfig: varlen_output must be Layout.BLNH or Layout.TNH, got "
                f"{self.varlen_output!r}. Fix: varlen_output=Layout.TNH for varlen's packed output "
                f"(from dtensor_attn import Layout), else leave it out."
            )
        if self.varlen_output is Layout.TNH and self.backend is not Backend.VARLEN:
            raise ValueError(
                f"AttentionConfig: varlen_output=Layout.TNH needs backend varlen, got "
                f"{self.backend}. Fix: drop varlen_output, or use backend='varlen'."
            )
        for name in ("is_causal", "enable_gqa", "return_lse"):
            value = getattr(self, name)
            if not isinstance(value, bool):  # a truthy string or tensor would pass silently
                raise ValueError(
                    f"AttentionConfig: {name} must be True or False, got {value!r}. "
                    f"Fix: {name}=True or {name}=False."
                )
        scale = self.scale
        if scale is not None and (
            isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < math.inf
        ):
            raise ValueError(
                f"AttentionConfig: scale must be a positive finite number or None, got {scale!r}. "
                f"Fix: scale=None (1/sqrt(head_dim)), or a value such as 0.125."
            )
        if not isinstance(self.kernel, Kernel):
            names = ", ".join(f"Kernel.{k.name}" for k in Kernel)
            by_value = {k.value: k for k in Kernel}
            hint = by_value.get(str(self.kernel).lower(), Kernel.AUTO)
            raise ValueError(
                f"AttentionConfig: kernel must be one of {names}, got {self.kernel!r}. "
                f"Fix: kernel=Kernel.{hint.name} (from dtensor_attn import Kernel)."
            )

    def build(self):
        """The inner attention module for this config (from the backend registry)."""
        from dtensor_attn.backends import REGISTRY

        return REGISTRY[self.backend](self)


def _backend(value: object) -> Backend:
    """The Backend for ``value`` (a Backend or its string form)."""
    if isinstance(value, Backend):
        return value
    try:
        return Backend(value)
    except (ValueError, TypeError):
        names = ", ".join(b.value for b in Backend)
        raise ValueError(
            f"AttentionConfig: unknown backend {value!r}; expected one of {names} (a str or a "
            f"Backend). Fix: e.g. AttentionConfig(backend='flex')."
        ) from None
