"""Pins of other repositories (`repos`), and what refers to them: their environments, builds,
sources and files, read through a `Repositories` object the caller hands in.

The engine does no I/O of its own: `Repositories` (implemented in testlooper.repos, by git
locally and by the operator's mirrors in the cluster) answers three questions, each raising
`RepositoryLookupError` when it cannot:

- `resolve_commit(repository, ref) -> sha`
- `list_files(repository, sha) -> iterable of paths`
- `read_file(repository, sha, path) -> str`
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Protocol

from . import schema
from .errors import DefinitionsError
from .tasks import RESERVED_NAMES
from .yamlload import error_at

_FULL_SHA = re.compile(r"^[0-9a-fA-F]{40}$")


class RepositoryLookupError(Exception):
    """A repository, commit or file that the lookup cannot provide; the message names it and
    says what to do (the engine adds the pin that asked)."""


class Repositories(Protocol):
    def resolve_commit(self, repository: str, ref: str) -> str: ...
    def list_files(self, repository: str, sha: str): ...
    def read_file(self, repository: str, sha: str, path: str) -> str: ...


@dataclass
class Pin:
    """One entry of `repos` as written: `repository/ref`, `HEAD` (this commit), or an import."""

    name: str
    repository: str = ""  # "" for a HEAD pin and an import
    ref: str = ""
    path: str = ""
    branch: str = ""
    auto: bool = False
    prioritize: bool = False
    imported: str = ""  # `import: a/b/c`
    written: str = ""  # the reference as written
    source: object = field(default=None, repr=False)
    key: str | None = None  # for error positions

    @property
    def is_head(self) -> bool:
        return self.written == "HEAD"


@dataclass
class Target:
    """Where a pin finally points: `repository` at `commit` (both "" for this commit), `path` in it."""

    repository: str
    commit: str
    path: str = ""
    written: str = ""
    commit_resolved: bool = True  # False: a full sha taken as written, not yet looked up

    @property
    def is_self(self) -> bool:
        return not self.repository


def parse_pin(name: str, value, source) -> Pin:
    path = ("repos", name)
    if name in RESERVED_NAMES or "/" in name or not name:
        raise error_at(f"repo name {name!r} is reserved or not a plain name (reserved: {', '.join(RESERVED_NAMES)})",
                       path, source, name)
    if isinstance(value, str):
        pin = Pin(name, written=value, source=source, key=name)
    else:
        spec = schema.need_mapping(value, path, f"repo {name!r}", source, name)
        if "import" in spec:
            schema.check_keys(spec, schema.REPO_IMPORT_KEYS, path, "an imported repo")
            imported = schema.need_string(spec["import"], path + ("import",), "'import'", spec, "import")
            if "/" not in imported or not all(imported.split("/")):
                raise error_at(f"import {imported!r} must be 'pin/name' (or 'pin/name/name...' over more hops)",
                               path + ("import",), spec, "import")
            return Pin(name, imported=imported, path=_clean_path(spec.get("path", ""), path + ("path",), spec),
                       source=spec, key="import")
        schema.check_keys(spec, schema.REPO_PIN_KEYS, path, "a repo pin")
        pin = Pin(
            name, written=schema.need_string(spec.get("reference"), path + ("reference",), "'reference'", spec, "reference"),
            branch=schema.need_string(spec.get("branch", ""), path + ("branch",), "'branch'", spec, "branch"),
            auto=schema.need_bool(spec.get("auto", False), path + ("auto",), "'auto'", spec, "auto"),
            prioritize=schema.need_bool(spec.get("prioritize", False), path + ("prioritize",), "'prioritize'",
                                        spec, "prioritize"),
            path=_clean_path(spec.get("path", ""), path + ("path",), spec), source=spec, key="reference",
        )
    if pin.is_head:
        return pin
    repository, _, ref = pin.written.rpartition("/")
    if not repository or not ref:
        raise error_at(f"repo pin {pin.written!r} must be 'repository/<commit>' (the repository name is "
                       "everything before the last '/') or HEAD", path, pin.source, pin.key)
    pin.repository, pin.ref = repository, ref
    return pin


def _clean_path(value, key_path, spec) -> str:
    text = schema.need_string(value, key_path, "'path'", spec, "path").strip("/")
    if any(part in ("", ".", "..") for part in text.split("/")) and text:
        raise error_at(f"path {text!r} must be a plain relative path", key_path, spec, "path")
    return text


def join_path(first: str, second: str) -> str:
    return "/".join(p for p in (first, second) if p)


def _python_warning(warning) -> None:
    import warnings

    warnings.warn(warning, stacklevel=2)


class Context:
    """One resolution and every other repository's definitions it pulls in, each once."""

    def __init__(self, repositories: Repositories | None, warn):
        self.repositories = repositories
        self.warn = warn if warn is not None else _python_warning
        self.definitions: dict[tuple[str, str], object] = {}
        self.in_progress: list[tuple[str, str]] = []
        self.commits: dict[tuple[str, str], str] = {}

    def lookup(self, pin_description: str, what, *args):
        """Calls the repository lookup; its failure becomes an error naming the pin."""
        if self.repositories is None:
            raise DefinitionsError(f"{pin_description}: other repositories cannot be read here "
                                   "(no repository lookup was given)")
        try:
            return getattr(self.repositories, what)(*args)
        except RepositoryLookupError as exc:
            raise DefinitionsError(f"{pin_description}: {exc}") from None

    def commit(self, repository: str, ref: str, pin_description: str, needed: bool) -> str:
        """The full sha `ref` means in `repository`. A full sha that nothing reads from is taken as
        written (a source input needs no lookup to be named)."""
        key = (repository, ref)
        if key in self.commits:
            return self.commits[key]
        if not needed and _FULL_SHA.match(ref):
            return ref.lower()
        sha = self.lookup(pin_description, "resolve_commit", repository, ref)
        self.commits[key] = sha
        return sha

    def resolve_at(self, repository: str, sha: str, pin_description: str):
        """The resolved definitions of `repository` at `sha` (a Resolution), or None without a file."""
        from .resolver import find_definitions_file, resolve_document  # resolver imports this module

        key = (repository, sha)
        if key in self.definitions:
            return self.definitions[key]
        if key in self.in_progress:
            chain = " -> ".join(f"{r}/{s[:12]}" for r, s in self.in_progress[self.in_progress.index(key):] + [key])
            raise DefinitionsError(f"{pin_description}: repositories pin each other in a cycle: {chain}")
        files = self.lookup(pin_description, "list_files", repository, sha)
        filename = find_definitions_file(files)
        if filename is None:
            self.definitions[key] = None
            return None
        text = self.lookup(pin_description, "read_file", repository, sha, filename)
        self.in_progress.append(key)
        try:
            resolution = resolve_document(text, filename, self, origin=(repository, sha))
        except DefinitionsError as exc:  # where in that repository, and through which pin
            raise DefinitionsError(f"{pin_description}: the definitions of {repository} at {sha[:12]} do not "
                                   f"resolve: {exc}") from None
        finally:
            self.in_progress.pop()
        self.definitions[key] = resolution
        return resolution

    def read(self, origin, path: str, pin_description: str) -> str:
        repository, sha = origin
        return self.lookup(pin_description, "read_file", repository, sha, path)


