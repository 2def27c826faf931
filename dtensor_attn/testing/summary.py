"""The per-rank summary of a torchrun run, from its files: ``python3 summary.py OUT``.

Read after the run from ``rank<r>.xml`` (written test by test) and ``rank<r>.log``, so it covers
ranks that were killed or hung as well as ranks that finished. Exit status 0 only if every rank
finished with no failure and at least one test ran. Standard library only, so that the launcher
can run it as a script without importing torch.
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT_CAUSE_PROPERTY = "dtensor_attn_root_cause_ranks"  # a <property> of a failed <testcase>
_RANK_FILE = re.compile(r"rank(\d+)\.xml$")
_PHASE_LINE = re.compile(r"\] start (setup|call|teardown) (\S.*)$")
_EXIT_CODE = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def _last_started(log: Path) -> str:
    """The test this rank was last in, per its log ('' if none)."""
    if not log.exists():
        return ""
    last = ""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("[dtensor_attn ") and (match := _PHASE_LINE.search(line)):
            last = f"{match.group(2)} ({match.group(1)})"
    return last


def read_rank(xml_path: Path) -> dict:
    """Totals, completeness and failed tests (with root-cause ranks) of one rank's JUnit file."""
    try:
        suite = ET.parse(xml_path).getroot().find("testsuite")
    except ET.ParseError as error:
        return {"unreadable": str(error), "cases": {}, "counts": {}}
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    failed = {}
    for case in suite.iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        kind = {"failure": "failed"}.get(kind, kind)
        counts[kind] += 1
        if kind in ("failed", "error"):
            root = next((p.get("value") for p in case.iter("property")
                         if p.get("name") == ROOT_CAUSE_PROPERTY), None)
            message = next(c.get("message", "") for c in case if c.tag in ("failure", "error"))
            failed[case.get("nodeid") or case.get("name")] = (root, message)
    return {
        "counts": counts,
        "failed": failed,
        "complete": suite.get("complete") == "true",
        "world_size": int(suite.get("world_size", "0")),
        "collected": int(suite.get("collected", "-1")),
        "stop_reason": suite.get("stop_reason", ""),
    }


def exit_codes(console: Path) -> dict[int, int]:
    """{rank: exit code} from torchrun's failure report in the console log, where there is one
    (a negative code is the signal that ended the rank: -9 SIGKILL, -15 SIGTERM)."""
    if not console.exists():
        return {}
    text = console.read_text(errors="replace")
    return {int(rank): int(code) for rank, code in _EXIT_CODE.findall(text)}


def _describe_exit(code: int | None) -> str:
    if code is None:
        return ""
    if code < 0:
        name = {-9: "SIGKILL", -15: "SIGTERM (torchrun stops the rest once one fails)"}
        return f", exit signal {-code} {name.get(code, '')}".rstrip()
    return f", exit code {code}"


def summarize(out_dir: Path, *, this_node_only: bool = False) -> tuple[str, int]:
    """(text, exit status) for the run whose files are in ``out_dir``. ``this_node_only``: a
    multi-node run with a folder per node; ranks without files here ran on other nodes."""
    files = {int(m.group(1)): p for p in sorted(out_dir.glob("rank*.xml"))
             if (m := _RANK_FILE.search(p.name))}
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
        exit_text = _describe_exit(codes.get(rank))
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
                killed.append(f"rank {rank} ended{_describe_exit(codes[rank])[1:]} during {where}")
        elif info["stop_reason"]:
            state = "stopped early (reason below)"
        else:
            state = "finished"
        if info["complete"] and info["collected"] == 0:
            state += ", no tests collected"
            status = 1
        lines.append(f"{rank:<6}{c['passed']:>8}{c['failed']:>8}{c['error']:>8}{c['skipped']:>9}"
                     f"  {state}{exit_text}")
        status = 1 if c["failed"] or c["error"] or info["stop_reason"] else status
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
