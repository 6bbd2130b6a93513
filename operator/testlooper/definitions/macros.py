"""The macro pre-processor: `define/in`, `foreach/repeat`, `squash/over`, `case/in`, `merge`.

It walks the loaded document from the outside in, carrying the active macro variables, and
substitutes `${name}` in every string, keys included. References to names that are not macro
variables are left alone: they are definition variables, substituted later (late binding).
"""

from __future__ import annotations

import itertools

from .substitution import split_references, substitute, whole_reference
from .yamlload import PDict, PList, error_at

# Values a whole expansion may produce before it is refused (a cross product can explode). A
# 5,000-test file with 20 variables a test produces about 160,000.
MAX_PRODUCED_VALUES = 1_000_000

MAX_FOREACH_ITEMS = 200_000

_DIRECTIVE_KEYS = frozenset({"define", "foreach", "squash", "case", "merge"})
_DIRECTIVES = (
    frozenset({"define", "in"}),
    frozenset({"foreach", "repeat"}),
    frozenset({"squash", "over"}),
    frozenset({"case", "in"}),
    frozenset({"merge"}),
)


class IncludeRequest:
    """One entry of `includes` after macros: the path, and the macro variables the included file
    starts with: those active where the entry was written, plus its own `variables`."""

    __slots__ = ("path", "variables", "mark")

    def __init__(self, path, variables: dict, mark):
        self.path = path
        self.variables = variables
        self.mark = mark


