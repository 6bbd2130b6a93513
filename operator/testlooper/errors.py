"""Errors shared by every layer."""


class UserError(Exception):
    """A mistake the user can fix (a bad path, an unknown test set): one line, no traceback.

    Raised below the shells too (reading definitions from disk, opening a store), so it lives
    here rather than in `cli/`: the CLI prints it as `testlooper: error: ...`, the operator turns
    it into a condition on the resource.
    """
