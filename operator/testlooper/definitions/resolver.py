"""Resolve a definitions file: load, expand macros, merge includes, check, and resolve."""

from __future__ import annotations

import fnmatch
import gc
import posixpath
import re
from typing import Callable

from . import schema
from .dependencies import ReferenceParser, assign_hashes, check_build_cycles, resolve_dependencies
from .environments import EnvironmentResolver, parse_environment
from .errors import DefinitionsError
from .macros import expand_macros, flatten
from .tasks import RESERVED_NAMES, TaskParser
from .yamlload import PDict, error_at, load_yaml_text

LOOPER_VERSION = 5
MAX_INCLUDE_DEPTH = 20
# Builds, tests and deployments one file may define: far above real projects, far below what
# would take minutes and gigabytes to resolve (a few lines of nested foreach can ask for that).
MAX_TASKS = 50_000
_SHA = re.compile(r"^[0-9a-fA-F]{40}$")
_MERGED_SECTIONS = ("repos", "environments", "builds", "tests", "deployments", "test_sets")
_FLATTENED_SECTIONS = ("builds", "tests", "deployments")

ReadFile = Callable[[str], str]


def resolve_text(text: str, filename: str, read_file: ReadFile | None = None) -> dict:
    """Resolve one definitions file to the JSON contract (see docs/design.md).

    `filename` is the file's path relative to the tree root (it names the file in errors and
    anchors relative includes); `read_file(path)` reads another file of the same tree.
    """
    # The cyclic garbage collector would walk the growing result again and again while it is
    # built (it holds no cycles worth collecting); pausing it makes large files ~20% faster.
    collecting = gc.isenabled()
    gc.disable()
    try:
        document = _load_document(text, filename, read_file, variables={}, including=(), top=True)
        return _resolve_document(document, filename)
    finally:
        if collecting:
            gc.enable()


def _load_document(text, filename, read_file, variables, including, top) -> dict:
    loaded = load_yaml_text(text, filename)
    document = expand_macros(loaded, variables)
    if not isinstance(document, dict):
        raise error_at("the file must hold a mapping of sections (looper_version, builds, tests, ...)", (), document,
                       filename=filename)
    schema.check_keys(document, schema.TOP_LEVEL_KEYS, (), "the top level")
    _check_version(document, filename, required=top)
    sections = {key: _section(document, key) for key in _MERGED_SECTIONS}
    sections["triggers"] = list(schema.need_list(document.get("triggers", []), ("triggers",), "'triggers'", document, "triggers"))
    sections["_sources"] = {key: document.get(key) for key in _MERGED_SECTIONS}
    includes = document.get("includes", [])
    includes = flatten(schema.need_list(includes, ("includes",), "'includes'", document, "includes"))
    repo_names = set(sections["repos"])
    for i, include in enumerate(includes):
        path, include_vars = _include_entry(include, ("includes", i), document)
        target = _include_target(path, filename, repo_names, ("includes", i), document)
        if target in including or target == filename:
            chain = " -> ".join(including + (filename, target))
            raise error_at(f"includes form a cycle: {chain}", ("includes", i), document, "includes")
        if len(including) >= MAX_INCLUDE_DEPTH:
            raise error_at(f"includes nest deeper than {MAX_INCLUDE_DEPTH} files", ("includes", i), document, "includes")
        if read_file is None:
            raise error_at(f"cannot read included file {target!r} here", ("includes", i), document, "includes")
        try:
            included_text = read_file(target)
        except (OSError, KeyError) as exc:
            raise error_at(f"included file {target!r} cannot be read: {exc}", ("includes", i), document, "includes") from None
        included = _load_document(included_text, target, read_file, {**variables, **include_vars},
                                  including + (filename,), top=False)
        _merge_into(sections, included, target)
    return sections


def _check_version(document, filename, required: bool) -> None:
    if "looper_version" not in document:
        if required:
            raise error_at(f"'looper_version' is missing (this version reads looper_version: {LOOPER_VERSION})",
                           ("looper_version",), document, filename=filename)
        return
    version = document["looper_version"]
    if str(version) != str(LOOPER_VERSION):
        raise error_at(f"looper_version {version!r} is not supported (this version reads {LOOPER_VERSION})",
                       ("looper_version",), document, "looper_version")


def _section(document, key) -> dict:
    value = document.get(key)
    if value is None:
        return {}
    if key in _FLATTENED_SECTIONS and isinstance(value, list):
        return _flatten_to_mapping(value, (key,), document, key)
    return dict(schema.need_mapping(value, (key,), f"'{key}'", document, key))


