"""The run-level JUnit file of a torchrun run: ``python3 run_junit.py OUT`` writes OUT/junit.xml.

This is the file CI reads. ``scripts/run_torchrun.sh`` writes it after torchrun exits, from the
files every rank left, so it holds even when ranks were killed before they could write (torchrun
SIGTERMs the others once one dies): each rank's collected tests (``rank<r>.collected.txt``),
its JUnit cases (``rank<r>.xml``), the phase it last started (``rank<r>.log``) and torchrun's
exit codes (``console.log``). One ``<testcase>`` per collected test, in collection order:

- recorded by some rank: the agreed outcome (the worst, where ranks that ended early differ);
- in flight on ranks that ended without recording it: an error naming how each ended, the
  culprit (a rank not stopped by torchrun's SIGTERM) as root cause;
- never reached: skipped, ``not run: <why the run stopped>``;

after the harness's own findings (ranks collected different tests, a collection error, no test
ran, a rank that never started), failures and errors under ``dtensor_attn::``. The exit status
is 0 when the file was written. Standard library only, like ``summary.py``.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

if __package__:
    from dtensor_attn.testing.harness.junit import HARNESS, case_xml
    from dtensor_attn.testing.harness.outcome import CaseKind
    from dtensor_attn.testing.harness.summary import (
        ROOT_CAUSE_PROPERTY, Case, describe_exit, exit_codes, last_started, rank_files,
        read_collected, read_rank,
    )
else:  # run as a script by scripts/run_torchrun.sh: the sibling files, without importing torch
    from junit import HARNESS, case_xml
    from outcome import CaseKind
    from summary import (
        ROOT_CAUSE_PROPERTY, Case, describe_exit, exit_codes, last_started, rank_files,
        read_collected, read_rank,
    )

RUN_JUNIT = "junit.xml"
_SIGTERM = -15  # how torchrun stops the other ranks once one has failed


def _worst(cases: list[Case]) -> Case:
    """The case every rank should have agreed on: the worst, the root-cause carrier first."""
    return max(cases, key=lambda case: (case.kind.severity, case.root is not None))


def run_cases(
    collected: Mapping[int, list[str]],
    ranks: Mapping[int, dict],
    in_flight: Mapping[int, tuple[str, str]],
    codes: Mapping[int, int],
    *,
    missing_ranks: tuple[int, ...] = (),
    note: str = "",
) -> tuple[list[Case], str]:
    """(one Case per test and harness finding, why the run stopped ('' if it did not)).
    ``ranks``: read_rank() of each rank's file; ``in_flight``: {rank: (test id, phase)} of
    ranks that did not finish, from their logs; ``codes``: torchrun's exit codes;
    ``missing_ranks``: ranks that left no files; ``note``: the launcher's own (a run timeout)."""
    unfinished = sorted(r for r, info in ranks.items() if not info.get("complete"))
    ends = {r: f"rank {r} ended during the {in_flight[r][1]} of {in_flight[r][0]}"
            if r in in_flight else f"rank {r} ended before its first test" for r in unfinished}
    ends = {r: text + describe_exit(codes.get(r)) for r, text in ends.items()}
    # torchrun SIGTERMs the others once one ends: a rank that ended otherwise is the culprit
    known = [r for r in unfinished if codes.get(r) not in (None, _SIGTERM)]
    culprits = known or unfinished
    reasons = [info["stop_reason"] for _, info in sorted(ranks.items()) if info.get("stop_reason")]
    stop = note or (reasons[0] if reasons else "; ".join(ends[r] for r in culprits))

    recorded: dict[str, list[Case]] = {}
    for _, info in sorted(ranks.items()):
        for nodeid, case in info.get("cases", {}).items():
            recorded.setdefault(nodeid, []).append(case)
    order = [n for n in recorded if n.startswith(HARNESS)]
    for rank in sorted(collected):
        order += [n for n in collected[rank] if n not in order]
    order += [n for n in recorded if n not in order]  # e.g. a collection error's file

    cases = [Case(f"{HARNESS}rank{r}_never_started", CaseKind.ERROR,
                  f"rank {r} left no files: it never started (see console.log)")
             for r in missing_ranks]
    for nodeid in order:
        flying = [r for r in unfinished if in_flight.get(r, ("",))[0] == nodeid]
        if nodeid in recorded:
            cases.append(_worst(recorded[nodeid]))
        elif flying:
            root = [r for r in flying if r in culprits] or flying
            named = [ends[r] + (" (root cause)" if r in known else "") for r in root]
            named += [ends[r] for r in flying if r not in root]
            message = f"no rank recorded a result: {'; '.join(named)}"
            cases.append(Case(nodeid, CaseKind.ERROR, message, f"{message}\nrun stopped: {stop}",
                              ",".join(map(str, root))))
        else:
            why = stop.splitlines()[0] if stop else "no rank reached it"
            cases.append(Case(nodeid, CaseKind.SKIPPED, f"not run: {why}", stop))
    return cases, stop


