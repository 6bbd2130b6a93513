"""What a local run runs: a commit of a git repository, or a working tree as it is on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Target:
    repo_id: str  # how the history store names the repository
    definitions: dict | None
    source_dir: str  # a snapshot the agents copy from
    commit: str  # a sha, or "" for a working tree outside git
    commit_message: str
    branch: str
    record: bool  # False for a dirty working tree: its results belong to no commit
    note: str  # said to the user before running
    repo: object = None  # the git.Repo, when there is one
    pinned: "PinnedSources | None" = None  # other repositories' commits the definitions pin

    def remove_snapshot(self) -> None:
        """The snapshot belongs to this one command: remove it when its runs are done."""
        shutil.rmtree(self.source_dir, ignore_errors=True)
        if self.pinned is not None:
            self.pinned.remove_snapshots()


class PinnedSources:
    """Other repositories' pinned commits, exported on first use into folders of this command's
    own (next to its snapshot), for builds of those repositories and their source inputs."""

    def __init__(self, repositories, repos: dict, snapshot_dir: str):
        self.repositories = repositories  # a repos.lookup.GitRepositories
        self.repos = repos  # the definitions' `repos`: pin path -> {repository, commit, path, ...}
        self.snapshot_dir = snapshot_dir
        self.exported: dict[tuple[str, str], str] = {}

    def where(self, pin: str) -> tuple[str, str]:
        entry = self.repos[pin]
        return entry["repository"], entry["commit"]

    def checkout(self, pin: str) -> str:
        """The folder holding the pinned commit's files."""
        repository, commit = self.where(pin)
        if (repository, commit) not in self.exported:
            folder = tempfile.mkdtemp(prefix=f"{commit[:12]}-", dir=self.snapshot_dir)
            self.repositories.export_tree(repository, commit, folder)
            self.exported[(repository, commit)] = folder
        return self.exported[(repository, commit)]

    def commit_message(self, pin: str) -> str:
        return self.repositories.commit_message(*self.where(pin))

    def repo_id(self, pin: str) -> str:
        """How the history store names that repository (its absolute path, as for this one)."""
        return repo_identity(self.repositories.repo(self.where(pin)[0]))

    def remove_snapshots(self) -> None:
        for folder in self.exported.values():
            shutil.rmtree(folder, ignore_errors=True)
        self.exported.clear()


def commit_target(path: str, rev: str, snapshot_dir: str, repositories=None) -> Target:
    """Commit REV, exported into a folder of its own under `snapshot_dir` (two commands running
    the same commit at once never share one), without touching the working tree."""
    from testlooper import gitio
    from testlooper.repos.definitions import definitions_at_commit, print_warning

    repo = gitio.open_repo(path)
    sha = gitio.resolve_rev(repo, rev)
    definitions = definitions_at_commit(repo, sha, repositories=repositories, warn=print_warning)
    os.makedirs(snapshot_dir, exist_ok=True)
    source = tempfile.mkdtemp(prefix=f"{sha[:12]}-", dir=snapshot_dir)
    try:
        gitio.export_tree(repo, sha, source)
    except BaseException:
        shutil.rmtree(source, ignore_errors=True)
        raise
    return Target(
        repo_id=repo_identity(repo), definitions=definitions, source_dir=source, commit=sha,
        commit_message=gitio.commit_message(repo, sha), branch=current_branch(repo), record=True,
        note=f"commit {sha[:12]}", repo=repo, pinned=_pinned(definitions, repositories, snapshot_dir),
    )


def _pinned(definitions: dict | None, repositories, snapshot_dir: str) -> PinnedSources | None:
    if definitions is None or repositories is None or not definitions.get("repos"):
        return None
    return PinnedSources(repositories, definitions["repos"], snapshot_dir)


def is_bare_repository(path: str) -> bool:
    """True when `path` is a bare git repository (`project.git`): it has no working tree to run."""
    from testlooper import gitio

    try:
        return bool(gitio.open_repo(path).bare)
    except gitio.GitError:
        return False


