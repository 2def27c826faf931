"""Outcome agreement: what each rank reports after a test phase, and the verdict all ranks apply.

Pure values: no store, no process group. Every rank posts a ``RankReport`` for each phase
(setup, call, teardown) of each test; every rank reads all of them and computes the same
``Verdict`` with ``judge``:

- all passed (or all skipped): that outcome;
- any rank failed, hung, got stuck or did not report: failed on every rank. The rank that failed
  first is the root cause (its text comes first); the others are collateral;
- a rank that hung, got stuck, or did not report cannot run the next test in step (it may still
  sit inside a collective), and ranks whose collective counts differ on a shared group have a
  collective pending that the next test's would pair with: the verdict then says to stop.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable, Mapping

PASSED, SKIPPED, FAILED, HUNG, STUCK = "passed", "skipped", "failed", "hung", "stuck"
_PROBLEMS = (FAILED, HUNG, STUCK)
MAX_TEXT_CHARS = 20_000

GroupKey = tuple[tuple[int, ...], int]  # (global ranks of the group, k-th group with those ranks)


def group_counts(counts: Iterable[tuple[tuple[int, ...], int]]) -> tuple[tuple[GroupKey, int], ...]:
    """Key each group by its ranks and creation order, so members of a group use the same key."""
    seen: Counter[tuple[int, ...]] = Counter()
    keyed = []
    for ranks, count in counts:
        keyed.append(((tuple(ranks), seen[tuple(ranks)]), int(count)))
        seen[tuple(ranks)] += 1
    return tuple(keyed)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RankReport:
    """One rank's outcome of one phase. ``at`` is wall-clock time (orders failures across ranks)."""

    rank: int
    outcome: str
    at: float
    text: str = ""
    counts: tuple[tuple[GroupKey, int], ...] = ()

    def to_json(self) -> str:
        text = self.text if len(self.text) <= MAX_TEXT_CHARS else (
            "[... truncated ...]\n" + self.text[-MAX_TEXT_CHARS:]
        )
        counts = [[list(ranks), k, n] for (ranks, k), n in self.counts]
        return json.dumps(
            {"rank": self.rank, "outcome": self.outcome, "at": self.at, "text": text,
             "counts": counts}
        )

    @classmethod
    def from_json(cls, data: str | bytes) -> RankReport:
        raw = json.loads(data)
        counts = tuple(((tuple(ranks), k), n) for ranks, k, n in raw["counts"])
        return cls(rank=raw["rank"], outcome=raw["outcome"], at=raw["at"], text=raw["text"],
                   counts=counts)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Verdict:
    outcome: str
    root_ranks: tuple[int, ...] = ()
    lost_ranks: tuple[int, ...] = ()
    text: str = ""
    stop_reason: str = ""


def out_of_step(reports: Mapping[int, RankReport]) -> tuple[str, tuple[int, ...]] | None:
    """(explanation, lagging ranks) for the first group whose members issued different numbers
    of collectives, or None when every shared group is in step."""
    per_group: dict[GroupKey, dict[int, int]] = {}
    for rank, report in sorted(reports.items()):
        for key, count in report.counts:
            per_group.setdefault(key, {})[rank] = count
    bad = [(key, counts) for key, counts in per_group.items() if len(set(counts.values())) > 1]
    if not bad:
        return None
    (ranks, _), counts = bad[0]
    fewest = min(counts.values())
    lagging = tuple(r for r, n in counts.items() if n == fewest)
    issued = ", ".join(f"rank {r} issued {n}" for r, n in counts.items())
    more = f" (and {len(bad) - 1} more groups)" if len(bad) > 1 else ""
    return (
        f"collectives out of step on the group of ranks {list(ranks)}: {issued}{more}. A rank "
        "left a collective pending (it failed before one, or an async op was never waited); "
        "the next test's collectives would pair with it and compute wrong values",
        lagging,
    )


def _line(
    rank: int, report: RankReport | None, root: tuple[int, ...], t0: float, timeout_s: float
) -> str:
    if report is None:
        return f"rank {rank}: no report within {timeout_s:g} s: it died or hung (see its log)"
    # A hung or stuck rank's text is one line from its watchdog: "hung: the call of ... ran past"
    own = report.text.splitlines()[0] if report.text else report.outcome
    if rank in root:
        return f"rank {rank}: {own if report.outcome != FAILED else 'failed first'} (root cause)"
    if report.outcome == FAILED:
        return f"rank {rank}: failed too, {report.at - t0:+.3f} s after the first failure"
    if report.outcome in (HUNG, STUCK):
        return f"rank {rank}: {own}"
    return f"rank {rank}: {report.outcome} locally; failed because another rank failed (collateral)"


