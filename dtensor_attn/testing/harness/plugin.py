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

import os
from pathlib import Path

import pytest
import torch

# The placement-trace fixture (dtensor_attn.explain) comes with the harness.
pytest_plugins = ["dtensor_attn.explain.pytest_trace"]

from dtensor_attn.testing.harness.meshspec import mesh_axes_of
from dtensor_attn.testing.harness.ranklog import start_rank_log
from dtensor_attn.testing.harness.simulate import SimulatedMode
from dtensor_attn.testing.harness.torchrun_env import (
    BACKENDS, UNMARKED, RunSettings, TorchrunEnv, launched_by_torchrun,
)
from dtensor_attn.testing.harness.torchrun_plugin import TorchrunPlugin
from dtensor_attn.testing.harness.torchrun_session import TorchrunSession

_MODE = pytest.StashKey[object]()  # SimulatedMode, or the registered TorchrunPlugin
_MESH = pytest.StashKey[object]()
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
        config.stash[_MODE] = SimulatedMode(device)
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
    plugin = TorchrunPlugin(run)
    config.stash[_MODE] = plugin
    config.pluginmanager.register(plugin, "dtensor_attn_torchrun")


def _mode(config: pytest.Config) -> SimulatedMode | TorchrunPlugin:
    return config.stash[_MODE]


def pytest_report_header(config: pytest.Config) -> str:
    return _mode(config).header()


@pytest.hookimpl(tryfirst=True, specname="pytest_runtest_setup")
def pytest_runtest_setup_mesh(item: pytest.Item) -> None:
    """Skip a test that cannot run here, else build its mesh (and enter simulated ranks).
    Not a wrapper: skipping inside a wrapper would stop the inner wrappers of other plugins
    from setting up what their teardown expects."""
    axes = mesh_axes_of(item)
    if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device; torch.cuda.is_available() is False here")
    mode = _mode(item.config)
    reason = mode.skip_reason(axes)
    if reason is not None:
        pytest.skip(reason)
    if axes is not None:
        item.stash[_MESH] = mode.mesh(item, axes)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    try:
        return (yield)
    finally:
        _mode(item.config).close_test(item)


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
    return _mode(request.config).world_size(request.node)
