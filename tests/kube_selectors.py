"""Label and field selectors as the Kubernetes API server reads them, for the emulator.

    parse_label_selector("app=web,tier!=db,env in (a,b),release,!canary")(labels) -> bool
    parse_field_selector("metadata.name=x", supported)(obj) -> bool

A selector the API server would refuse raises SelectorError (the emulator answers 400), so code
that relies on an unsupported field selector fails here as it would on a cluster.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any


class SelectorError(ValueError):
    pass


_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                  r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


def _split_requirements(selector: str) -> list[str]:
    """Split on the commas that are not inside `in (...)` sets."""
    parts, depth, current = [], 0, []
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(char)
    parts.append("".join(current).strip())
    return [part for part in parts if part]


def _checked_key(key: str, selector: str) -> str:
    key = key.strip()
    if not _KEY.match(key):
        raise SelectorError(f"invalid label key {key!r} in selector {selector!r}")
    return key


def _checked_value(value: str, selector: str) -> str:
    value = value.strip()
    if len(value) > 63 or not _VALUE.match(value):
        raise SelectorError(f"invalid label value {value!r} in selector {selector!r}")
    return value


def parse_label_selector(selector: str) -> Callable[[Mapping[str, str]], bool]:
    checks: list[Callable[[Mapping[str, str]], bool]] = []
    for requirement in _split_requirements(selector):
        set_match = re.fullmatch(r"(\S+)\s+(in|notin)\s*\((.*)\)", requirement)
        if set_match:
            key = _checked_key(set_match.group(1), selector)
            values = {_checked_value(v, selector) for v in set_match.group(3).split(",")}
            if set_match.group(2) == "in":
                checks.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                checks.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
            continue
        equality = re.fullmatch(r"([^=!]+?)\s*(==|=|!=)\s*([^=!]*)", requirement)
        if equality:
            key = _checked_key(equality.group(1), selector)
            value = _checked_value(equality.group(3), selector)
            if equality.group(2) == "!=":
                checks.append(lambda labels, k=key, v=value: labels.get(k) != v)
            else:
                checks.append(lambda labels, k=key, v=value: labels.get(k) == v)
            continue
        if requirement.startswith("!"):
            key = _checked_key(requirement[1:], selector)
            checks.append(lambda labels, k=key: k not in labels)
            continue
        key = _checked_key(requirement, selector)
        checks.append(lambda labels, k=key: k in labels)
    return lambda labels: all(check(labels) for check in checks)


def _field_value(obj: Mapping[str, Any], dotted: str) -> str:
    node: Any = obj
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, Mapping) else None
    if node is None:
        return ""
    if isinstance(node, bool):
        return "true" if node else "false"
    return str(node)


def parse_field_selector(selector: str,
                         supported: Iterable[str]) -> Callable[[Mapping[str, Any]], bool]:
    known = set(supported)
    checks: list[Callable[[Mapping[str, Any]], bool]] = []
    for requirement in _split_requirements(selector):
        match = re.fullmatch(r"([^=!]+?)\s*(==|=|!=)\s*(.*)", requirement)
        if not match:
            raise SelectorError(f"invalid field selector {selector!r}")
        field, operator, value = match.group(1).strip(), match.group(2), match.group(3).strip()
        if field not in known:
            quoted = ", ".join(f'"{name}"' for name in sorted(known))
            raise SelectorError(f'"{field}" is not a known field selector: only {quoted}')
        if operator == "!=":
            checks.append(lambda obj, f=field, v=value: _field_value(obj, f) != v)
        else:
            checks.append(lambda obj, f=field, v=value: _field_value(obj, f) == v)
    return lambda obj: all(check(obj) for check in checks)


def label_problem(key: str, value: Any) -> str | None:
    """Why the API server would refuse this label, or None when it is valid."""
    if not isinstance(value, str):
        return f"label {key!r}: the value must be a string"
    if not _KEY.match(key) or len(key.rsplit("/", 1)[-1]) > 63 or len(key) > 253 + 1 + 63:
        return (f"label key {key!r} is invalid: a name of at most 63 characters (alphanumerics, "
                f"'-', '_' or '.'), with an optional DNS-subdomain prefix and '/'")
    if len(value) > 63 or not _VALUE.match(value):
        return (f"label {key!r}: value {value!r} is invalid: at most 63 characters, "
                f"alphanumerics, '-', '_' or '.', starting and ending with an alphanumeric")
    return None
