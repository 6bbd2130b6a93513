"""Resolve a definitions file: load, expand macros, merge includes, check, and resolve."""

from __future__ import annotations

import fnmatch
import gc
import json
import posixpath
from dataclasses import dataclass
from typing import Callable

from . import schema
from .dependencies import ReferenceParser, assign_hashes, check_build_cycles, resolve_dependencies
from .environments import Environment, EnvironmentResolver, parse_environment
from .errors import DefinitionsError
from .macros import IncludeRequest, expand_macros, flatten
from .pins import Context, PinTable, include_place, parse_pin
from .tasks import TaskParser
from .yamlload import PDict, error_at, load_yaml_text

LOOPER_VERSION = 5  # the newest; files of every version in SUPPORTED_VERSIONS are read
SUPPORTED_VERSIONS = schema.SUPPORTED_VERSIONS
# Files one resolution may include, counting each (file, variables) pair once, as the original did.
MAX_INCLUDES = 128
# Builds, tests and deployments one file may define: far above real projects, far below what
# would take minutes and gigabytes to resolve (a few lines of nested foreach can ask for that).
MAX_TASKS = 50_000
_MERGED_SECTIONS = ("environments", "builds", "tests", "deployments", "test_sets")
_FLATTENED_SECTIONS = ("environments", "builds", "tests", "deployments")

ReadFile = Callable[[str], str]


def resolve_text(text: str, filename: str, read_file: ReadFile | None = None, repositories=None,
                 warn=None) -> dict:
    """Resolve one definitions file to the JSON contract (see docs/design.md).

    `filename` is the file's path relative to the tree root (it names the file in errors and
    anchors relative includes); `read_file(path)` reads another file of the same tree.
    `repositories` (see pins.Repositories) reads other repositories' commits, for pins that
    are used; `warn(DefinitionsWarning)` hears of what works but is probably a mistake.
    """
    # The cyclic garbage collector would walk the growing result again and again while it is
    # built (it holds no cycles worth collecting); pausing it makes large files ~20% faster.
    collecting = gc.isenabled()
    gc.disable()
    try:
        context = Context(repositories, warn)
        return resolve_document(text, filename, context, origin=None, read_file=read_file).json
    finally:
        if collecting:
            gc.enable()


@dataclass
class Resolution:
    """One commit's resolved definitions, with what another repository's file needs to build on
    them (its environments, its pins, its dependency parser)."""

    json: dict
    environments: EnvironmentResolver
    pins: PinTable
    parser: ReferenceParser
    origin: object


def resolve_document(text: str, filename: str, context: Context, origin, read_file: ReadFile | None = None) -> Resolution:
    loading = _Loading(context, origin, read_file)
    loading.load(text, filename, origin, {}, top=True)
    return _resolve_sections(loading, filename)


