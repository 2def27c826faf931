"""No input shows a traceback: ``explain`` answers (exit 0) or refuses in one line (exit 2).

Malformed messages, placements and options, in process and through the real entry point (bytes
that are not UTF-8 on standard input too). Each refusal is one line that starts with "error: ";
an "internal error" line would be a bug of ours, so it fails the test too.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import pytest

from dtensor_attn.__main__ import main

NOT_INTERPRETED = (
    "ValueError: use_strided_shard_as_shard_order is True, but placements: "
    "(_StridedShard(dim=1, sf=8),) is unable to be interpreted into a corresponding shard_order"
)
FLATTEN_UNEVEN = (
    "RuntimeError: Cannot flatten unevenly sharded tensor: dimension 1 (size 6) is not evenly "
    "divisible by mesh dimension 0 (size 4).\n\nSharding propagation failed for "
    "aten.view.default(Spec(f32[2, 6, 3](S(1))), [2, 18]) on DeviceMesh((tp=4), 'cpu', stride=(1,)))"
)


def explain(*argv: str, stdin: str | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.MonkeyPatch.context() as patch:
        if stdin is not None:
            patch.setattr("sys.stdin", io.StringIO(stdin))
        code = main(["explain", *argv])
    return code, out.getvalue(), err.getvalue()


MALFORMED = [
    "", " ", "\n\n", "ValueError:", "ValueError: ", "RuntimeError:", "Traceback (most recent call last):",
    "garbage", "(((", ")))", "()", "[]", ",,,", "_S(", "_S(1,", "_S(1, 8", "S(1", "[S(1)", "S(1)]",
    "S()", "S(1, 2, 3)", "_S(1)", "_S(1, 0)", "_S(1, -8)", "_S(x, 8)", "P(", "P(mean)",
    "Partial(reduce_op=)", "Shard(dim=)", "_StridedShard(dim=1, sf=8", "_S(1, 1e9)",
    "S(99999999999999999999)", "_S(99999999999999999999, 2)", "_S(1, 99999999999999999999)",
    "S(-99999999999)", "_S(1, 2147483647)", "S(１)", "Ｓ(1)", "_S(1, ８)", "🙂", "S(🙂)", "\x00", "\x00S(1)",
    "placements: ((((", "placements: " + "(" * 1000 + ")" * 1000, "S(1), " * 5000,
    "use_strided_shard_as_shard_order is True, but placements:",
    "use_strided_shard_as_shard_order is True, but placements: (_StridedShard(dim=1, sf=8 is unable",
    "... cannot be decoded into a corresponding shard_order",
    "_StridedShard placements () cannot be decoded into a corresponding shard_order",
    "Attempted to flatten multiple dimensions, with dimension 99999999999 being sharded",
    "Cannot flatten unevenly sharded tensor: dimension 1 (size 0) is not evenly divisible by mesh dimension 0 (size 0)",
    "Cannot unflatten unevenly sharded tensor: output dimension 7 (size 3) is not evenly divisible by mesh dimension 9 (size 2)",
    "This operation would remove or reshape sharded dimension 5",
    "Sharding propagation failed for",
    "Sharding propagation failed for aten.view.default(",
    "Sharding propagation failed for aten.view.default(Spec(f32[8, 2, 12](S(2))), [2, 4, -1])",
    "Sharding propagation failed for aten.view.default(Spec(f32[8, 2, 12](S(2))), [7, 7]) on DeviceMesh((tp=4), 'cpu', stride=(1,)))",
    "Sharding propagation failed for aten.view.default(Spec(f32[8, 2, 12](S(2))), [-1, -1]) on DeviceMesh((tp=4), 'cpu', stride=(1,)))",
    "Sharding propagation failed for aten.view.default(Spec(f32[](S(0))), []) on DeviceMesh((tp=4), 'cpu', stride=(1,)))",
    "Sharding propagation failed for aten.view.default(Spec(f32[8](S(5))), [8]) on DeviceMesh((tp=4), 'cpu', stride=(1,)))",
    "Sharding propagation failed for aten.view.default(Spec(f32[8, 2](S(0)S(1))), [16]) on DeviceMesh((tp=4), 'cpu', stride=(1,)))",
    "Sharding propagation failed for aten.view.default(Spec(f32[8, 2](S(0))), [16]) on DeviceMesh((tp=0), 'cpu', stride=(1,)))",
    "Sharding propagation failed for aten.view.default(Spec(f32[99999999999, 2](S(0))), [16]) on DeviceMesh((tp=99999999999), 'cpu', stride=(1,)))",
    NOT_INTERPRETED + " DeviceMesh('cpu', [[0, 1], [2", NOT_INTERPRETED + " DeviceMesh((tp=99999999999), 'cpu', stride=(1,))",
    NOT_INTERPRETED + " global shape torch.Size([99999999999, 99999999999])",
    NOT_INTERPRETED + " global shape torch.Size([8])",
    NOT_INTERPRETED + " global shape torch.Size([0, 0])",
]
MALFORMED_OPTIONS = [
    ("--mesh", ""), ("--mesh", "0"), ("--mesh", "-1"), ("--mesh", "x"), ("--mesh", "2,,3"), ("--mesh", "cp=2,tp"),
    ("--mesh", "=2"), ("--mesh", "1e3"), ("--mesh", "99999999999"), ("--mesh", "8,8"), ("--shape", ""),
    ("--shape", "8,-1"), ("--shape", "a"), ("--shape", "99999999999"), ("--shape", "0"), ("--shape", "0,0"),
    ("--mesh", "🙂"), ("--shape", "８,２５６"),
]


def _assert_answered_or_refused(code: int, out: str, err: str, what) -> None:
    assert code in (0, 2), what
    # a Python traceback has its header on a line of its own, then frames (an echo of the input
    # keeps its own words on one line)
    assert "Traceback (most recent call last):\n" not in out + err, (what, err)
    assert '\n  File "' not in out + err and "internal error" not in err, (what, err)
    if code == 2:
        assert out == "" and len(err.splitlines()) == 1 and err.startswith("error: "), (what, err)
    else:
        assert out and err == "", what


@pytest.mark.parametrize("text", MALFORMED, ids=range(len(MALFORMED)))
def test_malformed_messages_are_answered_or_refused_in_one_line(text):
    _assert_answered_or_refused(*explain(text), text)
    _assert_answered_or_refused(*explain("-", stdin=text), text)
    _assert_answered_or_refused(*explain(text, "--mesh", "2", "--shape", "8,8,8"), text)


@pytest.mark.parametrize("option, value", MALFORMED_OPTIONS)
def test_malformed_options_are_answered_or_refused_in_one_line(option, value):
    other = ("--shape", "8,256") if option == "--mesh" else ("--mesh", "8")
    for text in ("_S(1, 8)", NOT_INTERPRETED, FLATTEN_UNEVEN):
        _assert_answered_or_refused(*explain(text, option, value), (text, option, value))
        _assert_answered_or_refused(*explain(text, option, value, *other), (text, option, value, other))


def test_the_entry_point_shows_no_traceback_on_malformed_input():
    """The real process, with what the shell passes: bytes that are not UTF-8 on stdin too."""
    cases = (
        (["🙂"], b""),
        (["-"], b"\xff\xfe\x00garbage"),
        (["_S(1, 99999999999999999999)", "--mesh", "8", "--shape", "8,256"], b""),  # was a TypeError
    )
    for argv, stdin in cases:
        result = subprocess.run(
            [sys.executable, "-m", "dtensor_attn", "explain", *argv], input=stdin, capture_output=True, check=False
        )
        assert result.returncode in (0, 2), (argv, result.stderr)
        assert b"Traceback (most recent call last):\n" not in result.stdout + result.stderr, (argv, result.stderr.decode())

