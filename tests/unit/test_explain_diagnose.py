"""The trace's checks as pure functions over recorded events: no ranks, no tensors.

Legend: B batch, L seq, N heads (q or kv: the name says which), H head_dim, D model dim,
T packed tokens (B*L).

Each event is written out as the tracer would record it; the report of the seed bug is pinned
with expecttest (``EXPECTTEST_ACCEPT=1`` rewrites it after an intended change).
"""

from __future__ import annotations

import expecttest
import pytest

from dtensor_attn.explain.records import FindingKind, Severity
from dtensor_attn._compat import Partial, Replicate, Shard, strided_shard
from dtensor_attn.explain import PlacementTrace, TensorRecord, TraceEvent
from dtensor_attn.explain.diagnose import diagnose
from dtensor_attn.explain.mislabel import check_local_map

TP = dict(mesh_shape=(4,), mesh_names=("tp",))
CP_TP = dict(mesh_shape=(2, 2), mesh_names=("cp", "tp"))


def record(placements, shape, mesh, producer=None, name=""):
    return TensorRecord(tuple(placements), tuple(shape), producer=producer, name=name, **mesh)


def boundary(in_placements, in_shape, out_placements, out_shape, mesh=TP, index=0):
    """A local_map call: q in, one declared output (global shape as from_local computed it)."""
    return TraceEvent(
        index,
        "local_map(kernel)",
        "attn (Wrapper)",
        [record(in_placements, in_shape, mesh, name="q_BLNH")],
        [record(out_placements, out_shape, mesh, producer=index)],
        is_local_map=True,
    )


def test_seed_label_is_an_error_that_names_heads_dim_1():
    # q_BLNH (B=2, L=4, N=8, H=3) with S(2) on tp=4 -> kernel returns local TNH (8, 2, 3)
    (finding,) = check_local_map(boundary([Shard(2)], (2, 4, 8, 3), [Shard(2)], (8, 2, 12)))
    assert (finding.severity, finding.kind, finding.event) == (Severity.ERROR, FindingKind.MISLABEL, 0)
    text = "\n".join(finding.lines)
    assert "the kernel returned a TNH tensor (local shape (8, 2, 3)) from q_BLNH in BLNH" in text
    assert "in the packed TNH layout heads is dim 1, so the output should be Shard(1) on tp" in text
    assert "(B*L, N/tp, H*tp) = (8, 2, 12) instead of (B*L, N, H) = (8, 8, 3)" in text
    assert finding.fix.startswith("declare out_placements (S(1)) for output 0")


def test_correct_label_passes():
    assert check_local_map(boundary([Shard(2)], (2, 4, 8, 3), [Shard(1)], (8, 8, 3))) == []


def test_same_local_sizes_make_it_a_warning():
    """N/tp == H: shapes alone cannot tell heads from head_dim, so no error is claimed."""
    (finding,) = check_local_map(boundary([Shard(2)], (2, 4, 8, 2), [Shard(2)], (8, 2, 8)))
    assert finding.severity == Severity.WARNING
    assert "shapes alone cannot tell" in finding.lines[-1]


@pytest.mark.parametrize("algebra", ["torch", "torch-2.11"])
def test_packed_tokens_under_cp_must_be_strided(request, algebra):
    """Also where DTensor's view algebra refuses to flatten a sharded seq (torch 2.11, where
    this project's seed bug was seen): the debugger then judges with our flatten rule."""
    if algebra == "torch-2.11":
        request.getfixturevalue("torch211_view_algebra")
    good = boundary([Shard(1), Shard(2)], (2, 4, 4, 3), [strided_shard(0, 2), Shard(1)], (8, 4, 3), CP_TP)
    bad = boundary([Shard(1), Shard(2)], (2, 4, 4, 3), [Shard(0), Shard(1)], (8, 4, 3), CP_TP)
    assert check_local_map(good) == []
    (finding,) = check_local_map(bad)
    assert "each rank's tokens (dim 0) are strided, so the output should be _S(0, 2) on cp" in finding.lines[1]
    assert not any("claims global shape" in line for line in finding.lines)  # the shape is right


