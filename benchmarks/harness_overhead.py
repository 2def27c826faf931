"""The harness's own per-test cost, in simulation and under torchrun, and whole-run wall times.

    python3 benchmarks/harness_overhead.py                # per-test overhead, ~1 minute
    python3 benchmarks/harness_overhead.py --whole-runs   # also time the two suite commands

Per-test cost is the full pytest protocol of an empty test (setup, call, teardown, reporting),
timed by a hook wrapper around ``pytest_runtest_protocol``. The overhead is the difference to
the same empty test in plain pytest with the plugin disabled:
- simulated: ``@pytest.mark.mesh(...)`` tests taking the ``mesh`` fixture (mesh from the cache,
  LocalTensorMode entered and left);
- torchrun, 4 gloo ranks: the same tests (mesh from the cache, three store rounds of outcome
  agreement, watchdog, per-rank log and JUnit writes), slowest rank per test.
Numbers go to stdout as JSON; docs/harness.md records them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SUITE = '''
import pytest

MESHES = [dict(tp=4), dict(cp=2, tp=2), dict(dp=2, tp=2)]


@pytest.mark.parametrize("i", [
    pytest.param(i, marks=pytest.mark.mesh(**MESHES[i % 3])) for i in range({n})
])
def test_mesh(mesh, i):
    pass


@pytest.mark.parametrize("i", range({n}))
def test_plain(i):
    pass
'''

TIMER = '''
import json, os, time
import pytest

TIMES = {}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    started = time.perf_counter()
    try:
        return (yield)
    finally:
        TIMES[item.nodeid] = time.perf_counter() - started


def pytest_sessionfinish(session):
    out = os.environ["HARNESS_TIMES"]
    with open(f"{out}.{os.environ.get('RANK', 'single')}", "w") as f:
        json.dump(TIMES, f)
'''


def _write_suite(folder: Path, n: int) -> None:
    (folder / "test_overhead.py").write_text(SUITE.format(n=n))
    (folder / "conftest.py").write_text(TIMER)


def _times(prefix: Path) -> dict[str, dict[str, float]]:
    """{rank: {nodeid: seconds}} from the files the timer wrote."""
    return {p.suffix[1:]: json.loads(p.read_text()) for p in prefix.parent.glob(prefix.name + ".*")}


def _per_test_ms(times: dict[str, float], kind: str, skip_first: int = 3) -> float:
    """Median protocol time of one kind of test, in ms (the first few warm caches up)."""
    values = [t for nodeid, t in times.items() if f"::test_{kind}[" in nodeid][skip_first:]
    return 1e3 * statistics.median(values)


def _pytest(folder: Path, times: Path, *args: str) -> None:
    env = dict(os.environ, HARNESS_TIMES=str(times))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                    "-p", "no:hypothesispytest", str(folder), *args],
                   env=env, check=True, capture_output=True, text=True)


def measure(n: int, nproc: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _write_suite(folder, n)
        _pytest(folder, folder / "plain", "-p", "no:dtensor_attn", "-k", "test_plain")
        _pytest(folder, folder / "sim", "-k", "test_mesh")
        env = dict(os.environ, HARNESS_TIMES=str(folder / "torchrun"))
        started = time.monotonic()
        # The suite's meshes have 4 ranks: with another --nproc they skip (still agreed on).
        subprocess.run(["bash", str(REPO / "scripts/run_torchrun.sh"), "-n", str(nproc),
                        "--backend", "gloo", "--out", str(folder / "out"), "--",
                        str(folder), "-k", "test_mesh", "-p", "no:hypothesispytest"],
                       env=env, check=True, capture_output=True, text=True)
        torchrun_wall = time.monotonic() - started
        plain = _per_test_ms(_times(folder / "plain")["single"], "plain")
        sim = _per_test_ms(_times(folder / "sim")["single"], "mesh")
        ranks = _times(folder / "torchrun")
        slowest = {nodeid: max(r[nodeid] for r in ranks.values()) for nodeid in ranks["0"]}
        logs = [(folder / "out" / f"rank{r}.log").read_text() for r in range(nproc)]
        pg_up = [float(line.split("process group up in ")[1].split(" s")[0])
                 for log in logs for line in log.splitlines() if "process group up in" in line]
    torchrun = _per_test_ms(slowest, "mesh")
    return {
        "tests_per_kind": n,
        "plain_pytest_ms_per_test": round(plain, 3),
        "simulated_ms_per_test": round(sim, 3),
        "simulated_overhead_ms": round(sim - plain, 3),
        f"torchrun_{nproc}_ranks_ms_per_test": round(torchrun, 3),
        f"torchrun_{nproc}_ranks_overhead_ms": round(torchrun - plain, 3),
        "process_group_init_s_max": max(pg_up),
        "torchrun_wall_s_incl_startup": round(torchrun_wall, 1),
    }


def whole_runs() -> dict:
    """Wall time of the README's two commands' test parts on this machine."""
    result = {}
    for name, command in {
        "simulated_distributed_suite_pytest_n2_s": [sys.executable, "-m", "pytest", "-q", "-n",
                                                    "2", "tests/distributed"],
        "torchrun_4_gloo_ranks_s": ["bash", "scripts/run_torchrun.sh", "-n", "4", "--backend",
                                    "gloo", "--out", "out/bench-torchrun-4"],
        "all_tests_pytest_n2_s": [sys.executable, "-m", "pytest", "-q", "-n", "2"],
    }.items():
        started = time.monotonic()
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        result[name] = round(time.monotonic() - started, 1)
        result[name.removesuffix("_s") + "_exit"] = proc.returncode
        tail = [line for line in proc.stdout.splitlines()
                if re.search(r"\d+ (passed|failed|error)", line) and " in " in line]
        result[name.removesuffix("_s") + "_result"] = tail[-1].strip("= ") if tail else ""
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=150, help="tests of each kind (default 150)")
    parser.add_argument("--nproc", type=int, default=4, help="torchrun ranks (default 4)")
    parser.add_argument("--whole-runs", action="store_true", help="also time the suites")
    args = parser.parse_args()
    result = {"machine": f"{os.cpu_count()} CPUs, {sys.platform}, python {sys.version.split()[0]}"}
    result.update(measure(args.n, args.nproc))
    if args.whole_runs:
        result.update(whole_runs())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