def _flatten_to_mapping(items, path, parent, key) -> PDict:
    """Under builds/tests/deployments a list of mappings (nested lists too) is one mapping."""
    result = PDict(mark=getattr(items, "mark", None))
    for i, item in enumerate(flatten(items)):
        item = schema.need_mapping(item, path + (i,), f"each item of '{key}'", parent, key)
        for name, value in item.items():
            if name in result:
                raise error_at(f"{name!r} is defined twice", path + (name,), item, name)
            result[name] = value
            if name in getattr(item, "key_marks", {}):
                result.key_marks[name] = item.key_marks[name]
    return result


def _include_entry(include, path, document):
    if isinstance(include, str):
        return include, {}
    entry = schema.need_mapping(include, path, "an include", document, "includes")
    schema.check_keys(entry, ("path", "variables"), path, "an include")
    include_path = schema.need_string(entry.get("path"), path + ("path",), "'path'", entry, "path")
    return include_path, schema.string_mapping(entry.get("variables"), path + ("variables",), "'variables'", entry, "variables")


def _include_target(path: str, including_file: str, repo_names: set, key_path, document) -> str:
    if path.startswith("./") or path.startswith("../"):
        target = posixpath.normpath(posixpath.join(posixpath.dirname(including_file), path))
        if target.startswith("../") or target == "..":
            raise error_at(f"included file {path!r} is outside the repository", key_path, document, "includes")
        return target
    first = path.split("/", 1)[0]
    if first in repo_names:
        raise error_at(f"included file {path!r} is in the pinned repo {first!r}; including other repositories' "
                       "files needs the operator (not supported by this version)", key_path, document, "includes")
    raise error_at(f"included file {path!r} must start with './' (relative to this file) or name a repo under 'repos'",
                   key_path, document, "includes")


def _merge_into(sections: dict, included: dict, filename: str) -> None:
    for key in _MERGED_SECTIONS:
        target = sections[key]
        for name, value in included[key].items():
            if name in target:
                raise error_at(f"{key} entry {name!r} is defined both here and in an including file",
                               (key, name), included["_sources"].get(key), name)
            target[name] = value
        if key not in sections["_sources"] or sections["_sources"][key] is None:
            sections["_sources"][key] = included["_sources"].get(key)
    sections["triggers"].extend(included["triggers"])


def _resolve_document(sections: dict, filename: str) -> dict:
    sources = sections["_sources"]
    repos = _parse_repos(sections["repos"], sources.get("repos"))
    repo_names = set(repos)
    environments = {}
    for name, value in sections["environments"].items():
        environments[name] = parse_environment(name, value, ("environments", name))
    env_resolver = EnvironmentResolver(environments, repo_names)
    for name in environments:
        env_resolver.linearize(name)  # cycles and unknown bases fail here, even if unused
    env_json = env_resolver.to_json()

    task_count = sum(len(sections[section]) for section in ("builds", "tests", "deployments"))
    if task_count > MAX_TASKS:
        raise DefinitionsError(f"the file defines {task_count:,} builds, tests and deployments; at most "
                               f"{MAX_TASKS:,} are allowed", filename=filename)
    _check_names_unique(sections, sources)
    parser = TaskParser(env_resolver, repo_names)
    parsed = {}
    for section in ("builds", "tests", "deployments"):
        parsed[section] = {
            name: parser.parse(section, name, value, sources.get(section) or {})
            for name, value in sections[section].items()
        }
    builds = {name: task for name, (task, _) in parsed["builds"].items()}
    references = ReferenceParser(builds, repo_names)
    for section in ("builds", "tests", "deployments"):
        resolve_dependencies(parsed[section], references, section)
    build_sources = {name: raw["source"] for name, (_, raw) in parsed["builds"].items()}
    build_order = check_build_cycles(builds, build_sources)
    all_tasks = [task for section in parsed.values() for task, _ in section.values()]
    pins = {name: repo["reference"] or repo["import"] for name, repo in repos.items()}
    assign_hashes(all_tasks, builds, build_order, pins)

    tests = {name: task for name, (task, _) in parsed["tests"].items()}
    test_sets = _expand_test_sets(sections["test_sets"], tests, sources.get("test_sets"))
    triggers = _parse_triggers(sections["triggers"], test_sets)
    return {
        "looper_version": LOOPER_VERSION,
        "definitions_file": filename,
        "repos": repos,
        "environments": env_json,
        "builds": builds,
        "tests": tests,
        "deployments": {name: task for name, (task, _) in parsed["deployments"].items()},
        "test_sets": test_sets,
        "triggers": triggers,
    }


