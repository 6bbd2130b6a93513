"""The `testlooper` command line: `main` in cli.main, one small module per subcommand.

Nothing outside this package imports it: what the shells share lives below them.
"""

import argparse

from testlooper.errors import UserError

__all__ = ["UserError", "runs_option"]


def runs_option(text: str) -> int:
    """`--runs N`: a whole number, in the words `runs:` gets in a definitions file (`1.5` and
    `many` included; the bounds are checked by the command, before anything runs)."""
    from testlooper.planning.planner import MAX_RUNS

    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_RUNS}, not {text!r}") from None
