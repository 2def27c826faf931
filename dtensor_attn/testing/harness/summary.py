"""The per-rank summary of a torchrun run, from its files: ``python3 summary.py OUT``.

Read after the run from ``rank<r>.xml`` (written test by test) and ``rank<r>.log``, so it covers
ranks that were killed or hung as well as ranks that finished. Exit status 0 only if every rank
finished with no failure and at least one test ran (ranks record a run in which every test
skipped as the failure ``dtensor_attn::no_test_ran``). Standard library only, so that the
launcher can run it as a script without importing torch; ``run_junit.py`` reads the same files
through these functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path

if __package__:
    from dtensor_attn.testing.harness.junit import HARNESS, UNFINISHED
    from dtensor_attn.testing.harness.outcome import RESULT_TAGS, CaseKind
else:  # run as a script by scripts/run_torchrun.sh: the sibling files, without importing torch
    from junit import HARNESS, UNFINISHED
    from outcome import RESULT_TAGS, CaseKind

ROOT_CAUSE_PROPERTY = "dtensor_attn_root_cause_ranks"  # a <property> of a failed <testcase>
_RANK_FILE = re.compile(r"rank(\d+)\.xml$")
_PHASE_LINE = re.compile(r"\] start (setup|call|teardown) (\S.*)$")
_EXIT_CODE = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def collected_path(out_dir: Path, rank: int) -> Path:
    """The test ids a rank collected, one a line, written before its first test."""
    return Path(out_dir) / f"rank{rank}.collected.txt"


def read_collected(out_dir: Path, rank: int) -> list[str] | None:
    path = collected_path(out_dir, rank)
    return path.read_text().splitlines() if path.exists() else None


def last_started(log: Path) -> tuple[str, str] | None:
    """(test id, phase) this rank was last in, per its log (None if none)."""
    if not log.exists():
        return None
    last = None
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("[dtensor_attn ") and (match := _PHASE_LINE.search(line)):
            last = (match.group(2), match.group(1))
    return last


def _last_started(log: Path) -> str:
    last = last_started(log)
    return f"{last[0]} ({last[1]})" if last else ""


@dataclasses.dataclass(frozen=True, slots=True)
class Case:
    """One recorded <testcase>."""

    nodeid: str
    kind: CaseKind
    message: str = ""
    text: str = ""
    root: str | None = None
    seconds: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", CaseKind(self.kind))


def read_rank(xml_path: Path) -> dict:
    """Totals, completeness, cases and failed tests (with root-cause ranks) of one rank's JUnit
    file; ``in_flight``: the test its placeholder names (the rank ended during it)."""
    try:
        suite = ET.parse(xml_path).getroot().find("testsuite")
    except ET.ParseError as error:
        return {"unreadable": str(error), "cases": {}, "counts": {}}
    counts = {kind: 0 for kind in CaseKind}
    failed, cases, in_flight = {}, {}, ""
    for element in suite.iter("testcase"):
        nodeid = element.get("nodeid") or element.get("name")
        if element.get(UNFINISHED) == "true":
            in_flight = "" if nodeid.startswith(HARNESS) else nodeid
            continue
        child = next((c for c in element if c.tag in RESULT_TAGS), None)
        kind = CaseKind.from_tag(None if child is None else child.tag)
        root = next((p.get("value") for p in element.iter("property")
                     if p.get("name") == ROOT_CAUSE_PROPERTY), None)
        case = Case(nodeid, kind, "" if child is None else child.get("message", ""),
                    "" if child is None else (child.text or ""), root,
                    float(element.get("time", "0")))
        cases[nodeid] = case
        counts[kind] += 1
        if kind.is_problem:
            failed[nodeid] = (root, case.message)
    return {
        "counts": counts,
        "failed": failed,
        "cases": cases,
        "in_flight": in_flight,
        "complete": suite.get("complete") == "true",
        "world_size": int(suite.get("world_size", "0")),
        "collected": int(suite.get("collected", "-1")),
        "stop_reason": suite.get("stop_reason", ""),
    }


def no_test_ran(num_collected: int, skip_reasons: Mapping[str, int]) -> str:
    """Why a torchrun run tested nothing; the first line stands alone (a JUnit message)."""
    head = (f"{num_collected} collected, every one skipped on every rank" if num_collected
            else "no tests collected")
    lines = [f"no test ran under torchrun: {head}; tests without a mesh marker skip here unless "
             "--dtensor-unmarked=run. A run that tests nothing is not a pass (pytest exits 5 "
             "when nothing ran)."]
    lines += [f"  {n} skipped: {reason}" for reason, n in
              sorted(skip_reasons.items(), key=lambda item: (-item[1], item[0]))]
    lines.append("Fix: scripts/run_torchrun.sh ... -- --dtensor-unmarked=run runs tests without a "
                 "mesh marker on every rank; or mark them @pytest.mark.mesh(...); tests whose "
                 "mesh needs more ranks run with a larger -n.")
    return "\n".join(lines)


def exit_codes(console: Path) -> dict[int, int]:
    """{rank: exit code} from torchrun's failure report in the console log, where there is one
    (a negative code is the signal that ended the rank: -9 SIGKILL, -15 SIGTERM)."""
    if not console.exists():
        return {}
    text = console.read_text(errors="replace")
    return {int(rank): int(code) for rank, code in _EXIT_CODE.findall(text)}


def rank_files(out_dir: Path) -> dict[int, Path]:
    """{rank: its JUnit file} in ``out_dir``."""
    return {int(m.group(1)): p for p in sorted(Path(out_dir).glob("rank*.xml"))
            if (m := _RANK_FILE.search(p.name))}


def describe_exit(code: int | None) -> str:
    if code is None:
        return ""
    if code < 0:
        name = {-9: "SIGKILL", -15: "SIGTERM (torchrun stops the rest once one fails)"}
        return f", exit signal {-code} {name.get(code, '')}".rstrip()
    return f", exit code {code}"


def summarize(out_dir: Path, *, this_node_only: bool = False) -> tuple[str, int]:
    """(text, exit status) for the run whose files are in ``out_dir``. ``this_node_only``: a
    multi-node run with a folder per node; ranks without files here ran on other nodes."""
    files = rank_files(out_dir)
    if not files:
        return f"dtensor_attn summary: no rank<r>.xml in {out_dir}: no rank started", 1
    ranks = {rank: read_rank(path) for rank, path in files.items()}
    codes = exit_codes(out_dir / "console.log")
    world_size = max([info.get("world_size", 0) for info in ranks.values()] + [max(files) + 1])
    lines = [f"dtensor_attn summary of {out_dir} ({world_size} ranks)",
             f"{'rank':<6}{'passed':>8}{'failed':>8}{'errors':>8}{'skipped':>9}  state"]
    status = 0
    failed_tests: dict[str, tuple[str | None, str]] = {}
    stop_reasons: list[str] = []
    killed: list[str] = []
    for rank in range(world_size):
        info = ranks.get(rank)
        exit_text = describe_exit(codes.get(rank))
        if info is None and this_node_only:
            continue
        if info is None or "unreadable" in info:
            why = info["unreadable"] if info else "no JUnit file: the rank never started"
            lines.append(f"{rank:<6}  {why}{exit_text}")
            status = 1
            continue
        c = info["counts"]
        if not info["complete"]:
            where = _last_started(out_dir / f"rank{rank}.log") or "before its first test"
            state = f"did not finish: ended during {where}"
            status = 1
            if codes.get(rank, -15) not in (-15, 1):  # not stopped by torchrun or by us
                killed.append(f"rank {rank} ended{describe_exit(codes[rank])[1:]} during {where}")
        elif info["stop_reason"]:
            state = "stopped early (reason below)"
        else:
            state = "finished"
        if info["complete"] and info["collected"] == 0:
            state += ", no tests collected"
            status = 1
        lines.append(f"{rank:<6}{c[CaseKind.PASSED]:>8}{c[CaseKind.FAILED]:>8}"
                     f"{c[CaseKind.ERROR]:>8}{c[CaseKind.SKIPPED]:>9}  {state}{exit_text}")
        status = 1 if c[CaseKind.FAILED] or c[CaseKind.ERROR] or info["stop_reason"] else status
        if info["stop_reason"] and info["stop_reason"] not in stop_reasons:
            stop_reasons.append(info["stop_reason"])
        for name, (root, message) in info["failed"].items():
            if name not in failed_tests or (root and not failed_tests[name][0]):
                failed_tests[name] = (root, message)  # the agreed verdict beats a local note
    for name, (root, message) in failed_tests.items():
        cause = f" (root cause: rank {root})" if root and "root cause" not in message else ""
        lines.append(f"FAILED {name}: {message.splitlines()[0] if message else ''}{cause}")
    lines += [f"run stopped: {reason}" for reason in stop_reasons]
    lines += [f"root cause: {line}" for line in killed]
    return "\n".join(lines), status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="the --out folder of scripts/run_torchrun.sh")
    parser.add_argument("--this-node-only", action="store_true",
                        help="multi-node run: summarise the ranks whose files are in out_dir")
    args = parser.parse_args(argv)
    text, status = summarize(args.out_dir, this_node_only=args.this_node_only)
    print(text)
    return status


if __name__ == "__main__":
    sys.exit(main())
