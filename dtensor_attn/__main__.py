"""Command line: ``python -m dtensor_attn <command> ...``.

    python -m dtensor_attn explain "ValueError: use_strided_shard_as_shard_order is True, ..."
    python -m dtensor_attn explain - < traceback.txt
    python -m dtensor_attn explain "_S(1, 8)" --mesh 8 --shape 8,256
    python -m dtensor_attn explain "(_S(0, 4), S(1))" --mesh cp=2,tp=4 --shape 32,8,64

Each command is one entry of ``COMMANDS``: a help line, a function that adds its arguments, and
a function that runs it and returns the exit code. Bad input is one line on stderr, exit code 2;
no input shows a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import NamedTuple


class Command(NamedTuple):
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _explain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "placements",
        help="placements as torch prints them: '_S(1, 8)', '(S(1), R)', "
        "'(_StridedShard(dim=1, sf=8),)', or torch's error message (a line or a whole "
        "traceback); '-' reads it from standard input",
    )
    parser.add_argument("--mesh", help="mesh shape: 8, 2,4, 2x4 or cp=2,tp=4 (default: the message's, if any)")
    parser.add_argument("--shape", help="global tensor shape: 8,256 or 8x256 (default: the message's, if any)")


def _explain(args: argparse.Namespace) -> int:
    from dtensor_attn.explain.answer import answer

    text = sys.stdin.read() if args.placements == "-" else args.placements
    try:
        explained = answer(text, args.mesh, args.shape)
    except ValueError:
        raise
    except Exception as exc:  # noqa: BLE001 - no input may show a traceback: one line, ours
        detail = " ".join(str(exc).split())[:200]
        return _fail(f"internal error on this input ({type(exc).__name__}: {detail}); please report it")
    print(explained)
    return 0


def _report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, metavar="DIR", help="writes DIR/conformance.md and DIR/conformance.html")


def _report(args: argparse.Namespace) -> int:
    from dtensor_attn.report import check_out_dir, run_report

    check_out_dir(args.out)  # before the matrix runs (tens of seconds), not after
    report = run_report(args.out)
    counts = ", ".join(f"{n} {kind}" for kind, n in sorted(report.counts.items()))
    print(f"{counts}; wrote {report.markdown} and {report.html}")
    return report.exit_code


COMMANDS: dict[str, Command] = {
    "explain": Command(
        "explain placements or a pasted torch error: what they mean, whether they decode, the "
        "rank table, the likely causes and their fixes",
        _explain_arguments,
        _explain,
    ),
    "report": Command(
        "run the conformance matrix on LocalMapAttention over every backend; write Markdown and HTML",
        _report_arguments,
        _report,
    ),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, never the usage block
        raise SystemExit(_fail(f"{self.prog}: {message}"))


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m dtensor_attn", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, already printed)
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.run(args)
    except ValueError as exc:  # PlacementError included: the message says expected/actual/fix
        return _fail(" ".join(str(exc).split()))
    except BrokenPipeError:  # `... | head` closed the pipe: nothing left to say, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's documented way
        return 0


if __name__ == "__main__":
    sys.exit(main())
