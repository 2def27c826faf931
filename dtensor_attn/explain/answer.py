"""The explainer's answer to what the user has: placements or a pasted torch error message.

``answer(text, mesh=None, shape=None)`` reads the text (``message.read_message``), takes the
mesh and global shape from the options or, failing those, from the message, and returns the
printed answer, one section each: what torch said and what was read; what the placements mean
(in symbols where sizes are unknown) and what the view does; whether they decode to a shard
order; the rank table where mesh and shape are known; the likely causes ranked with their
fixes; and next steps, with a command line to copy that adds what is missing. Placements alone
with both options print the rank table report of ``explain_placements``, as before.
"""

from __future__ import annotations

import math

from dtensor_attn._compat import StridedShard
from dtensor_attn.explain.causes import Cause, Focus, rank_causes
from dtensor_attn.explain.focus import (
    ViewFacts,
    reclassify,
    shape_text,
    strided_focus,
    view_facts,
    view_focus,
    view_lines,
)
from dtensor_attn.explain.known import Known, mesh_text, resolve
from dtensor_attn.explain.message import Message, MessageKind, read_message
from dtensor_attn.explain.rank_table import explain_placements
from dtensor_attn.explain.strided import SHARD_LIKE
from dtensor_attn.explain.symbolic import Sizes, decode_verdicts, meaning
from dtensor_attn.placements import format_placements

K = MessageKind
_HEADLINES = {
    K.NOT_INTERPRETED: "torch 2.11 could not read these placements as a shard order, which it "
    "needs to full_tensor() or redistribute:",
    K.NOT_DECODED: "torch could not decode these _StridedShard placements into a shard order:",
    K.FLATTEN_SHARDED: "torch 2.11's view rule refused to flatten dims while one after the first "
    "of them is sharded:",
    K.FLATTEN_UNEVEN: "DTensor refused a view that flattens an unevenly sharded dim:",
    K.UNFLATTEN_UNEVEN: "DTensor refused a view that splits a sharded dim into pieces its mesh "
    "axis does not divide:",
    K.RESHAPE_SHARDED: "DTensor refused a view that removes or reshapes a sharded dim:",
    K.PROPAGATION_FAILED: "DTensor found no output placements for {op} without redistributing "
    "its input:",
}
_KIND_MEANING = {
    K.FLATTEN_SHARDED: "a view that merges dims keeps a shard only on the first of them: with "
    "dimension {dim} sharded, each rank's part of the merged dim would be a piece of every block "
    "(torch 2.13 labels that a _StridedShard); torch 2.11 refuses, and view() never redistributes",
    K.FLATTEN_UNEVEN: "dim {dim} is sharded into unequal pieces, and a dim merged from it would "
    "need equal ones; view() never redistributes",
    K.UNFLATTEN_UNEVEN: "the view splits a sharded dim into several; the shard can stay only on "
    "the first piece, and only if its mesh axis divides it",
    K.RESHAPE_SHARDED: "dim {dim} is sharded, and the view would drop it or reshape it so that no "
    "output dim starts with it; view() never redistributes",
    K.PROPAGATION_FAILED: "DTensor's sharding rule for the op raised; the line before 'Sharding "
    "propagation failed' in the message says why",
}
_TORCH_211 = (
    '"use_strided_shard_as_shard_order is True, but placements: ... is unable to be interpreted '
    'into a corresponding shard_order"'
)
_VERSIONS = {
    K.NOT_INTERPRETED: "torch 2.11 raises this ValueError wherever it needs a shard order "
    "(full_tensor(), redistribute()); torch 2.13 falls back to a plan that works there",
    K.NOT_DECODED: "torch 2.13 raises this (_StridedShardNotDecodableError, a ValueError) where "
    "it must read a shard order from the placements; its full_tensor() and redistribute() catch "
    "it and fall back to a plan that works; torch 2.11 raises \"... is unable to be interpreted "
    'into a corresponding shard_order" instead',
    K.PLACEMENTS: f"where torch needs a shard order (full_tensor(), redistribute()), torch 2.11 "
    f"raises {_TORCH_211}; torch 2.13 falls back to a plan that works",
}
_STRIDED_KINDS = (K.NOT_INTERPRETED, K.NOT_DECODED, K.PLACEMENTS)
_TRACE = (
    "to find the line that made it, run the model once under "
    "dtensor_attn.explain.trace_placements(model, *inputs) (simulated ranks work)"
)


def _read_line(message: Message, known: Known) -> str:
    if message.placements is not None:
        placements = format_placements(message.placements)
    else:
        placements = "not in the message" + (f" ({message.placements_error})" if message.placements_error else "")
    parts = [f"placements {placements}"]
    if known.mesh_shape is not None:
        parts.append(f"mesh ({mesh_text(known.mesh_shape, known.names).replace(',', ', ')}) {known.mesh_from}")
    else:
        parts.append(f"mesh axes {known.names}, sizes not given" if known.names else "mesh not given")
    if known.global_shape is not None:
        parts.append(f"global shape {shape_text(known.global_shape)} {known.shape_from}")
    else:
        parts.append("global shape not given")
    if message.view_shape is not None:
        parts.append(f"viewed as {shape_text(message.view_shape)}")
    return "read: " + "; ".join(parts)


def _example_shape(placements, mesh_shape, ndim: int) -> tuple[int, ...]:
    """A shape each shard divides evenly: twice the product of the axes (and split factors) per dim."""
    shape = []
    for d in range(ndim):
        factors = [
            mesh_shape[a] * (p.split_factor if isinstance(p, StridedShard) else 1)
            for a, p in enumerate(placements)
            if isinstance(p, SHARD_LIKE) and p.dim == d
        ]
        shape.append(2 * math.prod(factors) if factors else 4)
    return tuple(shape)


