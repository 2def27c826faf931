"""The torchrun harness on small planted suites: scripts/run_torchrun.sh with 2 gloo ranks.

Each scenario plants one misbehaving rank (an assertion, an exception before a collective, a
sleep past the timeout, a SIGKILL, a different test list, a collective left pending) and checks
what the issue asks: the run ends non-zero within the timeout, the report names the rank and
the test (the root cause apart from collateral ranks), and no process of the run is left.
The fully passing suite must report identical counts on every rank.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "run_torchrun.sh"
# --timeout of the planted runs. Runs that plant a hang use a short one (the hang is detected
# after it); the others a long one, far above their slowest phase on a loaded machine (the
# first DTensor op alone takes ~1.2 s on 2 idle cores). A stopped run never reaches test_dtensor.
PHASE_TIMEOUT_S = {"raise": 5, "sleep": 5, "skip": 5, "exit0": 5, "gil": 5}
DEFAULT_PHASE_TIMEOUT_S = 30
# Bound on a whole planted run (start-up of 2 ranks and torchrun included) on a loaded 2-core
# machine; a hang that the harness failed to end would take at least the 120 s run timeout.
RUN_BOUND_S = 60

PLANTED = '''
import os, re, signal, time
import pytest, torch, torch.distributed as dist
from torch.distributed.tensor import Shard, distribute_tensor
from dtensor_attn.testing import assert_dtensor_close

RANK = int(os.environ["RANK"])
SCENARIO = os.environ["SCENARIO"]


@pytest.mark.mesh(tp=2)
def test_first(mesh):
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2


@pytest.mark.mesh(tp=2)
def test_planted(mesh):
    if SCENARIO == "assert" and RANK == 1:
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == 3, "planted assertion on rank 1"
        return
    if SCENARIO == "raise" and RANK == 1:
        raise RuntimeError("planted exception on rank 1 before the all_reduce")
    if SCENARIO == "sleep" and RANK == 1:
        time.sleep(600)
    if SCENARIO == "kill" and RANK == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if SCENARIO == "skip" and RANK == 1:
        pytest.skip("planted skip on rank 1 only")
    if SCENARIO == "exit0" and RANK == 1:
        os._exit(0)
    if SCENARIO == "gil" and RANK == 1:
        re.match(r"(a+)+$", "a" * 40 + "b")  # backtracks for hours, never releasing the GIL
    if SCENARIO == "pending":
        if RANK == 0:
            dist.all_reduce(torch.ones(1), async_op=True)  # never waited, never matched
        return
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2


@pytest.mark.mesh(dp=1, tp=2)
def test_next(mesh):
    # Pairs with a pending collective of test_planted if the harness let the run go on.
    t = torch.full((1,), float(RANK + 1))
    dist.all_reduce(t, group=mesh.get_group("tp"))
    assert t.item() == 3


@pytest.mark.mesh(tp=2)
def test_dtensor(mesh):
    x = torch.arange(8.0).reshape(4, 2)
    assert_dtensor_close(distribute_tensor(x, mesh, [Shard(0)]), x, rtol=0, atol=0)


@pytest.mark.mesh(cp=2, tp=2)
def test_needs_four(mesh):
    pass


def test_unmarked():
    pass


if SCENARIO == "collect" and RANK == 1:
    def test_only_on_rank1():
        pass
'''


@dataclasses.dataclass
class Run:
    returncode: int
    output: str
    seconds: float
    out_dir: Path
    leftovers: list[int]

    def junit(self, rank: int) -> ET.Element:
        return ET.parse(self.out_dir / f"rank{rank}.xml").getroot().find("testsuite")

    def outcomes(self, rank: int) -> dict[str, str]:
        """{test name: passed|failure|error|skipped} from one rank's JUnit file."""
        result = {}
        for case in self.junit(rank).iter("testcase"):
            kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
            result[case.get("name")] = kinds[0] if kinds else "passed"
        return result

    def run_junit_outcomes(self) -> dict[str, str]:
        """{test name: outcome} from the launcher's run-level JUnit file (out/junit.xml)."""
        (suite,) = ET.parse(self.out_dir / "junit.xml").getroot().iter("testsuite")
        result = {}
        for case in suite.iter("testcase"):
            kinds = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
            result[case.get("name")] = kinds[0] if kinds else "passed"
        return result

    def log(self, rank: int) -> str:
        return (self.out_dir / f"rank{rank}.log").read_text(errors="replace")


def _processes_with(tag: str) -> list[int]:
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"DTENSOR_ATTN_RUN_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return pids


