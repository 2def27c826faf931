"""Pure placement logic: normalising placements and mapping them through a layout change.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

No collectives, no tensor math: every function here takes and returns values. The mapping
runs DTensor's own view algebra (``_compat.propagate_view_placements``) step by step, so what
we infer is what a DTensor ``view`` of the same tensor would produce:

    BLNH (Shard(1), Shard(2)) on a (cp=2, tp=4) mesh, packed to TNH
      -> split nothing, drop nothing, permute nothing, flatten (B, L) into T
      -> (_StridedShard(0, sf=B), Shard(1))
"""

from __future__ import annotations

from collections.abc import Sequence

from dtensor_attn import _compat
from dtensor_attn._compat import Partial, Placement, Shard, StridedShard
from dtensor_attn.errors import PlacementError
from dtensor_attn.layout import Dim, Layout

Placements = tuple[Placement, ...]


def normalize_placement(placement: Placement, ndim: int) -> Placement:
    """One canonical value per meaning: negative dims resolved, ``_StridedShard(sf=1)`` is Shard."""
    if isinstance(placement, StridedShard):
        dim = placement.dim % ndim if ndim else placement.dim
        factor = _compat.split_factor(placement)
        return Shard(dim) if factor == 1 else _compat.strided_shard(dim, factor)
    if isinstance(placement, Shard):
        return Shard(placement.dim % ndim if ndim else placement.dim)
    return placement


def normalize_placements(placements: Sequence[Placement], ndim: int) -> Placements:
    return tuple(normalize_placement(p, ndim) for p in placements)


def placements_equal(a: Sequence[Placement], b: Sequence[Placement], ndim: int) -> bool:
    """Equality that sees through ``Shard(-1)`` vs ``Shard(3)``, sf=1, and list vs tuple."""
    return normalize_placements(a, ndim) == normalize_placements(b, ndim)


def format_placements(placements: Sequence[Placement]) -> str:
    """torch's short printed forms, e.g. ``(S(1), _S(0, 2), R)``."""
    return "(" + ", ".join(str(p) for p in placements) + ")"


def sharded_mesh_axes(placements: Sequence[Placement], dim: int) -> list[int]:
    """Mesh axes whose placement shards tensor dim ``dim`` (Shard or _StridedShard, which is
    not a Shard subclass on every torch)."""
    return [i for i, p in enumerate(placements) if isinstance(p, (Shard, StridedShard)) and p.dim == dim]


def _check_even_flatten(
    placements: Placements,
    atoms: tuple[Dim, ...],
    sizes: dict[Dim, int],
    mesh_shape: Sequence[int],
    out_layout: Layout,
    where: str,
) -> None:
    """A shard of B or L folded into packed tokens is only a placement if it divides evenly."""
    for i, atom in enumerate(atoms):
        if atom not in Dim.T.atoms:
            continue
        num_shards = 1
        for axis in sharded_mesh_axes(placements, i):
            num_shards *= mesh_shape[axis]
        if sizes[atom] % num_shards:
            raise PlacementError(
                f"{where}: cannot express {atom.value} sharded {num_shards} ways as a placement "
                f"of {out_layout.name}: {atom.value} has {sizes[atom]} entries, not a multiple of "
                f"{num_shards}, so the ranks' packed tokens are not one strided pattern. "
                f"Fix: make {atom.value} divisible by {num_shards}, or keep the output in BLNH."
            )


