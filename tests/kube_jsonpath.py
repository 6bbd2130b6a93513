"""The subset of Kubernetes JSONPath that CRD printer columns use, for the emulator's Tables.

    compile_path('.status.conditions[?(@.type=="Ready")].status')(obj) -> ["True"]

Supported: dotted fields (`.spec.url`), escaped dots inside a name
(`.metadata.labels.testlooper\\.dev/short-commit`), `['quoted key']`, `[n]` (negative counts from
the end), `[*]`, and filters `[?(@.a.b=="v")]`, `!=`, `[?(@.a)]` (exists). The API server checks
a column's jsonPath when a CRD is created, so a bad one is refused there (JsonPathError), never
rendered as an empty column.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any


class JsonPathError(ValueError):
    pass


_FILTER = re.compile(r"^\?\(\s*@((?:\.[^=!]+?)+)\s*(?:(==|!=)\s*(.+?))?\s*\)$")


def _literal(text: str) -> Any:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text in ("true", "false"):
        return text == "true"
    try:
        return json.loads(text)
    except ValueError:
        raise JsonPathError(f"unsupported literal in a jsonPath filter: {text}") from None


def _bracket_end(path: str, start: int) -> int:
    """Index of the `]` closing the `[` at `start`, skipping quoted strings and parentheses."""
    depth = 0
    quote = ""
    for index in range(start + 1, len(path)):
        char = path[index]
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif char == "]" and depth == 0:
            return index
    raise JsonPathError(f"unclosed '[' in jsonPath {path!r}")


def _tokens(path: str) -> list[tuple[str, Any]]:
    tokens: list[tuple[str, Any]] = []
    index = 0
    while index < len(path):
        char = path[index]
        if char == ".":
            index += 1
        elif char == "[":
            end = _bracket_end(path, index)
            inside = path[index + 1:end].strip()
            index = end + 1
            if inside == "*":
                tokens.append(("all", None))
            elif re.fullmatch(r"-?\d+", inside):
                tokens.append(("index", int(inside)))
            elif inside[:1] in "'\"" and inside[-1:] == inside[:1] and len(inside) >= 2:
                tokens.append(("field", inside[1:-1]))
            elif inside.startswith("?"):
                match = _FILTER.match(inside)
                if not match:
                    raise JsonPathError(f"unsupported filter [{inside}] in jsonPath {path!r}")
                subpath, operator, value = match.groups()
                tokens.append(("filter", (compile_path(subpath), operator,
                                          None if operator is None else _literal(value))))
            else:
                raise JsonPathError(f"unsupported [{inside}] in jsonPath {path!r}")
        else:
            name = []
            while index < len(path) and path[index] not in ".[":
                if path[index] == "\\" and index + 1 < len(path):
                    index += 1
                name.append(path[index])
                index += 1
            text = "".join(name)
            if not text or any(c in text for c in "]()=!@{} "):
                raise JsonPathError(f"unsupported name {text!r} in jsonPath {path!r}")
            tokens.append(("field", text))
    return tokens


def compile_path(path: str) -> Callable[[Any], list[Any]]:
    """Compile a jsonPath (with or without the `{...}` template braces) into a function that
    returns every value it selects in an object, in order (empty when nothing matches)."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1].strip()
    if path.startswith("$"):
        path = path[1:]
    if not path.startswith(".") and not path.startswith("["):
        raise JsonPathError(f"a jsonPath must start with '.': {path!r}")
    tokens = _tokens(path)
    if not tokens:
        raise JsonPathError(f"empty jsonPath {path!r}")

    def evaluate(obj: Any) -> list[Any]:
        nodes = [obj]
        for kind, argument in tokens:
            selected: list[Any] = []
            for node in nodes:
                if kind == "field":
                    if isinstance(node, dict) and argument in node:
                        selected.append(node[argument])
                elif kind == "index":
                    if isinstance(node, list) and -len(node) <= argument < len(node):
                        selected.append(node[argument])
                elif kind == "all":
                    if isinstance(node, list):
                        selected.extend(node)
                    elif isinstance(node, dict):
                        selected.extend(node.values())
                else:
                    subpath, operator, value = argument
                    for item in node if isinstance(node, list) else []:
                        found = subpath(item)
                        if operator is None:
                            keep = bool(found)
                        elif operator == "==":
                            keep = bool(found) and found[0] == value
                        else:
                            keep = not found or found[0] != value
                        if keep:
                            selected.append(item)
            nodes = selected
        return nodes

    return evaluate