def write_run_junit(path: Path, cases: list[Case], *, world_size: int, stop: str,
                    complete: bool) -> None:
    kinds = [case.kind for case in cases]
    attrs = {"name": f"dtensor_attn torchrun, {world_size} ranks", "tests": str(len(cases)),
             "failures": str(kinds.count(CaseKind.FAILED)),
             "errors": str(kinds.count(CaseKind.ERROR)), "skipped": str(kinds.count(CaseKind.SKIPPED)),
             "time": f"{sum(case.seconds for case in cases):.3f}",
             "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "hostname": socket.gethostname(),
             "world_size": str(world_size), "complete": "true" if complete else "false"}
    if stop:
        attrs["stop_reason"] = stop
    suite = ET.tostring(ET.Element("testsuite", attrs), encoding="unicode").removesuffix(" />")
    body = "".join(
        case_xml(case.nodeid, outcome=case.kind, seconds=case.seconds, message=case.message,
                 text=case.text, properties={ROOT_CAUSE_PROPERTY: case.root} if case.root else None)
        for case in cases
    )
    tmp = path.with_suffix(".xml.tmp")
    tmp.write_text(f'<?xml version="1.0" encoding="utf-8"?>\n<testsuites>\n{suite}>\n{body}'
                   "</testsuite>\n</testsuites>\n", encoding="utf-8")
    tmp.replace(path)


def write_for(out_dir: Path, *, this_node_only: bool = False, note: str = "") -> Path:
    """Read the run's files in ``out_dir`` and write its run-level JUnit file there."""
    files = rank_files(out_dir)
    ranks = {rank: read_rank(path) for rank, path in files.items()}
    ranks = {rank: info for rank, info in ranks.items() if "unreadable" not in info}
    world_size = max([info["world_size"] for info in ranks.values()] + [max(files, default=-1) + 1])
    collected = {r: c for r in range(world_size) if (c := read_collected(out_dir, r)) is not None}
    in_flight = {}
    for rank, info in ranks.items():
        last = last_started(out_dir / f"rank{rank}.log")
        if not info["complete"] and (last or info["in_flight"]):
            in_flight[rank] = last or (info["in_flight"], "test")
    missing = () if this_node_only else tuple(r for r in range(world_size) if r not in ranks)
    cases, stop = run_cases(collected, ranks, in_flight, exit_codes(out_dir / "console.log"),
                            missing_ranks=missing, note=note)
    if not cases:
        cases = [Case(f"{HARNESS}run", CaseKind.ERROR, f"no rank left its files in {out_dir}: the run "
                      "never started (see console.log)")]
    complete = bool(ranks) and all(info["complete"] for info in ranks.values()) and not missing
    path = Path(out_dir) / RUN_JUNIT
    write_run_junit(path, cases, world_size=world_size, stop=stop, complete=complete)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="the --out folder of scripts/run_torchrun.sh")
    parser.add_argument("--this-node-only", action="store_true",
                        help="multi-node run: the ranks whose files are in out_dir")
    parser.add_argument("--note", default="", help="why the launcher stopped the run, if it did")
    args = parser.parse_args(argv)
    path = write_for(args.out_dir, this_node_only=args.this_node_only, note=args.note)
    print(f"run-level JUnit (for CI): {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
