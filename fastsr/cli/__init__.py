"""The `fastsr` command line: `fastsr upscale ...`, `eval ...`, `train ...`, `compare ...`, `export ...`.

One module per command (`fastsr.cli.upscale`, `.evaluate`, `.train`, `.export`, `.compare`),
each defining `COMMAND = Command(help, add_arguments, run)`; `COMMANDS` below lists them, and a new
command joins with one line there. What the commands share (messages, argument types,
the model arguments and `load_upscaler`) is in `fastsr.cli.common`. `run(args)` returns
the exit status.

Exit status: 0 all good; 1 a user-level failure (bad weights, unreadable image, ...:
one line `fastsr: error: ...` on stderr, other files still processed); 2 usage errors
(argparse); 130 interrupted (Ctrl-C), 143 terminated (SIGTERM: cleaned up as
after Ctrl-C). Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import signal
import sys
import warnings
from typing import Sequence

from fastsr.cli import compare, evaluate, export, train, upscale
from fastsr.cli.common import PROG, Command, Terminated, error, info, sigterm_as_interrupt
from fastsr.errors import FastSRError

COMMANDS: dict[str, Command] = {
    "upscale": upscale.COMMAND,
    "eval": evaluate.COMMAND,
    "train": train.COMMAND,
    "export": export.COMMAND,
    "compare": compare.COMMAND,
}


def build_parser() -> argparse.ArgumentParser:
    """The `fastsr` parser with one subparser per entry of COMMANDS."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="EDSR/MDSR super-resolution (official-checkpoint compatible)."
    )
    from fastsr import __version__

    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, usage errors: argparse already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if getattr(args, "run", None) is None:
        parser.print_usage(sys.stderr)
        print(f"{PROG}: error: a command is required ({', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    from pathlib import Path

    from fastsr.ops import dispatch

    # Measured choices (fastsr.ops.dispatch) persist between runs of the command line, so
    # only the first run on a machine pays for timing; FASTSR_PLAN_CACHE overrides ("": off).
    dispatch.set_default_plan_cache(str(Path.home() / ".cache" / "fastsr" / "plans.json"))
    try:
        with warnings.catch_warnings(), sigterm_as_interrupt():
            # Library warnings (a guessed res_scale, ...) as one line each, not file:line text.
            warnings.showwarning = lambda message, *rest: info(f"warning: {message}")
            return args.run(args)
    except FastSRError as e:
        error(str(e))
        return 1
    except Terminated:
        print(f"\n{PROG}: terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "Command", "build_parser", "main"]
