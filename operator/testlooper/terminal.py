"""Plain-text tables for the terminal, coloured only on a terminal and only when NO_COLOR is unset."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Sequence, TextIO

_ANSI_CODES = {"bold": "1", "dim": "2", "red": "31", "green": "32", "yellow": "33", "blue": "34", "magenta": "35"}
_KIND_STYLES = {"build": "blue", "test": "green", "deployment": "magenta"}


def colour_wanted(stream: TextIO | None = None) -> bool:
    """Colour for a terminal, never for a pipe or a file, and never when NO_COLOR is set (no-color.org)."""
    stream = stream or sys.stdout
    return stream.isatty() and not os.environ.get("NO_COLOR")


@dataclass(frozen=True)
class Styler:
    """Wraps text in ANSI codes when enabled, else leaves it alone."""

    enabled: bool

    def __call__(self, text: str, style: str | None) -> str:
        if not self.enabled or not style:
            return text
        return f"\033[{_ANSI_CODES[style]}m{text}\033[0m"


@dataclass(frozen=True)
class Cell:
    """A table cell with a style; tables pad by the plain text, so codes never skew columns."""

    text: str
    style: str | None = None


def kind_cell(kind: str) -> Cell:
    return Cell(kind, _KIND_STYLES.get(kind))


def heading(text: str, styler: Styler) -> str:
    return styler(text, "bold")


def table(headers: Sequence[str], rows: Sequence[Sequence[str | Cell]], styler: Styler) -> str:
    """Columns separated by two spaces, with a bold header line and no trailing spaces."""
    cells = [[Cell(printable(header), "bold") for header in headers]]
    cells += [[Cell(printable(value.text), value.style) if isinstance(value, Cell) else Cell(printable(value))
               for value in row] for row in rows]
    widths = [max(len(row[column].text) for row in cells) for column in range(len(headers))]
    lines = []
    for row in cells:
        parts = [styler(cell.text, cell.style) + " " * (width - len(cell.text)) for cell, width in zip(row, widths)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def duration(seconds: float) -> str:
    """`5400` -> `1h30m`, `90` -> `1m30s`, `45` -> `45s`."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"


def count(number: int, noun: str) -> str:
    """`1 task`, `2 tasks`, `0 runs`."""
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def printable(text: str) -> str:
    """`text` on one line: a newline, a tab or another control character in a test's name shows
    as its escape (`\\n`), so it can neither break a line of progress nor a table's rows."""
    if text.isprintable():
        return text
    return "".join(character if character.isprintable() else _escape(character) for character in text)


def _escape(character: str) -> str:
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(character, f"\\x{ord(character):02x}"
                                                            if ord(character) < 0x100 else f"\\u{ord(character):04x}")
