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
    "min_cores", "max_cores", "min_ram_gb", "min_disk_gb",
)


def source(repo: str, path: str) -> dict:
    return {"kind": "source", "repo": repo, "path": path}


def build(repo: str, name: str, artifact: str = "") -> dict:
    return {"kind": "build", "repo": repo, "build": name, "artifact": artifact}


class ReferenceParser:
    def __init__(self, builds: dict[str, dict], repos: set[str]):
        self.builds = builds  # name -> resolved TASK (stages known)
        self.repos = repos

    def parse(self, reference: str, variables: dict, path: tuple, holder, key) -> dict:
        first = reference.split("/", 1)[0]
        if "${" in first:
            raise error_at(f"dependency {reference!r}: the first segment may not use a variable "
                           "(it decides between this repo, another repo and a build)", path, holder, key)
        reference = substitute_known(reference, variables)
        segments = reference.split("/")
        if not reference or any(not s for s in segments):
            raise error_at(f"dependency {reference!r} has an empty path segment", path, holder, key)
        head, rest = segments[0], segments[1:]
        if head == "HEAD":
            if not rest:
                return source("HEAD", "")
            if rest[0] == "source":
                return source("HEAD", "/".join(rest[1:]))
            return self.local_build("/".join(rest), path, holder, key)
        if head in self.repos:
            if not rest:
                return source(head, "")
            if rest[0] == "source":
                return source(head, "/".join(rest[1:]))
            return build(head, "/".join(rest))
        if head in ("source", "data"):
            raise error_at(f"dependency {reference!r}: write 'HEAD/source/...' for this commit's source", path, holder, key)
        return self.local_build(reference, path, holder, key)

    def local_build(self, name: str, path: tuple, holder, key) -> dict:
        if name in self.builds:
            return build("HEAD", name)
        if "/" in name:
            build_name, artifact = name.rsplit("/", 1)
            if build_name in self.builds:
                artifacts = [a["name"] for s in self.builds[build_name]["stages"] for a in s["artifacts"] if a["name"]]
                if artifact in artifacts:
                    return build("HEAD", build_name, artifact)
                have = ", ".join(artifacts) or "none"
                raise error_at(f"build {build_name!r} has no artifact {artifact!r} (its named artifacts: {have})",
                               path, holder, key)
        known = ", ".join(sorted(self.builds)) or "none defined"
        raise error_at(f"dependency on build {name!r}, which is not defined (builds: {known})", path, holder, key)


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


def assign_hashes(tasks: list[dict], builds: dict[str, dict], build_order: list[str], repo_pins: dict[str, str]) -> None:
    """Hash builds in dependency order, then everything else, each including its inputs' hashes."""
    for name in build_order:
        builds[name]["hash"] = task_hash(builds[name], builds, repo_pins)
    for task in tasks:
        if task["kind"] != "build":
            task["hash"] = task_hash(task, builds, repo_pins)


def task_hash(task: dict, builds: dict[str, dict], repo_pins: dict[str, str]) -> str:
    content = {field: task[field] for field in _HASHED_FIELDS}
    inputs = {}
    for key, dep in task["dependencies"].items():
        entry = dict(dep)
        if dep["repo"] == "HEAD":
            if dep["kind"] == "build":
                entry["build_hash"] = builds[dep["build"]]["hash"]
        else:
            entry["pin"] = repo_pins.get(dep["repo"], "")
        inputs[key] = entry
    content["inputs"] = inputs
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
