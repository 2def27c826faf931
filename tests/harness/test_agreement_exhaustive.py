"""The verdict (agreement.judge) over every combination of outcomes on 2 and 3 ranks, against
the rules of agreement.py's docstring written out independently here.

Each rank reports passed, skipped, failed, hung, stuck or silent, or sends no report (None);
the times at which they reported are permuted, since the root cause is the rank that diverged
first. No collective counts here (test_agreement.py covers out-of-step groups).
"""

from __future__ import annotations

import itertools

import pytest

from dtensor_attn.testing.harness.agreement import RankReport, judge
from dtensor_attn.testing.harness.outcome import Outcome

CHOICES = [*Outcome, None]  # None: the rank never reported
NODE = "t.py::test_x"


def _name(outcome) -> str:
    return "none" if outcome is None else outcome.value


def reports_of(outcomes, times):
    return {rank: None if outcome is None else
            RankReport(rank=rank, outcome=outcome, at=times[rank], text=f"{_name(outcome)} text")
            for rank, outcome in enumerate(outcomes)}


def expected_verdict(outcomes, times):
    """(outcome, root ranks, lost ranks, stops?) by the docstring's rules."""
    ranks = range(len(outcomes))
    problem = {Outcome.FAILED, Outcome.HUNG, Outcome.STUCK, Outcome.SILENT}
    problems = [r for r in ranks if outcomes[r] is None or outcomes[r] in problem]
    skipped = [r for r in ranks if outcomes[r] is Outcome.SKIPPED]
    if not problems:
        if len(set(outcomes)) == 1:
            return outcomes[0], (), (), False
        return Outcome.FAILED, tuple(skipped), (), False  # a rank-dependent skip
    diverged = {r: times[r] for r in ranks
                if outcomes[r] in (Outcome.FAILED, Outcome.HUNG, Outcome.SILENT)}
    present = [r for r in ranks if outcomes[r] is not None]
    if len(skipped) < len(present):  # skipped while another rank went on
        diverged.update({r: times[r] for r in skipped})
    diverged.update({r: float("inf") for r in ranks if outcomes[r] is None})
    if diverged:
        root = (min(diverged, key=lambda r: (diverged[r], r)),)
    else:
        root = tuple(r for r in ranks if outcomes[r] is Outcome.STUCK)
    lost = tuple(r for r in problems if outcomes[r] is not Outcome.FAILED)
    return Outcome.FAILED, root, lost, bool(lost)


def check(outcomes, times):
    verdict = judge(NODE, "call", reports_of(outcomes, times), timeout_s=5.0)
    outcome, root, lost, stops = expected_verdict(outcomes, times)
    assert (verdict.outcome, verdict.root_ranks, verdict.lost_ranks) == (outcome, root, lost), (
        outcomes, times)
    assert bool(verdict.stop_reason) == stops
    if outcome is not Outcome.FAILED:
        assert verdict.text == "" and verdict.stop_reason == ""
    elif all(o in (Outcome.PASSED, Outcome.SKIPPED) for o in outcomes):
        skipped = [r for r, o in enumerate(outcomes) if o is Outcome.SKIPPED]
        assert verdict.text.startswith(f"ranks disagree in call: skipped on ranks {skipped} ")
    else:
        head = verdict.text.splitlines()[0]
        assert head.startswith(f"failed in call on rank{'s' if len(root) > 1 else ''} "
                               f"{', '.join(map(str, root))} first (root cause)")
        for rank in range(len(outcomes)):
            assert f"  rank {rank}: " in verdict.text  # every rank gets its line


TWO = list(itertools.product(CHOICES, repeat=2))


@pytest.mark.parametrize("outcomes", TWO, ids=["-".join(map(_name, o)) for o in TWO])
@pytest.mark.parametrize("times", [(100.0, 101.0), (101.0, 100.0), (100.0, 100.0)],
                         ids=["rank0-first", "rank1-first", "same-time"])
def test_every_pair_of_outcomes(outcomes, times):
    check(outcomes, times)


@pytest.mark.parametrize("times", list(itertools.permutations((100.0, 101.0, 102.0))),
                         ids=lambda t: "".join(str(int(x) - 100) for x in t))
def test_every_triple_of_outcomes(times):
    for outcomes in itertools.product(CHOICES, repeat=3):
        check(outcomes, times)


@pytest.mark.parametrize("outcome", [Outcome.PASSED, Outcome.SKIPPED], ids=_name)
@pytest.mark.parametrize("world_size", [1, 2, 5, 8])
def test_ranks_that_agree_keep_their_outcome_at_any_size(outcome, world_size):
    reports = reports_of([outcome] * world_size, [100.0] * world_size)
    verdict = judge(NODE, "setup", reports, timeout_s=5.0)
    assert (verdict.outcome, verdict.root_ranks, verdict.text) == (outcome, (), "")


@pytest.mark.parametrize("world_size", [2, 4, 8])
def test_one_failing_rank_among_many_is_the_only_root_cause(world_size):
    for culprit in range(world_size):
        outcomes = [Outcome.FAILED if r == culprit else Outcome.PASSED for r in range(world_size)]
        verdict = judge(NODE, "call", reports_of(outcomes, [100.0] * world_size), timeout_s=5.0)
        assert verdict.root_ranks == (culprit,) and verdict.lost_ranks == ()
        assert f"rank {culprit}: failed first (root cause)" in verdict.text
        assert verdict.stop_reason == ""  # a failure alone leaves every rank in step
