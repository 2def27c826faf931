"""``python -m dtensor_attn explain`` and ``report``: output pinned with expecttest; bad input is one
line, exit 2; a huge mesh costs no more than a small one; a bad ``--out`` fails before the matrix.

Regenerate the pinned outputs after an intended change with
``EXPECTTEST_ACCEPT=1 pytest tests/unit/test_explain_cli.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

import expecttest
import pytest

from dtensor_attn.__main__ import COMMANDS, main
from dtensor_attn.explain import rank_table
from dtensor_attn.explain.bounds import MAX_ROWS, shown_ranks


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


class TestExplainCommand(expecttest.TestCase):
    def test_seed_placement(self):
        """The placement of the torchtitan #2761 error, on an 8-rank tp mesh."""
        code, out, err = run_cli("explain", "_S(1, 8)", "--mesh", "8", "--shape", "8,256")
        self.assertEqual((code, err), (0, ""))
        self.assertExpectedInline(out, """\
placements (_S(1, 8)) on mesh (8), global shape (8, 256)

rank  coord  local    dim 0 (8)  dim 1 (256)
0     (0,)   (8, 32)  all        0-3, 32-35, ..., 224-227 (8 runs of 4, every 32)
1     (1,)   (8, 32)  all        4-7, 36-39, ..., 228-231 (8 runs of 4, every 32)
2     (2,)   (8, 32)  all        8-11, 40-43, ..., 232-235 (8 runs of 4, every 32)
3     (3,)   (8, 32)  all        12-15, 44-47, ..., 236-239 (8 runs of 4, every 32)
4     (4,)   (8, 32)  all        16-19, 48-51, ..., 240-243 (8 runs of 4, every 32)
5     (5,)   (8, 32)  all        20-23, 52-55, ..., 244-247 (8 runs of 4, every 32)
6     (6,)   (8, 32)  all        24-27, 56-59, ..., 248-251 (8 runs of 4, every 32)
7     (7,)   (8, 32)  all        28-31, 60-63, ..., 252-255 (8 runs of 4, every 32)

_S(1, 8) on axis 0, 8 ranks: does not decode to a shard order: split factor 8 is not a product of the sizes of later mesh axes sharding dim 1 (later axes: none; decodable split factors: 1).
  flatten: dim 1 (size 256) = flatten of (8, 32) with the 32 sharded on axis 0, 8 ranks (4 per rank in each of the 8 blocks): a DTensor view of a (8, 8, 32) tensor with placements (S(2)) as (8, 256) produces exactly this
  hint: in attention code: dims (N/tp=8, H*tp=32) of a packed TNH output labelled with the BLNH Shard(2) (head_dim) instead of Shard(1) (heads), then viewed (torchtitan #2761). Fix: declare the packed output's out_placements as Shard(1); trace_placements() points at the wrapper.

torch 2.11 raises "use_strided_shard_as_shard_order is True, but placements: (_StridedShard(dim=1, sf=8),) is unable to be interpreted into a corresponding shard_order" where it needs a shard order (full_tensor, redistribute); newer torch: "... cannot be decoded into a corresponding shard_order", or a fallback.
""")

    def test_torch_docstring_example(self):
        code, out, _ = run_cli("explain", "[_StridedShard(0, split_factor=2), Shard(0)]", "--mesh", "2x2", "--shape", "8,8")
        self.assertEqual(code, 0)
        self.assertExpectedInline(out, """\
placements (_S(0, 2), S(0)) on mesh (2, 2), global shape (8, 8)

rank  coord   local   dim 0 (8)  dim 1 (8)
0     (0, 0)  (2, 8)  0-1        all
1     (0, 1)  (2, 8)  4-5        all
2     (1, 0)  (2, 8)  2-3        all
3     (1, 1)  (2, 8)  6-7        all

shard order (torch decodes it): dim 0 on axis 1, then axis 0

_S(0, 2) on axis 0, 2 ranks: decodes: split factor 2 = product of the sizes of the axes that shard dim 0 before it (axis 1 (2)).
  flatten: not a flatten: it records that dim 0 was sharded right to left (the order above), as FSDP2 sharding on top of TP does
""")

    def test_packed_tokens_on_a_named_cp_tp_mesh(self):
        code, out, _ = run_cli("explain", "(_S(0, 4), S(1))", "--mesh", "cp=2,tp=2", "--shape", "16,4,8")
        self.assertEqual(code, 0)
        self.assertExpectedInline(out, """\
placements (_S(0, 4), S(1)) on mesh (cp=2, tp=2), global shape (16, 4, 8)

rank  coord   local      dim 0 (16)              dim 1 (4)  dim 2 (8)
0     (0, 0)  (8, 2, 8)  0-1, 4-5, 8-9, 12-13    0-1        all
1     (0, 1)  (8, 2, 8)  0-1, 4-5, 8-9, 12-13    2-3        all
2     (1, 0)  (8, 2, 8)  2-3, 6-7, 10-11, 14-15  0-1        all
3     (1, 1)  (8, 2, 8)  2-3, 6-7, 10-11, 14-15  2-3        all

_S(0, 4) on axis 0 (cp), 2 ranks: does not decode to a shard order: split factor 4 is not a product of the sizes of later mesh axes sharding dim 0 (later axes: none; decodable split factors: 1).
  flatten: dim 0 (size 16) = flatten of (4, 4) with the 4 sharded on axis 0 (cp), 2 ranks (2 per rank in each of the 4 blocks): a DTensor view of a (4, 4, 4, 8) tensor with placements (S(1), S(2)) as (16, 4, 8) produces exactly this
  hint: in attention code: the seq shard of a (B=4, L=4, ...) tensor viewed as (B*L, ...): packed tokens (TNH) under context parallelism on cp. Expected there (each rank holds its seq chunk of every batch row); torch 2.11 cannot full_tensor() or redistribute it.

torch 2.11 raises "use_strided_shard_as_shard_order is True, but placements: (_StridedShard(dim=0, sf=4), Shard(dim=1)) is unable to be interpreted into a corresponding shard_order" where it needs a shard order (full_tensor, redistribute); newer torch: "... cannot be decoded into a corresponding shard_order", or a fallback.
""")

    def test_error_message_pasted_whole(self):
        """The message's placements are read: its answer holds the same rank table as the
        placements typed alone, after what torch said."""
        message = (
            "use_strided_shard_as_shard_order is True, but placements: (_StridedShard(dim=1, sf=8),) "
            "is unable to be interpreted into a corresponding shard_order"
        )
        code, out, _ = run_cli("explain", message, "--mesh", "8", "--shape", "8,256")
        self.assertEqual(code, 0)
        self.assertTrue(out.startswith("torch 2.11 could not read these placements as a shard order"))
        typed = run_cli("explain", "_S(1, 8)", "--mesh", "8", "--shape", "8,256")[1]
        table = typed.split("\n\n")[1].splitlines()
        self.assertIn("\n".join(f"  {row}" for row in table), out)

    def test_mesh_and_shape_are_optional(self):
        for argv in (("_S(1, 8)",), ("_S(1, 8)", "--mesh", "8"), ("_S(1, 8)", "--shape", "8,256")):
            with self.subTest(argv=argv):
                code, out, err = run_cli("explain", *argv)
                self.assertEqual((code, err), (0, ""))
                self.assertIn("_S(1, 8) on axis 0: dim 1 of size", out)

    def test_bad_input_is_one_line_and_exit_code_2(self):
        cases = {
            ("explain", "Q(1)", "--mesh", "8", "--shape", "8"): "unknown placement 'Q(1)'",
            ("explain", "S(1), R", "--mesh", "8", "--shape", "8,256"): "2 placements (S(1), R) for a 1-D mesh",
            ("explain", "S(1)", "--mesh", "99999999999"): "--mesh 99999999999 has 99999999999 ranks",
            ("explain", "S(2)", "--shape", "8,256"): "S(2) shards dim 2, but the global shape (8, 256) has 2 dims",
            ("explain", "S(1)", "--mesh", "0", "--shape", "8"): "every axis needs >= 1 rank",
            ("nope",): "invalid choice: 'nope'",
            (): "the following arguments are required: command",
        }
        for argv, needle in cases.items():
            with self.subTest(argv=argv):
                code, out, err = run_cli(*argv)
                self.assertEqual((code, out), (2, ""))
                self.assertEqual(len(err.splitlines()), 1, err)
                self.assertTrue(err.startswith("error: ") and needle in err, err)

    def test_every_registered_command_has_help(self):
        for name, command in COMMANDS.items():
            with self.subTest(command=name):
                code, out, _ = run_cli(name, "--help")
                self.assertEqual(code, 0)
                self.assertIn(command.help, " ".join(out.split()))

    def test_module_entry_point_never_shows_a_traceback(self):
        # Python warnings off (torch warns at import where numpy is missing): stderr must be our
        # one line; a traceback is not a warning, so it would still show and fail the test.
        result = subprocess.run(
            [sys.executable, "-m", "dtensor_attn", "explain", "_S(1, x)", "--mesh", "8", "--shape", "8,256"],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        self.assertEqual((result.returncode, result.stdout), (2, ""))
        self.assertEqual(
            result.stderr, "error: '_S(1, x)': expected an integer split factor, got 'x'\n"
        )


def test_standard_input_is_read_with_a_dash(monkeypatch):
    message = "_StridedShard placements (_StridedShard(dim=1, sf=8),) cannot be decoded\ninto a corresponding shard_order\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(message))
    code, out, err = run_cli("explain", "-")
    assert (code, err) == (0, "")
    assert out.startswith("torch could not decode these _StridedShard placements into a shard order:")


def test_a_huge_mesh_computes_only_the_printed_ranks(monkeypatch):
    """--mesh 100000 took minutes (every rank computed, then printed): now the table prints the
    first and last few ranks and computes only those, plus rank 0 before each strided axis."""
    calls = []
    real = rank_table.rank_indices
    monkeypatch.setattr(rank_table, "rank_indices", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    code, out, err = run_cli("explain", "_S(1, 8)", "--mesh", "100000", "--shape", "8,256")
    assert (code, err) == (0, "")
    shown = shown_ranks(100_000)
    assert shown == (0, 1, 2, 3, 99_998, 99_999)
    assert len(calls) <= len(shown) + 1, len(calls)
    assert "... 99994 more ranks\n99998  (99998,)  (8, 0)  all        none" in out


def test_shown_ranks_is_every_rank_of_a_small_mesh():
    assert shown_ranks(MAX_ROWS) == tuple(range(MAX_ROWS))
    assert len(shown_ranks(MAX_ROWS + 1)) < MAX_ROWS + 1
    assert shown_ranks(1) == (0,)


@pytest.mark.parametrize(
    "option, value, limit",
    [("--mesh", "99999999999", "16777216"), ("--mesh", "4096,4096,2", "16777216"), ("--shape", "8,99999999999", "4194304")],
)
def test_absurd_sizes_are_refused_up_front_naming_option_value_limit_and_fix(option, value, limit):
    other = ("--shape", "8,8") if option == "--mesh" else ("--mesh", "8")
    for argv in ((option, value), (option, value, *other)):  # alone: symbolic; both: the table
        code, out, err = run_cli("explain", "S(1)", *argv)
        assert (code, out) == (2, "")
        assert len(err.splitlines()) == 1
        assert f"{option} {value} has" in err and limit in err and "Fix:" in err


def test_report_to_an_unwritable_out_fails_before_running_the_matrix(tmp_path, monkeypatch):
    """--out under a regular file (not a chmod: tests may run as root) is refused at once, in
    one line with the path, the reason and the fix; the matrix (19-34 s) never starts."""
    import dtensor_attn.report as report

    def matrix_ran(*_, **__):
        raise AssertionError("run_report started before the --out check")

    monkeypatch.setattr(report, "run_report", matrix_ran)
    (tmp_path / "a_file").write_text("")
    out_dir = tmp_path / "a_file" / "report"
    code, out, err = run_cli("report", "--out", str(out_dir))
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1
    assert f"--out {out_dir}" in err and "a_file is a file, not a directory" in err and "Fix:" in err


def test_check_out_dir_creates_a_writable_directory(tmp_path):
    from dtensor_attn.report import check_out_dir

    target = tmp_path / "new" / "report"
    assert check_out_dir(target) == target and target.is_dir() and not list(target.iterdir())


def test_a_closed_pipe_is_not_a_traceback():
    """``explain ... | head -1``: the reader closes the pipe early; no traceback, exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dtensor_attn", "explain", "_S(1, 8)", "--mesh", "64", "--shape", "8,4096"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()  # before torch is even imported: every write hits a closed pipe
    _, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()
    assert proc.returncode == 0


if __name__ == "__main__":
    expecttest.run_tests()
