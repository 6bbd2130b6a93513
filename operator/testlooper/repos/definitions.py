"""Definitions in a tree on disk or in a commit: find the file, read it and its includes from
there, and resolve it. Shared by the local runner, the CLI and (later) the operator."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from testlooper.errors import UserError

if TYPE_CHECKING:  # gitpython is imported only by the callers that read git
    import git


def existing_directory(path: str) -> Path:
    directory = Path(path)
    if not directory.exists():
        raise UserError(f"{path} does not exist")
    if not directory.is_dir():
        raise UserError(f"{path} is not a directory")
    return directory


def definitions_on_disk(root: Path, repositories=None, warn=None) -> dict | None:
    """The resolved definitions of the files under `root` as they are now; None without a file.
    `repositories` (a lookup.GitRepositories, or the operator's own) reads pinned repositories;
    `warn` hears of definitions warnings."""
    from testlooper.definitions import find_definitions_file, resolve_text

    filename = find_definitions_file(_files_under(root))
    if filename is None:
        return None
    # Includes are read relative to the tree root; a missing one raises FileNotFoundError,
    # which the engine reports at the `includes` entry naming it.
    return resolve_text(_read_text(root, filename), filename, lambda path: _read_text(root, path),
                        repositories=repositories, warn=warn)


def definitions_at_commit(repo: git.Repo, sha: str, path: str | None = None, repositories=None,
                          warn=None) -> dict | None:
    """The resolved definitions committed at `sha` (includes read at `sha` too); None without a file.

    `path` names the file (a Repo's `definitionsPath`); without it the file is found by name.
    `repositories` reads pinned repositories; `warn` hears of definitions warnings.
    """
    from testlooper import gitio
    from testlooper.definitions import find_definitions_file, resolve_text

    filename = path.strip("/") if path else find_definitions_file(gitio.list_files(repo, sha))
    if filename is None:
        return None

    def read_include(path: str) -> str:
        try:
            return gitio.read_file(repo, sha, path)
        except gitio.GitError as exc:
            # The engine turns an OSError into an error at the `includes` entry that names the file.
            raise OSError(str(exc)) from None

    return resolve_text(gitio.read_file(repo, sha, filename), filename, read_include,
                        repositories=repositories, warn=warn)


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
        "external_builds": {},
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


def repositories_from_option(values: list[str]):
    """The lookup `--repo NAME=PATH` (repeatable) describes, for the CLI commands."""
    from testlooper.repos.lookup import GitRepositories, parse_repo_option

    return GitRepositories(parse_repo_option(values), missing_hint="map it with --repo {name}=PATH")


def print_warning(warning) -> None:
    """Definitions warnings on the command line: one line each on stderr."""
    import sys

    print(f"warning: {warning}", file=sys.stderr)


def add_repo_option(parser) -> None:
    parser.add_argument(
        "--repo", metavar="NAME=PATH", dest="repos", action="append", default=[],
        help="read the repository that pins call NAME (the part before the last '/' of NAME/<commit>) "
        "from the local git repository PATH (repeatable)",
    )


def pinned_changes(definitions: dict | None, base_definitions: dict | None, repositories) -> dict[str, list[str]]:
    """For triggers: each pin of `definitions` whose commit differs from the same pin in
    `base_definitions` (the first parent's), with the paths that changed in its repository
    between the two (under the pin's `path`, if it has one). A pin new since the base counts
    every file of its commit as changed. Pins that cannot be read are left out."""
    from testlooper.definitions import RepositoryLookupError

    if not definitions or repositories is None:
        return {}
    before = (base_definitions or {}).get("repos", {})
    changes: dict[str, list[str]] = {}
    for pin, entry in definitions["repos"].items():
        if "/" in pin or entry["repository"] == "HEAD":
            continue  # pins reached through another repository, and this commit's own, are not triggers
        try:
            new = repositories.resolve_commit(entry["repository"], entry["commit"])
            old_entry = before.get(pin)
            if old_entry is None or old_entry.get("repository") != entry["repository"]:
                paths = list(repositories.list_files(entry["repository"], new))
            else:
                old = repositories.resolve_commit(old_entry["repository"], old_entry["commit"])
                if old == new:
                    continue
                paths = repositories.changed_files(entry["repository"], old, new)
        except RepositoryLookupError:
            continue
        prefix = entry["path"] + "/" if entry["path"] else ""
        paths = sorted(path for path in paths if path.startswith(prefix))
        if paths:
            changes[pin] = paths
    return changes


def pinned_changes_at(repo: git.Repo, sha: str, definitions: dict | None, repositories,
                      base: str | None = None) -> dict[str, list[str]]:
    """`pinned_changes` of commit `sha` against `base` (default: its first parent); {} for a
    root commit or a file without pins of other repositories."""
    from testlooper.definitions import DefinitionsError

    if not definitions or not any(e["repository"] != "HEAD" for e in definitions["repos"].values()):
        return {}
    if base is None:
        parents = repo.commit(sha).parents
        if not parents:
            return {}
        base = parents[0].hexsha
    try:
        before = definitions_at_commit(repo, base, repositories=repositories, warn=lambda warning: None)
    except DefinitionsError:
        before = None  # the base's pins cannot be read: every pin counts as new
    return pinned_changes(definitions, before, repositories)