class _Loading:
    """A file and its includes, merged section by section; each name remembers the
    looper_version of the file that defined it."""

    def __init__(self, context: Context, origin, read_file: ReadFile | None):
        self.context = context
        self.origin = origin
        self.read_file = read_file
        self.pins = PinTable(context, origin, {})
        self.sections: dict[str, dict] = {key: {} for key in _MERGED_SECTIONS}
        self.sources: dict[str, object] = {}
        self.versions: dict[tuple[str, str], int] = {}
        self.triggers: list = []
        self.prioritize: list[str] | None = None
        self.version: int | None = None  # the root file's
        self.included: set = set()

    def load(self, text: str, filename: str, place, variables: dict, top: bool) -> None:
        loaded = load_yaml_text(text, filename, self.context.warn)
        document = expand_macros(loaded, variables)
        if not isinstance(document, dict):
            raise error_at("the file must hold a mapping of sections (looper_version, builds, tests, ...)", (),
                           document, filename=filename)
        version = self.check_version(document, filename, top)
        schema.check_keys(document, schema.TOP_LEVEL_KEYS[version], (), f"the top level of looper_version {version}")
        for name, value in _section(document, "repos").items():
            if name in self.pins.pins:
                raise error_at(f"repo {name!r} is defined both here and in an including file", ("repos", name),
                               document.get("repos"), name)
            self.pins.pins[name] = parse_pin(name, value, document.get("repos"))
        self.pins.names = set(self.pins.pins)
        for key in _MERGED_SECTIONS:
            target = self.sections[key]
            source = document.get(key)
            for name, value in _section(document, key).items():
                if name in target:
                    raise error_at(f"{key} entry {name!r} is defined both here and in an including file",
                                   (key, name), source, name)
                target[name] = value
                self.versions[(key, name)] = version
            if source is not None and self.sources.get(key) is None:
                self.sources[key] = source
        self.triggers.extend(schema.need_list(document.get("triggers", []), ("triggers",), "'triggers'", document,
                                              "triggers"))
        if top and "prioritize" in document:
            self.prioritize = schema.string_list(document["prioritize"], ("prioritize",), "'prioritize'", document,
                                                 "prioritize")
        includes = document.get("includes", [])
        schema.need_list(includes, ("includes",), "'includes'", document, "includes")
        for i, request in enumerate(includes):
            self.include(request, ("includes", i), document, place, filename)

    def include(self, request, key_path, document, place, filename) -> None:
        if not isinstance(request, IncludeRequest):
            raise error_at("an include must be a path or a mapping with 'path' (and 'variables')", key_path, document,
                           "includes")
        path = schema.need_string(request.path, key_path, "an include's path", document, "includes")
        target_place, target = include_place(path, place, filename, self.pins, key_path, document)
        key = (target_place, target, json.dumps(request.variables, sort_keys=True, default=str))
        if key in self.included:
            return  # included already with these variables: an include cycle ends here, as in the original
        self.included.add(key)
        if len(self.included) > MAX_INCLUDES:
            raise error_at(f"more than {MAX_INCLUDES} files are included (each file and variables counted once); "
                           "do includes keep producing new variables?", key_path, document, "includes")
        try:
            if target_place is None:
                if self.read_file is None:
                    raise error_at(f"cannot read included file {target!r} here", key_path, document, "includes")
                included_text = self.read_file(target)
            else:
                included_text = self.context.read(target_place, target, f"included file {path!r}")
        except (OSError, KeyError) as exc:
            raise error_at(f"included file {target!r} cannot be read: {exc}", key_path, document, "includes") from None
        except DefinitionsError as exc:
            if exc.line is not None:
                raise
            raise error_at(exc.message, key_path, document, "includes") from None
        self.load(included_text, target, target_place, request.variables, top=False)

    def check_version(self, document, filename, top: bool) -> int:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        if "looper_version" not in document:
            if top:
                raise error_at(f"'looper_version' is missing (supported: {supported})", ("looper_version",), document,
                               filename=filename)
            return self.version
        version = document["looper_version"]
        if isinstance(version, str) and version.isdigit():
            version = int(version)
        if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
            raise error_at(f"looper_version {version!r} is not supported (supported: {supported})",
                           ("looper_version",), document, "looper_version")
        if top:
            self.version = version
        elif version > self.version:
            raise error_at(f"an included file may not be newer than the file including it: it is looper_version "
                           f"{version}, the including file {self.version}", ("looper_version",), document,
                           "looper_version")
        return version


def _section(document, key) -> dict:
    value = document.get(key)
    if value is None:
        return {}
    if key in _FLATTENED_SECTIONS and isinstance(value, list):
        return _flatten_to_mapping(value, (key,), document, key)
    return dict(schema.need_mapping(value, (key,), f"'{key}'", document, key))


def _flatten_to_mapping(items, path, parent, key) -> PDict:
    """Under environments/builds/tests/deployments a list of mappings (nested lists too) is one mapping."""
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


def _resolve_sections(loading: _Loading, filename: str) -> Resolution:
    sections, sources, versions, pins = loading.sections, loading.sources, loading.versions, loading.pins
    environments = {}
    for name, value in sections["environments"].items():
        environments[name] = parse_environment(name, value, ("environments", name), versions[("environments", name)])
    resolution = Resolution(json={}, environments=None, pins=pins, parser=None, origin=loading.origin)
    env_resolver = EnvironmentResolver(environments, pins.names, _ForeignEnvironments(loading, environments))
    resolution.environments = env_resolver
    for name in list(environments):
        env_resolver.linearize(name)  # cycles and unknown bases fail here, even if unused
    env_json = env_resolver.to_json()

    task_count = sum(len(sections[section]) for section in ("builds", "tests", "deployments"))
    if task_count > MAX_TASKS:
        raise DefinitionsError(f"the file defines {task_count:,} builds, tests and deployments; at most "
                               f"{MAX_TASKS:,} are allowed", filename=filename)
    _check_names_unique(sections, sources)
    parser = TaskParser(env_resolver, pins.names)
    parsed = {}
    for section in ("builds", "tests", "deployments"):
        parsed[section] = {
            name: parser.parse(section, name, value, sources.get(section) or {}, versions[(section, name)])
            for name, value in sections[section].items()
        }
    builds = {name: task for name, (task, _) in parsed["builds"].items()}
    references = ReferenceParser(builds, pins)
    resolution.parser = references
    for section in ("builds", "tests", "deployments"):
        resolve_dependencies(parsed[section], references, section)
    build_sources = {name: raw["source"] for name, (_, raw) in parsed["builds"].items()}
    build_order = check_build_cycles(builds, build_sources)
    all_tasks = [task for section in parsed.values() for task, _ in section.values()]
    repos = pins.repos_json()
    pin_text = {name: f"{entry['repository']}/{entry['commit']}/{entry['path']}" for name, entry in repos.items()}
    assign_hashes(all_tasks, builds, build_order, pin_text, pins.external_hashes)

    tests = {name: task for name, (task, _) in parsed["tests"].items()}
    deployments = {name: task for name, (task, _) in parsed["deployments"].items()}
    if loading.prioritize is not None:
        _apply_prioritize(loading.prioritize, builds, tests, deployments)
    _enable_needed_builds(builds, tests, deployments)
    test_sets = _expand_test_sets(sections["test_sets"], tests, sources.get("test_sets"))
    triggers = _parse_triggers(loading.triggers, test_sets)
    resolution.json = {
        "looper_version": loading.version,
        "definitions_file": filename,
        "repos": pins.repos_json(),
        "environments": env_json,
        "builds": builds,
        "tests": tests,
        "deployments": deployments,
        "external_builds": pins.external_builds,
        "test_sets": test_sets,
        "triggers": triggers,
    }
    return resolution


