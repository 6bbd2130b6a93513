"""`testlooper definitions`: the resolved test definitions of a working tree or of a commit.

Also home of the loading shared with `testlooper plan`: find the definitions file in a tree on
disk or in a commit, read it (and its includes) from there, and resolve it.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from testlooper.cli import UserError, output

if TYPE_CHECKING:  # gitpython is imported only by the commands that read git
    import git


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
    parser.add_argument("--json", action="store_true", help="print the resolved definitions as JSON")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.rev is None:
        definitions = definitions_on_disk(existing_directory(args.path))
        where = f"working tree {args.path}"
    else:
        from testlooper import gitio

        repo = gitio.open_repo(args.path)
        sha = gitio.resolve_rev(repo, args.rev)
        definitions = definitions_at_commit(repo, sha)
        where = f"commit {sha[:12]}"

    if args.json:
        print(json.dumps(definitions or empty_definitions(), indent=2, sort_keys=True))
    elif definitions is None:
        print(f"No definitions file in {where}, so it has no tests (looked for {looked_for()}).")
    else:
        print(render(definitions, where, output.Styler(output.colour_wanted())))
    return 0


def existing_directory(path: str) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise UserError(f"{path} does not exist")
    if not directory.is_dir():
        raise UserError(f"{path} is not a directory")
    return directory


def definitions_on_disk(root: Path) -> dict | None:
    """The resolved definitions of the files under `root` as they are now; None without a file."""
    from testlooper.definitions import find_definitions_file, resolve_text

    filename = find_definitions_file(_files_under(root))
    if filename is None:
        return None
    # Includes are read relative to the tree root; a missing one raises FileNotFoundError,
    # which the engine reports at the `includes` entry naming it.
    return resolve_text(_read_text(root, filename), filename, lambda path: _read_text(root, path))


def definitions_at_commit(repo: git.Repo, sha: str) -> dict | None:
    """The resolved definitions committed at `sha` (includes read at `sha` too); None without a file."""
    from testlooper import gitio
    from testlooper.definitions import find_definitions_file, resolve_text

    filename = find_definitions_file(gitio.list_files(repo, sha))
    if filename is None:
        return None

    def read_include(path: str) -> str:
        try:
            return gitio.read_file(repo, sha, path)
        except gitio.GitError as exc:
            # The engine turns an OSError into an error at the `includes` entry that names the file.
            raise OSError(str(exc)) from None

    return resolve_text(gitio.read_file(repo, sha, filename), filename, read_include)


def empty_definitions() -> dict:
    """The resolved-definitions contract of a tree without a definitions file: no tests."""
    from testlooper.definitions import LOOPER_VERSION

    return {
        "looper_version": LOOPER_VERSION,
        "definitions_file": "",
        "repos": {},
        "environments": {},
        "builds": {},
        "tests": {},
        "deployments": {},
        "test_sets": {"all": []},
        "triggers": [],
    }


def looked_for() -> str:
    from testlooper.definitions import DEFINITIONS_FILE_NAMES, DEFINITIONS_FILE_SUFFIX

    return ", ".join([*DEFINITIONS_FILE_NAMES, f"*{DEFINITIONS_FILE_SUFFIX}"])


def _files_under(root: Path) -> Iterator[str]:
    """Every file below `root` as a POSIX path relative to it, leaving out `.git`."""
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = [name for name in subdirectories if name != ".git"]
        relative = Path(directory).relative_to(root)
        for name in files:
            yield (relative / name).as_posix()


def _read_text(root: Path, relative: str) -> str:
    try:
        return (root / relative).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{relative} is not UTF-8 text") from None


def render(definitions: dict, where: str, styler: output.Styler) -> str:
    """The definitions as readable tables: tasks, environments, test sets, triggers."""
    tasks = [
        task
        for section in ("builds", "tests", "deployments")
        for _, task in sorted(definitions[section].items())
    ]
    blocks = [f"{output.heading('Definitions file', styler)} {definitions['definitions_file']} ({where})"]
    blocks.append(_section("Builds and tests", _task_table(tasks, styler) if tasks else "none", styler))
    environments = definitions["environments"]
    blocks.append(
        _section("Environments", _environment_table(environments, styler) if environments else "none", styler)
    )
    blocks.append(_section("Test sets", _test_set_table(definitions["test_sets"], styler), styler))
    triggers = definitions["triggers"]
    blocks.append(
        _section("Triggers", _trigger_table(triggers, styler) if triggers else "none: every commit runs all", styler)
    )
    return "\n\n".join(blocks)


def _section(title: str, body: str, styler: output.Styler) -> str:
    return f"{output.heading(title, styler)}\n{body}"


def _task_table(tasks: list[dict], styler: output.Styler) -> str:
    headers = ["NAME", "KIND", "ENVIRONMENT", "PLATFORM", "CORES/RAM", "TIMEOUT", "RUNS", "DEPENDENCIES"]
    rows = [
        [
            task["name"],
            output.kind_cell(task["kind"]),
            task["environment"],
            task["platform"],
            _resources(task),
            output.duration(task["timeout_seconds"]),
            str(task["runs"]),
            ", ".join(f"{key}={_reference(dependency)}" for key, dependency in sorted(task["dependencies"].items())),
        ]
        for task in tasks
    ]
    return output.table(headers, rows, styler)


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


def _environment_table(environments: dict, styler: output.Styler) -> str:
    rows = [
        [name, environment["platform"], _image(environment["image"]), ", ".join(environment["inheritance"])]
        for name, environment in sorted(environments.items())
    ]
    return output.table(["NAME", "PLATFORM", "IMAGE", "INHERITS"], rows, styler)


def _image(image: dict) -> str:
    """`dockerfile: ci/Dockerfile`; inline contents are summarised as `dockerfile_contents (3 lines)`."""
    parts = []
    for key, value in image.items():
        text = value.strip()
        parts.append(f"{key} ({len(text.splitlines())} lines)" if "\n" in text else f"{key}: {text}")
    return ", ".join(parts)


def _test_set_table(test_sets: dict, styler: output.Styler, shown: int = 4) -> str:
    rows = []
    for name, tests in sorted(test_sets.items()):
        listed = ", ".join(tests[:shown]) + (f" and {len(tests) - shown} more" if len(tests) > shown else "")
        rows.append([name, str(len(tests)), listed])
    return output.table(["NAME", "COUNT", "TESTS"], rows, styler)


def _trigger_table(triggers: list[dict], styler: output.Styler) -> str:
    rows = [[t["name"], ", ".join(t["paths"]), ", ".join(t["test_sets"])] for t in triggers]
    return output.table(["NAME", "PATHS", "TEST SETS"], rows, styler)