def test_unnamed_layouts_get_a_generic_message():
    # (A, C, D) with C sharded, kernel flattens (C, D): output dim 1 carries the shard
    event = boundary([Shard(1)], (4, 6, 2), [Shard(0)], (8, 6), mesh=dict(mesh_shape=(2,), mesh_names=None))
    (finding,) = check_local_map(event)
    assert finding.lines[0].startswith("output dim 1 is made of q_BLNH dim(s) (1, 2), sharded on axis0")
    assert finding.fix == "declare out_placements (S(1)) for output 0"


@pytest.mark.parametrize(
    "out_placements, out_shape",
    [
        ([Partial("sum")], (8, 8, 3)),  # a reduction the kernel did: not a layout question
        ([Replicate()], (8, 8, 3)),
        ([Shard(0)], (8, 3)),  # numel differs from q's: q is not its source
    ],
)
def test_outputs_that_are_not_a_view_of_an_input_are_not_judged(out_placements, out_shape):
    assert check_local_map(boundary([Shard(2)], (2, 4, 8, 3), out_placements, out_shape)) == []


def seed_events(view_error: str | None = None) -> list[TraceEvent]:
    view = TraceEvent(
        2,
        "aten.view.default",
        "Block",
        [record([Shard(2)], (8, 2, 12), TP, producer=1)],
        [] if view_error else [record([strided_shard(2, 2)], (2, 4, 24), TP, producer=2)],
        error=view_error,
    )
    mul = TraceEvent(0, "aten.mul.Tensor", "Block", [record([Shard(2)], (2, 4, 8, 3), TP)])
    mul.outputs.append(record([Shard(2)], (2, 4, 8, 3), TP, producer=0))
    wrapper = boundary([Shard(2)], (2, 4, 8, 3), [Shard(2)], (8, 2, 12), index=1)
    wrapper.inputs[0] = record([Shard(2)], (2, 4, 8, 3), TP, producer=0, name="q_BLNH")
    return [mul, wrapper, view]


def test_first_strided_shard_is_linked_to_the_label_behind_it():
    strided, mislabel = sorted(diagnose(seed_events()), key=lambda f: f.kind != FindingKind.STRIDED)
    assert (strided.kind, strided.severity, strided.cause) == (FindingKind.STRIDED, Severity.ERROR, 1)
    assert mislabel.event == 1


def test_failed_view_on_torch_2_11_is_linked_too():
    error = "RuntimeError: Attempted to flatten multiple dimensions, with dimension 2 being sharded"
    failure = [f for f in diagnose(seed_events(error)) if f.kind == FindingKind.FAILURE]
    assert failure[0].title == f"propagation failed at #2 aten.view.default in Block: {error}"
    assert failure[0].cause == 1


def test_a_strided_shard_with_no_label_to_blame_is_a_note():
    events = seed_events()
    events[1].outputs[0] = record([Shard(1)], (8, 8, 3), TP, producer=1)  # a correct label
    events[2].inputs[0] = record([Shard(1)], (8, 8, 3), TP, producer=1)
    (note,) = diagnose(events)
    assert (note.kind, note.severity, note.cause) == (FindingKind.STRIDED, Severity.NOTE, None)


