"""The `testlooper` command line: `main` in cli.main, one small module per subcommand."""


class UserError(Exception):
    """A mistake the user can fix (a bad path, an unknown test set): one line, no traceback."""
