"""scripts/run_torchrun.sh's command line and scripts/setup.sh's quick path."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def _dry_run(*args: str) -> str:
    result = _run("scripts/run_torchrun.sh", "--dry-run", "--backend", "gloo", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_default_is_one_node_on_a_free_port_running_the_distributed_suite():
    command = _dry_run()
    assert command.startswith("run_torchrun.sh: 4 ranks, gloo; ")
    assert "torch.distributed.run --standalone --nproc-per-node 4 -m pytest" in command
    assert "--dtensor-mode torchrun --dtensor-backend gloo --dtensor-out " \
           f"{REPO}/out/torchrun tests/distributed" in command
    assert "--master-port" not in command and "--master_port" not in command


def test_multi_node_flags_are_forwarded_to_torchrun_and_pytest_args_to_pytest():
    command = _dry_run("-n", "2", "--nnodes=2", "--node-rank", "1", "--rdzv-endpoint",
                       "node0:29400", "--rdzv-id", "job7", "--timeout", "30", "--out", "o",
                       "--", "tests/distributed", "-k", "tp")
    assert "--nnodes 2 --node-rank 1 --rdzv-endpoint node0:29400 --rdzv-id job7 " \
           "--rdzv-backend c10d --nproc-per-node 2 -m pytest" in command
    assert "--standalone" not in command
    assert f"--dtensor-out {REPO}/o --dtensor-timeout 30 tests/distributed -k tp" in command


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unknown option --bogus (see --help); pytest arguments go after --"),
        (["--backend", "mpi"], "--backend must be gloo or nccl"),
        (["-n"], "-n needs a value"),
    ],
)
def test_bad_arguments_exit_2_with_the_fix(args, message):
    result = _run("scripts/run_torchrun.sh", *args)
    assert result.returncode == 2 and message in result.stderr


def test_help_lists_the_options():
    result = _run("scripts/run_torchrun.sh", "--help")
    assert result.returncode == 0
    for option in ("-n NPROC", "--backend B", "--timeout S", "--out DIR", "--run-timeout S",
                   "--dry-run", "--nnodes N --node-rank R --rdzv-endpoint HOST:PORT"):
        assert option in result.stdout
    assert "junit.xml (the run, for CI)" in result.stdout  # where CI reads the results


def test_setup_is_quick_and_changes_nothing_when_everything_is_installed():
    result = _run("scripts/setup.sh")
    assert result.returncode == 0, result.stderr
    assert "already installed" in result.stdout and "pip" not in result.stdout


def test_setup_pins_the_installed_torch_distribution_not_its_version_string(tmp_path):
    """PyPI's CUDA wheels install distribution 2.11.0 whose torch.__version__ is 2.11.0+cu130:
    a pin on the version string matches no distribution and pip refuses to install anything."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text('__version__ = "9.9.9+cu999"\n')
    (tmp_path / "torch-9.9.9.dist-info").mkdir()
    (tmp_path / "torch-9.9.9.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: torch\nVersion: 9.9.9\n")
    result = subprocess.run(["bash", "scripts/setup.sh", "--dry-run"], cwd=REPO, text=True,
                            capture_output=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert "-m pip install -c <(echo torch==9.9.9) -e .[test]" in result.stdout, result.stdout