def infer_out_placements(
    in_placements: Sequence[Placement],
    in_layout: Layout,
    out_layout: Layout,
    *,
    global_shape: Sequence[int],
    mesh_shape: Sequence[int],
    batch: int | None = None,
    module: str = "infer_out_placements",
) -> Placements:
    """Placements of a tensor in ``out_layout`` that holds the same values as one in ``in_layout``.

    ``global_shape`` is the input's global shape (in ``in_layout``); ``batch`` splits a packed
    input's T into (B, L). Dims of the input that the output lacks (head_dim, for an LSE) must
    not be sharded. Raises PlacementError where the output cannot carry the input's sharding.
    """
    placements = normalize_placements(in_placements, in_layout.ndim)
    if len(placements) != len(mesh_shape):
        raise PlacementError(
            f"{module}: {len(placements)} placements {format_placements(placements)} for a "
            f"{len(mesh_shape)}-D mesh {tuple(mesh_shape)}. Fix: one placement per mesh axis."
        )
    for p in placements:
        if isinstance(p, Partial):
            raise PlacementError(
                f"{module}: {in_layout.name} placements {format_placements(placements)} contain "
                f"Partial; a layout change of a pending reduction has no meaning. "
                f"Fix: redistribute to Replicate or Shard first."
            )
    sizes = in_layout.atom_sizes(tuple(global_shape), batch=batch)
    shape = tuple(global_shape)
    atoms = in_layout.atoms

    # 1. Split packed dims into atoms (T -> B, L).
    atom_shape = tuple(sizes[a] for a in atoms)
    if atom_shape != shape:
        rule = _compat.view_groups(shape, atom_shape)
        try:
            _, split = _compat.propagate_view_placements(placements, shape, rule, mesh_shape)
        except RuntimeError:
            split = None
        if split is None or any(isinstance(p, StridedShard) for p in split):
            # torch 2.11 keeps the strided shard on the batch dim (measured: _S(0, 4) where the
            # seq shard is meant) or refuses: use the inverse of step 4 instead.
            split = _split_tokens(placements, in_layout, sizes, mesh_shape, module)
        placements, shape = tuple(split), atom_shape

    # 2. Drop atoms the output lacks (head_dim for an LSE): only if nothing shards them.
    out_atoms = out_layout.atoms
    for i, atom in enumerate(atoms):
        if atom not in out_atoms and sharded_mesh_axes(placements, i):
            raise PlacementError(
                f"{module}: {in_layout.name} shards {atom.value} (placements "
                f"{format_placements(placements)}), which {out_layout.name} does not have. "
                f"Fix: do not shard {atom.value}; only heads and seq may be sharded."
            )
    kept = [i for i, a in enumerate(atoms) if a in out_atoms]
    missing = [a for a in out_atoms if a not in atoms]
    if missing:
        raise PlacementError(
            f"{module}: {out_layout.name} needs {[a.value for a in missing]}, which "
            f"{in_layout.name} does not have."
        )
    placements = tuple(_reindex(p, kept) for p in placements)
    atoms = tuple(atoms[i] for i in kept)
    shape = tuple(sizes[a] for a in atoms)

    # 3. Permute atoms into the output's order (BLNH -> BNLH is a transpose).
    if atoms != out_atoms:
        rule = tuple(_compat.input_dim(atoms.index(a)) for a in out_atoms)
        _, placements = _compat.propagate_view_placements(placements, shape, rule, mesh_shape)
        placements, atoms = tuple(placements), out_atoms
        shape = tuple(sizes[a] for a in atoms)

    # 4. Flatten atoms into packed dims (B, L -> T).
    out_shape = out_layout.shape(sizes)
    if out_shape != shape:
        _check_even_flatten(placements, atoms, sizes, mesh_shape, out_layout, module)
        _, placements = view_placements(placements, shape, out_shape, mesh_shape)
    return normalize_placements(placements, out_layout.ndim)


def view_placements(
    placements: Sequence[Placement],
    shape: Sequence[int],
    out_shape: Sequence[int],
    mesh_shape: Sequence[int],
) -> tuple[Placements, Placements]:
    """(placements the input needs, output placements) of a view ``shape -> out_shape`` of a
    tensor placed ``placements``, without redistribution, by DTensor's own view algebra.

    torch 2.11 refuses to flatten a sharded non-leading dim ("Attempted to flatten multiple
    dimensions, with dimension 1 being sharded"), where 2.13 answers with a ``_StridedShard``;
    for a view that only keeps and flattens dims, ``flatten_placements`` then gives 2.13's
    answer (a unit test pins the two equal where torch answers). Raises RuntimeError where
    neither can.
    """
    rule = _compat.view_groups(tuple(shape), tuple(out_shape))
    try:
        needed, out = _compat.propagate_view_placements(placements, shape, rule, mesh_shape)
    except RuntimeError:
        sources = _compat.view_sources(shape, out_shape)
        own = flatten_placements(placements, shape, sources, mesh_shape)
        if own is None:
            raise
        return tuple(placements), own
    return tuple(needed), tuple(out)


