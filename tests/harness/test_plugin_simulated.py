"""The plugin in simulated mode, end to end through pytester on small planted suites."""

from __future__ import annotations

import pytest

from dtensor_attn.testing.harness.meshspec import (
    describe_axes, mesh_id, validate_axes, world_size_skip_reason,
)

CONTRACT = '''
import pytest, torch
from torch.distributed.tensor import Shard, distribute_tensor
from dtensor_attn import _compat
from dtensor_attn.testing import assert_dtensor_close, mesh_id

MESHES = []


@pytest.fixture
def x_dt(mesh):
    # Fixtures run inside simulated ranks too: their DTensors hold every rank's local.
    assert _compat.local_tensor_mode_active()
    yield distribute_tensor(torch.arange(16.0).reshape(4, 4), mesh, [Shard(0), Shard(1)])
    assert _compat.local_tensor_mode_active()


@pytest.mark.mesh(cp=2, tp=4)
def test_marker(mesh, mesh_axes, world_size, request):
    assert mesh.mesh_dim_names == ("cp", "tp") and tuple(mesh.shape) == (2, 4)
    assert mesh_axes == {"cp": 2, "tp": 4} and world_size == 8
    assert mesh.device_type == request.config.getoption("dtensor_device")
    MESHES.append(mesh)


@pytest.mark.mesh(dp=2, tp=2)
def test_fixture_dtensor_every_rank(x_dt):
    full = x_dt.full_tensor()
    assert isinstance(full, _compat.LocalTensor) and full.device.type == x_dt.device_mesh.device_type
    assert sorted(_compat.rank_tensors(full)) == [0, 1, 2, 3]
    assert_dtensor_close(x_dt, torch.arange(16.0).reshape(4, 4), rtol=0, atol=0)


@pytest.mark.mesh(cp=2, tp=4)
def test_mesh_is_cached_per_axes(mesh):
    assert MESHES and mesh is MESHES[0]


@pytest.mark.parametrize("size", [pytest.param(2, marks=pytest.mark.mesh(tp=2)),
                                  pytest.param(8, marks=pytest.mark.mesh(tp=8))])
def test_param_marks(mesh, size, world_size):
    assert mesh.size() == size == world_size


@pytest.mark.parametrize("mesh", [{"tp": 2}, {"cp": 2, "tp": 2}], indirect=True, ids=mesh_id)
def test_indirect(mesh, mesh_axes):
    assert tuple(mesh.mesh_dim_names) == tuple(mesh_axes)


@pytest.mark.mesh(world=1)
def test_single_rank(mesh, world_size):
    assert world_size == 1 and mesh.size() == 1


def test_unmarked_runs_outside_simulated_ranks(world_size):
    assert world_size == 1 and not _compat.local_tensor_mode_active()
    assert type(torch.ones(1)) is torch.Tensor
'''


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_mesh_fixtures_and_simulated_ranks_contract(pytester, device):
    pytester.makepyfile(test_contract=CONTRACT)
    result = pytester.runpytest("-p", "no:cacheprovider", "-v", "--dtensor-device", device)
    result.assert_outcomes(passed=9)
    result.stdout.fnmatch_lines([
        f"dtensor_attn: simulated ranks (LocalTensorMode on a fake process group), {device} meshes",
        "*test_param_marks?2? PASSED*",
        "*test_indirect?tp2? PASSED*",
        "*test_indirect?cp2xtp2? PASSED*",
    ])


def test_cuda_meshes_without_cuda_are_a_usage_error(pytester):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: --dtensor-device cuda is valid")
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--dtensor-device", "cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--dtensor-device cuda: torch.cuda.is_available() is False here. Fix: *"])


def test_mode_ends_with_the_test_even_when_it_fails(pytester):
    pytester.makepyfile(test_fail='''
        import pytest, torch
        from dtensor_attn import _compat

        @pytest.mark.mesh(tp=2)
        def test_fails(mesh):
            raise ValueError("planted")

        def test_after():
            assert not _compat.local_tensor_mode_active()
            assert type(torch.ones(1)) is torch.Tensor
    ''')
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1, failed=1)


