"""`${name}` substitution with nested lookups (`${${A}${B}}`), shared by macros and variables."""

from __future__ import annotations

from typing import Callable

Lookup = Callable[[str], "str | None"]


def _closing_brace(text: str, start: int) -> int:
    """Index of the `}` closing the `${` whose body starts at `start`, or -1."""
    depth = 1
    i = start
    while True:
        close = text.find("}", i)
        if close < 0:
            return -1
        opened = text.find("${", i, close)
        if opened >= 0:
            depth += 1
            i = opened + 2
            continue
        depth -= 1
        if depth == 0:
            return close
        i = close + 1


def substitute(text: str, lookup: Lookup) -> str:
    """Replace every `${name}` that `lookup` knows; unknown references stay as written.

    The inner part of a reference is substituted first, so `${${A}${B}}` looks up the
    variable named by the values of A and B.
    """
    if "${" not in text:
        return text
    out = []
    i = 0
    while True:
        start = text.find("${", i)
        if start < 0:
            out.append(text[i:])
            break
        out.append(text[i:start])
        end = _closing_brace(text, start + 2)
        if end < 0:  # unterminated: leave the rest as written
            out.append(text[start:])
            break
        name = text[start + 2 : end]
        if "${" in name:
            name = substitute(name, lookup)
        value = lookup(name)
        out.append("${" + name + "}" if value is None else value)
        i = end + 1
    return "".join(out)


def whole_reference(text: str) -> str | None:
    """The name when `text` is exactly one `${name}` reference (with no nesting), else None."""
    if text.startswith("${") and text.endswith("}") and text.find("}") == len(text) - 1:
        inner = text[2:-1]
        if "${" not in inner:
            return inner
    return None