def flatten_placements(
    placements: Sequence[Placement],
    shape: Sequence[int],
    sources: Sequence[tuple[int, ...] | None],
    mesh_shape: Sequence[int],
) -> Placements | None:
    """Output placements of a view that keeps or flattens input dims, or None for any other view.

    ``sources[j]`` are the input dims output dim j is made of (``_compat.view_sources``). A
    shard of the first dim of a flattened group stays a plain shard of the output dim; a shard
    of a later dim becomes ``_StridedShard(j, sf)``, sf being the number of blocks that dim is
    repeated in on each rank: the product of the earlier dims of the group, divided by their
    shards on earlier mesh axes. (B, L) -> T with L on cp: ``_S(0, B)``; with B on dp first:
    ``_S(0, B / dp)``, the local batch. A ``_StridedShard`` moves with a dim that is kept as it
    is; one on a flattened dim has no rule here (None).
    """
    if any(src is None for src in sources):
        return None
    owner = {d: (j, i) for j, src in enumerate(sources) for i, d in enumerate(src)}
    out: list[Placement] = []
    for axis, p in enumerate(placements):
        if isinstance(p, (Shard, StridedShard)) and p.dim not in owner:
            return None
        if isinstance(p, StridedShard):
            j, _ = owner[p.dim]
            if len(sources[j]) != 1:
                return None
            out.append(_compat.strided_shard(j, _compat.split_factor(p)))
            continue
        if not isinstance(p, Shard):
            out.append(p)
            continue
        j, i = owner[p.dim]
        blocks = 1
        for earlier_dim in sources[j][:i]:
            blocks *= shape[earlier_dim]
            for earlier_axis in sharded_mesh_axes(placements[:axis], earlier_dim):
                blocks //= mesh_shape[earlier_axis]
        out.append(_compat.strided_shard(j, blocks) if blocks > 1 else Shard(j))
    return tuple(out)


def _split_tokens(
    placements: Placements,
    in_layout: Layout,
    sizes: dict[Dim, int],
    mesh_shape: Sequence[int],
    module: str,
) -> Placements:
    """Placements after splitting T into (B, L): the inverse of ``flatten_placements``."""
    token_dim = in_layout.dims.index(Dim.T)
    atoms = in_layout.atoms
    batch_dim, seq_dim = atoms.index(Dim.B), atoms.index(Dim.L)
    out: list[Placement] = []
    rows = sizes[Dim.B]
    for axis, p in enumerate(placements):
        if not isinstance(p, (Shard, StridedShard)):
            out.append(p)
            continue
        if p.dim != token_dim:
            out.append(Shard(atoms.index(in_layout.dims[p.dim])))
            continue
        factor = _compat.split_factor(p) if isinstance(p, StridedShard) else 1
        if factor == 1 and rows % mesh_shape[axis] == 0 and rows > 1:
            out.append(Shard(batch_dim))
            rows //= mesh_shape[axis]
        elif factor == rows:
            out.append(Shard(seq_dim))
        else:
            raise PlacementError(
                f"{module}: {p} on mesh axis {axis} of packed {in_layout.name} tokens is not a "
                f"shard of batch rows nor of each row's seq ({rows} rows left); it has no "
                f"{'x'.join(a.name for a in atoms)} placement. Fix: keep this tensor packed."
            )
    return tuple(out)


def _reindex(placement: Placement, kept: list[int]) -> Placement:
    """Renumber a shard's dim after dropping the dims not in ``kept``."""
    if isinstance(placement, StridedShard):
        return _compat.strided_shard(kept.index(placement.dim), _compat.split_factor(placement))
    if isinstance(placement, Shard):
        return Shard(kept.index(placement.dim))
    return placement


__all__ = [
    "Placements",
    "flatten_placements",
    "format_placements",
    "infer_out_placements",
    "normalize_placement",
    "normalize_placements",
    "placements_equal",
    "sharded_mesh_axes",
    "view_placements",
]
