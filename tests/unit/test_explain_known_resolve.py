"""``resolve`` (explain/known.py): which mesh, axis names and global shape the explainer works
from: the options over the message, the message's own values dropped with a note where they
do not fit, and option errors that name the option (exit code 2 in the CLI)."""

from __future__ import annotations

import pytest
from torch.distributed.tensor import Replicate, Shard

from dtensor_attn import _compat
from dtensor_attn.errors import PlacementError
from dtensor_attn.explain.bounds import MAX_DIM_SIZE, MAX_MESH_AXES, MAX_MESH_RANKS
from dtensor_attn.explain.known import mesh_text, resolve
from dtensor_attn.explain.message import Message, MessageKind

S01 = (Shard(0), Shard(1))


def message(placements=S01, mesh=None, names=None, shape=None) -> Message:
    return Message(MessageKind.NOT_DECODED, placements=placements, mesh_shape=mesh, mesh_names=names,
                   global_shape=shape)


# (the message's mesh, names and shape; --mesh; --shape) -> (mesh, names, shape, mesh from, shape from)
SOURCES = [
    ("message-only", ((2, 4), ("cp", "tp"), (8, 16)), None, None,
     ((2, 4), ("cp", "tp"), (8, 16), "from the message", "from the message")),
    ("options-beat-the-message", ((2, 4), ("cp", "tp"), (8, 16)), "dp=4,tp=2", "4,6",
     ((4, 2), ("dp", "tp"), (4, 6), "from --mesh", "from --shape")),
    ("mesh-option-without-names-drops-the-messages-names", ((2, 4), ("cp", "tp"), None), "4,2", None,
     ((4, 2), None, None, "from --mesh", "from the message")),
    ("shape-option-keeps-the-messages-mesh", ((2, 4), None, None), None, "8x16",
     ((2, 4), None, (8, 16), "from the message", "from --shape")),
    ("nothing-known", (None, None, None), None, None,
     (None, None, None, "from the message", "from the message")),
]


@pytest.mark.parametrize("from_message,mesh_option,shape_option,expected", [s[1:] for s in SOURCES],
                         ids=[s[0] for s in SOURCES])
def test_options_first_then_what_the_message_names(from_message, mesh_option, shape_option, expected):
    known = resolve(message(S01, *from_message), mesh_option, shape_option)
    assert (known.mesh_shape, known.names, known.global_shape, known.mesh_from, known.shape_from) == expected
    assert known.notes == () and known.placements == S01


@pytest.mark.parametrize("from_message,kept,note", [
    (((2, 2, 2), ("a", "b", "c"), (8, 8)), ((None, None, (8, 8))),
     "the message's mesh (2, 2, 2) has 3 axes for 2 placements: not used"),
    (((2, 4), None, (8,)), (((2, 4), None, None)),
     "the message's shape (8,) has too few dims for the placements: not used"),
    (((MAX_MESH_RANKS, 2), None, (8, 8)), ((None, None, (8, 8))),
     f"the message's mesh ({MAX_MESH_RANKS}, 2) is too large for a rank table: not used"),
    (((2, 2), None, (8, MAX_DIM_SIZE + 1)), (((2, 2), None, None)),
     f"the message's shape (8, {MAX_DIM_SIZE + 1}) is too large for a rank table: not used"),
], ids=["mesh-axes-differ", "shape-too-few-dims", "mesh-too-large", "shape-too-large"])
def test_the_messages_values_that_do_not_fit_are_dropped_with_a_note(from_message, kept, note):
    known = resolve(message(S01, *from_message), None, None)
    assert (known.mesh_shape, known.names, known.global_shape) == kept
    assert known.notes == (note,)


def test_names_of_another_axis_count_are_dropped_silently():
    known = resolve(message(S01, (2, 4), ("tp",), None), None, None)
    assert (known.mesh_shape, known.names, known.notes) == ((2, 4), None, ())


@pytest.mark.parametrize("placements,mesh_option,shape_option,pattern", [
    (S01, "2,2,2", None, r"^2 placements \(S\(0\), S\(1\)\) for a 3-D mesh \(2, 2, 2\): expected one "
                         r"placement per mesh axis\. Fix: pass a mesh with one size per placement"),
    (S01, None, "8", r"^S\(1\) shards dim 1, but the global shape \(8,\) has 1 dims\. Fix: pass the "
                     r"tensor's full global shape with --shape\."),
    (S01, ",".join(["1"] * (MAX_MESH_AXES + 1)), None, rf"^--mesh has {MAX_MESH_AXES + 1} axes"),
    (S01, None, f"4,{MAX_DIM_SIZE + 1}", rf"^--shape 4,{MAX_DIM_SIZE + 1} has a dim of size"),
    ((Replicate(),) * (MAX_MESH_AXES + 1), None, None,
     rf"^{MAX_MESH_AXES + 1} placements: one per mesh axis, and the explainer takes at most {MAX_MESH_AXES} axes"),
], ids=["mesh-axes", "shape-dims", "mesh-too-many-axes", "shape-too-large", "too-many-placements"])
def test_option_errors_name_the_option_and_the_fix(placements, mesh_option, shape_option, pattern):
    with pytest.raises(PlacementError, match=pattern):
        resolve(message(placements), mesh_option, shape_option)


@pytest.mark.parametrize("placements,shape,expected", [
    ((Shard(-1), Replicate()), "4,6", (Shard(1), Replicate())),
    ((_compat.strided_shard(-2, 2), Shard(-1)), "8,6", (_compat.strided_shard(0, 2), Shard(1))),
    ((Shard(-1), Replicate()), None, (Shard(-1), Replicate())),  # no shape: nothing to count from
], ids=["shard", "strided", "no-shape"])
def test_negative_dims_are_counted_from_the_global_shape(placements, shape, expected):
    assert resolve(message(placements), None, shape).placements == expected


def test_a_message_without_placements_takes_any_mesh_and_shape():
    known = resolve(Message(MessageKind.FLATTEN_SHARDED), "cp=2,tp=4", "8,16,3")
    assert (known.placements, known.mesh_shape, known.names, known.global_shape) == (
        None, (2, 4), ("cp", "tp"), (8, 16, 3))


@pytest.mark.parametrize("mesh_shape,names,text", [
    ((2, 4), ("cp", "tp"), "cp=2,tp=4"), ((8,), None, "8"), ((2, 2, 2), None, "2,2,2"),
], ids=["named", "one-axis", "unnamed"])
def test_the_mesh_is_written_back_in_the_options_form(mesh_shape, names, text):
    assert mesh_text(mesh_shape, names) == text
    assert resolve(message((Replicate(),) * len(mesh_shape)), text, None).mesh_shape == mesh_shape
