"""Other repositories by name: "repository name -> files at a commit".

A definitions file pins other repositories as `name/<commit>`; the definitions engine asks a
`Repositories` object (testlooper.definitions.pins) for what it needs, and this module answers
from git. Locally, `--repo NAME=PATH` builds the mapping; the operator hands in its own mirrors
keyed by name. Every failure is a `RepositoryLookupError` whose one-line message names the
repository and what is missing; the engine adds the pin that asked.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Mapping

from testlooper.definitions.pins import RepositoryLookupError

if TYPE_CHECKING:
    import git

__all__ = ["GitRepositories", "RepositoryLookupError", "parse_repo_option"]


class GitRepositories:
    """The `Repositories` interface over git: `mapping` gives each repository name a git.Repo or
    the path of one (opened when first used). It may also be a function from a name to either,
    or None (the operator looks Repo resources up as pins ask for them). `missing_hint` ends the
    message for a name that is not mapped (the CLI says which option maps it)."""

    def __init__(self, mapping: "Mapping[str, git.Repo | str | os.PathLike] | Callable | None" = None,
                 missing_hint: str = ""):
        self._find = mapping if callable(mapping) else dict(mapping or {}).get
        self._names = None if callable(mapping) else sorted(mapping or {})
        self._opened: dict[str, git.Repo] = {}
        self.missing_hint = missing_hint

    def repo(self, name: str) -> "git.Repo":
        if name in self._opened:
            return self._opened[name]
        value = self._find(name)
        if value is None:
            known = "" if self._names is None else f" (mapped: {', '.join(self._names) or 'none'})"
            hint = self.missing_hint.format(name=name)
            raise RepositoryLookupError(f"no repository named {name!r} is available{known}"
                                        + (f"; {hint}" if hint else ""))
        if isinstance(value, (str, os.PathLike)):
            from testlooper import gitio

            try:
                value = gitio.open_repo(value)
            except gitio.GitError as exc:
                raise RepositoryLookupError(f"repository {name!r}: {exc}") from None
        self._opened[name] = value
        return value

    def resolve_commit(self, name: str, ref: str) -> str:
        from testlooper import gitio

        repo = self.repo(name)
        try:
            return gitio.resolve_rev(repo, ref)
        except gitio.GitError:
            raise RepositoryLookupError(f"repository {name!r} has no commit {ref!r}") from None

    def list_files(self, name: str, sha: str) -> list[str]:
        from testlooper import gitio

        return gitio.list_files(self.repo(name), sha)

    def read_file(self, name: str, sha: str, path: str) -> str:
        from testlooper import gitio

        try:
            return gitio.read_file(self.repo(name), sha, path)
        except gitio.GitError as exc:
            raise RepositoryLookupError(f"repository {name!r}: {exc}") from None

    def changed_files(self, name: str, old: str, new: str) -> list[str]:
        """Paths that differ between two commits of the repository (for triggers on moved pins)."""
        from testlooper import gitio

        try:
            return gitio.changed_files(self.repo(name), new, old) or []
        except Exception as exc:  # gitpython's errors for commits it cannot compare
            raise RepositoryLookupError(f"repository {name!r}: cannot compare {old[:12]} and {new[:12]}: {exc}") from None

    def export_tree(self, name: str, sha: str, destination: str) -> None:
        """The commit's files into `destination` (for runs that take another repository's source)."""
        from testlooper import gitio

        gitio.export_tree(self.repo(name), sha, destination)

    def commit_message(self, name: str, sha: str) -> str:
        from testlooper import gitio

        return gitio.commit_message(self.repo(name), sha)


def parse_repo_option(values: list[str]) -> dict[str, str]:
    """`--repo NAME=PATH` values as a mapping; NAME is the repository name pins use (the part
    before the last `/` of `NAME/<commit>`), so it may itself hold `/`."""
    from testlooper.errors import UserError

    mapping: dict[str, str] = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise UserError(f"--repo {value!r} must be NAME=PATH (the repository name pins use, and a local git "
                            "repository)")
        if name in mapping and mapping[name] != path:
            raise UserError(f"--repo maps {name!r} twice ({mapping[name]} and {path})")
        mapping[name] = path
    return mapping