def _launch(tmp_path: Path, scenario: str, suite_text: str, *extra: str,
            timeout_s: float | None = None, run_timeout_s: int = 120, nproc: int = 2):
    """(Popen of run_torchrun.sh on the planted suite, its process tag)."""
    suite = tmp_path / "test_planted.py"
    suite.write_text(suite_text)
    tag = f"dtensor_attn-harness-{uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTEST_", "TORCHELASTIC_")) and k not in ("RANK", "WORLD_SIZE")}
    env.update(SCENARIO=scenario, DTENSOR_ATTN_RUN_TAG=tag)
    timeout_s = timeout_s or PHASE_TIMEOUT_S.get(scenario, DEFAULT_PHASE_TIMEOUT_S)
    command = [
        "bash", str(SCRIPT), "-n", str(nproc), "--backend", "gloo", "--timeout", str(timeout_s),
        "--run-timeout", str(run_timeout_s), "--out", str(tmp_path / "out"),
        # hypothesis's plugin (installed here, unused by us) imports itself at session end: 2 s
        "--", str(suite), "-p", "no:hypothesispytest", *extra,
    ]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, tag


def run_planted(tmp_path: Path, scenario: str, suite_text: str = PLANTED, *extra: str,
                **launch) -> Run:
    started = time.monotonic()
    proc, tag = _launch(tmp_path, scenario, suite_text, *extra, **launch)
    output, _ = proc.communicate(timeout=240)
    seconds = time.monotonic() - started
    return Run(proc.returncode, output, seconds, tmp_path / "out", _processes_with(tag))


def _assert_ended_cleanly(run: Run, bound_s: float = RUN_BOUND_S) -> None:
    """Ended by itself within the bound: no leftover, and the launcher swept nothing."""
    assert run.leftovers == [], f"processes left behind: {run.leftovers}\n{run.output}"
    assert "stopping leftover processes" not in run.output, run.output
    assert run.seconds < bound_s, f"took {run.seconds:.1f} s\n{run.output}"


def test_passing_suite_reports_identical_counts_on_every_rank(tmp_path):
    run = run_planted(tmp_path, "pass")
    assert run.returncode == 0, run.output
    counts = [
        {key: run.junit(rank).get(key) for key in ("tests", "failures", "errors", "skipped")}
        for rank in (0, 1)
    ]
    assert counts[0] == counts[1] == {"tests": "6", "failures": "0", "errors": "0",
                                      "skipped": "2"}
    assert all(run.junit(rank).get("complete") == "true" for rank in (0, 1))
    # Rank 0's console table (through the store) and the launcher's (from the files).
    rows = re.findall(r"^([01])\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\b", run.output, re.M)
    assert rows == [("0", "4", "0", "0", "2"), ("1", "4", "0", "0", "2")] * 2, run.output
    assert "mesh cp=2 x tp=2 needs 4 ranks, this run has 2" in run.log(1)
    assert run.run_junit_outcomes() == {
        "test_first": "passed", "test_planted": "passed", "test_next": "passed",
        "test_dtensor": "passed", "test_needs_four": "skipped", "test_unmarked": "skipped"}
    _assert_ended_cleanly(run)


UNMARKED_ONLY = '''
import torch, torch.distributed as dist


def test_all_reduce():
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 2


def test_barrier():
    dist.barrier()
'''


def test_a_run_in_which_no_test_ran_fails_naming_the_option(tmp_path):
    """Plain torch.distributed tests without a mesh marker skip under torchrun: a run that
    tested nothing must not look like success (pytest exits 5 when nothing ran)."""
    run = run_planted(tmp_path, "unmarked", UNMARKED_ONLY)
    assert run.returncode != 0, run.output
    assert "no test ran" in run.output and "--dtensor-unmarked=run" in run.output, run.output
    assert run.run_junit_outcomes() == {
        "no_test_ran": "failure", "test_all_reduce": "skipped", "test_barrier": "skipped"}
    _assert_ended_cleanly(run)
    # The fix the message names: the same tests run on every rank and pass.
    rerun = run_planted(tmp_path, "unmarked", UNMARKED_ONLY, "--dtensor-unmarked=run")
    assert rerun.returncode == 0, rerun.output
    assert rerun.run_junit_outcomes() == {"test_all_reduce": "passed", "test_barrier": "passed"}


