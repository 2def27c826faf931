"""The pytest plugin: one test file, two launchers (simulated ranks, or torchrun ranks).

- ``@pytest.mark.mesh(cp=2, tp=4)`` gives the test a ``mesh`` fixture (a DeviceMesh with
  ``mesh_dim_names`` in marker order), ``mesh_axes`` ({name: size}) and ``world_size``.
- **simulated** (plain ``pytest``, also with ``-n``): the whole test, from fixture setup to
  teardown, runs under LocalTensorMode on a fake process group (``simulate.py``).
- **torchrun** (detected from torchrun's environment, or ``--dtensor-mode=torchrun``): one
  process group for the session, meshes from ``init_device_mesh``, tests whose mesh does not
  fit the world size skip with a reason, and the ranks agree on every outcome
  (``torchrun_session.py``). Tests without a mesh marker skip there by default: they need no
  ranks and already ran in simulation (``--dtensor-unmarked=run`` runs them on every rank).
- ``@pytest.mark.gpu`` skips with a reason where CUDA is not available.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

# The placement-trace fixture (dtensor_attn.explain) comes with the harness.
pytest_plugins = ["dtensor_attn.explain.pytest_trace"]

from dtensor_attn.testing.harness.meshspec import mesh_axes_of, num_ranks, world_size_skip_reason
from dtensor_attn.testing.harness.ranklog import start_rank_log
from dtensor_attn.testing.harness.simulate import SimulatedMeshes
from dtensor_attn.testing.harness.torchrun_env import (
    BACKENDS, UNMARKED, RunSettings, TorchrunEnv, launched_by_torchrun,
)
from dtensor_attn.testing.harness.torchrun_session import TorchrunSession

_SIMULATED = pytest.StashKey[SimulatedMeshes]()
_TORCHRUN = pytest.StashKey[TorchrunSession]()
_MESH = pytest.StashKey[object]()
_RANKS_MODE = pytest.StashKey[contextlib.ExitStack]()
_CONSOLE = pytest.StashKey[int]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dtensor_attn", "dtensor_attn distributed test harness")
    group.addoption("--dtensor-mode", choices=("auto", "simulate", "torchrun"), default="auto",
                    help="simulated ranks, or torchrun ranks; auto: torchrun when launched by it")
    group.addoption("--dtensor-timeout", type=float, default=120.0, metavar="SECONDS",
                    help="torchrun: limit of each test phase and of each wait for the other "
                    "ranks' outcome (default 120)")
    group.addoption("--dtensor-backend", choices=BACKENDS, default="auto",
                    help="torchrun: process group backend; auto: nccl if every local rank has "
                    "a GPU, else gloo")
    group.addoption("--dtensor-out", default="out/torchrun", metavar="DIR",
                    help="torchrun: folder for rank<r>.log and rank<r>.xml (default out/torchrun)")
    group.addoption("--dtensor-unmarked", choices=UNMARKED, default="skip",
                    help="torchrun: skip (default) or run tests without a mesh marker")
    group.addoption("--dtensor-device", choices=("cpu", "cuda"), default="cpu",
                    help="simulated: the device of the meshes (default cpu); cuda puts every "
                    "simulated rank on the one GPU: CUDA kernels and torch's CUDA-only ring "
                    "attention on a machine with fewer GPUs than ranks")


def _torchrun_mode(mode: str) -> bool:
    return mode == "torchrun" or (mode == "auto" and launched_by_torchrun(os.environ))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser, args):
    """Before pytest captures output: ranks other than 0 print into their log files."""
    options = early_config.known_args_namespace
    if _torchrun_mode(options.dtensor_mode) and "RANK" in os.environ:  # else: configure says why
        start_rank_log(Path(options.dtensor_out), int(os.environ["RANK"]))
        early_config.stash[_CONSOLE] = os.dup(1)  # the console (rank 0) or the log, uncaptured
    return (yield)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "mesh(**axes): build a device mesh for the test, e.g. "
                            "mesh(cp=2, tp=4); simulated ranks or torchrun ranks")
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped with a reason on CPU")
    device = config.getoption("dtensor_device")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("--dtensor-device cuda: torch.cuda.is_available() is False here. "
                                "Fix: drop the option (simulated meshes on cpu) or run on a GPU machine.")
    if not _torchrun_mode(config.getoption("dtensor_mode")):
        config.stash[_SIMULATED] = SimulatedMeshes(device)
        return
    if device != "cpu":
        raise pytest.UsageError("--dtensor-device is for simulated ranks; under torchrun every rank "
                                "uses its own GPU with NCCL (--dtensor-backend). Fix: drop the option.")
    if getattr(config.option, "numprocesses", None):
        raise pytest.UsageError(
            "torchrun mode runs one pytest per rank; pytest-xdist's -n would start several per "
            "rank. Fix: drop -n under torchrun (use it for simulated runs)."
        )
    try:
        settings = RunSettings(
            out_dir=Path(config.getoption("dtensor_out")),
            timeout_s=config.getoption("dtensor_timeout"),
            backend=config.getoption("dtensor_backend"),
            unmarked=config.getoption("dtensor_unmarked"),
        )
        env = TorchrunEnv.from_environ(os.environ)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    run = TorchrunSession(env, settings)
    run.console_fd = config.stash.get(_CONSOLE, None)
    config.stash[_TORCHRUN] = run
    config.pluginmanager.register(_CollectionErrors(run), "dtensor_attn_collection_errors")


class _CollectionErrors:
    """Under torchrun, a file that fails to collect is an error in JUnit (pytest then stops
    before any test; without this the JUnit file would hold no case at all)."""

    def __init__(self, run: TorchrunSession) -> None:
        self.run = run

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.failed:
            self.run.collection_error(report.nodeid, report.longreprtext)


def _session(config: pytest.Config) -> TorchrunSession | None:
    return config.stash.get(_TORCHRUN, None)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    if (run := _session(session.config)) is not None:
        run.start()


def pytest_report_header(config: pytest.Config) -> str:
    run = _session(config)
    if run is None:
        device = config.getoption("dtensor_device")
        return f"dtensor_attn: simulated ranks (LocalTensorMode on a fake process group), {device} meshes"
    return (f"dtensor_attn: torchrun rank {run.rank} of {run.world_size}, backend {run.backend}, "
            f"phase timeout {run.settings.timeout_s:g} s, logs and JUnit XML in "
            f"{run.settings.out_dir}")


def pytest_collection_finish(session: pytest.Session) -> None:
    run = _session(session.config)
    if run is None:
        return
    difference = run.check_collection([item.nodeid for item in session.items])
    if difference is not None:
        run.stop_reason = difference
        pytest.exit(f"dtensor_attn: {difference}", returncode=pytest.ExitCode.INTERRUPTED)


def _skip_reason(item: pytest.Item, axes: dict[str, int] | None) -> str | None:
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        return "needs a CUDA device; torch.cuda.is_available() is False here"
    run = _session(item.config)
    if run is None:
        return None
    if axes is None:
        if run.settings.unmarked == "run":
            return None
        return ("no mesh marker: runs in simulation (plain pytest); under torchrun only mesh "
                "tests run (--dtensor-unmarked=run to run it on every rank)")
    return world_size_skip_reason(axes, run.world_size)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_setup(item: pytest.Item):
    run = _session(item.config)
    if run is None:
        return (yield)
    run.begin_phase(item.nodeid, "setup")
    try:
        return (yield)
    finally:
        run.end_phase()


@pytest.hookimpl(tryfirst=True, specname="pytest_runtest_setup")
def pytest_runtest_setup_mesh(item: pytest.Item) -> None:
    """Skip a test that cannot run here, else build its mesh (and enter simulated ranks).
    Not a wrapper: skipping inside a wrapper would stop the inner wrappers of other plugins
    from setting up what their teardown expects."""
    axes = mesh_axes_of(item)
    reason = _skip_reason(item, axes)
    if reason is not None:
        pytest.skip(reason)
    if axes is None:
        return
    run = _session(item.config)
    if run is not None:
        item.stash[_MESH] = run.mesh(axes)
        return
    stack = contextlib.ExitStack()
    item.stash[_RANKS_MODE] = stack
    item.stash[_MESH] = item.config.stash[_SIMULATED].enter(axes, stack)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item):
    run = _session(item.config)
    if run is None:
        return (yield)
    run.begin_phase(item.nodeid, "call")
    try:
        return (yield)
    finally:
        run.end_phase()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    run = _session(item.config)
    if run is not None:
        run.begin_phase(item.nodeid, "teardown")
    try:
        return (yield)
    finally:
        stack = item.stash.get(_RANKS_MODE, None)
        if stack is not None:
            del item.stash[_RANKS_MODE]
            stack.close()
        if run is not None:
            run.end_phase()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if (run := _session(item.config)) is not None:
        run.agree(item, call, report)
    return report


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    if (run := _session(session.config)) is not None:
        run.pytest_session = session
        num_collected = len(getattr(session, "items", []))
        session.exitstatus = run.finish(num_collected, int(session.exitstatus))


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    run = _session(config)
    if run is None or run.rank != 0:
        return
    terminalreporter.write_sep("=", f"dtensor_attn: {run.world_size} torchrun ranks, {run.backend}")
    terminalreporter.write_line(f"{'rank':<6}{'passed':>8}{'failed':>8}{'errors':>8}{'skipped':>9}")
    for rank, totals in sorted(run.rank_summaries.items()):
        if totals is None:
            terminalreporter.write_line(f"{rank:<6}  no summary: hung, stuck or killed (see "
                                        f"{run.settings.out_dir}/rank{rank}.log)")
            continue
        terminalreporter.write_line(
            f"{rank:<6}{totals.get('passed', 0):>8}{totals.get('failed', 0):>8}"
            f"{totals.get('error', 0):>8}{totals.get('skipped', 0):>9}"
        )
    for nodeid, when, verdict in run.failures:
        ranks = ", ".join(map(str, verdict.root_ranks))
        terminalreporter.write_line(f"root cause: rank {ranks} in {when} of {nodeid}")
    if run.stop_reason:
        terminalreporter.write_line(f"run stopped: {run.stop_reason}")
    if run.no_test_ran:
        terminalreporter.write_line(run.no_test_ran, red=True)
    terminalreporter.write_line(f"per-rank logs and JUnit XML: {run.settings.out_dir} (the "
                                "run-level junit.xml follows from scripts/run_torchrun.sh)")


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if (run := _session(config)) is None:
        return
    del config.stash[_TORCHRUN]
    run.close()
    # Every rank has written its results and passed the final store barrier. Exit now, all
    # within milliseconds: torchrun stops the other workers as soon as one exits non-zero, and
    # would otherwise SIGTERM (and then blame) a rank still in interpreter shutdown.
    session = run.pytest_session
    status = int(session.exitstatus) if session is not None else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


@pytest.fixture
def mesh(request: pytest.FixtureRequest):
    """The test's DeviceMesh, built from its ``mesh`` marker (cached per axes in a session)."""
    if _MESH not in request.node.stash:
        pytest.fail(f"{request.node.nodeid}: the 'mesh' fixture needs a mesh, e.g. "
                    "@pytest.mark.mesh(tp=2)", pytrace=False)
    return request.node.stash[_MESH]


@pytest.fixture
def mesh_axes(request: pytest.FixtureRequest) -> dict[str, int]:
    """{axis name: size} of the test's mesh, in marker order."""
    axes = mesh_axes_of(request.node)
    if axes is None:
        pytest.fail(f"{request.node.nodeid}: 'mesh_axes' needs @pytest.mark.mesh(...)",
                    pytrace=False)
    return dict(axes)


@pytest.fixture
def world_size(request: pytest.FixtureRequest) -> int:
    """Ranks this test runs on: the mesh size (simulated), the torchrun world size otherwise."""
    run = _session(request.config)
    if run is not None:
        return run.world_size
    axes = mesh_axes_of(request.node)
    return 1 if axes is None else num_ranks(axes)
