"""How the kit calls a subject: its calling convention, shapes, mesh axis names and set-up.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

A subject is called ``subject(q_BLNH, k_BLNH, v_BLNH, **kwargs)`` with DTensors. What goes in
``kwargs`` is the subject's ``CallingConvention``: the mask under the keyword it reads
(``mask=`` for dtensor_attn's modules, ``attention_masks=`` for torchtitan's), built either once
from global positions or per rank from that rank's ``RankView`` in the module's own mask type
(a flex ``BlockMask`` whose queries are the rank's sequence chunk, torchtitan's
``VarlenMetadata``), and the extra keywords of each case (``enable_gqa=``, ``scale=``).
``Shapes`` sizes the inputs; ``axis_roles`` says what each mesh axis name shards; ``prepare``
sets a subject up for a mesh (torchtitan's ``Module.parallelize``) and may hand back the mesh
it was tied to, on which the kit then places the inputs.
"""

from __future__ import annotations

import dataclasses
import enum
import types
from collections.abc import Callable, Mapping

import torch
from torch.distributed.device_mesh import DeviceMesh

from dtensor_attn.layout import Dim

# What the kit's mesh axis names shard by default: dp batch, cp the sequence, tp the heads;
# torchtitan's names as well (its dp_replicate and dp_shard both shard batch).
DEFAULT_AXIS_ROLES: Mapping[str, Dim | None] = types.MappingProxyType({
    "dp": Dim.B, "dp_replicate": Dim.B, "dp_shard": Dim.B, "cp": Dim.L, "tp": Dim.N,
})
_ROLE_WORDS = {"batch": Dim.B, "seq": Dim.L, "heads": Dim.N, "replicate": None}


def parse_axis_roles(roles: Mapping[str, object]) -> dict[str, Dim | None]:
    """``{"dp_shard": "batch", "cp": "seq", "tp": "heads", "ep": "replicate"}`` (or Dim values)."""
    parsed = {}
    for axis, role in roles.items():
        if isinstance(role, Dim) and role in (Dim.B, Dim.L, Dim.N) or role is None:
            parsed[axis] = role
        elif isinstance(role, str) and role in _ROLE_WORDS:
            parsed[axis] = _ROLE_WORDS[role]
        else:
            raise ValueError(
                f"check_attention: axis_roles[{axis!r}] = {role!r}; expected one of {sorted(_ROLE_WORDS)} "
                f"(or Dim.B, Dim.L, Dim.N, None). Fix: e.g. axis_roles={{'{axis}': 'batch'}}"
            )
    return parsed