class PinTable:
    """The pins one file (with its includes) declares, resolved on first use."""

    def __init__(self, context: Context, origin, pins: dict[str, Pin]):
        self.context = context
        self.origin = origin  # None for the tree being resolved, else (repository, sha)
        self.pins = pins
        self.names = set(pins)
        self.targets: dict[str, Target] = {}
        self.external_hashes: dict[tuple[str, str], str] = {}
        self.external_builds: dict[str, dict] = {}
        self.extra_repos: dict[str, dict] = {}  # pins reached through other repositories

    def describe(self, name: str) -> str:
        pin = self.pins[name]
        written = f"import {pin.imported}" if pin.imported else pin.written
        return f"repo pin {name!r} ({written})"

    def error(self, name: str, message: str) -> DefinitionsError:
        pin = self.pins[name]
        return error_at(f"{self.describe(name)}: {message}", ("repos", name), pin.source, pin.key)

    def target(self, name: str, needed: bool = True, chain: tuple = ()) -> Target:
        """Where the pin points, following imports over as many hops as written."""
        if name in self.targets and (not needed or self.targets[name].commit_resolved):
            return self.targets[name]
        pin = self.pins[name]
        if name in chain:
            raise self.error(name, f"imports form a cycle: {' -> '.join(chain + (name,))}")
        if pin.is_head:
            target = Target("", "", pin.path, "HEAD")
            target.commit_resolved = True
        elif not pin.imported:
            try:
                sha = self.context.commit(pin.repository, pin.ref, self.describe(name), needed)
            except DefinitionsError as exc:
                raise error_at(exc.message, ("repos", name), pin.source, pin.key) from None
            target = Target(pin.repository, sha, pin.path, pin.written)
            target.commit_resolved = needed or not _FULL_SHA.match(pin.ref)  # see Context.commit
        else:
            first, *hops = pin.imported.split("/")
            if first not in self.pins:
                raise self.error(name, f"{first!r} is not a pin of this file (pins: {', '.join(sorted(self.pins))})")
            current = self.target(first, True, chain + (name,))
            for hop in hops:
                if current.is_self:  # through a HEAD pin: this commit's own pins
                    if hop not in self.pins:
                        raise self.error(name, f"this commit has no pin {hop!r}")
                    current = self.target(hop, True, chain + (name,))
                    continue
                try:
                    foreign = self.definitions_of(name, current)
                except DefinitionsError as exc:
                    if exc.line is not None:
                        raise
                    raise error_at(exc.message, ("repos", name), pin.source, pin.key) from None
                if foreign is None or hop not in foreign.pins.pins:
                    known = ", ".join(sorted(foreign.pins.pins)) if foreign else "none: it has no definitions file"
                    raise self.error(name, f"{current.repository} at {current.commit[:12]} has no pin {hop!r} "
                                           f"(its pins: {known})")
                try:
                    inner = foreign.pins.target(hop)
                except DefinitionsError as exc:
                    raise self.error(name, exc.message) from None
                if inner.is_self:  # that repository's own HEAD pin
                    inner = Target(current.repository, current.commit, inner.path, inner.written)
                current = inner
            target = Target(current.repository, current.commit, join_path(current.path, pin.path), current.written)
            target.commit_resolved = True
        self.targets[name] = target
        return target

    def definitions_of(self, name: str, target: Target):
        return self.context.resolve_at(target.repository, target.commit, self.describe(name))

    def foreign(self, name: str):
        """The resolved definitions a pin points at, or None for this commit (a HEAD pin)."""
        target = self.target(name)
        if target.is_self:
            return None
        resolution = self.definitions_of(name, target)
        if resolution is None:
            raise self.error(name, f"{target.repository} at {target.commit[:12]} has no definitions file")
        return resolution

    # -- what refers to pins -----------------------------------------------------------------

    def self_key(self, name: str) -> str:
        """The pin path meaning the whole pinned commit (a pin with `path` selects less)."""
        if not self.target(name).path:
            return name
        key = f"{name}/HEAD"
        target = self.target(name)
        self.extra_repos[key] = repo_entry(Target(target.repository, target.commit, "", target.written), "")
        return key

    def source(self, name: str, path: str, where) -> dict:
        target = self.target(name, needed=False)
        return {"kind": "source", "repo": "HEAD" if target.is_self else name, "path": join_path(target.path, path)}

    def build(self, name: str, build_name: str, where, local_parser) -> dict:
        from .dependencies import pick_build

        key_path, holder, key = where
        target = self.target(name)
        if target.is_self:
            return local_parser.local_build(build_name, key_path, holder, key)
        if target.path:
            raise error_at(f"dependency on build {build_name!r} through repo pin {name!r}, which is a folder "
                           f"({target.path}) of its repository: pin the whole repository to use its builds",
                           key_path, holder, key)
        try:
            foreign = self.foreign(name)
        except DefinitionsError as exc:
            if exc.line is not None:
                raise
            raise error_at(exc.message, key_path, holder, key) from None
        picked = pick_build(foreign.json["builds"], build_name)
        if isinstance(picked, str):
            raise error_at(f"{self.describe(name)} at {target.commit[:12]}: {picked}", key_path, holder, key)
        build, artifact = picked
        self.adopt(name, foreign)
        self.external_hashes[(name, build)] = foreign.json["builds"][build]["hash"]
        self.add_external_build(name, foreign, build)
        return {"kind": "build", "repo": name, "build": build, "artifact": artifact}

    def adopt(self, name: str, foreign) -> None:
        """Pins of a pinned repository become pin paths here (`pin/theirs`), so that inputs it
        hands over (environment dependencies, builds' inputs) still say where they come from."""
        for key, entry in foreign.json["repos"].items():
            self.extra_repos.setdefault(f"{name}/{key}", dict(entry))

    def rebase(self, name: str, dependency: dict) -> dict:
        """A dependency as written in the repository `name` points at, as seen from here."""
        rebased = dict(dependency)
        rebased["repo"] = self.self_key(name) if dependency["repo"] == "HEAD" else f"{name}/{dependency['repo']}"
        return rebased

    def add_external_build(self, name: str, foreign, build: str) -> None:
        """The build, and every build it needs there, under `pin/build`, with inputs rebased."""
        key = f"{name}/{build}"
        if key in self.external_builds:
            return
        written = foreign.json["builds"][build]
        self.external_builds[key] = self.rebased_task(name, dict(written))
        for dependency in written["dependencies"].values():
            if dependency["kind"] != "build":
                continue
            if dependency["repo"] == "HEAD":
                self.add_external_build(name, foreign, dependency["build"])
        for inner_key, inner in foreign.json["external_builds"].items():
            self.external_builds.setdefault(f"{name}/{inner_key}", self.rebased_task(name, dict(inner)))

    def rebased_task(self, name: str, task: dict) -> dict:
        task["repo"] = self.self_key(name) if task.get("repo", "HEAD") == "HEAD" else f"{name}/{task['repo']}"
        task["dependencies"] = {k: self.rebase(name, d) for k, d in task["dependencies"].items()}
        return task

    def repos_json(self) -> dict:
        result = {}
        for name, pin in self.pins.items():
            try:
                target = self.targets.get(name) or self.target(name, needed=False)
            except DefinitionsError:
                target = Target(pin.repository, pin.ref, pin.path, pin.written)
            entry = repo_entry(target, pin.imported)
            entry.update(branch=pin.branch, auto=pin.auto, prioritize=pin.prioritize)
            result[name] = entry
        for key, entry in self.extra_repos.items():
            result.setdefault(key, entry)
        return result


