"""Safe YAML (and JSON) loading that remembers where every mapping and list came from.

PyYAML's safe loader builds plain dicts and lists and forgets positions, and it builds an alias
bomb ("billion laughs") as shared references that only explode when walked. Here the document
is composed to nodes, its expanded size is measured before anything is built, and mappings and
lists become `PDict`/`PList`, which carry their position so that errors found much later (after
macros ran) still point at a line.
"""

from __future__ import annotations

import yaml

from .errors import DefinitionsError, DefinitionsWarning

MAX_FILE_BYTES = 4 * 1024 * 1024
# Nodes a document may expand to once aliases are followed. A 5,000-test file written out in
# full is about 300,000 nodes; an alias bomb is billions.
MAX_EXPANDED_NODES = 2_000_000
# Nesting a definitions file needs is a dozen levels; a deeper document is refused before any
# recursive walk could overflow the stack.
MAX_DEPTH = 100

try:  # the C composer is several times faster; fall back where libyaml is missing
    _Loader = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _Loader = yaml.SafeLoader

_PLAIN_SCALAR_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}


class Mark(tuple):
    """(filename, line, column), 1-based."""

    __slots__ = ()

    def __new__(cls, filename: str, line: int | None, column: int | None):
        return super().__new__(cls, (filename, line, column))


class PDict(dict):
    """A mapping that knows where it, and each of its keys, was written."""

    __slots__ = ("mark", "key_marks")

    def __init__(self, *args, mark: Mark | None = None, key_marks: dict | None = None):
        super().__init__(*args)
        self.mark = mark
        self.key_marks = key_marks if key_marks is not None else {}


class PList(list):
    """A list that knows where it was written."""

    __slots__ = ("mark",)

    def __init__(self, *args, mark: Mark | None = None):
        super().__init__(*args)
        self.mark = mark


def mark_of(value, key=None) -> Mark | None:
    if key is not None and isinstance(value, PDict) and key in value.key_marks:
        return value.key_marks[key]
    return getattr(value, "mark", None)


def error_at(message: str, key_path, value=None, key=None, filename: str | None = None) -> DefinitionsError:
    mark = mark_of(value, key)
    if mark is None:
        return DefinitionsError(message, key_path, filename=filename)
    return DefinitionsError(message, key_path, filename=mark[0], line=mark[1], column=mark[2])


def load_yaml_text(text: str, filename: str, warn=None):
    """Parse one YAML (or JSON, a subset of YAML) document into PDict/PList/scalars.

    `warn(DefinitionsWarning)` hears of keys written twice in one mapping (the last one is kept).
    """
    if len(text.encode("utf-8", errors="replace")) > MAX_FILE_BYTES:
        raise DefinitionsError(
            f"file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; refusing to read it", filename=filename
        )
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, filename) from None
    finally:
        loader.dispose()
    if node is None:
        raise DefinitionsError("the file is empty", filename=filename)
    _check_expanded_size(node, filename)
    return _NodeConverter(filename, warn).convert(node)


def _yaml_error(exc: yaml.YAMLError, filename: str) -> DefinitionsError:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    message = f"invalid YAML: {problem}" + (f" ({context})" if context else "")
    if mark is None:
        return DefinitionsError(message, filename=filename)
    return DefinitionsError(message, filename=filename, line=mark.line + 1, column=mark.column + 1)


def _check_expanded_size(root: yaml.Node, filename: str) -> None:
    """Refuse documents whose aliases expand past MAX_EXPANDED_NODES, or nest deeper than
    MAX_DEPTH once expanded, without expanding them."""
    sizes: dict[int, int] = {}
    heights: dict[int, int] = {}  # levels below a node, so an alias reused deep is measured too
    in_progress: set[int] = set()

    def size(node: yaml.Node, depth: int = 0) -> int:
        key = id(node)
        if key in sizes:
            if depth + heights[key] > MAX_DEPTH:
                raise DefinitionsError(f"the document nests deeper than {MAX_DEPTH} levels; refusing it",
                                       filename=filename, line=node.start_mark.line + 1)
            return sizes[key]
        if key in in_progress:  # a recursive alias can never be expanded
            raise DefinitionsError("recursive YAML alias", filename=filename, line=node.start_mark.line + 1)
        if depth > MAX_DEPTH:
            raise DefinitionsError(f"the document nests deeper than {MAX_DEPTH} levels; refusing it",
                                   filename=filename, line=node.start_mark.line + 1, column=node.start_mark.column + 1)
        total = 1
        children = []
        if isinstance(node, yaml.MappingNode):
            children = [child for pair in node.value for child in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        in_progress.add(key)
        for child in children:
            total += size(child, depth + 1)
        in_progress.discard(key)
        heights[key] = 1 + max((heights[id(child)] for child in children), default=0) if children else 0
        total = min(total, MAX_EXPANDED_NODES + 1)
        sizes[key] = total
        return total

    if size(root) > MAX_EXPANDED_NODES:
        raise DefinitionsError(
            f"the document expands past {MAX_EXPANDED_NODES:,} values through YAML aliases; refusing it",
            filename=filename,
        )


class _NodeConverter:
    def __init__(self, filename: str, warn=None):
        self.filename = filename
        self.warn = warn
        self.constructor = yaml.SafeLoader("")  # only its scalar constructors are used
        self.done: dict[int, object] = {}

    def mark(self, node: yaml.Node) -> Mark:
        return Mark(self.filename, node.start_mark.line + 1, node.start_mark.column + 1)

    def convert(self, node: yaml.Node):
        key = id(node)
        if key in self.done:  # an alias: share the converted value, as YAML means
            return self.done[key]
        if isinstance(node, yaml.ScalarNode):
            value = self.scalar(node)
        elif isinstance(node, yaml.SequenceNode):
            value = PList(mark=self.mark(node))
            self.done[key] = value
            value.extend(self.convert(item) for item in node.value)
        else:
            value = self.mapping(node)
        self.done[key] = value
        return value

    def scalar(self, node: yaml.ScalarNode):
        if node.tag not in _PLAIN_SCALAR_TAGS:
            return node.value  # timestamps, binary and custom tags stay as written
        return self.constructor.construct_object(node)

    def mapping(self, node: yaml.MappingNode) -> PDict:
        self.check_duplicate_keys(node)
        self.constructor.flatten_mapping(node)  # YAML merge keys (<<): written keys win over merged
        result = PDict(mark=self.mark(node))
        self.done[id(node)] = result
        for key_node, value_node in node.value:
            key = self.key(key_node)
            result.key_marks[key] = self.mark(value_node)
            result[key] = self.convert(value_node)
        return result

    def key(self, key_node: yaml.Node) -> str:
        if not isinstance(key_node, yaml.ScalarNode):
            raise DefinitionsError(
                "a mapping key must be a plain value", filename=self.filename,
                line=key_node.start_mark.line + 1, column=key_node.start_mark.column + 1,
            )
        key = self.scalar(key_node)
        if isinstance(key, bool):
            return str(key).lower()
        return "" if key is None else str(key)

    def check_duplicate_keys(self, node: yaml.MappingNode) -> None:
        """PyYAML silently kept the last of two equal keys, and old files rely on it (the
        original's own fixtures repeat `environments:`). The last one is kept here too, with a
        warning naming the file, line and key."""
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.key(key_node)
            if key in seen and self.warn is not None:
                self.warn(DefinitionsWarning(
                    f"key {key!r} is written twice in one mapping; the last value is kept",
                    self.filename, key_node.start_mark.line + 1, key_node.start_mark.column + 1))
            seen.add(key)