def judge(
    nodeid: str, when: str, reports: Mapping[int, RankReport | None], *, timeout_s: float
) -> Verdict:
    """The outcome every rank gives this phase; ``reports[r]`` is None if rank r never reported."""
    present = {r: rep for r, rep in reports.items() if rep is not None}
    step = out_of_step(present)
    problems = {r: rep for r, rep in reports.items() if rep is None or rep.outcome in _PROBLEMS}
    if not problems and step is None:
        outcomes = sorted({rep.outcome for rep in present.values()})
        if len(outcomes) == 1:
            return Verdict(outcome=outcomes[0])
        skipped = sorted(r for r, rep in present.items() if rep.outcome == SKIPPED)
        others = sorted(r for r in present if r not in skipped)
        reason = present[skipped[0]].text
        return Verdict(
            outcome=FAILED,
            root_ranks=tuple(skipped),
            text=(
                f"ranks disagree in {when}: skipped on ranks {skipped} ({reason}), "
                f"not skipped on ranks {others}. Every rank must behave the same: skip from a "
                "marker or the mesh size, never from the rank."
            ),
        )

    lost = tuple(sorted(r for r, rep in problems.items() if rep is None or rep.outcome != FAILED))
    ordered = sorted(
        (rep.at, r)
        for r, rep in problems.items()
        if rep is not None and rep.outcome in (FAILED, HUNG)
    )
    first = ordered[0][1] if ordered else None
    if first is not None:
        root: tuple[int, ...] = (first,)
    elif problems:
        root = tuple(sorted(problems))
    else:
        root = step[1]
    t0 = ordered[0][0] if ordered else min((rep.at for rep in present.values()), default=0.0)
    lines = [f"failed in {when} on rank{'s' if len(root) > 1 else ''} "
             f"{', '.join(map(str, root))} first (root cause); every rank fails it."]
    lines += [f"  {_line(r, reports[r], root, t0, timeout_s)}" for r in sorted(reports)]
    stop = ""
    if lost:
        states = ", ".join(
            f"rank {r} {'sent no report' if reports[r] is None else reports[r].outcome}"
            for r in lost
        )
        stop = (
            f"stopping the run after {nodeid} ({when}): {states}; a rank still inside a "
            "collective would pair it with the next test's collectives"
        )
    if step is not None:
        lines.append(f"  {step[0]}")
        stop = stop or f"stopping the run after {nodeid}: {step[0]}"
    if stop:
        lines.append(f"  {stop}")
    for r in (*root, *sorted(r for r in problems if r not in root)):
        if reports[r] is not None and reports[r].text and reports[r].outcome == FAILED:
            label = "root cause" if r in root else reports[r].outcome
            lines += ["", f"===== rank {r} ({label}) =====", reports[r].text.rstrip()]
    return Verdict(
        outcome=FAILED, root_ranks=root, lost_ranks=lost, text="\n".join(lines), stop_reason=stop
    )


def collection_difference(
    nodeids_by_rank: Mapping[int, list[str]], *, limit: int = 5
) -> str | None:
    """Why the ranks' test lists differ (compared with the lowest rank's), or None if equal."""
    ranks = sorted(nodeids_by_rank)
    base_rank = ranks[0]
    base = nodeids_by_rank[base_rank]
    lines = []
    for rank in ranks[1:]:
        other = nodeids_by_rank[rank]
        if other == base:
            continue
        base_set, other_set = set(base), set(other)
        only_other = [n for n in other if n not in base_set]
        only_base = [n for n in base if n not in other_set]
        line = f"rank {rank} collected {len(other)} tests, rank {base_rank} {len(base)}"
        if only_other:
            line += f"; only on rank {rank}: {', '.join(only_other[:limit])}"
        if only_base:
            line += f"; missing on rank {rank}: {', '.join(only_base[:limit])}"
        if not only_other and not only_base:
            position = next(i for i, (a, b) in enumerate(zip(base, other)) if a != b)
            line += (f"; same tests in another order, from position {position}: rank "
                     f"{base_rank} runs {base[position]}, rank {rank} runs {other[position]}")
        lines.append(line)
    if not lines:
        return None
    return (
        "ranks collected different tests, so their collectives would not pair up:\n  "
        + "\n  ".join(lines)
        + "\nFix: make collection independent of the rank (no rank-dependent parametrize, "
        "imports or skips at collection time)."
    )
