"""The outcome agreement as pure values: every rank computes one verdict from the same reports."""

from __future__ import annotations

import pytest

from dtensor_attn.testing.harness.agreement import (
    RankReport, collection_difference, group_counts, judge,
    out_of_step, silent_report,
)
from dtensor_attn.testing.harness.outcome import Outcome

NODE = "tests/distributed/test_x.py::test_y[tp2]"


def report(rank, outcome=Outcome.PASSED, at=100.0, text="", counts=()):
    return RankReport(rank=rank, outcome=outcome, at=at, text=text, counts=counts)


def test_all_passed_or_all_skipped_is_that_outcome():
    assert judge(NODE, "call", {0: report(0), 1: report(1)}, timeout_s=5).outcome == Outcome.PASSED
    skipped = {r: report(r, Outcome.SKIPPED, text="mesh tp=4 needs 4 ranks") for r in range(2)}
    verdict = judge(NODE, "setup", skipped, timeout_s=5)
    assert (verdict.outcome, verdict.text, verdict.stop_reason) == (Outcome.SKIPPED, "", "")


def test_one_rank_failing_fails_every_rank_and_names_it_root_cause():
    reports = {0: report(0), 1: report(1, Outcome.FAILED, at=100.5, text="AssertionError: boom"),
               2: report(2)}
    verdict = judge(NODE, "call", reports, timeout_s=5)
    assert verdict.outcome == Outcome.FAILED and verdict.root_ranks == (1,)
    assert verdict.lost_ranks == () and verdict.stop_reason == ""
    lines = verdict.text.splitlines()
    assert lines[0] == "failed in call on rank 1 first (root cause); every rank fails it."
    assert lines[1] == "  rank 0: passed locally; failed because another rank failed (collateral)"
    assert lines[2] == "  rank 1: failed first (root cause)"
    assert "===== rank 1 (root cause) =====\nAssertionError: boom" in verdict.text


def test_the_earliest_failure_is_the_root_cause_and_later_ones_are_listed():
    reports = {0: report(0, Outcome.FAILED, at=101.0, text="RuntimeError: Connection closed by peer"),
               1: report(1, Outcome.FAILED, at=100.0, text="ValueError: planted")}
    verdict = judge(NODE, "call", reports, timeout_s=5)
    assert verdict.root_ranks == (1,)
    assert "  rank 0: failed too, +1.000 s after the first failure" in verdict.text
    # The root cause's traceback comes first, then the collateral one.
    assert verdict.text.index("ValueError: planted") < verdict.text.index("Connection closed")


def test_stuck_rank_is_collateral_and_stops_the_run():
    reports = {0: report(0, Outcome.STUCK, at=103.0, text="stuck: still in the call of x 1 s after ..."),
               1: report(1, Outcome.FAILED, at=100.0, text="RuntimeError: before the all_reduce")}
    verdict = judge(NODE, "call", reports, timeout_s=5)
    assert verdict.root_ranks == (1,) and verdict.lost_ranks == (0,)
    assert "  rank 0: stuck: still in the call of x 1 s after ..." in verdict.text
    assert verdict.stop_reason.startswith(f"stopping the run after {NODE} (call): rank 0 stuck")


def test_hung_rank_is_root_cause_over_ranks_stuck_waiting_for_it():
    reports = {0: report(0, Outcome.STUCK, at=105.0, text="stuck: waiting in all_reduce"),
               1: report(1, Outcome.HUNG, at=105.1, text="hung: the call ran past the 5 s timeout")}
    verdict = judge(NODE, "call", reports, timeout_s=5)
    assert verdict.root_ranks == (1,) and verdict.lost_ranks == (0, 1)
    assert "  rank 1: hung: the call ran past the 5 s timeout (root cause)" in verdict.text


def test_missing_report_is_root_cause_when_nobody_failed_and_stops_the_run():
    verdict = judge(NODE, "teardown", {0: report(0), 1: None}, timeout_s=7)
    assert verdict.outcome == Outcome.FAILED and verdict.root_ranks == (1,) == verdict.lost_ranks
    assert "  rank 1: no report within 7 s: it died or hung (see its log)" in verdict.text
    assert "rank 1 sent no report" in verdict.stop_reason


