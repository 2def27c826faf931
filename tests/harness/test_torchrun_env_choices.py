"""torchrun mode's option values as enums (torchrun_env.py): the options' choices, the settings
that hold them, and the backend choice over every GPU count."""

from __future__ import annotations

from pathlib import Path

import pytest

from dtensor_attn.testing.harness import torchrun_env
from dtensor_attn.testing.harness.torchrun_env import (
    BACKENDS, UNMARKED, BackendChoice, RunSettings, Unmarked, choose_backend,
)


def test_the_options_choices_are_the_enums_values_in_order():
    assert BACKENDS == ("auto", "gloo", "nccl") and UNMARKED == ("skip", "run")
    assert [c.value for c in BackendChoice] == list(BACKENDS)
    assert [c.value for c in Unmarked] == list(UNMARKED)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("unmarked", UNMARKED)
def test_settings_from_the_options_strings_hold_enum_members(backend, unmarked):
    settings = RunSettings(out_dir=Path("out"), backend=backend, unmarked=unmarked)
    assert settings.backend is BackendChoice(backend) and settings.unmarked is Unmarked(unmarked)
    assert f"{settings.backend}" == backend and str(settings.unmarked) == unmarked


def test_defaults_are_auto_and_skip():
    settings = RunSettings(out_dir=Path("out"))
    assert (settings.backend, settings.unmarked) == (BackendChoice.AUTO, Unmarked.SKIP)


@pytest.mark.parametrize("field,value,needle", [
    ("backend", "mpi", "--dtensor-backend must be one of ('auto', 'gloo', 'nccl'), got 'mpi'."),
    ("unmarked", "maybe", "--dtensor-unmarked must be one of ('skip', 'run'), got 'maybe'."),
], ids=["backend", "unmarked"])
def test_a_value_outside_the_choices_names_them(field, value, needle):
    with pytest.raises(ValueError) as error:
        RunSettings(out_dir=Path("out"), **{field: value})
    assert str(error.value) == needle


def _gpus(monkeypatch, count):
    cuda = type("Cuda", (), {"is_available": staticmethod(lambda: count > 0),
                              "device_count": staticmethod(lambda: count)})
    monkeypatch.setattr(torchrun_env.torch, "cuda", cuda)


@pytest.mark.parametrize("num_gpus", [0, 1, 2, 4, 8])
@pytest.mark.parametrize("local_world_size", [1, 2, 4, 8])
def test_auto_is_nccl_exactly_when_every_local_rank_has_a_gpu(monkeypatch, num_gpus,
                                                              local_world_size):
    _gpus(monkeypatch, num_gpus)
    enough = num_gpus >= local_world_size
    assert choose_backend("auto", local_world_size) is (
        BackendChoice.NCCL if enough else BackendChoice.GLOO)
    assert choose_backend(BackendChoice.GLOO, local_world_size) is BackendChoice.GLOO
    if enough:
        assert choose_backend("nccl", local_world_size) is BackendChoice.NCCL
    else:
        with pytest.raises(ValueError, match=f"needs one GPU per local rank: {local_world_size} "
                                             f"ranks, {num_gpus} GPUs. Fix: fewer ranks"):
            choose_backend("nccl", local_world_size)