def test_assertion_on_one_rank_fails_the_test_on_every_rank_and_the_run_goes_on(tmp_path):
    run = run_planted(tmp_path, "assert")
    assert run.returncode != 0
    # Rank 0's console names the root cause and shows rank 1's own traceback.
    assert "failed in call on rank 1 first (root cause); every rank fails it." in run.output
    assert "rank 0: passed locally; failed because another rank failed (collateral)" in run.output
    assert "planted assertion on rank 1" in run.output
    for rank in (0, 1):
        outcomes = run.outcomes(rank)
        assert outcomes["test_planted"] == "failure"
        # Collectives stayed in step: the next tests' collectives pair correctly.
        assert outcomes["test_next"] == outcomes["test_dtensor"] == "passed"
    _assert_ended_cleanly(run)


PHASES = '''
import os
import pytest, torch, torch.distributed as dist
from dtensor_attn.testing import mesh_id

RANK = int(os.environ["RANK"])


def all_reduce_sum(value):
    t = torch.full((1,), float(value))
    dist.all_reduce(t)
    return t.item()


@pytest.fixture
def fails_on_rank1_setup():
    if RANK == 1:
        raise RuntimeError("planted setup failure on rank 1")


@pytest.fixture
def fails_on_rank0_teardown():
    yield
    if RANK == 0:
        raise RuntimeError("planted teardown failure on rank 0")


@pytest.mark.mesh(tp=2)
def test_setup_fails_on_rank1(mesh, fails_on_rank1_setup):
    all_reduce_sum(1)  # never reached on rank 0 either: it would wait for rank 1 forever


@pytest.mark.mesh(tp=2)
def test_after_setup_failure(mesh):
    assert all_reduce_sum(RANK + 1) == 3


@pytest.mark.mesh(tp=2)
def test_teardown_fails_on_rank0(mesh, fails_on_rank0_teardown):
    assert all_reduce_sum(1) == 2


def test_unmarked_runs_on_every_rank(world_size):
    assert world_size == 2 and all_reduce_sum(1) == 2


@pytest.mark.mesh(tp=2)
@pytest.mark.xfail(reason="planted, on every rank", strict=True)
def test_xfail_everywhere(mesh):
    assert all_reduce_sum(1) == 3


@pytest.mark.parametrize("size", [pytest.param(2, marks=pytest.mark.mesh(tp=2), id="tp2"),
                                  pytest.param(4, marks=pytest.mark.mesh(tp=4), id="tp4")])
def test_param_meshes(mesh, size):
    assert mesh.size() == size == all_reduce_sum(1)


@pytest.mark.parametrize("mesh", [{"dp": 1, "tp": 2}], indirect=True, ids=mesh_id)
def test_indirect(mesh, mesh_axes):
    assert mesh_axes == {"dp": 1, "tp": 2} and mesh.mesh_dim_names == ("dp", "tp")
'''


def test_setup_and_teardown_failures_markers_and_unmarked_tests_under_torchrun(tmp_path):
    run = run_planted(tmp_path, "phases", PHASES, "--dtensor-unmarked", "run")
    assert run.returncode != 0
    expected = {
        "test_setup_fails_on_rank1": "error",
        "test_after_setup_failure": "passed",
        "test_teardown_fails_on_rank0": "error",
        "test_unmarked_runs_on_every_rank": "passed",
        "test_xfail_everywhere": "skipped",
        "test_param_meshes[tp2]": "passed",
        "test_param_meshes[tp4]": "skipped",
        "test_indirect[dp1xtp2]": "passed",
    }
    assert run.outcomes(0) == run.outcomes(1) == expected
    assert "failed in setup on rank 1 first (root cause)" in run.output
    assert "RuntimeError: planted setup failure on rank 1" in run.output
    assert "failed in teardown on rank 0 first (root cause)" in run.output
    for rank in (0, 1):
        assert "mesh tp=4 needs 4 ranks, this run has 2" in run.log(rank)
    _assert_ended_cleanly(run)