def test_rank_dependent_skip_is_a_failure_naming_the_skipping_rank():
    reports = {0: report(0), 1: report(1, Outcome.SKIPPED, text="only on rank 1")}
    verdict = judge(NODE, "setup", reports, timeout_s=5)
    assert verdict.outcome == Outcome.FAILED and verdict.root_ranks == (1,)
    assert "skipped on ranks [1] (only on rank 1), not skipped on ranks [0]" in verdict.text


def test_pending_collective_is_out_of_step_and_stops_even_a_passing_test():
    ahead = group_counts([((0, 1), 3)])
    behind = group_counts([((0, 1), 2)])
    verdict = judge(NODE, "call", {0: report(0, counts=ahead), 1: report(1, counts=behind)},
                    timeout_s=5)
    assert verdict.outcome == Outcome.FAILED and verdict.root_ranks == (1,)
    assert "collectives out of step on the group of ranks [0, 1]: rank 0 issued 3, rank 1 " \
           "issued 2" in verdict.stop_reason


def test_groups_are_compared_only_between_their_members():
    # tp groups {0,1} and {2,3} ran different numbers of collectives: both in step inside.
    counts = {0: [((0, 1, 2, 3), 1), ((0, 1), 4)], 1: [((0, 1, 2, 3), 1), ((0, 1), 4)],
              2: [((0, 1, 2, 3), 1), ((2, 3), 9)], 3: [((0, 1, 2, 3), 1), ((2, 3), 9)]}
    reports = {r: report(r, counts=group_counts(c)) for r, c in counts.items()}
    assert out_of_step(reports) is None
    reports[3] = report(3, counts=group_counts([((0, 1, 2, 3), 1), ((2, 3), 8)]))
    text, lagging = out_of_step(reports)
    assert lagging == (3,) and "group of ranks [2, 3]: rank 2 issued 9, rank 3 issued 8" in text


def test_groups_with_the_same_ranks_are_told_apart_by_creation_order():
    assert group_counts([((0, 1), 5), ((0, 1), 2), ((0,), 1)]) == (
        (((0, 1), 0), 5), (((0, 1), 1), 2), (((0,), 0), 1),
    )


def test_rank_report_round_trips_through_json_and_truncates_long_text():
    original = report(3, Outcome.FAILED, at=1.5, text="x" * 30_000, counts=group_counts([((0, 3), 7)]))
    decoded = RankReport.from_json(original.to_json())
    assert (decoded.rank, decoded.outcome, decoded.at, decoded.counts) == (
        3, Outcome.FAILED, 1.5, original.counts)
    assert decoded.text.startswith("[... truncated ...]\n") and len(decoded.text) < 20_100


@pytest.mark.parametrize(
    "lists, expected",
    [
        ({0: ["a", "b"], 1: ["a", "b"]}, None),
        ({0: ["a", "b"], 1: ["a", "b", "c"]},
         "rank 1 collected 3 tests, rank 0 2; only on rank 1: c"),
        ({0: ["a", "b"], 1: ["a"]}, "rank 1 collected 1 tests, rank 0 2; missing on rank 1: b"),
        ({0: ["a", "b"], 1: ["b", "a"]},
         "same tests in another order, from position 0: rank 0 runs a, rank 1 runs b"),
    ],
    ids=["same", "extra", "missing", "order"],
)
def test_collection_difference_names_ranks_and_tests(lists, expected):
    difference = collection_difference(lists)
    if expected is None:
        assert difference is None
    else:
        assert expected in difference and difference.startswith("ranks collected different tests")


def test_out_of_step_verdict_lists_the_lagging_rank_as_root_cause():
    verdict = judge(NODE, "call", {0: report(0, counts=group_counts([((0, 1), 3)])),
                                   1: report(1, counts=group_counts([((0, 1), 2)]))},
                    timeout_s=5)
    assert verdict.text.splitlines()[1:3] == [
        "  rank 0: passed locally; failed because another rank failed (collateral)",
        "  rank 1: passed (root cause)",
    ]


# -- the culprit is the rank that diverged first (issue #15) ---------------------------------