def working_tree_target(path: str, snapshot_dir: str, on_progress=None, own_paths=(),
                        repositories=None) -> Target:
    """The files on disk, copied once into a folder of this command's own, so edits made during
    the run change nothing and two commands never share a snapshot.

    In a git repository the copy holds what git would commit: tracked and untracked files,
    not ignored ones (no `.venv`, no build trees). `snapshot_dir` and `own_paths` (the
    command's output folder, spool and store) are never copied and never make the tree dirty,
    even when they lie inside it (`--output ./out`). `on_progress(copied, total)` hears each
    file copied (`total` is None when not known beforehand).
    """
    from testlooper import gitio
    from testlooper.repos.definitions import definitions_on_disk, existing_directory, print_warning

    root = existing_directory(path)
    definitions = definitions_on_disk(root, repositories, print_warning)
    try:
        repo = gitio.open_repo(root)
    except gitio.GitError:
        repo = None
    os.makedirs(snapshot_dir, exist_ok=True)
    source = tempfile.mkdtemp(prefix="working-tree-", dir=snapshot_dir)
    try:
        copy_working_tree(Path(root), Path(source), [Path(snapshot_dir), *map(Path, own_paths)], repo,
                          on_progress)
    except BaseException:
        shutil.rmtree(source, ignore_errors=True)
        raise
    if repo is None or not repo.head.is_valid():
        return Target(repo_id=str(Path(root).resolve()), definitions=definitions, source_dir=source, commit="",
                      commit_message="", branch="", record=False, repo=repo,
                      pinned=_pinned(definitions, repositories, snapshot_dir),
                      note=f"working tree {path} (not a commit: results are not kept in the history)")
    sha = gitio.resolve_rev(repo, "HEAD")
    dirty = bool(gitio.uncommitted_changes(repo, leaving_out=[snapshot_dir, *own_paths]))
    note = f"working tree {path} at {sha[:12]}"
    if dirty:
        note += " with uncommitted changes (results are not kept in the history; commit, or use --rev)"
    return Target(repo_id=repo_identity(repo), definitions=definitions, source_dir=source, commit=sha,
                  commit_message=gitio.commit_message(repo, sha), branch=current_branch(repo), record=not dirty,
                  note=note, repo=repo, pinned=_pinned(definitions, repositories, snapshot_dir))


def copy_working_tree(root: Path, destination: Path, left_out: list[Path], repo, on_progress=None) -> None:
    root = root.resolve()
    left_out = [path.resolve() for path in left_out]
    on_progress = on_progress or (lambda copied, total: None)

    def inside_output(path: Path) -> bool:
        return any(path == own or own in path.parents for own in left_out)

    if repo is None or repo.bare:
        def ignore(directory, names):
            return [n for n in names if n == ".git" or inside_output(Path(directory).resolve() / n)]

        copied = 0

        def copy_counted(source, target):
            nonlocal copied
            shutil.copy2(source, target)
            copied += 1
            on_progress(copied, None)

        shutil.copytree(root, destination, symlinks=True, ignore=ignore, dirs_exist_ok=True,
                        copy_function=copy_counted)
        return
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            capture_output=True, check=True).stdout
    files = sorted(set(listed.decode("utf-8", "surrogateescape").split("\0")) - {""})
    for copied, relative in enumerate(files, 1):
        on_progress(copied, len(files))
        origin = root / relative
        if not os.path.lexists(origin) or inside_output(origin.parent.resolve() / origin.name):
            continue  # deleted but still tracked, or our own output
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if origin.is_symlink():
            os.symlink(os.readlink(origin), target)
        elif origin.is_dir():  # a submodule (or a nested repository): git lists it as one entry
            shutil.copytree(origin, target, symlinks=True, ignore=shutil.ignore_patterns(".git"),
                            dirs_exist_ok=True)
        elif origin.is_file():
            shutil.copy2(origin, target)


def repo_identity(repo) -> str:
    """The repository's name in the history: its absolute path (the same clone, the same history)."""
    root = repo.working_tree_dir if not repo.bare else repo.git_dir
    return str(Path(root).resolve())


def current_branch(repo) -> str:
    try:
        return repo.active_branch.name
    except (TypeError, ValueError):  # detached HEAD
        return ""
