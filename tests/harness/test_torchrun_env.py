"""torchrun mode's inputs: the worker environment, the settings and the backend choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dtensor_attn.testing.harness.torchrun_env import (
    RunSettings, TorchrunEnv, choose_backend, launched_by_torchrun,
)

WORKER = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
          "MASTER_ADDR": "node0", "MASTER_PORT": "29400", "TORCHELASTIC_RUN_ID": "job7",
          "TORCHELASTIC_RESTART_COUNT": "0"}


def test_worker_environment_is_read_into_a_value():
    assert launched_by_torchrun(WORKER) and not launched_by_torchrun({"RANK": "0"})
    env = TorchrunEnv.from_environ(WORKER)
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 8, 1, 2)
    assert (env.master_addr, env.master_port, env.run_id, env.attempt) == (
        "node0", 29400, "job7", "0")


def test_missing_variables_are_named_with_the_fix():
    with pytest.raises(ValueError, match=r"missing \['MASTER_ADDR', 'MASTER_PORT'\]\. Fix: "
                                         r"launch with scripts/run_torchrun.sh"):
        TorchrunEnv.from_environ({"RANK": "0", "WORLD_SIZE": "1"})


def test_settings_derive_every_wait_from_the_phase_timeout():
    settings = RunSettings(out_dir=Path("out"), timeout_s=3)
    assert (settings.wait_timeout_s, settings.grace_s, settings.sync_timeout_s) == (5.0, 1.0, 60.0)
    assert settings.silence_s == 2.0  # 8 heartbeats missed, whatever the grace
    default = RunSettings(out_dir=Path("out"))
    assert (default.timeout_s, default.wait_timeout_s, default.grace_s) == (120.0, 150.0, 10.0)
    assert default.silence_s == 10.0
    assert default.sync_timeout_s == 240.0  # above a phase: the watchdog reports before gloo
    for bad in (dict(timeout_s=0), dict(backend="mpi"), dict(unmarked="maybe")):
        with pytest.raises(ValueError):
            RunSettings(out_dir=Path("out"), **bad)


def test_backend_is_gloo_without_a_gpu_per_local_rank():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the CPU choice is what is checked here")
    assert choose_backend("auto", 4) == "gloo" == choose_backend("gloo", 4)
    with pytest.raises(ValueError, match="needs one GPU per local rank: 4 ranks, 0 GPUs"):
        choose_backend("nccl", 4)
