"""`testlooper definitions`: the resolved test definitions of a working tree or of a commit."""

from __future__ import annotations

import argparse
import json

from testlooper import terminal
from testlooper.repos.definitions import (
    add_repo_option, definitions_at_commit, definitions_on_disk, empty_definitions, existing_directory, looked_for,
    print_warning, repositories_from_option,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "definitions",
        help="show the resolved builds, tests and environments",
        description="Find the test definitions file of a working tree (or of a commit, with --rev), "
        "resolve it, and show the builds, tests and environments it defines.",
    )
    parser.add_argument(
        "path", metavar="PATH", nargs="?", default=".", help="a working tree or git repository (default: .)"
    )
    parser.add_argument(
        "--rev", metavar="REV", help="read the definitions committed at REV instead of the files on disk"
    )
    add_repo_option(parser)
    parser.add_argument("--json", action="store_true", help="print the resolved definitions as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    repositories = repositories_from_option(args.repos)
    if args.rev is None:
        definitions = definitions_on_disk(existing_directory(args.path), repositories, print_warning)
        where = f"working tree {args.path}"
    else:
        from testlooper import gitio

        repo = gitio.open_repo(args.path)
        sha = gitio.resolve_rev(repo, args.rev)
        definitions = definitions_at_commit(repo, sha, repositories=repositories, warn=print_warning)
        where = f"commit {sha[:12]}"

    if args.json:
        print(json.dumps(definitions or empty_definitions(), indent=2, sort_keys=True))
    elif definitions is None:
        print(f"No definitions file in {where}, so it has no tests (looked for {looked_for()}).")
    else:
        print(render(definitions, where, terminal.Styler(terminal.colour_wanted())))
    return 0


def render(definitions: dict, where: str, styler: terminal.Styler) -> str:
    """The definitions as readable tables: tasks, environments, test sets, triggers."""
    tasks = [
        task
        for section in ("builds", "tests", "deployments")
        for _, task in sorted(definitions[section].items())
    ]
    blocks = [f"{terminal.heading('Definitions file', styler)} {definitions['definitions_file']} ({where})"]
    blocks.append(_section("Builds and tests", _task_table(tasks, styler) if tasks else "none", styler))
    environments = definitions["environments"]
    blocks.append(
        _section("Environments", _environment_table(environments, styler) if environments else "none", styler)
    )
    repos = definitions.get("repos") or {}
    if repos:
        blocks.append(_section("Other repositories", _repo_table(repos, styler), styler))
    blocks.append(_section("Test sets", _test_set_table(definitions["test_sets"], styler), styler))
    triggers = definitions["triggers"]
    blocks.append(
        _section("Triggers", _trigger_table(triggers, styler) if triggers else "none: every commit runs all", styler)
    )
    return "\n\n".join(blocks)


def _section(title: str, body: str, styler: terminal.Styler) -> str:
    return f"{terminal.heading(title, styler)}\n{body}"


def _task_table(tasks: list[dict], styler: terminal.Styler) -> str:
    headers = ["NAME", "KIND", "ENVIRONMENT", "PLATFORM", "CORES/RAM", "TIMEOUT", "RUNS", "DEPENDENCIES"]
    rows = [
        [
            task["name"] + (" (disabled)" if task.get("disabled") else ""),
            terminal.kind_cell(task["kind"]),
            task["environment"],
            task["platform"],
            _resources(task),
            terminal.duration(task["timeout_seconds"]),
            str(task["runs"]),
            ", ".join(f"{key}={_reference(dependency)}" for key, dependency in sorted(task["dependencies"].items())),
        ]
        for task in tasks
    ]
    return terminal.table(headers, rows, styler)


def _resources(task: dict) -> str:
    """Cores and RAM a task asks for, where 0 means "don't care": `4-8 / 16 GB`, `2+ / any`, `any`."""
    low, high = task["min_cores"], task["max_cores"]
    if not low and not high:
        cores = "any"
    elif not high:
        cores = f"{low}+"
    elif low == high:
        cores = f"{low}"
    elif not low:
        cores = f"<={high}"
    else:
        cores = f"{low}-{high}"
    ram = f"{task['min_ram_gb']:g} GB" if task["min_ram_gb"] else "any"
    return "any" if cores == ram == "any" else f"{cores} / {ram}"


def _reference(dependency: dict) -> str:
    """A dependency written back as its reference: `HEAD`, `HEAD/source/sub`, `build/linux`, `lib/build`."""
    repo = dependency["repo"]
    if dependency["kind"] == "source":
        return f"{repo}/source/{dependency['path']}" if dependency["path"] else repo
    parts = [] if repo == "HEAD" else [repo]
    parts.append(dependency["build"])
    if dependency["artifact"]:
        parts.append(dependency["artifact"])
    return "/".join(parts)


def _environment_table(environments: dict, styler: terminal.Styler) -> str:
    rows = [
        [name, environment["platform"], _image(environment["image"]), ", ".join(environment["inheritance"])]
        for name, environment in sorted(environments.items())
    ]
    return terminal.table(["NAME", "PLATFORM", "IMAGE", "INHERITS"], rows, styler)


def _image(image: dict) -> str:
    """`dockerfile: ci/Dockerfile`; inline contents are summarised as `dockerfile_contents (3 lines)`."""
    parts = []
    for key, value in image.items():
        text = value.strip()
        parts.append(f"{key} ({len(text.splitlines())} lines)" if "\n" in text else f"{key}: {text}")
    return ", ".join(parts)


def _repo_table(repos: dict, styler: terminal.Styler) -> str:
    """Each pin (and pin path reached through another repository) and the commit it means."""
    rows = [[name, entry["repository"], entry["commit"][:12], entry["path"], entry["import"] and f"import {entry['import']}"]
            for name, entry in sorted(repos.items())]
    return terminal.table(["PIN", "REPOSITORY", "COMMIT", "PATH", "HOW"], rows, styler)


def _test_set_table(test_sets: dict, styler: terminal.Styler, shown: int = 4) -> str:
    rows = []
    for name, tests in sorted(test_sets.items()):
        listed = ", ".join(tests[:shown]) + (f" and {len(tests) - shown} more" if len(tests) > shown else "")
        rows.append([name, str(len(tests)), listed])
    return terminal.table(["NAME", "COUNT", "TESTS"], rows, styler)


def _trigger_table(triggers: list[dict], styler: terminal.Styler) -> str:
    rows = [[t["name"], ", ".join(t["paths"]), ", ".join(t["test_sets"])] for t in triggers]
    return terminal.table(["NAME", "PATHS", "TEST SETS"], rows, styler)
