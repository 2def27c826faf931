"""What a 'Sharding propagation failed for aten.view' message is about (explain/focus.py), against
torch: every view here is also run as a real DTensor ``view`` on simulated ranks, and the
explainer's re-run of the view rule must give the same placements, or the same refusal, and
the same kind of error as torch's own message.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from dtensor_attn import _compat
from dtensor_attn.explain.focus import reclassify, shape_text, strided_focus, view_facts, view_focus, view_lines
from dtensor_attn.explain.message import Message, MessageKind, read_message
from dtensor_attn.explain.symbolic import Sizes, Verdict, decode_verdicts
from dtensor_attn.testing.harness.simulate import simulated_mesh


@functools.cache
def real_view(axes: tuple, shape: tuple, placements: tuple, target: tuple):
    """The placements of a real DTensor view, or the error torch raises."""
    with simulated_mesh(dict(axes)) as mesh:
        try:
            return tuple(distribute_tensor(torch.zeros(shape), mesh, list(placements)).view(target).placements)
        except Exception as error:  # noqa: BLE001 - torch's refusal is the expectation
            return error


def local_shape(axes: tuple, shape: tuple, placements: tuple) -> tuple[int, ...]:
    """The shape rank 0 holds of a ``shape`` tensor placed ``placements``."""
    with simulated_mesh(dict(axes)) as mesh:
        x = distribute_tensor(torch.zeros(shape), mesh, list(placements)).to_local()
        return tuple(_compat.rank_tensors(x)[0].shape)


def propagation_failed(shape, placements, target) -> Message:
    return Message(MessageKind.PROPAGATION_FAILED, line="Sharding propagation failed for aten.view.default",
                   placements=placements, global_shape=shape, view_shape=target)


S = _compat.strided_shard
# (mesh axes, shape, placements, view target, the kind torch 2.11 would report, the explainer's
# answer where this torch refuses: torch 2.13's, for the flattens flatten_placements has a rule for)
VIEWS = [
    ("BL-to-T-cp2", (("cp", 2),), (4, 8), (Shard(1),), (32,), MessageKind.FLATTEN_SHARDED, (S(0, 4),)),
    ("packed-S2-merge-tp2", (("tp", 2),), (16, 4, 8), (Shard(2),), (16, 32), MessageKind.FLATTEN_SHARDED,
     (S(1, 4),)),
    ("split-and-merge-tp4", (("tp", 4),), (8, 2, 12), (Shard(2),), (2, 4, 24), MessageKind.FLATTEN_SHARDED, None),
    ("replicate-then-merge", (("dp", 2), ("cp", 2)), (4, 8), (Replicate(), Shard(1)), (32,),
     MessageKind.FLATTEN_SHARDED, (Replicate(), S(0, 4))),
    ("unflatten-uneven-head", (("tp", 4),), (8, 4), (Shard(0),), (2, 4, 4), MessageKind.UNFLATTEN_UNEVEN, None),
    ("unflatten-uneven-inner", (("tp", 4),), (2, 12), (Shard(1),), (2, 3, 4), MessageKind.UNFLATTEN_UNEVEN, None),
    ("flatten-uneven", (("tp", 4),), (6, 4), (Shard(0),), (24,), MessageKind.FLATTEN_UNEVEN, None),
    ("drop-sharded-size-1", (("tp", 1),), (4, 1, 8), (Shard(1),), (4, 8), MessageKind.RESHAPE_SHARDED, None),
]


@pytest.mark.parametrize("axes,shape,placements,target,kind,ours", [v[1:] for v in VIEWS], ids=[v[0] for v in VIEWS])
def test_the_rerun_view_rule_gives_torchs_answer_or_refusal_and_kind(axes, shape, placements, target, kind, ours):
    real = real_view(axes, shape, placements, target)
    message = propagation_failed(shape, placements, target)
    facts = view_facts(message, tuple(s for _, s in axes))
    assert (facts.in_shape, facts.out_shape, facts.placements) == (shape, target, placements)
    if isinstance(real, Exception):
        first_sentence = " ".join(str(real).split()).split(". ")[0]
        assert facts.refusal.startswith(first_sentence) and facts.answer == ours
        assert read_message(str(real)).kind is kind  # torch's own words, read as the explainer reads them
    elif not any(isinstance(p, _compat.StridedShard) for p in real):
        # this torch answers without a _StridedShard (torch 2.11 drops a sharded size-1 dim into R):
        # no message arises, and the explainer says what this torch answers
        assert (facts.answer, facts.refusal) == (real, None)
        assert reclassify(message, facts) == (message, None)
        return
    else:
        assert (facts.answer, facts.refusal) == (real, None)
        if ours is not None:  # the explainer's torch 2.13 answer is torch 2.13's
            assert real == ours
    reclassified, note = reclassify(message, facts)
    assert reclassified.kind is kind and note.startswith("the message does not say why; ")


ANSWERED, REFUSED = "this torch's view rule answers it: ", "torch 2.13's view rule (this torch refuses) answers it: "


# The last line depends on this torch: where its rule answers the view, its answer; where it
# refuses, torch 2.13's (the explainer's flatten_placements), for the flattens it has a rule for.
@pytest.mark.parametrize("axes,shape,placements,target,lines,if_answered,if_refused", [
    ((("cp", 2),), (4, 8), (Shard(1),), (32,), [
        "the view (4, 8) -> (32,) merges dims (0, 1) into dim 0; dim 1 (not the first of them) is sharded"],
     ANSWERED + "(_S(0, 4)) on (32,) (a _StridedShard, no error)",
     REFUSED + "(_S(0, 4)) on (32,) (a _StridedShard, no error)"),
    ((("cp", 2),), (4, 8), (Shard(0),), (32,), ["the view (4, 8) -> (32,) merges dims (0, 1) into dim 0"],
     ANSWERED + "(S(0)) on (32,)", None),
    ((("tp", 4),), (8, 4), (Shard(0),), (2, 4, 4), ["the view (8, 4) -> (2, 4, 4) splits dim 0, which is sharded"],
     None, None),
    ((("tp", 1),), (4, 1, 8), (Shard(1),), (4, 8), ["the view (4, 1, 8) -> (4, 8) drops dim 1, which is sharded"],
     ANSWERED + "(R) on (4, 8)", None),
], ids=["merge-inner-sharded", "merge-outer-sharded", "split", "drop"])
def test_what_the_view_does_to_each_dim(axes, shape, placements, target, lines, if_answered, if_refused):
    last = if_refused if isinstance(real_view(axes, shape, placements, target), Exception) else if_answered
    expected = lines + ([last] if last is not None else [])
    mesh_shape = tuple(s for _, s in axes)
    assert view_lines(view_facts(propagation_failed(shape, placements, target), mesh_shape), None) == expected


def test_the_packed_output_reading_matches_what_each_rank_holds():
    # A (T, N/tp, H) tensor per rank labelled Shard(2) claims (T, N/tp, H*tp): torch's local shard
    # under that label is (16, 4, 4), which the reading must call (B*L, N/tp, H).
    shape, placements, target = (16, 4, 8), (Shard(2),), (16, 32)
    local = local_shape((("tp", 2),), shape, placements)
    message = propagation_failed(shape, placements, target)
    facts = view_facts(message, (2,))
    reclassified, _ = reclassify(message, facts)
    focus = view_focus(reclassified, facts, (2,), ("tp",))
    true = (local[0], local[1] * 2, local[2])
    assert focus.mislabel == (
        f"read as a packed output: each rank holds {shape_text(local)} = (B*L, N/tp, H), so the true "
        f"global shape is {shape_text(true)} and the label should be Shard(1); the declared Shard(2) "
        "claims (16, 4, 8) = (B*L, N/tp, H*tp)")
    assert (focus.dim, focus.merged, focus.ndim, focus.view, focus.axis_name) == (2, (1, 2), 3, "(16, 4, 8) -> (16, 32)", "tp")


@pytest.mark.parametrize("shape,placements,target,mesh_shape", [
    ((16, 4, 8), (Shard(1),), (16, 32), (2,)),  # heads sharded: no mislabel
    ((16, 4, 6), (Shard(2),), (16, 24), (4,)),  # head_dim 6 does not split 4 ways
    ((2, 16, 4, 8), (Shard(3),), (2, 16, 32), (2,)),  # 4-D: not a packed output
], ids=["heads-sharded", "indivisible", "four-dims"])
def test_no_packed_output_reading_where_it_cannot_be_one(shape, placements, target, mesh_shape):
    message = propagation_failed(shape, placements, target)
    facts = view_facts(message, mesh_shape)
    assert view_focus(reclassify(message, facts)[0], facts, mesh_shape, None).mislabel is None


def test_an_uneven_split_is_focused_on_the_dim_split_with_its_sizes():
    axes, shape, placements, target = (("tp", 4),), (2, 12), (Shard(1),), (2, 3, 4)
    told = read_message(str(real_view(axes, shape, placements, target)))
    if told.dim_size is not None:  # torch 2.13 prints the sizes: piece 0, size 3, axis 0 of 4
        assert (told.dim, told.dim_size, told.axis, told.axis_size) == (0, 3, 0, 4)
    message = Message(MessageKind.UNFLATTEN_UNEVEN, placements=placements, global_shape=shape,
                      view_shape=target, dim=0, dim_size=3, axis=0, axis_size=4)
    focus = view_focus(message, view_facts(message, (4,)), (4,), ("tp",))
    assert focus.dim == 1  # the tensor dim split, not torch's piece number
    assert focus.sizes == "piece 0 of the split has size 3, not a multiple of the 4 ranks of mesh axis 0"


@pytest.mark.parametrize("size,ways", [(6, 4), (10, 4), (5, 8)], ids=["6-over-4", "10-over-4", "5-over-8"])
def test_an_uneven_flatten_names_torch_chunks_pieces(size, ways):
    shape, placements = (size, 2), (Shard(0),)
    message = Message(MessageKind.FLATTEN_UNEVEN, placements=placements, global_shape=shape, view_shape=(2 * size,), dim=0)
    focus = view_focus(message, view_facts(message, (ways,)), (ways,), None)
    pieces = [len(c) for c in torch.arange(size).chunk(ways)]
    pieces += [0] * (ways - len(pieces))
    listed = ", ".join(map(str, pieces[:8]))
    assert focus.sizes == f"dim 0 has size {size} and mesh axis 0 has {ways} ranks: torch.chunk pieces {listed}"


@pytest.mark.parametrize("message,mesh_shape", [
    (Message(MessageKind.PROPAGATION_FAILED, placements=(Shard(0),), global_shape=(4, 8)), (2,)),
    (Message(MessageKind.PROPAGATION_FAILED, placements=(Shard(0),), view_shape=(32,)), (2,)),
    (Message(MessageKind.PROPAGATION_FAILED, global_shape=(4, 8), view_shape=(32,)), (2,)),
    (propagation_failed((4, 8), (Shard(0),), (32,)), None),
    (propagation_failed((4, 8), (Shard(0),), (32,)), (2, 2)),
], ids=["no-target", "no-shape", "no-placements", "no-mesh", "mesh-of-other-rank"])
def test_no_view_facts_without_everything_the_rule_needs(message, mesh_shape):
    assert view_facts(message, mesh_shape) is None
    assert view_lines(None, None) == [] and reclassify(message, None) == (message, None)


def test_shapes_that_are_no_view_of_each_other_are_said_so():
    facts = view_facts(propagation_failed((4, 8), (Shard(0),), (5, 6)), (2,))
    assert (facts.sources, facts.answer, facts.refusal) == (None, None, "not a view of these shapes")
    assert facts.split_dims() == [] and facts.merged_with(0) is None


def test_a_message_that_says_why_is_not_reclassified():
    message = Message(MessageKind.FLATTEN_SHARDED, placements=(Shard(1),), global_shape=(4, 8), view_shape=(32,), dim=1)
    assert reclassify(message, view_facts(message, (2,))) == (message, None)


@pytest.mark.parametrize("placements,names,expected", [
    ((_compat.strided_shard(1, 8),), None, dict(dim=1, split_factor=8, strided_text="_S(1, 8)", later_axes=(), axis_name="tp")),
    ((_compat.strided_shard(0, 4), Shard(1)), None, dict(dim=0, split_factor=4, later_axes=(), axis_name="cp")),
    ((_compat.strided_shard(0, 2), Shard(0)), ("dp", "cp"), dict(dim=0, split_factor=2, later_axes=(1,), axis_name="dp")),
    ((_compat.strided_shard(0, 1), Shard(0)), None, dict(dim=None, split_factor=None)),
], ids=["one-axis-inner-dim", "packed-tokens", "named-conditional", "everything-decodes"])
def test_the_focus_is_the_first_strided_shard_that_may_not_decode(placements, names, expected):
    focus = strided_focus(decode_verdicts(placements, Sizes(len(placements))), placements, names)
    assert {key: getattr(focus, key) for key in expected} == expected


def test_a_decoding_verdict_is_passed_over_for_the_next():
    first, second = _compat.strided_shard(0, 1), _compat.strided_shard(1, 4)
    verdicts = [Verdict(0, first, True, "decodes"), Verdict(1, second, False, "never")]
    focus = strided_focus(verdicts, (first, second), ("cp", "tp"))
    assert (focus.dim, focus.split_factor, focus.axis_name) == (1, 4, "tp")