def _check_names_unique(sections: dict, sources: dict) -> None:
    """Runs, results and history are keyed by task name, so a name means one task."""
    seen: dict[str, str] = {}
    for section in ("builds", "tests", "deployments"):
        for name in sections[section]:
            if name in seen:
                raise error_at(f"{name!r} names both a {seen[name]} and a {section[:-1]}; task names must be unique",
                               (section, name), sources.get(section), name)
            seen[name] = section[:-1]


def _parse_repos(written: dict, source) -> dict:
    repos = {}
    for name, value in written.items():
        path = ("repos", name)
        if name in RESERVED_NAMES or "/" in name or not name:
            raise error_at(f"repo name {name!r} is reserved or not a plain name (reserved: {', '.join(RESERVED_NAMES)})",
                           path, source, name)
        entry = {"reference": "", "branch": "", "auto": False, "import": ""}
        if isinstance(value, str):
            entry["reference"] = value
        else:
            spec = schema.need_mapping(value, path, f"repo {name!r}", source, name)
            if "import" in spec:
                schema.check_keys(spec, ("import",), path, "an imported repo")
                entry["import"] = schema.need_string(spec["import"], path + ("import",), "'import'", spec, "import")
                if entry["import"].count("/") != 1 or not all(entry["import"].split("/")):
                    raise error_at(f"import {entry['import']!r} must be 'otherrepo/name'", path + ("import",), spec, "import")
                repos[name] = entry
                continue
            schema.check_keys(spec, ("reference", "branch", "auto"), path, "a repo pin")
            entry["reference"] = schema.need_string(spec.get("reference"), path + ("reference",), "'reference'", spec, "reference")
            entry["branch"] = schema.need_string(spec.get("branch", ""), path + ("branch",), "'branch'", spec, "branch")
            entry["auto"] = schema.need_bool(spec.get("auto", False), path + ("auto",), "'auto'", spec, "auto")
            source_for_error, key = spec, "reference"
        if isinstance(value, str):
            source_for_error, key = source, name
        repo, _, sha = entry["reference"].rpartition("/")
        if not repo or not _SHA.match(sha):
            raise error_at(f"repo pin {entry['reference']!r} must be 'reponame/<full 40-character commit sha>'",
                           path, source_for_error, key)
        repos[name] = entry
    return repos


def _expand_test_sets(written: dict, tests: dict, source) -> dict:
    if "all" in written:
        raise error_at("the test set 'all' is built in (every test) and cannot be redefined", ("test_sets", "all"),
                       source, "all")
    result = {"all": list(tests)}
    for name, globs in written.items():
        path = ("test_sets", name)
        patterns = schema.string_list(globs, path, f"test set {name!r}", source, name)
        members = []
        for pattern in patterns:
            matched = [t for t in tests if fnmatch.fnmatchcase(t, pattern)]
            if not matched:
                raise error_at(f"test set {name!r}: {pattern!r} matches no test", path, source, name)
            members.extend(t for t in matched if t not in members)
        result[name] = members
    return result


def _parse_triggers(written: list, test_sets: dict) -> list:
    triggers = []
    for i, value in enumerate(written):
        path = ("triggers", i)
        trigger = schema.need_mapping(value, path, "a trigger")
        schema.check_keys(trigger, schema.TRIGGER_KEYS, path, "a trigger")
        name = schema.need_string(trigger.get("name", f"trigger {i}"), path + ("name",), "'name'", trigger, "name")
        paths = schema.string_list(trigger.get("paths", []), path + ("paths",), "'paths'", trigger, "paths")
        sets = schema.string_list(trigger.get("test_sets", []), path + ("test_sets",), "'test_sets'", trigger, "test_sets")
        if not paths or not sets:
            raise error_at("a trigger needs 'paths' and 'test_sets'", path, trigger)
        for pattern in sets:
            if not any(fnmatch.fnmatchcase(s, pattern) for s in test_sets):
                raise error_at(f"trigger {name!r}: {pattern!r} matches no test set (sets: {', '.join(test_sets)})",
                               path + ("test_sets",), trigger, "test_sets")
        triggers.append({"name": name, "paths": paths, "test_sets": sets})
    return triggers


DEFINITIONS_FILE_NAMES = ("testDefinitions.yml", "testDefinitions.json", "testlooper.yml")
DEFINITIONS_FILE_SUFFIX = ".testlooper.yml"


def is_definitions_file(path: str) -> bool:
    base = posixpath.basename(path)
    return base in DEFINITIONS_FILE_NAMES or base.endswith(DEFINITIONS_FILE_SUFFIX)


def find_definitions_file(paths) -> str | None:
    """The first path, sorted over the whole tree, with a definitions file name; None if none."""
    candidates = sorted(p for p in paths if is_definitions_file(p))
    return candidates[0] if candidates else None


__all__ = ["DefinitionsError", "resolve_text", "find_definitions_file", "is_definitions_file"]