class TestSeedReport(expecttest.TestCase):
    def test_report(self):
        events = seed_events()
        trace = PlacementTrace("Block", events, diagnose(events))
        self.assertFalse(trace.ok)
        self.assertExpectedInline(trace.render(), """\
placement trace of Block: 2 DTensor ops, 1 local_map call; 2 errors, 0 warnings

PROBLEM: first _StridedShard at #2 aten.view.default in Block: (S(2)) (8, 2, 12) -> (_S(2, 2)) (2, 4, 24)
  _S(2, 2) on axis 0: does not decode to a shard order: split factor 2 is not a product of the sizes of later mesh axes sharding dim 2 (later axes: none; decodable split factors: 1)
  flatten: dim 2 (size 24) = flatten of (2, 12) with the 12 sharded on axis 0 (tp), 4 ranks (3 per rank in each of the 2 blocks): a DTensor view of a (2, 4, 2, 12) tensor with placements (S(3)) as (2, 4, 24) produces exactly this
  likely cause: #1 local_map(kernel) in attn (Wrapper): output 0 declared (S(2)), which does not match the kernel's output layout
    the kernel returned a TNH tensor (local shape (8, 2, 3)) from q_BLNH in BLNH ((S(2)), local shape (2, 4, 2, 3)) on mesh {'tp': 4}
    in the packed TNH layout heads is dim 1, so the output should be Shard(1) on tp; the declared Shard(2) is head_dim x tp
    so the DTensor claims global shape (B*L, N/tp, H*tp) = (8, 2, 12) instead of (B*L, N, H) = (8, 8, 3)
    fix: declare out_placements (S(1)) for output 0: derive it from the kernel's output layout, infer_out_placements(in_placements, Layout.BLNH, Layout.TNH, ...), instead of copying the input's placements

events:
  #0 aten.mul.Tensor in Block: (S(2)) (2, 4, 8, 3) -> (S(2)) (2, 4, 8, 3)
  #1 local_map(kernel) in attn (Wrapper): q_BLNH (S(2)) (2, 4, 8, 3) -> declared (S(2)) (8, 2, 12)  <--
  #2 aten.view.default in Block: (S(2)) (8, 2, 12) -> (_S(2, 2)) (2, 4, 24)  <--""")


def test_negative_dims_are_normalised_before_judging():
    """docs/bugs.md row 9: Shard(-2) on a 4-D input is Shard(2); Shard(-1) on a 3-D output is Shard(2)."""
    (finding,) = check_local_map(boundary([Shard(-2)], (2, 4, 8, 3), [Shard(-1)], (8, 2, 12)))
    assert "heads is dim 1, so the output should be Shard(1)" in finding.lines[1]
    assert check_local_map(boundary([Shard(-2)], (2, 4, 8, 3), [Shard(-2)], (8, 8, 3))) == []


def long_run(num_ops: int) -> list[TraceEvent]:
    """``num_ops`` harmless ops, then the seed's boundary and view at the end."""
    events = []
    for i in range(num_ops):
        event = TraceEvent(i, "aten.add.Tensor", "", [record([Shard(2)], (2, 4, 8, 3), TP)])
        event.outputs.append(record([Shard(2)], (2, 4, 8, 3), TP, producer=i))
        events.append(event)
    wrapper = boundary([Shard(2)], (2, 4, 8, 3), [Shard(2)], (8, 2, 12), index=num_ops)
    view = TraceEvent(num_ops + 1, "aten.view.default", "", [record([Shard(2)], (8, 2, 12), TP, num_ops)])
    view.outputs.append(record([strided_shard(2, 2)], (2, 4, 24), TP, producer=num_ops + 1))
    return [*events, wrapper, view]


def test_long_logs_are_cut_but_keep_the_flagged_events():
    events = long_run(100)
    text = PlacementTrace("model", events, diagnose(events)).render(max_events=5)
    log = text.split("events:\n")[1].splitlines()
    assert [line.split()[0] for line in log[:-1]] == ["#0", "#1", "#2", "#3", "#4", "#100", "#101"]
    assert log[-1] == "  ... 97 more events not shown"


def test_header_counts_and_labels():
    events = [boundary([Shard(2)], (2, 4, 8, 2), [Shard(2)], (8, 2, 8))]  # ambiguous: a warning
    trace = PlacementTrace("model", events, diagnose(events), error=ZeroDivisionError("boom"))
    text = trace.render()
    assert text.startswith("placement trace of model: 0 DTensor ops, 1 local_map call; 0 errors, 1 warning")
    assert "\nwarning: #0 local_map(kernel) in attn (Wrapper): output 0 declared (S(2))" in text
    assert "the call raised ZeroDivisionError: boom" in text
    assert trace.ok and trace.first_problem is None
