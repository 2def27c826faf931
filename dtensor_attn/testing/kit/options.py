"""The kit's matrix and precision: known meshes, and ``ConformanceOptions``.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping

import torch

from dtensor_attn.config import Backend
from dtensor_attn.layout import Dim, Layout
from dtensor_attn.testing.harness.meshspec import mesh_id, validate_axes
from dtensor_attn.testing.kit.cases import CallSettings
from dtensor_attn.testing.kit.spec import DEFAULT_AXIS_ROLES, Shapes, parse_axis_roles

# Every mesh the kit knows, by id; ``meshes=`` takes these ids or axis dicts in this form.
MESHES: Mapping[str, Mapping[str, int]] = types.MappingProxyType({
    mesh_id(axes): types.MappingProxyType(axes)
    for axes in (
        {"tp": 1}, {"tp": 2}, {"tp": 4}, {"tp": 8}, {"cp": 2}, {"cp": 4}, {"cp": 8},
        {"cp": 2, "tp": 2}, {"cp": 2, "tp": 4}, {"cp": 4, "tp": 2}, {"dp": 2, "cp": 2, "tp": 2},
    )
})
# World sizes 1, 2, 4, 4, 8: TP alone, 4-way CP alone (ranks past the second need the right
# offsets too), and CP x TP with 2 and 4 heads shards (a GQA group inside one rank).
DEFAULT_MESHES = ("tp1", "tp2", "cp4", "cp2xtp2", "cp2xtp4")
MASKS = ("causal", "docs")

# bf16 (and fp16) subjects: the inputs are rounded to bf16 (eps 2^-8 = 3.9e-3) and the reference
# is float64 from those same rounded values, so what remains is the kernel's own rounding: flash
# and flex keep P and the output in bf16 (one rounding, 2^-9 relative) and accumulate in fp32;
# gradients round dS and P once more and sum L terms of random sign, whose rounding errors
# grow as sqrt(L) like the sum itself, so the relative error stays a few 2^-8. With the absolute
# part scaled by max|reference| (compare.py), 5e-2 is ~13 bf16 ulps of margin, while a placement
# or mask mistake moves values by O(1) of max|reference|.
HALF_TOLERANCE = 5e-2
FLOAT_TOLERANCE = 1e-9  # float64: reduction order only (~1e-15); six orders of margin


@dataclasses.dataclass(kw_only=True, slots=True)
class ConformanceOptions:
    """The matrix, shapes, device and precision. Narrow any axis to run fewer cases.

    ``device="cuda"`` runs the simulated ranks on one GPU with the real kernels, in bf16 with
    ``HALF_TOLERANCE`` (its derivation is above); ``dtype`` and ``rtol``/``atol`` override. A
    subject that computes in lower precision sets ``dtype``; the reference then starts from the
    same rounded inputs.
    """

    meshes: tuple = DEFAULT_MESHES  # ids of MESHES, or axis dicts such as {"cp": 2, "tp": 2}
    gqa: tuple[bool, ...] = (False, True)  # True: Shapes.num_kv_heads_gqa k/v heads
    masks: tuple[str, ...] = MASKS  # "causal"; "docs": causal within packed documents
    lse: tuple[bool, ...] = (False, True)  # factory only: AttentionConfig.return_lse
    backends: tuple = ()  # factory only: Backend values or names; () is the whole registry
    outputs: tuple[Layout, ...] = (Layout.BLNH, Layout.TNH)  # factory only: varlen_output, where offered
    combinations: str = "pairwise"  # of (gqa, masks, lse) per variant and mesh; or "all"
    backward: bool = True
    cache_check: bool = True
    shapes: Shapes = Shapes()
    axis_roles: Mapping[str, object] = dataclasses.field(default_factory=dict)  # added to DEFAULT_AXIS_ROLES: {"fsdp": "batch"}
    prepare: Callable | None = None  # (subject, MeshContext) -> subject or Prepared, per case
    device: str | torch.device = "cpu"
    dtype: torch.dtype | None = None  # None: float64 on CPU, bfloat16 on CUDA
    rtol: float | None = None  # None: FLOAT_TOLERANCE, or HALF_TOLERANCE for bf16/fp16
    atol: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self.axis_roles = {**DEFAULT_AXIS_ROLES, **parse_axis_roles(self.axis_roles)}
        self.meshes = tuple(self._mesh(m) for m in self.meshes)
        if self.combinations not in ("pairwise", "all"):
            raise ValueError(f"check_attention: combinations={self.combinations!r}; expected 'pairwise' or 'all'")
        unknown = sorted(set(self.masks) - set(MASKS))
        if unknown:
            raise ValueError(f"check_attention: masks {unknown} unknown; expected a subset of {MASKS}")
        self.backends = tuple(Backend(b) if isinstance(b, str) else b for b in self.backends)
        for name in ("gqa", "lse", "masks", "outputs"):
            setattr(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise ValueError(f"check_attention: {name}=() selects no case. Fix: keep at least one value.")
        if not isinstance(self.shapes, Shapes):
            raise ValueError(f"check_attention: shapes={self.shapes!r}; expected a Shapes(...). Fix: shapes=Shapes(seq=256)")
        self.device = torch.device(self.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("check_attention: device='cuda' but torch sees no CUDA device. Fix: run on a GPU machine, or device='cpu'")
        if self.dtype is None:
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float64
        half = self.dtype in (torch.bfloat16, torch.float16)
        for name in ("rtol", "atol"):
            if getattr(self, name) is None:
                setattr(self, name, HALF_TOLERANCE if half else FLOAT_TOLERANCE)

    def _mesh(self, mesh: str | Mapping[str, int]) -> tuple[str, dict[str, int]]:
        if isinstance(mesh, str):
            if mesh not in MESHES:
                raise ValueError(f"check_attention: unknown mesh {mesh!r}; expected one of {sorted(MESHES)} or an axis dict")
            return mesh, dict(MESHES[mesh])
        axes = validate_axes(dict(mesh), "check_attention")
        unknown = sorted(set(axes) - set(self.axis_roles))
        if unknown:
            raise ValueError(
                f"check_attention: mesh axes {unknown} have no meaning here; expected axes named "
                f"{sorted(self.axis_roles)}, or axis_roles={{'{unknown[0]}': 'batch' | 'seq' | 'heads' | 'replicate'}}"
            )
        return mesh_id(axes), axes

    def axis_dims(self, names) -> tuple[Dim | None, ...]:
        return tuple(self.axis_roles[name] for name in names)

    def settings(self) -> CallSettings:
        return CallSettings(shapes=self.shapes, dtype=self.dtype, rtol=self.rtol, atol=self.atol,
                            backward=self.backward, seed=self.seed, device=self.device)
