"""Named logical layouts of attention tensors.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

A layout is a tuple of logical dims. ``T`` is the flattening of (B, L): a layout change
between BLNH and TNH is a zero-copy view, and the placement mapping treats it as DTensor's own
view would (see dtensor_attn.placements).
"""

from __future__ import annotations

import enum


class Dim(enum.Enum):
    """A logical dim. ``atoms`` is what it is made of: T is B then L."""

    B = "batch"
    L = "seq"
    N = "heads"
    H = "head_dim"
    T = "tokens"

    @property
    def atoms(self) -> tuple[Dim, ...]:
        return (Dim.B, Dim.L) if self is Dim.T else (self,)

    def __repr__(self) -> str:
        return self.name


class Layout(enum.Enum):
    """The layouts an attention input, output or LSE can have."""

    BLNH = (Dim.B, Dim.L, Dim.N, Dim.H)
    BNLH = (Dim.B, Dim.N, Dim.L, Dim.H)
    TNH = (Dim.T, Dim.N, Dim.H)
    BLN = (Dim.B, Dim.L, Dim.N)
    BNL = (Dim.B, Dim.N, Dim.L)
    TN = (Dim.T, Dim.N)

    @property
    def dims(self) -> tuple[Dim, ...]:
        return self.value

    @property
    def ndim(self) -> int:
        return len(self.value)

    @property
    def atoms(self) -> tuple[Dim, ...]:
        return tuple(atom for dim in self.value for atom in dim.atoms)

    def index(self, dim: Dim) -> int:
        """Tensor dim of ``dim`` in this layout; for B or L inside T, the index of T."""
        for i, d in enumerate(self.value):
            if dim in d.atoms:
                return i
        raise ValueError(f"{self.name} has no {dim.value} dim")

    @property
    def seq_dim(self) -> int:
        """The dim a context-parallel shard of the sequence lives on (1 in BLNH, 2 in BNLH)."""
        return self.index(Dim.L)

    @property
    def heads_dim(self) -> int:
        """The dim a tensor-parallel shard of heads lives on (2 in BLNH, 1 in BNLH and TNH)."""
        return self.index(Dim.N)

    def atom_sizes(self, shape: tuple[int, ...] | list[int], *, batch: int | None = None) -> dict[Dim, int]:
        """Size of each atom given a tensor shape in this layout.

        A packed T dim does not say how it splits into B and L: pass ``batch`` for that.
        """
        if len(shape) != self.ndim:
            raise ValueError(f"a {self.name} tensor has {self.ndim} dims, got shape {tuple(shape)}")
        sizes: dict[Dim, int] = {}
        for dim, size in zip(self.value, shape):
            if dim is Dim.T:
                if batch is None or size % batch:
                    raise ValueError(f"cannot split {size} packed tokens into batch {batch}")
                sizes[Dim.B], sizes[Dim.L] = batch, size // batch
            else:
                sizes[dim] = size
        return sizes

    def shape(self, sizes: dict[Dim, int]) -> tuple[int, ...]:
        """Tensor shape in this layout from atom sizes."""
        out = []
        for dim in self.value:
            size = 1
            for atom in dim.atoms:
                size *= sizes[atom]
            out.append(size)
        return tuple(out)

    def __repr__(self) -> str:
        return f"Layout.{self.name}"