class _ForeignEnvironments:
    """`base: pin/env`: the environment as its own repository resolves it, standing in as a base
    here (with its inputs rebased to say which repository they come from)."""

    def __init__(self, loading: _Loading, local: dict[str, Environment]):
        self.loading = loading
        self.local = local

    def __call__(self, name: str, key_path, source, key) -> Environment | None:
        pins = self.loading.pins
        pin_name, env_name = name.split("/", 1)
        try:
            foreign = pins.foreign(pin_name)
        except DefinitionsError as exc:
            raise error_at(exc.message, key_path, source, key) from None
        if foreign is None:  # a HEAD pin: this commit's own environment
            if env_name in self.local:
                return self.local[env_name]
            known = ", ".join(sorted(self.local)) or "none defined"
            raise error_at(f"environment {env_name!r} (through the HEAD pin {pin_name!r}) is not defined "
                           f"(environments: {known})", key_path, source, key)
        resolver = foreign.environments
        target = pins.target(pin_name)
        if env_name not in resolver.local_names:
            known = ", ".join(sorted(resolver.local_names)) or "none defined"
            raise error_at(f"{pins.describe(pin_name)} at {target.commit[:12]} defines no environment {env_name!r} "
                           f"(its environments: {known})", key_path, source, key)
        eff = resolver.effective(env_name)
        pins.adopt(pin_name, foreign)
        dependencies = {}
        for input_key, reference in eff.dependencies.items():
            dependency = foreign.parser.parse(reference, eff.resolved.values, ("environments", env_name, "dependencies",
                                                                               input_key), None, None)
            dependencies[input_key] = pins.rebase(pin_name, dependency)
        image = dict(eff.image)
        if "dockerfile" in image:  # a path in that repository: read it from there
            text = pins.context.read((target.repository, target.commit), image.pop("dockerfile"),
                                     pins.describe(pin_name))
            image["dockerfile_contents"] = text
        return Environment(
            name=name, bases=[], platform=eff.platform or None, image=image if eff.platform else None,
            variables=dict(eff.resolved.values), dependencies=dependencies, setup_script=eff.setup_script,
            test_defaults=dict(eff.test_defaults), test_stages=list(eff.test_stages), pre_command=eff.pre_command,
            pre_cleanup=eff.pre_cleanup, source=source, foreign=True,
        )


def _apply_prioritize(globs: list[str], *sections: dict) -> None:
    """Version 4: a task whose name matches no `prioritize` glob is disabled."""
    for tasks in sections:
        for name, task in tasks.items():
            if not any(fnmatch.fnmatchcase(name, glob) for glob in globs):
                task["disabled"] = True


def _enable_needed_builds(builds: dict, *consumers: dict) -> None:
    """A build an enabled task needs is enabled too, as the original did."""
    pending = [task for tasks in (builds,) + consumers for task in tasks.values() if not task["disabled"]]
    while pending:
        task = pending.pop()
        for dependency in task["dependencies"].values():
            if dependency["kind"] == "build" and dependency["repo"] == "HEAD":
                needed = builds[dependency["build"]]
                if needed["disabled"]:
                    needed["disabled"] = False
                    pending.append(needed)


def _check_names_unique(sections: dict, sources: dict) -> None:
    """Runs, results and history are keyed by task name, so a name means one task."""
    seen: dict[str, str] = {}
    for section in ("builds", "tests", "deployments"):
        for name in sections[section]:
            if name in seen:
                raise error_at(f"{name!r} names both a {seen[name]} and a {section[:-1]}; task names must be unique",
                               (section, name), sources.get(section), name)
            seen[name] = section[:-1]


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
