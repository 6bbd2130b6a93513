"""Late binding of definition variables: resolved after inheritance merged them."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import DefinitionsError
from .substitution import SIMPLE_REFERENCE, substitute

_SIMPLE_REFERENCE_SPLIT = SIMPLE_REFERENCE.split

# A value that keeps changing this many times is a cycle built through nested lookups.
_MAX_PASSES = 50


@dataclass
class ResolvedVariables:
    raw: dict[str, str]
    values: dict[str, str]
    # name -> every name its resolution looked up, transitively (unknown names too, since a
    # task may define them later). Lets a task reuse its environment's work.
    lookups: dict[str, frozenset]

    @property
    def dependents(self) -> dict[str, set]:
        """name -> the names whose resolution looked it up (computed once)."""
        cached = self.__dict__.get("_dependents")
        if cached is None:
            cached = {}
            for name, used in self.lookups.items():
                for other in used:
                    cached.setdefault(other, set()).add(name)
            self.__dict__["_dependents"] = cached
        return cached


def resolve_variables(raw: dict[str, str], key_path=(), known: ResolvedVariables | None = None,
                      track: bool = True, changed: list[str] | None = None) -> ResolvedVariables:
    """Resolve every `${name}` among `raw` until nothing changes.

    `OVERRIDE_OUTPUT: ${OVERRIDE}` takes whatever OVERRIDE finally is; unknown names are left
    as written (the shell may still expand them); a cycle is an error naming its members.
    `known`, an earlier resolution of a subset of `raw` (an environment's, for a task), is
    reused for every name whose value, and every value it looked up, `raw` leaves unchanged.
    `track=False` skips recording lookups, for a resolution nothing will build on;
    `changed`, the names whose raw value differs from `known`'s, when the caller knows them.
    """
    resolved: dict[str, str] = {}
    lookups: dict[str, frozenset] = {}
    if known is not None:
        known_raw = known.raw
        if changed is None:
            changed = [name for name, value in raw.items() if known_raw.get(name) != value]
        resolved = dict(known.values)
        lookups = dict(known.lookups) if track else {}
        dependents = known.dependents
        for name in changed:
            resolved.pop(name, None)
            for stale in dependents.get(name, ()):
                resolved.pop(stale, None)
    stack: list[str] = []
    seen_stack: list[set] = []

    def lookup(name: str):
        if track and seen_stack:
            seen_stack[-1].add(name)
        if name in resolved:
            if track and seen_stack:
                seen_stack[-1].update(lookups[name])
            return resolved[name]
        if name not in raw:
            return None
        if name in stack:
            cycle = stack[stack.index(name):] + [name]
            raise DefinitionsError(f"variables form a cycle: {' -> '.join(cycle)}", key_path)
        stack.append(name)
        if track:
            seen_stack.append(set())
        value = raw[name]
        for _ in range(_MAX_PASSES):
            if "${" not in value:
                break
            new = substitute(value, lookup, cache=False)
            if new == value:
                break
            value = new
        else:
            raise DefinitionsError(f"variable {name!r} never stops changing (a cycle through nested lookups)", key_path)
        stack.pop()
        if track:
            mine = frozenset(seen_stack.pop())
            if seen_stack:
                seen_stack[-1].update(mine)
            lookups[name] = mine
        resolved[name] = value
        return value

    for name in raw:
        if name not in resolved:
            lookup(name)  # names already resolved are skipped: lookup is idempotent
    if len(resolved) != len(raw):  # a reused environment resolution may hold overridden names only
        resolved = {name: resolved[name] for name in raw}
    return ResolvedVariables(raw, resolved, lookups)


def resolve_overrides(known: ResolvedVariables, overrides: dict[str, str], key_path=()) -> dict[str, str]:
    """A task's variables: its environment's resolution with the task's own on top.

    Only the overridden names and those whose resolution looked them up are resolved again.
    """
    known_raw = known.raw
    changed = [name for name, value in overrides.items() if known_raw.get(name) != value]
    if not changed:
        return dict(known.values)
    raw = {**known_raw, **overrides}
    quick = _resolve_in_one_pass(raw, known, changed)
    if quick is not None:
        return quick
    return resolve_variables(raw, key_path, known=known, track=False, changed=changed).values


def _resolve_in_one_pass(raw: dict[str, str], known: ResolvedVariables, changed: list[str]) -> dict[str, str] | None:
    """The usual task: its own variables refer only to environment variables it leaves alone.
    Then one substitution each, with plain dict lookups, is the whole resolution; anything else
    (a reference to another changed name, nesting, a result that still holds `${`) returns None
    so the general resolution runs."""
    if not known.dependents.keys().isdisjoint(changed):
        return None  # an environment variable looked one of these names up: it must be resolved again
    pending = set(changed)
    resolved = dict(known.values)  # in `raw`'s order: overrides keep their place, new names follow
    get = resolved.get
    split = _SIMPLE_REFERENCE_SPLIT
    for name in changed:
        value = raw[name]
        if "${" in value:
            parts = split(value)
            if value.count("${") != len(parts) // 2:
                return None  # nested or unterminated references
            refs = parts[1::2]
            if not pending.isdisjoint(refs):
                return None
            for i, ref in enumerate(refs):
                found = get(ref)
                parts[2 * i + 1] = found if found is not None else "${" + ref + "}"
            substituted = "".join(parts)
            if "${" in substituted and substituted != value:
                return None
            value = substituted
        resolved[name] = value
    return resolved


def substitute_known(text: str, variables: dict[str, str]) -> str:
    """Substitute resolved variables into a task's other fields; unknown names stay."""
    return substitute(text, variables.get) if "${" in text else text
