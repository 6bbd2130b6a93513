"""Dependency references (`HEAD`, `HEAD/source/x`, `build`, `build/artifact`, `repo/...`),
build cycles, and the content hashes that follow the dependency graph."""

from __future__ import annotations

import hashlib
import json

from .variables import substitute_known
from .yamlload import error_at

# Fields of a resolved task that change what runs. Labels (project, configuration), the run
# count and retry policy are left out: they change how often or where results show, not what
# a run does.
_HASHED_FIELDS = (
    "name", "kind", "platform", "image", "setup_script", "variables", "stages", "timeout_seconds",
    "min_cores", "max_cores", "min_ram_gb", "min_disk_gb", "working_directory",
)


def source(repo: str, path: str) -> dict:
    return {"kind": "source", "repo": repo, "path": path}


def build(repo: str, name: str, artifact: str = "") -> dict:
    return {"kind": "build", "repo": repo, "build": name, "artifact": artifact}


def artifact_names(task: dict) -> list[str]:
    return [a["name"] for s in task["stages"] for a in s["artifacts"]]


def pick_build(builds: dict[str, dict], name: str) -> tuple[str, str] | str:
    """(build, artifact) that `name` means among `builds`, or an error message.

    A name that is a build wins over reading its last segment as an artifact; a whole build
    (artifact "") is its unnamed artifact, which only a build with `command` has.
    """
    if name in builds:
        build_name, artifact = name, ""
    elif "/" in name and name.rsplit("/", 1)[0] in builds:
        build_name, artifact = name.rsplit("/", 1)
    else:
        known = ", ".join(sorted(builds)) or "none defined"
        return f"build {name!r}, which is not defined (builds: {known})"
    artifacts = artifact_names(builds[build_name])
    if artifact in artifacts:
        return build_name, artifact
    named = ", ".join(a for a in artifacts if a) or "none"
    if not artifact:
        return (f"build {build_name!r} has no unnamed artifact (its whole output comes from a 'command'); "
                f"depend on one of its named artifacts: {named}")
    return f"build {build_name!r} has no artifact {artifact!r} (its named artifacts: {named})"


class ReferenceParser:
    """Reads dependency references. `pins` answers for the names under `repos` (see
    resolver.PinTable): `names`, `source(pin, path, where)` and `build(pin, name, where)`."""

    def __init__(self, builds: dict[str, dict], pins):
        self.builds = builds  # name -> resolved TASK (stages known)
        self.pins = pins

    def parse(self, reference, variables: dict, path: tuple, holder, key) -> dict:
        if isinstance(reference, dict):
            return reference  # resolved already, in another repository's environment
        first = reference.split("/", 1)[0]
        if "${" in first:
            raise error_at(f"dependency {reference!r}: the first segment may not use a variable "
                           "(it decides between this repo, another repo and a build)", path, holder, key)
        reference = substitute_known(reference, variables)
        segments = reference.split("/")
        if not reference or any(not s for s in segments):
            raise error_at(f"dependency {reference!r} has an empty path segment", path, holder, key)
        head, rest = segments[0], segments[1:]
        where = (path, holder, key)
        if head == "HEAD":
            if not rest:
                return source("HEAD", "")
            if rest[0] == "source":
                return source("HEAD", "/".join(rest[1:]))
            return self.local_build("/".join(rest), path, holder, key)
        if head in self.pins.names:
            if not rest or rest[0] == "source":
                return self.pins.source(head, "/".join(rest[1:]), where)
            return self.pins.build(head, "/".join(rest), where, self)
        if head in ("source", "data"):
            raise error_at(f"dependency {reference!r}: write 'HEAD/source/...' for this commit's source", path, holder, key)
        return self.local_build(reference, path, holder, key)

    def local_build(self, name: str, path: tuple, holder, key) -> dict:
        picked = pick_build(self.builds, name)
        if isinstance(picked, str):
            message = picked if not picked.startswith("build ") or "not defined" not in picked \
                else f"dependency on {picked}"
            raise error_at(message, path, holder, key)
        return build("HEAD", *picked)


def resolve_dependencies(tasks: dict[str, tuple[dict, dict]], parser: ReferenceParser, section: str) -> None:
    for name, (task, raw) in tasks.items():
        deps = {}
        source_task = raw["source"]
        for key, reference in raw["references"].items():
            where = (section, name, "dependencies", key)
            holder = source_task.get("dependencies") if key in raw["own"] else source_task
            deps[key] = parser.parse(reference, task["variables"], where, holder, key if key in raw["own"] else None)
        task["dependencies"] = deps


def check_build_cycles(builds: dict[str, dict], sources: dict[str, object]) -> list[str]:
    """Builds in dependency order (consumed first); a cycle is an error naming its members."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = on the path, 2 = done
    for start in builds:
        if state.get(start):
            continue
        stack = [(start, iter(local_build_deps(builds[start])))]
        path = [start]
        state[start] = 1
        while stack:
            name, children = stack[-1]
            child = next(children, None)
            if child is None:
                stack.pop()
                path.pop()
                state[name] = 2
                order.append(name)
                continue
            if state.get(child) == 1:
                cycle = path[path.index(child):] + [child]
                raise error_at(f"builds depend on each other in a cycle: {' -> '.join(cycle)}",
                               ("builds", name, "dependencies"), sources.get(name), None)
            if not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(local_build_deps(builds[child]))))
    return order


def local_build_deps(task: dict) -> list[str]:
    return [d["build"] for d in task["dependencies"].values() if d["kind"] == "build" and d["repo"] == "HEAD"]


def assign_hashes(tasks: list[dict], builds: dict[str, dict], build_order: list[str], repo_pins: dict[str, str],
                  external_hashes: dict | None = None) -> None:
    """Hash builds in dependency order, then everything else, each including its inputs' hashes.
    `external_hashes` maps (pin, build) to the hash of a build of another repository."""
    for name in build_order:
        builds[name]["hash"] = task_hash(builds[name], builds, repo_pins, external_hashes)
    for task in tasks:
        if task["kind"] != "build":
            task["hash"] = task_hash(task, builds, repo_pins, external_hashes)


def task_hash(task: dict, builds: dict[str, dict], repo_pins: dict[str, str], external_hashes: dict | None = None) -> str:
    content = {field: task[field] for field in _HASHED_FIELDS}
    inputs = {}
    for key, dep in task["dependencies"].items():
        entry = dict(dep)
        if dep["repo"] == "HEAD":
            if dep["kind"] == "build":
                entry["build_hash"] = builds[dep["build"]]["hash"]
        else:
            entry["pin"] = repo_pins.get(dep["repo"], "")
            if dep["kind"] == "build" and external_hashes:
                entry["build_hash"] = external_hashes.get((dep["repo"], dep["build"]), "")
        inputs[key] = entry
    content["inputs"] = inputs
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
