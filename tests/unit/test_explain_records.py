"""A trace's values and the checks over them (records.py, diagnose.py, mislabel.py), on
hand-made events: what a report leads with, how values print, which local_map a later
_StridedShard or failure is tied to, and when a declared output is a mislabel."""

from __future__ import annotations

import itertools

from torch.distributed.tensor import Replicate, Shard

from dtensor_attn._compat import StridedShard
from dtensor_attn.explain.diagnose import diagnose
from dtensor_attn.explain.mislabel import check_local_map
from dtensor_attn.explain.records import (
    Finding, FindingKind, Severity, TensorRecord, TraceEvent, headline_order,
)


def _finding(severity, kind, event):
    return Finding(severity, kind, event, f"{severity.value} {kind.value} at {event}")


# one finding per (severity, kind) at each of two events, every event distinct: no ties
FINDINGS = [_finding(s, k, 10 * i + e) for i, (s, k, e) in
            enumerate(itertools.product(Severity, FindingKind, (1, 4)))]


def test_the_headline_is_the_first_error_that_is_not_a_mislabel_then_by_event():
    by_hand = sorted(FINDINGS, key=lambda f: (
        {"error": 0, "warning": 1, "note": 1}[f.severity.value],  # errors first, the rest alike
        f.kind.value == "mislabel", f.event))
    for permutation in itertools.islice(itertools.permutations(FINDINGS[::3]), 300):
        assert sorted(permutation, key=headline_order) == [f for f in by_hand if f in permutation]
    assert sorted(FINDINGS, key=headline_order) == by_hand


def record(placements, shape, *, mesh=(2,), producer=None, name=""):
    return TensorRecord(tuple(placements), tuple(shape), mesh, ("tp",) if len(mesh) == 1 else None,
                        producer, name)


def test_records_and_events_print_their_placements_and_shapes():
    q = record([Shard(2)], (8, 4, 8, 3), name="q")
    out = record([Shard(1)], (32, 8, 3), producer=0)
    op = TraceEvent(0, "aten.view.default", "attn", [q], [out])
    assert str(q) == "q (S(2)) (8, 4, 8, 3)" and str(out) == "(S(1)) (32, 8, 3)"
    assert op.where() == "#0 aten.view.default in attn"
    assert str(op) == "#0 aten.view.default in attn: q (S(2)) (8, 4, 8, 3) -> (S(1)) (32, 8, 3)"
    failed = TraceEvent(3, "aten.mm.default", "", [out], error="no rule")
    assert str(failed) == "#3 aten.mm.default: (S(1)) (32, 8, 3) -> FAILED: no rule"
    boundary = TraceEvent(1, "local_map(f)", "", [q], [out], is_local_map=True)
    assert "-> declared (S(1))" in str(boundary)


def _chain(declared, *, strided_later=True, error=None):
    """q -> local_map (declared output) -> a view of that output (strided or failing)."""
    q = record([Shard(2)], (2, 4, 8, 3), name="q")  # BLNH, heads sharded on tp=2
    packed = record(declared, (8, 8, 3) if declared == [Shard(1)] else (8, 4, 6), producer=0)
    view_out = record([StridedShard(1, split_factor=4)] if strided_later else [Shard(1)],
                      (8, 24), producer=1)
    return [
        TraceEvent(0, "local_map(packed_attention)", "attn", [q], [packed], is_local_map=True),
        TraceEvent(1, "aten.view.default", "block", [packed], [] if error else [view_out],
                   error=error),
    ]


def test_the_packed_output_labelled_with_the_blnh_head_shard_is_the_seed_bug():
    events = _chain([Shard(2)])
    (mislabel,) = check_local_map(events[0])
    assert (mislabel.severity, mislabel.kind, mislabel.event) == (
        Severity.ERROR, FindingKind.MISLABEL, 0)
    assert mislabel.fix.startswith("declare out_placements (S(1)) for output 0")
    findings = diagnose(events)
    assert [(f.kind, f.event, f.cause) for f in findings] == [
        (FindingKind.MISLABEL, 0, None), (FindingKind.STRIDED, 1, 0)]
    assert findings[1].severity is Severity.ERROR  # tied to its cause
    assert sorted(findings, key=headline_order)[0].kind is FindingKind.STRIDED


def test_a_correct_label_has_no_mislabel_and_a_later_strided_is_only_a_note():
    events = _chain([Shard(1)])
    assert check_local_map(events[0]) == []
    (strided,) = diagnose(events)
    assert (strided.kind, strided.severity, strided.cause) == (FindingKind.STRIDED, Severity.NOTE, None)
    assert strided.title.startswith("first _StridedShard at #1 aten.view.default in block: ")


def test_a_failure_after_a_mislabel_is_an_error_tied_to_it():
    findings = diagnose(_chain([Shard(2)], error="Sharding propagation failed"))
    failure = findings[-1]
    assert (failure.kind, failure.severity, failure.cause) == (FindingKind.FAILURE, Severity.ERROR, 0)
    assert failure.title == ("propagation failed at #1 aten.view.default in block: "
                             "Sharding propagation failed")
    assert failure.lines[0].startswith("inputs: (S(2)) (8, 4, 6)")


def test_a_failure_without_any_local_map_is_still_an_error():
    x = record([Shard(0)], (8, 8))
    (failure,) = diagnose([TraceEvent(0, "aten.mm.default", "", [x], error="boom")])
    assert (failure.kind, failure.severity, failure.cause) == (FindingKind.FAILURE, Severity.ERROR, None)


def test_only_the_first_strided_or_failure_is_reported():
    x = record([Shard(0)], (8, 8))
    events = [TraceEvent(i, f"op{i}", "", [x], error=f"boom {i}") for i in range(3)]
    assert [f.event for f in diagnose(events)] == [0]


def test_inputs_that_are_replicated_or_on_another_mesh_are_not_judged():
    q = record([Replicate()], (2, 4, 8, 3))
    other = record([Shard(2)], (2, 4, 8, 3), mesh=(4,))
    out = record([Shard(2)], (8, 4, 6))
    assert check_local_map(TraceEvent(0, "local_map(f)", "", [q, other], [out], is_local_map=True)) == []


def test_a_cause_must_be_an_ancestor():
    """A mislabelled local_map whose output the failing op never used is not its cause."""
    events = _chain([Shard(2)])
    unrelated = record([Shard(0)], (8, 8))
    events.append(TraceEvent(2, "aten.mm.default", "", [unrelated], error="boom"))
    events[1] = TraceEvent(1, "aten.add.default", "", [events[0].outputs[0]], [events[0].outputs[0]])
    findings = diagnose(events)
    assert [(f.kind, f.cause) for f in findings] == [(FindingKind.MISLABEL, None),
                                                     (FindingKind.FAILURE, None)]