def variable_value(value):
    """Macro and definition variables hold strings; other plain scalars become strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (int, float)):
        return str(value)
    return value


class MacroExpander:
    def __init__(self):
        self.produced = 0
        self._last_scope: tuple[dict | None, bool] = (None, False)
        self._static: dict[int, bool] = {}
        self.static_sizes: dict[int, int] = {}  # values in each static subtree, counted when it is used

    def strings_only(self, variables: dict) -> bool:
        """Whether every active variable is a string, so a plain `dict.get` can do the lookups.
        Remembered for the last scope asked about: a whole subtree expands in one scope."""
        scope, answer = self._last_scope
        if scope is not variables:
            answer = all(type(v) is str for v in variables.values())
            self._last_scope = (variables, answer)
        return answer

    def expand(self, value, variables: dict, path: tuple):
        if isinstance(value, str):
            return self.expand_string(value, variables, path) if "${" in value else value
        self.produced += len(value) + 1 if isinstance(value, (dict, list)) else 1
        if self.produced > MAX_PRODUCED_VALUES:
            raise error_at(f"macros expand past {MAX_PRODUCED_VALUES:,} values; refusing the file", path, value)
        if path and isinstance(value, (dict, list)) and self.is_static(value):  # the top: see expand_includes
            self.produced += self.static_sizes[id(value)]  # shared, but it counts every time it is used
            if self.produced > MAX_PRODUCED_VALUES:
                raise error_at(f"macros expand past {MAX_PRODUCED_VALUES:,} values; refusing the file", path, value)
            return value  # nothing to substitute or expand: shared, never copied
        if isinstance(value, PDict):
            if len(value) <= 2 and _DIRECTIVE_KEYS.intersection(value):
                keys = frozenset(value)
                if keys in _DIRECTIVES:
                    return self.directive(keys, value, variables, path)
            return self.mapping(value, variables, path)
        if isinstance(value, list):
            return PList((self.expand(item, variables, path + (i,)) for i, item in enumerate(value)),
                         mark=getattr(value, "mark", None))
        return value

    def is_static(self, value) -> bool:
        """Whether a written value holds no `${` and no directive anywhere (remembered per value:
        the expander only ever walks the loaded document, whose values live as long as it does)."""
        known = self._static.get(id(value))
        if known is None:
            if isinstance(value, str):
                return "${" not in value
            if isinstance(value, dict):
                known = not (len(value) <= 2 and frozenset(value) in _DIRECTIVES) and all(
                    "${" not in key and self.is_static(item) for key, item in value.items())
                items = value.values()
            elif isinstance(value, list):
                known = all(self.is_static(item) for item in value)
                items = value
            else:
                return True
            self._static[id(value)] = known
            if known:
                self.static_sizes[id(value)] = 1 + sum(
                    self.static_sizes.get(id(item), 1) if isinstance(item, (dict, list)) else 1 for item in items)
        return known

    def fast_string(self, text: str, variables: dict):
        """`expand_string` for the common cases with no Python-level lookups; None otherwise."""
        parts = split_references(text)
        if parts is None:
            return None
        if len(parts) == 3 and not parts[0] and not parts[2]:  # exactly `${name}`
            found = variables.get(parts[1])
            return text if found is None else found
        scope, strings_only = self._last_scope
        if scope is not variables:
            strings_only = self.strings_only(variables)
        if not strings_only:
            return None
        get = variables.get
        out = parts[:]
        for i in range(1, len(parts), 2):
            found = get(parts[i])
            if found is not None:
                out[i] = found
            else:
                out[i] = "${" + parts[i] + "}"
        return "".join(out)

    def expand_string(self, text: str, variables: dict, path: tuple, value_holder=None):
        if "${" not in text:
            return text
        name = whole_reference(text)
        if name is not None and name in variables:
            return variables[name]  # may be a list or dict: `${name}` stands for the value itself
        if self.strings_only(variables):
            return substitute(text, variables.get)

        def lookup(ref: str):
            found = variables.get(ref)
            if found is None or isinstance(found, str):
                return found
            raise error_at(
                f"macro variable {ref!r} is a {type(found).__name__} and can only be used alone, as '${{{ref}}}'",
                path, value_holder,
            )

        return substitute(text, lookup)

    def mapping(self, value: PDict, variables: dict, path: tuple) -> PDict:
        result = PDict(mark=value.mark, key_marks=value.key_marks)  # marks shared until a key changes
        expand, expand_string = self.expand, self.expand_string
        for key, item in value.items():
            if key == "includes" and not path:  # the file's own includes (a whole-file define keeps path ())
                result[key] = self.expand_includes(item, variables, ("includes",))
                continue
            if "${" in key:
                new_key = expand_string(key, variables, path, value)
                if not isinstance(new_key, str):
                    raise error_at(f"key {key!r} must expand to a string", path, value, key)
                if new_key != key:
                    if result.key_marks is value.key_marks:
                        result.key_marks = dict(value.key_marks)
                    if key in value.key_marks:
                        result.key_marks[new_key] = value.key_marks[key]
                if new_key in result:
                    raise error_at(f"key {new_key!r} is produced twice", path + (new_key,), value, key)
                key = new_key
            if type(item) is str:  # most values: skip the general dispatch
                if "${" in item:
                    expanded = self.fast_string(item, variables)
                    item = expanded if expanded is not None else expand_string(item, variables, path + (key,), value)
                result[key] = item
            else:
                result[key] = expand(item, variables, path + (key,))
        return result

    # -- includes ----------------------------------------------------------------------------

    def expand_includes(self, value, variables: dict, path: tuple) -> PList:
        """`includes` as a flat list of IncludeRequest. As in the original, a string (or a
        `{path, variables}`) takes along the macro variables active where it is written, so an
        include inside `foreach` sees the loop's variables."""
        mark = getattr(value, "mark", None)
        if isinstance(value, str):
            text = self.expand_string(value, variables, path)
            return PList([IncludeRequest(text, dict(variables), mark)], mark=mark)
        if isinstance(value, list):
            result = PList(mark=mark)
            for i, item in enumerate(value):
                result.extend(self.expand_includes(item, variables, path + (i,)))
            return result
        if isinstance(value, PDict):
            keys = frozenset(value)
            if "path" in keys and keys <= {"path", "variables"}:
                own = self.expand(value.get("variables") or PDict(), variables, path + ("variables",))
                if not isinstance(own, dict):
                    raise error_at("an include's 'variables' must be a mapping", path + ("variables",), value, "variables")
                target = self.expand(value["path"], variables, path + ("path",))
                merged = dict(variables)
                merged.update((name, variable_value(item)) for name, item in own.items())
                return PList([IncludeRequest(target, merged, value.mark)], mark=mark)
            if keys == {"define", "in"}:
                defined = self.expand(value["define"], variables, path + ("define",))
                if not isinstance(defined, dict):
                    raise error_at("'define' must be a mapping of variable names to values", path + ("define",),
                                   value, "define")
                inner = dict(variables)
                inner.update((name, variable_value(item)) for name, item in defined.items())
                return self.expand_includes(value["in"], inner, path)
            if keys == {"foreach", "repeat"}:
                result = PList(mark=mark)
                for item in self.foreach_items(value, variables, path + ("foreach",)):
                    inner = dict(variables)
                    inner.update((name, variable_value(v)) for name, v in item.items())
                    result.extend(self.expand_includes(value["repeat"], inner, path))
                return result
            if keys == {"merge"} and isinstance(value["merge"], list):
                return self.expand_includes(value["merge"], variables, path + ("merge",))
        expanded = self.expand(value, variables, path)  # squash/over, case/in: their result, then as above
        if expanded is value:
            raise error_at("an include must be a path or a mapping with 'path' (and 'variables')", path, value)
        return self.expand_includes(expanded, variables, path)

    # -- directives --------------------------------------------------------------------------

    def directive(self, keys: frozenset, value: PDict, variables: dict, path: tuple):
        if "define" in keys:
            return self.define_in(value, variables, path)
        if "foreach" in keys:
            return self.foreach_repeat(value, variables, path)
        if "squash" in keys:
            return self.squash_over(value, variables, path)
        if "case" in keys:
            return self.case_in(value, variables, path)
        return self.merge(value, variables, path)

    def define_in(self, value: PDict, variables: dict, path: tuple):
        defined = self.expand(value["define"], variables, path + ("define",))
        if not isinstance(defined, dict):
            raise error_at("'define' must be a mapping of variable names to values", path + ("define",), value, "define")
        inner = dict(variables)
        for name, item in defined.items():
            inner[name] = variable_value(item)
        return self.expand(value["in"], inner, path)

    def foreach_repeat(self, value: PDict, variables: dict, path: tuple):
        items = self.foreach_items(value, variables, path + ("foreach",))
        template = value["repeat"]
        results = []
        for item in items:
            inner = dict(variables)
            for name, item_value in item.items():
                inner[name] = variable_value(item_value)
            results.append(self.expand(template, inner, path))
        if not results:  # an empty foreach: nothing, of the kind the template makes
            return PList(mark=value.mark) if isinstance(template, list) else PDict(mark=value.mark)
        if all(isinstance(r, dict) for r in results):
            return self.merge_dicts(results, path, value, "repeat", strict=True)
        if all(isinstance(r, list) for r in results):
            return PList(itertools.chain.from_iterable(results), mark=value.mark)
        raise error_at("'repeat' must produce a mapping or a list each time", path + ("repeat",), value, "repeat")

    def foreach_items(self, value: PDict, variables: dict, path: tuple) -> list:
        spec = self.expand(value["foreach"], variables, path)
        if isinstance(spec, dict):
            names = list(spec)
            columns = []
            for name in names:
                column = spec[name]
                if not isinstance(column, list):
                    raise error_at(f"'foreach' of a mapping needs a list for {name!r}", path + (name,), spec, name)
                columns.append(flatten(column))
            combinations = 1
            for column in columns:
                combinations *= len(column)
            if combinations > MAX_FOREACH_ITEMS:
                raise error_at(f"'foreach' cross product has {combinations:,} items, more than "
                               f"{MAX_FOREACH_ITEMS:,}; refusing the file", path, value, "foreach")
            return [dict(zip(names, combo)) for combo in itertools.product(*columns)]
        if isinstance(spec, list):
            items = flatten(spec)
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise error_at("'foreach' items must be mappings of variables", path + (i,), spec)
            return items
        raise error_at("'foreach' must be a list of mappings or a mapping of lists", path, value, "foreach")

    def squash_over(self, value: PDict, variables: dict, path: tuple):
        squash = self.expand(value["squash"], variables, path + ("squash",))
        if not isinstance(squash, dict):
            raise error_at("'squash' must be a mapping", path + ("squash",), value, "squash")
        over = self.expand(value["over"], variables, path + ("over",))
        if not isinstance(over, list):
            raise error_at("'over' must produce a list of mappings", path + ("over",), value, "over")
        result = PList(mark=value.mark)
        for i, item in enumerate(flatten(over)):
            if not isinstance(item, dict):
                raise error_at("'over' must produce a list of mappings", path + ("over", i), value, "over")
            merged = PDict(item, mark=getattr(item, "mark", value.mark), key_marks=dict(getattr(item, "key_marks", {})))
            merged.update(squash)
            result.append(merged)
        return result

    def case_in(self, value: PDict, variables: dict, path: tuple):
        case = self.expand(value["case"], variables, path + ("case",))
        options = self.expand(value["in"], variables, path + ("in",))
        if not isinstance(options, dict):
            raise error_at("'in' of a 'case' must be a mapping", path + ("in",), value, "in")
        case = variable_value(case)
        if not isinstance(case, str) or case not in options:
            known = ", ".join(sorted(options)) or "none"
            raise error_at(f"case {case!r} is not one of: {known}", path + ("case",), value, "case")
        return options[case]

    def merge(self, value: PDict, variables: dict, path: tuple):
        parts = self.expand(value["merge"], variables, path + ("merge",))
        if not isinstance(parts, list):
            raise error_at("'merge' must be a list of lists or a list of mappings", path, value, "merge")
        if all(isinstance(p, list) for p in parts):
            return PList(itertools.chain.from_iterable(parts), mark=value.mark)
        if all(isinstance(p, dict) for p in parts):
            return self.merge_dicts(parts, path, value, "merge", strict=False)
        raise error_at("'merge' must be a list of lists or a list of mappings", path, value, "merge")

    @staticmethod
    def merge_dicts(parts: list, path: tuple, origin: PDict, origin_key: str, strict: bool) -> PDict:
        result = PDict(mark=origin.mark)
        for part in parts:
            for key, item in part.items():
                if strict and key in result:
                    raise error_at(f"key {key!r} is produced twice", path + (key,), origin, origin_key)
                result[key] = item
                mark = getattr(part, "key_marks", {}).get(key)
                if mark is not None:
                    result.key_marks[key] = mark
        return result


def flatten(items: list) -> list:
    """Nested lists become one flat list (the format allows lists of lists anywhere a list is)."""
    if not any(isinstance(i, list) for i in items):
        return list(items)
    flat = []
    for item in items:
        if isinstance(item, list):
            flat.extend(flatten(item))
        else:
            flat.append(item)
    return flat


def expand_macros(document, variables: dict | None = None):
    return MacroExpander().expand(document, dict(variables or {}), ())
