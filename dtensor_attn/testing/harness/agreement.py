"""Outcome agreement: what each rank reports after a test phase, and the verdict all ranks apply.

Pure values: no store, no process group. Every rank posts a ``RankReport`` for each phase
(setup, call, teardown) of each test; every rank reads all of them and computes the same
``Verdict`` with ``judge``:

- all passed (or all skipped): that outcome;
- any rank failed, hung, got stuck, went silent, did not report or skipped alone: failed on
  every rank. The root cause is the rank whose phase diverged first: it failed, hung, skipped
  while the others went on, or went silent (exited, was killed, or holds the GIL: no report and
  no heartbeat; its last heartbeat dates it). A rank stuck in a collective that the culprit
  never joined, or failing because the culprit vanished ("Connection reset by peer"), is
  collateral. Only when nobody diverged are the stuck ranks, or those that issued fewer
  collectives, the root cause;
- a rank that hung, got stuck, went silent or did not report cannot run the next test in step
  (it may still sit inside a collective), and ranks whose collective counts differ on a shared
  group have a collective pending that the next test's would pair with: the verdict says stop.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterable, Mapping

from dtensor_attn.testing.harness.outcome import Outcome

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
    outcome: Outcome
    at: float
    text: str = ""
    counts: tuple[tuple[GroupKey, int], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "outcome", Outcome(self.outcome))  # from the store: a string

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
    outcome: Outcome
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


def silent_report(
    rank: int, *, nodeid: str, when: str, began_phase: bool, last_beat_at: float, silent_s: float
) -> RankReport:
    """The report a rank that went silent would not send: no phase report and no heartbeat.
    ``began_phase``: its last heartbeat announced this phase (else it vanished before it);
    ``last_beat_at``: the wall time of that heartbeat, which orders it against failures."""
    where = (f"during the {when} of {nodeid}" if began_phase
             else f"before the {when} of {nodeid}, after its previous phase")
    return RankReport(
        rank=rank, outcome=Outcome.SILENT, at=last_beat_at,
        text=(f"went silent {where}: no report and no heartbeat for {silent_s:.1f} s: it "
              "exited, was killed, or holds the GIL in a call that does not return (see its log)"),
    )


def _divergent_skips(present: Mapping[int, RankReport]) -> list[int]:
    """Ranks that skipped while another rank went on (a rank-dependent skip)."""
    skipped = [r for r, rep in sorted(present.items()) if rep.outcome is Outcome.SKIPPED]
    return skipped if len(skipped) < len(present) else []


def _root_ranks(
    reports: Mapping[int, RankReport | None], step: tuple[str, tuple[int, ...]] | None
) -> tuple[int, ...]:
    """The rank whose phase diverged first: it failed, hung, skipped alone or went silent
    (ordered by when; a missing report last). Ranks stuck in a collective wait for that rank:
    they are the root cause only when nobody diverged, and then the ranks that issued fewer
    collectives (those that never joined) come before them."""
    present = {r: rep for r, rep in reports.items() if rep is not None}
    diverged = {r: rep.at for r, rep in present.items() if rep.outcome.diverged}
    diverged.update({r: present[r].at for r in _divergent_skips(present)})
    diverged.update({r: float("inf") for r, rep in reports.items() if rep is None})
    if diverged:
        return (min(diverged, key=lambda r: (diverged[r], r)),)
    if step is not None:
        return step[1]
    return tuple(sorted(r for r, rep in present.items() if rep.outcome is Outcome.STUCK))


_SINCE = {Outcome.FAILED: "the first failure", Outcome.SILENT: "rank {rank}'s last heartbeat",
          Outcome.SKIPPED: "rank {rank}'s skip", Outcome.HUNG: "rank {rank} was declared hung"}


def _line(rank: int, report: RankReport | None, root: tuple[int, ...],
          reports: Mapping[int, RankReport | None], timeout_s: float) -> str:
    if report is None:
        text = f"no report within {timeout_s:g} s: it died or hung (see its log)"
        return f"rank {rank}: {text}" + (" (root cause)" if rank in root else "")
    # A hung, stuck or silent rank's text is one line from the harness: "hung: the call of ..."
    own = report.text.splitlines()[0] if report.text else report.outcome
    if rank in root:
        if report.outcome is Outcome.FAILED:
            return f"rank {rank}: failed first (root cause)"
        if report.outcome is Outcome.SKIPPED:
            others = [r for r, rep in sorted(reports.items())
                      if rep is None or rep.outcome is not Outcome.SKIPPED]
            ranks = f"rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))}"
            return f"rank {rank}: skipped locally ({own}) while {ranks} did not (root cause)"
        return f"rank {rank}: {own} (root cause)"
    if report.outcome is Outcome.FAILED:
        first = reports[root[0]] if len(root) == 1 else None
        if first is None or first.outcome not in _SINCE:
            return f"rank {rank}: failed too (collateral)"
        since = _SINCE[first.outcome].format(rank=root[0])
        return f"rank {rank}: failed too, {report.at - first.at:+.3f} s after {since} (collateral)"
    if report.outcome is Outcome.STUCK:
        return f"rank {rank}: {own} (collateral)"
    if report.outcome in (Outcome.HUNG, Outcome.SILENT):
        return f"rank {rank}: {own}"
    return f"rank {rank}: {report.outcome} locally; failed because another rank failed (collateral)"


def judge(
    nodeid: str, when: str, reports: Mapping[int, RankReport | None], *, timeout_s: float
) -> Verdict:
    """The outcome every rank gives this phase; ``reports[r]`` is None if rank r never reported."""
    present = {r: rep for r, rep in reports.items() if rep is not None}
    step = out_of_step(present)
    problems = {r: rep for r, rep in reports.items() if rep is None or rep.outcome.is_problem}
    if not problems and step is None:
        outcomes = sorted({rep.outcome for rep in present.values()})
        if len(outcomes) == 1:
            return Verdict(outcome=outcomes[0])
        skipped = sorted(r for r, rep in present.items() if rep.outcome is Outcome.SKIPPED)
        others = sorted(r for r in present if r not in skipped)
        reason = present[skipped[0]].text
        return Verdict(
            outcome=Outcome.FAILED,
            root_ranks=tuple(skipped),
            text=(
                f"ranks disagree in {when}: skipped on ranks {skipped} ({reason}), "
                f"not skipped on ranks {others}. Every rank must behave the same: skip from a "
                "marker or the mesh size, never from the rank."
            ),
        )

    root = _root_ranks(reports, step)
    lost = tuple(sorted(r for r, rep in problems.items()
                        if rep is None or rep.outcome is not Outcome.FAILED))
    lines = [f"failed in {when} on rank{'s' if len(root) > 1 else ''} "
             f"{', '.join(map(str, root))} first (root cause); every rank fails it."]
    lines += [f"  {_line(r, reports[r], root, reports, timeout_s)}" for r in sorted(reports)]
    if any(reports[r] is not None and reports[r].outcome is Outcome.SKIPPED for r in root):
        lines.append("  Every rank must skip alike: skip from a marker or the mesh size, never "
                     "from the rank; the other ranks went on into collectives it never joined.")
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
    if step is not None and (not lost or root == step[1]):
        lines.append(f"  {step[0]}")
        stop = stop or f"stopping the run after {nodeid}: {step[0]}"
    if stop:
        lines.append(f"  {stop}")
    for r in (*root, *sorted(r for r in problems if r not in root)):
        if reports[r] is not None and reports[r].text and reports[r].outcome is Outcome.FAILED:
            label = "root cause" if r in root else reports[r].outcome
            lines += ["", f"===== rank {r} ({label}) =====", reports[r].text.rstrip()]
    return Verdict(
        outcome=Outcome.FAILED, root_ranks=root, lost_ranks=lost, text="\n".join(lines), stop_reason=stop
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