def test_fixture_and_marker_misuse_is_reported_with_the_fix(pytester):
    pytester.makepyfile(test_misuse='''
        import pytest

        def test_no_marker(mesh):
            pass

        @pytest.mark.mesh(2, 4)
        def test_positional(mesh):
            pass

        @pytest.mark.mesh(tp=0)
        def test_zero(mesh):
            pass

        @pytest.mark.parametrize("mesh", [4], indirect=True)
        def test_indirect_not_a_dict(mesh):
            pass
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=4)
    result.stdout.fnmatch_lines_random([
        "*the 'mesh' fixture needs a mesh, e.g. @pytest.mark.mesh(tp=2)*",
        "*mesh marker takes axis sizes as keywords, got positional (2, 4). Fix: "
        "@pytest.mark.mesh(cp=2, tp=4).*",
        "*mesh axis tp=0: expected a positive int size, e.g. tp=2.*",
        "*an indirect 'mesh' parameter must be a dict of axis sizes, got 4*",
    ])


def test_gpu_marker_skips_with_a_reason_on_cpu(pytester):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the gpu marker does not skip here")
    pytester.makepyfile(test_gpu='''
        import pytest

        @pytest.mark.gpu
        def test_on_gpu():
            pass
    ''')
    result = pytester.runpytest("-p", "no:cacheprovider", "-rs", "--strict-markers")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(["*needs a CUDA device; torch.cuda.is_available() is False here*"])


def test_works_under_xdist(pytester):
    pytester.makepyfile(test_contract=CONTRACT.replace(
        "    assert MESHES and mesh is MESHES[0]", "    assert mesh.size() == 8"))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest",
                                           "-n", "2")
    result.assert_outcomes(passed=9)


def test_torchrun_mode_rejects_xdist(pytester, monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "localhost",
                        "MASTER_PORT": "1"}.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-n", "2", "--dtensor-mode", "torchrun",
        "--dtensor-out", str(pytester.path / "out"))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*pytest-xdist's -n would start several per rank*"])


@pytest.mark.parametrize(
    "axes, world_size, reason",
    [
        ({"cp": 2, "tp": 4}, 4, "mesh cp=2 x tp=4 needs 8 ranks, this run has 4"),
        ({"tp": 4}, 4, None),
        ({"dp": 1, "tp": 2}, 4, "mesh dp=1 x tp=2 needs 2 ranks, this run has 4"),
    ],
)
def test_world_size_skip_reason(axes, world_size, reason):
    assert world_size_skip_reason(axes, world_size) == reason


def test_axes_validation_and_names():
    assert describe_axes({"cp": 2, "tp": 4}) == "cp=2 x tp=4"
    assert mesh_id({"cp": 2, "tp": 4}) == "cp2xtp4"
    assert list(validate_axes({"tp": 2, "cp": 4}, "t")) == ["tp", "cp"]  # order kept
    for bad in ({}, {"tp": True}, {"tp": 1.5}, {"t p": 2}):
        with pytest.raises(ValueError):
            validate_axes(bad, "t")


def test_the_closest_mesh_marker_wins(pytester):
    pytester.makepyfile(test_closest='''
        import pytest

        pytestmark = pytest.mark.mesh(dp=8)

        @pytest.mark.mesh(tp=4)
        class TestTP:
            def test_class_marker(self, mesh_axes):
                assert mesh_axes == {"tp": 4}

            @pytest.mark.parametrize("n", [pytest.param(2, marks=pytest.mark.mesh(tp=2))])
            def test_param_marker(self, mesh_axes, n):
                assert mesh_axes == {"tp": n}

        def test_module_marker(mesh_axes, world_size):
            assert mesh_axes == {"dp": 8} and world_size == 8
    ''')
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=3)


TORCHRUN_WORKER = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "WORLD_SIZE": "2"}


def test_mode_follows_torchrun_environment_and_can_be_forced(pytester, monkeypatch):
    for name, value in TORCHRUN_WORKER.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    out = ("--dtensor-out", str(pytester.path / "out"), "-p", "no:hypothesispytest")
    # Launched by torchrun, but without its rendezvous variables: a usage error with the fix.
    detected = pytester.runpytest_subprocess("-p", "no:cacheprovider", *out)
    assert detected.ret == pytest.ExitCode.USAGE_ERROR
    assert "missing ['MASTER_ADDR', 'MASTER_PORT']. Fix: launch with scripts/run_torchrun.sh " \
           "or torchrun, or pass --dtensor-mode=simulate" in detected.stderr.str()
    forced = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--dtensor-mode",
                                           "simulate", *out)
    forced.assert_outcomes(passed=1)
    forced.stdout.fnmatch_lines(["dtensor_attn: simulated ranks*"])
