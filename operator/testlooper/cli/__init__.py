"""The `testlooper` command line: `main` in cli.main, one small module per subcommand.

Nothing outside this package imports it: what the shells share lives below them.
"""

from testlooper.errors import UserError

__all__ = ["UserError"]