def _commands(known: Known) -> list[str]:
    """The options that would add the rank table: a template and a runnable example."""
    placements, mesh_shape, names, global_shape = known.placements, known.mesh_shape, known.names, known.global_shape
    ndim = max((p.dim + 1 for p in placements if isinstance(p, SHARD_LIKE) and p.dim >= 0), default=1)
    axes = range(len(placements))
    symbols = ("N",) if len(placements) == 1 else tuple(f"N{a}" for a in axes)
    template_mesh = mesh_text(mesh_shape or symbols, names)
    example_mesh = mesh_shape or tuple(4 for _ in axes)
    template_shape = ",".join(map(str, global_shape or (f"S{d}" for d in range(ndim))))
    example_shape = ",".join(map(str, global_shape or _example_shape(placements, example_mesh, ndim)))
    quoted = f'"{placements[0]}"' if len(placements) == 1 else f'"{format_placements(placements)}"'
    missing = " and ".join(o for o, v in (("--mesh", mesh_shape), ("--shape", global_shape)) if v is None)
    return [
        f"for the rank table (which indices each rank holds), add {missing}:",
        f"  python -m dtensor_attn explain {quoted} --mesh {template_mesh} --shape {template_shape}",
        f"  e.g. python -m dtensor_attn explain {quoted} --mesh {mesh_text(example_mesh, names)} "
        f"--shape {example_shape}",
    ]


def _meaning(message: Message, known: Known, sizes: Sizes | None, facts: ViewFacts | None) -> list[str]:
    body = meaning(known.placements, sizes) if sizes is not None else []
    body += view_lines(facts, known.names)
    if message.kind in _KIND_MEANING:
        body.append(_KIND_MEANING[message.kind].format(dim=message.dim))
    return ["", "meaning:", *(f"  {line}" for line in body)]


def _shard_order(message: Message, known: Known, sizes: Sizes | None) -> tuple[list[str], Focus]:
    """The decode verdict of each _StridedShard, and the focus for the causes."""
    if message.kind not in _STRIDED_KINDS:
        return [], Focus()
    verdicts = decode_verdicts(known.placements, sizes) if sizes is not None else []
    if not verdicts:
        return [], Focus()
    lines = ["", "shard order:", *(f"  {v.placement} on axis {v.axis}: {v.reason}" for v in verdicts)]
    focus = strided_focus(verdicts, known.placements, known.names)
    if focus.split_factor is not None:
        lines.append(f"  {_VERSIONS[message.kind]}")
    else:
        lines.append(
            "  nothing to fix: every _StridedShard decodes (a right-to-left shard order, as FSDP2 "
            "on top of TP makes)"
        )
    return lines, focus


def _table(known: Known) -> list[str]:
    if known.placements is None or known.mesh_shape is None or known.global_shape is None:
        return []
    explained = explain_placements(known.placements, known.mesh_shape, known.global_shape, mesh_names=known.names)
    lines = ["", f"rank table: {explained.render().splitlines()[0]}"]
    lines += [f"  {row}" for row in explained.table().splitlines()]
    return lines + [f"  reading: {n.flatten}" for n in explained.strided if n.flatten and not n.decodes]


def _causes(causes: list[Cause]) -> list[str]:
    if not causes:
        return []
    lines = ["", "likely causes, most likely first:"]
    for i, cause in enumerate(causes, 1):
        lines += [f"  {i}. {cause.kind.value}", *(f"     {why}" for why in cause.why), f"     fix: {cause.fix}"]
    return lines


def _next(known: Known, causes: list[Cause]) -> list[str]:
    after: list[str] = []
    if known.placements is None:
        after.append(
            "paste the whole message: its 'Sharding propagation failed for ...' line names the "
            "tensor's placements, global shape and mesh, for a concrete answer"
        )
    elif known.mesh_shape is None or known.global_shape is None:
        after += _commands(known)
    if causes:
        after.append(_TRACE)
    return ["", "next:", *(f"  {line}" for line in after)] if after else []


def answer(text: str, mesh: str | None = None, shape: str | None = None) -> str:
    """The printed answer for placements or a torch error message; ValueError if unreadable."""
    message = read_message(text)
    known = resolve(message, mesh, shape)
    if message.kind is K.PLACEMENTS and mesh is not None and shape is not None:
        explained = explain_placements(
            known.placements, known.mesh_shape, known.global_shape, mesh_names=known.names
        )
        return explained.render()
    facts = view_facts(message, known.mesh_shape)
    headline = _HEADLINES.get(message.kind, "").format(op=message.op or "the op")
    message, why = reclassify(message, facts)  # a bare propagation failure gets its reason
    lines = [headline, f"  {message.line[:400]}"] if message.is_torch_message else []
    lines.append(_read_line(message, known))
    lines += [f"in your code: {message.frame}"] if message.frame is not None else []
    if message.local_map is not None:
        lines.append(
            f"through local_map({message.local_map}): its out_placements label what the kernel "
            "returns, the first thing to check"
        )
    lines += [f"note: {note}" for note in (*known.notes, *([why] if why else []))]
    sizes = None
    if known.placements:
        sharded = tuple(p.dim for p in known.placements if isinstance(p, SHARD_LIKE))
        sizes = Sizes(len(known.placements), known.mesh_shape, known.names, known.global_shape, sharded)
    lines += _meaning(message, known, sizes, facts)
    order, focus = _shard_order(message, known, sizes)
    if message.kind not in _STRIDED_KINDS:
        focus = view_focus(message, facts, known.mesh_shape, known.names)
    causes = rank_causes(message.kind, focus)
    lines += order + _table(known) + _causes(causes) + _next(known, causes)
    return "\n".join(lines)


__all__ = ["answer"]