STOPPING = {
    # scenario: (what rank 0's console or the summary must say, ...)
    "raise": (
        "failed in call on rank 1 first (root cause)",
        "RuntimeError: planted exception on rank 1 before the all_reduce",
        "rank 0: stuck: still in the call of test_planted.py::test_planted",
        "waiting in all_reduce (called from test_planted.py:",
        "stopping the run after test_planted.py::test_planted (call): rank 0 stuck",
    ),
    "sleep": (
        "failed in call on rank 1 first (root cause)",
        "rank 1: hung: the call of test_planted.py::test_planted ran past the 5 s timeout "
        "(stacks in",
        "rank 0: stuck: the call of test_planted.py::test_planted ran past the 5 s timeout "
        "waiting in all_reduce",
    ),
    "kill": (
        "root cause: rank 1 ended exit signal 9 SIGKILL during test_planted.py::test_planted "
        "(call)",
    ),
    "collect": (
        "ranks collected different tests",
        "rank 1 collected 7 tests, rank 0 6; only on rank 1: test_planted.py::test_only_on_rank1",
    ),
    "pending": (
        "collectives out of step on the group of ranks [0, 1]: rank 0 issued 2, rank 1 issued 1",
        "run stopped: stopping the run after test_planted.py::test_planted",
    ),
    # The rank that diverged is the root cause; a rank waiting for it in a collective, or
    # failing because it vanished, is collateral.
    "skip": (
        "failed in call on rank 1 first (root cause)",
        "rank 1: skipped locally (Skipped: planted skip on rank 1 only) while rank 0 did not "
        "(root cause)",
        "rank 0: stuck: still in the call of test_planted.py::test_planted",
        "after rank 1 skipped it, waiting in all_reduce (called from test_planted.py:",
    ),
    "exit0": (
        "failed in call on rank 1 first (root cause)",
        "rank 1: went silent during the call of test_planted.py::test_planted: no report and no "
        "heartbeat for",
        "rank 0: failed too, +",
        "by peer",  # gloo: "Connection reset by peer" or "Connection closed by peer"
    ),
    "gil": (
        "failed in call on rank 1 first (root cause)",
        "rank 1: went silent during the call of test_planted.py::test_planted: no report and no "
        "heartbeat for",
        "rank 0: stuck: still in the call of test_planted.py::test_planted",
        "rank 1 sent no heartbeat for",
    ),
}
# The verdict header that the issue saw blame the wrong rank.
WRONG_ROOT = ("on rank 0 first (root cause)", "on ranks 0, 1 first (root cause)")


# Lines each rank's log must hold: the faulthandler dump of a hung or stuck rank shows where.
SLEEP_LINE = PLANTED.splitlines().index("        time.sleep(600)") + 1
GIL_LINE = PLANTED.splitlines().index(
    '        re.match(r"(a+)+$", "a" * 40 + "b")  # backtracks for hours, never releasing the GIL'
) + 1
LOGS = {
    "raise": {0: ("stacks of every thread", "in all_reduce")},
    "sleep": {0: ("stacks of every thread", "in all_reduce"),
              1: ("stacks of every thread",
                  f'test_planted.py", line {SLEEP_LINE} in test_planted')},
    "kill": {1: ("start call test_planted.py::test_planted",)},
    # The GIL-holding rank cannot run its watchdog; torchrun's SIGTERM dumps its stacks.
    "gil": {1: (f'test_planted.py", line {GIL_LINE} in test_planted',)},
}

UNREACHED = ("test_next", "test_dtensor", "test_needs_four", "test_unmarked")
# The launcher's run-level JUnit (out/junit.xml): every collected test, the broken one as a
# failure (the agreed verdict) or an error (no rank lived to record it), the rest skipped as
# not run.
RUN_JUNIT = {
    scenario: {"test_first": "passed", "test_planted": "failure",
               **{name: "skipped" for name in UNREACHED}}
    for scenario in ("raise", "sleep", "pending", "skip", "exit0", "gil")
}
RUN_JUNIT["kill"] = dict(RUN_JUNIT["raise"], test_planted="error")
RUN_JUNIT["collect"] = {
    "collection": "failure",
    **{name: "skipped" for name in ("test_first", "test_planted", *UNREACHED,
                                    "test_only_on_rank1")},
}


@pytest.mark.parametrize("scenario", list(STOPPING))
def test_broken_rank_stops_the_run_naming_rank_and_test(tmp_path, scenario):
    run = run_planted(tmp_path, scenario)
    assert run.returncode != 0, run.output
    for text in STOPPING[scenario]:
        assert text in run.output, f"missing {text!r} in:\n{run.output}"
    for text in WRONG_ROOT:
        assert text not in run.output, f"blames the wrong rank ({text!r}):\n{run.output}"
    for rank, texts in LOGS.get(scenario, {}).items():
        for text in texts:
            assert text in run.log(rank), f"missing {text!r} in rank {rank}'s log"
    # Nothing runs after a broken test (its collectives could pair with a pending one); every
    # rank's JUnit still lists each test it never reached, and none is green.
    for rank in (0, 1):
        outcomes = run.outcomes(rank)
        assert set(outcomes.values()) & {"failure", "error"}, (rank, outcomes)
        if scenario != "collect":
            assert outcomes.get("test_next") in (None, "skipped"), (rank, outcomes)
    assert run.run_junit_outcomes() == RUN_JUNIT[scenario], run.output
    assert "junit.xml" in run.output  # the launcher says where CI should read
    _assert_ended_cleanly(run)