def test_a_rank_that_skipped_alone_is_root_cause_over_the_rank_stuck_waiting_for_it():
    reports = {0: report(0, Outcome.STUCK, at=103.0, text="stuck: still in the call of x 1.7 s after "
                         "rank 1 skipped it, waiting in all_reduce (called from t.py:9)"),
               1: report(1, Outcome.SKIPPED, at=101.3, text="Skipped: only on rank 1")}
    verdict = judge(NODE, "call", reports, timeout_s=5)
    assert verdict.root_ranks == (1,) and verdict.lost_ranks == (0,)
    lines = verdict.text.splitlines()
    assert lines[0] == "failed in call on rank 1 first (root cause); every rank fails it."
    assert lines[1].startswith("  rank 0: stuck: still in the call of x") and \
        lines[1].endswith("(collateral)")
    assert lines[2] == ("  rank 1: skipped locally (Skipped: only on rank 1) while rank 0 did "
                        "not (root cause)")
    assert "Every rank must skip alike" in verdict.text
    assert "rank 0 stuck" in verdict.stop_reason


def test_a_rank_that_went_silent_is_root_cause_over_the_connection_reset_it_caused():
    gone = silent_report(1, nodeid=NODE, when="call", began_phase=True, last_beat_at=100.0,
                         silent_s=2.04)
    reports = {0: report(0, Outcome.FAILED, at=100.2, text="RuntimeError: [pair.cc:537] Read error: "
                         "Connection reset by peer"), 1: gone}
    verdict = judge(NODE, "call", reports, timeout_s=5)
    assert verdict.root_ranks == (1,) and verdict.lost_ranks == (1,)
    lines = verdict.text.splitlines()
    assert lines[0] == "failed in call on rank 1 first (root cause); every rank fails it."
    assert lines[1] == ("  rank 0: failed too, +0.200 s after rank 1's last heartbeat "
                        "(collateral)")
    assert lines[2] == (f"  rank 1: went silent during the call of {NODE}: no report and no "
                        "heartbeat for 2.0 s: it exited, was killed, or holds the GIL in a call "
                        "that does not return (see its log) (root cause)")
    assert "rank 1 silent" in verdict.stop_reason
    assert "===== rank 0 (failed) =====\nRuntimeError: [pair.cc:537]" in verdict.text


def test_a_silent_rank_is_root_cause_over_a_rank_stuck_in_a_collective():
    # One rank holds the GIL (its watchdog cannot report); the other waits in all_reduce.
    reports = {0: report(0, Outcome.STUCK, at=104.0, text="stuck: waiting in all_reduce"),
               1: silent_report(1, nodeid=NODE, when="call", began_phase=True,
                                last_beat_at=101.0, silent_s=3.0)}
    verdict = judge(NODE, "call", reports, timeout_s=5)
    assert verdict.root_ranks == (1,) and verdict.lost_ranks == (0, 1)
    assert "  rank 0: stuck: waiting in all_reduce (collateral)" in verdict.text


def test_a_rank_that_vanished_between_phases_says_so():
    gone = silent_report(2, nodeid=NODE, when="setup", began_phase=False, last_beat_at=1.0,
                         silent_s=4.0)
    assert gone.text.startswith(f"went silent before the setup of {NODE}, after its previous "
                                "phase: no report and no heartbeat for 4.0 s")


def test_the_earliest_divergence_wins_between_a_failure_and_a_later_silence():
    reports = {0: report(0, Outcome.FAILED, at=100.0, text="AssertionError: real bug"),
               1: silent_report(1, nodeid=NODE, when="call", began_phase=True,
                                last_beat_at=100.9, silent_s=2.0)}
    assert judge(NODE, "call", reports, timeout_s=5).root_ranks == (0,)


def test_a_rank_that_passed_without_joining_is_root_cause_over_the_stuck_rank():
    # Rank 1 returned early; rank 0 is stuck in the all_reduce rank 1 never issued.
    reports = {0: report(0, Outcome.STUCK, at=105.0, text="stuck: the call ran past the 5 s timeout",
                         counts=group_counts([((0, 1), 3)])),
               1: report(1, Outcome.PASSED, at=100.0, counts=group_counts([((0, 1), 2)]))}
    verdict = judge(NODE, "call", reports, timeout_s=5)
    assert verdict.root_ranks == (1,) and verdict.lost_ranks == (0,)
    assert "  rank 1: passed (root cause)" in verdict.text
    assert "rank 0 issued 3, rank 1 issued 2" in verdict.text


def test_ranks_all_stuck_with_nobody_diverging_are_all_named():
    reports = {r: report(r, Outcome.STUCK, at=105.0 + r, text="stuck: waiting") for r in (0, 1)}
    assert judge(NODE, "call", reports, timeout_s=5).root_ranks == (0, 1)