@dataclasses.dataclass(kw_only=True, frozen=True, slots=True)
class Shapes:
    """Global input sizes. ``seq`` must split evenly over the sequence-sharding axes; torch's
    CP flex masks want 128 x the CP degree (``Shapes(seq=256, head_dim=16)`` for cp2)."""

    batch: int = 2
    seq: int = 16  # != num_q_heads, so that BLN and BNL LSE shapes differ
    num_q_heads: int = 8
    num_kv_heads_gqa: int = 4
    head_dim: int = 4
    scale: float | None = None  # None: 1/sqrt(head_dim), the default of every kernel

    def __post_init__(self) -> None:
        for name in ("batch", "seq", "num_q_heads", "num_kv_heads_gqa", "head_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"check_attention: Shapes.{name}={value!r}; expected a positive int")
        if self.num_q_heads % self.num_kv_heads_gqa or self.num_kv_heads_gqa == self.num_q_heads:
            raise ValueError(
                f"check_attention: Shapes(num_q_heads={self.num_q_heads}, num_kv_heads_gqa={self.num_kv_heads_gqa}); "
                "expected fewer kv heads that divide the q heads, for the GQA cases. Fix: e.g. 8 and 4"
            )
        if self.seq == self.num_q_heads:
            raise ValueError(
                f"check_attention: Shapes(seq={self.seq}, num_q_heads={self.num_q_heads}); expected them to differ, "
                "so that a BNL LSE and a BLN one have different shapes. Fix: change seq"
            )

    def sizes(self) -> dict[Dim, int]:
        return {Dim.B: self.batch, Dim.L: self.seq, Dim.N: self.num_q_heads, Dim.H: self.head_dim}

    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim ** -0.5


@dataclasses.dataclass(frozen=True, slots=True)
class CaseInfo:
    """What a case asks of the subject: ``CallingConvention.extra_kwargs`` reads it."""

    gqa: bool
    documents: bool
    lse: bool | None
    shapes: Shapes

    @property
    def num_kv_heads(self) -> int:
        return self.shapes.num_kv_heads_gqa if self.gqa else self.shapes.num_q_heads


@dataclasses.dataclass(frozen=True, slots=True)
class RankView:
    """One rank's view of a case, for a mask built per rank.

    ``positions_BL``: positions inside each packed document (0 where one starts) of the rank's
    batch rows, the whole sequence; None for a causal-only case. ``q_index_L``: global sequence
    index of each of the rank's local queries (its chunk of every sequence-sharding axis);
    ``kv_index_L``: every key, 0..L-1 (what a CP wrapper that all-gathers k/v hands its kernel).
    ``coords``: the rank's coordinate on each mesh axis; ``cp_rank``/``cp_size``: its place over
    the sequence-sharding axes together."""

    rank: int
    coords: Mapping[str, int]
    positions_BL: torch.Tensor | None
    q_index_L: torch.Tensor
    kv_index_L: torch.Tensor
    cp_rank: int
    cp_size: int
    case: CaseInfo
    device: torch.device


class MaskScope(enum.Enum):
    GLOBAL = "global"  # make_mask(positions_BL) once: a value of global tensors the subject shards itself
    PER_RANK = "per_rank"  # make_mask(RankView) for every rank, in the module's own mask type

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(kw_only=True, frozen=True, slots=True)
class CallingConvention:
    """How a subject takes its mask and keywords.

    ``make_mask``: GLOBAL scope, ``(positions_BL) -> mask``; PER_RANK, ``(RankView) -> mask``.
    It raising ValueError means "no document masks" (those cases skip with its message).
    ``mask_for_causal``: also pass a mask in causal-only cases (built with ``positions_BL``
    None): flex modules need a causal block mask. ``extra_kwargs``: ``(CaseInfo) -> dict`` of
    keywords per case, e.g. ``lambda case: {"enable_gqa": case.gqa}``. ``out_transform``:
    ``(out_BLNH, lse_BLN) -> out_BLNH`` that the subject applies to attention's output (gpt-oss's
    sinks); the float64 reference applies it too."""

    mask_keyword: str = "mask"
    make_mask: Callable[..., object] | None = None
    mask_scope: MaskScope = MaskScope.GLOBAL
    mask_for_causal: bool = False
    extra_kwargs: Callable[[CaseInfo], Mapping[str, object]] | None = None
    out_transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if not self.mask_keyword.isidentifier():
            raise ValueError(f"check_attention: CallingConvention(mask_keyword={self.mask_keyword!r}); expected a keyword name")
        if not isinstance(self.mask_scope, MaskScope):
            object.__setattr__(self, "mask_scope", MaskScope(self.mask_scope))
        if self.mask_for_causal and self.make_mask is None:
            raise ValueError("check_attention: CallingConvention(mask_for_causal=True) needs make_mask. Fix: pass make_mask")

    def kwargs(self, case: CaseInfo) -> dict[str, object]:
        if self.extra_kwargs is None:
            return {}
        extra = dict(self.extra_kwargs(case))
        if self.mask_keyword in extra:
            raise ValueError(f"check_attention: extra_kwargs returned {self.mask_keyword!r}, the mask keyword; "
                             "expected the kit to pass the mask. Fix: build it in make_mask")
        return extra


@dataclasses.dataclass(frozen=True, slots=True)
class MeshContext:
    """What ``prepare`` gets: the kit's mesh for the case (simulated, or the real one), its axes
    and what each axis shards."""

    mesh: DeviceMesh
    axes: Mapping[str, int]
    roles: Mapping[str, Dim | None]
    device: torch.device


@dataclasses.dataclass(frozen=True, slots=True)
class Prepared:
    """What ``prepare`` may return: the set-up subject and the mesh it is tied to, on which the
    kit places the inputs. Its axes must match the kit's, but for axes of size 1."""

    subject: Callable
    mesh: DeviceMesh
