"""examples/torchtitan_conformance.py on torchtitan 0.3.0 as it ships: it runs where torchtitan
imports (install: docs/kit.md), and skips with the reason elsewhere.

The example's verdicts are its own exit code: FlexAttention passes every mesh, torchtitan's
sdpa under full-DTensor CP is wrong on the CP ranks above 0 only, no tp1 false alarm.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "torchtitan_conformance.py"


def _torchtitan_import_error() -> str | None:
    try:
        import torchtitan.models.common.attention  # noqa: F401
        import torchtitan.models.common.decoder_sharding  # noqa: F401
    except Exception as error:  # ImportError, or a dependency that fails on import
        return f"torchtitan is not importable here ({type(error).__name__}: {error}); install it as docs/kit.md says"
    return None


def _example():
    spec = importlib.util.spec_from_file_location("torchtitan_conformance", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_verdicts_are_the_expected_ones():
    reason = _torchtitan_import_error()
    if reason:
        pytest.skip(reason)
    done = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [line for line in done.stdout.splitlines() if not line.startswith("[rank")]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert lines[-1] == "verdicts as expected"
    table = {tuple(line.split()[:2]): line for line in lines[:-1]}
    assert set(table) == {(m, mesh) for m in ("FlexAttention", "ScaledDotProductAttention")
                          for mesh in ("tp1", "tp2", "cp2", "cp2xtp2", "dp_shard2xcp2")}
    assert "fail 0" in table["FlexAttention", "cp2xtp2"] and "pass 5" in table["FlexAttention", "cp2xtp2"]
    assert "fail 0" in table["ScaledDotProductAttention", "tp1"]  # no size-1 false alarm
    assert "wrong shards on ranks [2, 3]" in table["ScaledDotProductAttention", "cp2xtp2"]
    assert "not exercised 1" in table["ScaledDotProductAttention", "cp2xtp2"]


def test_the_expected_verdicts_check_flags_a_flex_failure_and_a_wrong_sdpa_rank():
    """The example's own judge (``unexpected``) on made-up results: it must not pass everything."""
    from dtensor_attn.testing.kit import CaseFailure, CaseOutcome, ConformanceResult, FailureKind, Status

    example = _example()

    def result(status, shard_ranks=()):
        failures = () if status is Status.PASS else (CaseFailure("c", FailureKind.VALUES, "output", "e", "a", shard_ranks=shard_ranks),)
        case = CaseOutcome(id="c", variant="v", kernel="", mesh="cp2xtp2", heads="mha", mask="causal", lse=None,
                           status=status, failures=failures)
        return ConformanceResult("s", (case,))

    assert example.unexpected({("FlexAttention", "cp2xtp2"): result(Status.PASS)}) == []
    assert example.unexpected({("FlexAttention", "cp2xtp2"): result(Status.FAIL)})
    assert example.unexpected({("ScaledDotProductAttention", "cp2xtp2"): result(Status.FAIL, (2, 3))}) == []
    assert example.unexpected({("ScaledDotProductAttention", "cp2xtp2"): result(Status.FAIL, (1, 3))})
    assert example.unexpected({("ScaledDotProductAttention", "cp2xtp2"): result(Status.PASS)})
    assert example.unexpected({("ScaledDotProductAttention", "tp1"): result(Status.FAIL)})
    assert example._cp_ranks_above_0("dp_shard2xcp2") == {1, 3}


def test_without_torchtitan_the_example_says_why_and_exits_2(monkeypatch):
    example = _example()
    monkeypatch.setitem(sys.modules, "torchtitan", None)  # import torchtitan raises ImportError
    monkeypatch.setitem(sys.modules, "torchtitan.models.common.attention", None)
    assert example.main([]) == 2
