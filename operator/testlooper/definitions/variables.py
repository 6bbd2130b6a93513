"""Late binding of definition variables: resolved after inheritance merged them."""

from __future__ import annotations

from .errors import DefinitionsError
from .substitution import substitute

# A value that keeps changing this many times is a cycle built through nested lookups.
_MAX_PASSES = 50


def resolve_variables(raw: dict[str, str], key_path=()) -> dict[str, str]:
    """Resolve every `${name}` among `raw` until nothing changes.

    `OVERRIDE_OUTPUT: ${OVERRIDE}` takes whatever OVERRIDE finally is; unknown names are left
    as written (the shell may still expand them); a cycle is an error naming its members.
    """
    if not any("${" in v for v in raw.values()):
        return dict(raw)
    resolved: dict[str, str] = {}
    stack: list[str] = []

    def lookup(name: str):
        if name in resolved:
            return resolved[name]
        if name not in raw:
            return None
        if name in stack:
            cycle = stack[stack.index(name):] + [name]
            raise DefinitionsError(f"variables form a cycle: {' -> '.join(cycle)}", key_path)
        stack.append(name)
        value = raw[name]
        for _ in range(_MAX_PASSES):
            new = substitute(value, lookup)
            if new == value:
                break
            value = new
        else:
            raise DefinitionsError(f"variable {name!r} never stops changing (a cycle through nested lookups)", key_path)
        stack.pop()
        resolved[name] = value
        return value

    for name in raw:
        lookup(name)
    return resolved


def substitute_known(text: str, variables: dict[str, str]) -> str:
    """Substitute resolved variables into a task's other fields; unknown names stay."""
    return substitute(text, variables.get) if "${" in text else text