def test_a_file_that_fails_to_collect_is_an_error_in_junit(tmp_path):
    run = run_planted(tmp_path, "syntax", "import torch\n\ndef test_broken(:\n    pass\n")
    assert run.returncode != 0, run.output
    assert run.run_junit_outcomes() == {"collection_error[test_planted.py]": "error"}
    assert all(run.outcomes(rank) == {"collection_error[test_planted.py]": "error"}
               for rank in (0, 1))
    _assert_ended_cleanly(run)


def test_run_timeout_stops_a_run_whose_phase_limit_is_too_long(tmp_path):
    # A 100 s phase limit lets the sleeping rank hang; the launcher's own limit still ends it.
    run = run_planted(tmp_path, "sleep", timeout_s=100, run_timeout_s=12)
    assert run.returncode == 124, run.output
    assert "the run exceeded --run-timeout 12 s and was stopped" in run.output
    assert "did not finish: ended during test_planted.py::test_planted (call)" in run.output
    assert run.leftovers == [] and run.seconds < RUN_BOUND_S
    (suite,) = ET.parse(run.out_dir / "junit.xml").getroot().iter("testsuite")
    assert suite.get("stop_reason") == "the run exceeded --run-timeout 12 s and was stopped"
    outcomes = run.run_junit_outcomes()
    assert outcomes["test_planted"] == "error" and outcomes["test_next"] == "skipped", outcomes


def test_sigterm_to_the_launcher_stops_every_process_of_the_run(tmp_path):
    started = time.monotonic()
    proc, tag = _launch(tmp_path, "sleep", PLANTED, timeout_s=100)
    log = tmp_path / "out" / "rank1.log"
    while "start call test_planted.py::test_planted" not in (
        log.read_text() if log.exists() else ""
    ):
        assert time.monotonic() - started < RUN_BOUND_S, "the planted test never started"
        time.sleep(0.2)
    proc.terminate()  # SIGTERM, as a CI runner's cancel or Ctrl-C's cousin
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    assert "run_torchrun.sh: interrupted" in output
    assert _processes_with(tag) == []


EIGHT_RANKS = '''
import os
import pytest, torch, torch.distributed as dist

RANK = int(os.environ["RANK"])


@pytest.mark.mesh(dp=2, cp=2, tp=2)
def test_first(mesh):
    t = torch.ones(1)
    dist.all_reduce(t, group=mesh.get_group("tp"))
    assert t.item() == 2


@pytest.mark.mesh(tp=8)
def test_planted(mesh):
    if RANK == 5:
        raise RuntimeError("planted exception on rank 5 before the all_reduce")
    t = torch.ones(1)
    dist.all_reduce(t)
    assert t.item() == 8


@pytest.mark.mesh(tp=8)
def test_next(mesh):
    dist.all_reduce(torch.ones(1))
'''
# 8 ranks share 2 cores here: start-up alone takes ~15 s of the bound.
EIGHT_RANK_BOUND_S = 150


def test_eight_ranks_one_raises_the_run_ends_naming_it(tmp_path):
    """The CI runner's size (8 ranks; gloo on CPU here, NCCL on an 8-GPU host): rank 5 fails
    before a collective that the 7 others enter. The run ends, rank 0's console names rank 5
    with its traceback and the stuck ranks, nothing runs after it, and no process is left."""
    run = run_planted(tmp_path, "eight", EIGHT_RANKS, nproc=8, run_timeout_s=EIGHT_RANK_BOUND_S)
    assert run.returncode != 0, run.output
    for text in (
        "failed in call on rank 5 first (root cause)",
        "RuntimeError: planted exception on rank 5 before the all_reduce",
        "stuck: still in the call of test_planted.py::test_planted",
        "stopping the run after test_planted.py::test_planted (call)",
    ):
        assert text in run.output, f"missing {text!r} in:\n{run.output}"
    for rank in range(8):
        outcomes = run.outcomes(rank)
        assert outcomes["test_first"] == "passed" and outcomes["test_planted"] == "failure", (rank, outcomes)
        assert outcomes.get("test_next") in (None, "skipped"), (rank, outcomes)  # never run
    assert run.run_junit_outcomes() == {"test_first": "passed", "test_planted": "failure",
                                        "test_next": "skipped"}
    _assert_ended_cleanly(run, EIGHT_RANK_BOUND_S)
