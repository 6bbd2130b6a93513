"""The one error type of the definitions engine, carrying where the mistake is."""

from __future__ import annotations

from typing import Iterable


def format_key_path(key_path: Iterable[object]) -> str:
    return ".".join(str(part) for part in key_path)


class DefinitionsError(Exception):
    """A definitions file that cannot be loaded or resolved.

    ``str()`` gives one line a user can act on: ``FILE:LINE:COL: KEY.PATH: MESSAGE``, leaving out
    the parts that are not known (YAML positions are 1-based).
    """

    def __init__(
        self,
        message: str,
        key_path: Iterable[object] = (),
        filename: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ):
        self.message = message
        self.key_path = format_key_path(key_path)
        self.filename = filename
        self.line = line
        self.column = column
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ""
        if self.filename:
            where = self.filename
            if self.line is not None:
                where += f":{self.line}"
                if self.column is not None:
                    where += f":{self.column}"
        parts = [p for p in (where, self.key_path) if p]
        parts.append(self.message)
        return ": ".join(parts)


class DefinitionsWarning(UserWarning):
    """Something a definitions file does that works but is probably a mistake (a key written
    twice in one mapping). ``str()`` is one line like an error's: ``FILE:LINE:COL: MESSAGE``.
    Without a `warn` callback the engine issues it through Python's `warnings`."""

    def __init__(self, message: str, filename: str | None = None, line: int | None = None,
                 column: int | None = None):
        self.message = message
        self.filename = filename
        self.line = line
        self.column = column
        super().__init__(str(DefinitionsError(message, (), filename, line, column)))
