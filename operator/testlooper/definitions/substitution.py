"""`${name}` substitution with nested lookups (`${${A}${B}}`), shared by macros and variables."""

from __future__ import annotations

import re
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


SIMPLE_REFERENCE = re.compile(r"\$\{([^${}]*)\}")  # `${name}` with no nesting; group 1 is the name
# Split forms of strings seen before: macro templates are expanded once per foreach item, so
# the same strings come back thousands of times. Bounded, cleared when full.
_SPLIT_CACHE: dict[str, list[str] | None] = {}
_SPLIT_CACHE_LIMIT = 200_000


def _split(text: str, cache: bool) -> list[str] | None:
    """[literal, name, literal, ..., literal], or None when a reference nests another."""
    try:
        return _SPLIT_CACHE[text]
    except KeyError:
        pass
    parts = SIMPLE_REFERENCE.split(text)
    if text.count("${") != len(parts) // 2:  # a `${` the simple pattern did not take: nested or unterminated
        parts = None
    if cache:
        if len(_SPLIT_CACHE) >= _SPLIT_CACHE_LIMIT:
            _SPLIT_CACHE.clear()
        _SPLIT_CACHE[text] = parts
    return parts


def split_references(text: str, cache: bool = True) -> list[str] | None:
    """[literal, name, literal, ..., literal] of a string, or None when references nest."""
    return _split(text, cache)


def substitute(text: str, lookup: Lookup, cache: bool = True) -> str:
    """Replace every `${name}` that `lookup` knows; unknown references stay as written.

    The inner part of a reference is substituted first, so `${${A}${B}}` looks up the
    variable named by the values of A and B. `cache=False` is for strings unlikely to recur.
    """
    if "${" not in text:
        return text
    parts = _split(text, cache)
    if parts is not None:  # the common case: no nesting
        if len(parts) == 3:  # one reference
            value = lookup(parts[1])
            return parts[0] + ("${" + parts[1] + "}" if value is None else value) + parts[2]
        out = parts[:]
        for i in range(1, len(parts), 2):
            value = lookup(parts[i])
            out[i] = "${" + parts[i] + "}" if value is None else value
        return "".join(out)
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
            name = substitute(name, lookup, cache)
        value = lookup(name)
        out.append("${" + name + "}" if value is None else value)
        i = end + 1
    return "".join(out)


def whole_reference(text: str) -> str | None:
    """The name when `text` is exactly one `${name}` reference (with no nesting), else None."""
    if text[:2] == "${" and text.find("}") == len(text) - 1:
        inner = text[2:-1]
        if "${" not in inner:
            return inner
    return None