def repo_entry(target: Target, imported: str) -> dict:
    reference = "HEAD" if target.is_self else f"{target.repository}/{target.commit}"
    return {"reference": reference, "repository": target.repository or "HEAD", "commit": target.commit,
            "path": target.path, "branch": "", "auto": False, "prioritize": False, "import": imported}


def include_place(path: str, including_origin, including_file: str, pins: PinTable, key_path, source):
    """(origin, path) of an include: `./x` and `../x` relative to the including file, `/x` from
    its repository's root, `pin/x` in a pinned repository."""
    if path.startswith("/"):
        return including_origin, path.lstrip("/")
    if path.startswith("./") or path.startswith("../"):
        target = posixpath.normpath(posixpath.join(posixpath.dirname(including_file), path))
        if target.startswith("../") or target == "..":
            raise error_at(f"included file {path!r} is outside the repository", key_path, source, "includes")
        return including_origin, target
    first, _, rest = path.partition("/")
    if first in pins.names and rest:
        target = pins.target(first)
        inner = join_path(target.path, rest)
        if target.is_self:
            return pins.origin, inner
        return (target.repository, target.commit), inner
    raise error_at(f"included file {path!r} must start with './' or '../' (relative to this file), '/' (from the "
                   "repository's root) or a pin named under 'repos'", key_path, source, "includes")
