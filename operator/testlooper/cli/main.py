"""Entry point of the `testlooper` command: parse arguments, run a subcommand, report errors.

Subcommand modules import their heavy dependencies (gitpython, PyYAML) inside their `run`
functions, so `testlooper --help` starts fast.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from testlooper import __version__
from testlooper.cli import (
    UserError, definitions_cmd, flaky_cmd, history_cmd, logs_cmd, operator_cmd, plan_cmd, rerun_cmd, run_cmd, watch_cmd,
)

# Each module has `register(subparsers)`, which adds its parser with a `run(args) -> int` default.
SUBCOMMANDS = (definitions_cmd, plan_cmd, run_cmd, watch_cmd, history_cmd, flaky_cmd, operator_cmd, rerun_cmd, logs_cmd)

EXIT_USER_ERROR = 2  # the status argparse gives a usage error, too
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # as a shell reports a command killed by SIGPIPE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="testlooper",
        description="Statistical CI: run every build and test of every commit, and find flaky and broken tests.",
    )
    parser.add_argument("--version", action="version", version=f"testlooper {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="show a traceback with errors")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`testlooper plan | head`): point stdout at /dev/null so that
        # flushing it at exit does not fail again, and stop quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as exc:
        message = _user_error_line(exc)
        if message is None:
            raise
        if args.verbose:
            traceback.print_exc()
        print(message, file=sys.stderr)
        return EXIT_USER_ERROR


def _user_error_line(exc: Exception) -> str | None:
    """The one line to show for an error the user can fix, or None for a bug (which gets a traceback).

    The error classes are looked up in sys.modules rather than imported: a module that was never
    imported cannot have raised its error, and importing it would load gitpython or PyYAML.
    """
    if isinstance(exc, UserError):
        return f"testlooper: error: {exc}"
    definitions = sys.modules.get("testlooper.definitions")
    if definitions is not None and isinstance(exc, definitions.DefinitionsError):
        return str(exc)
    store = sys.modules.get("testlooper.store")
    if store is not None and isinstance(exc, store.StoreError):
        return f"testlooper: error: {exc}"
    gitio = sys.modules.get("testlooper.gitio")
    if gitio is not None and isinstance(exc, gitio.GitError):
        return f"testlooper: error: {exc}"
    return None
