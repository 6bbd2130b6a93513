"""What a local run runs: a commit of a git repository, or a working tree as it is on disk."""

from __future__ import annotations

import os
import shutil
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


def commit_target(path: str, rev: str, snapshot_dir: str) -> Target:
    """Commit REV, exported to `snapshot_dir` without touching the working tree."""
    from testlooper import gitio
    from testlooper.cli.definitions_cmd import definitions_at_commit

    repo = gitio.open_repo(path)
    sha = gitio.resolve_rev(repo, rev)
    source = os.path.join(snapshot_dir, sha[:12])
    if not os.path.isdir(source):
        gitio.export_tree(repo, sha, source + ".partial")
        os.replace(source + ".partial", source)
    return Target(
        repo_id=repo_identity(repo), definitions=definitions_at_commit(repo, sha), source_dir=source, commit=sha,
        commit_message=gitio.commit_message(repo, sha), branch=current_branch(repo), record=True,
        note=f"commit {sha[:12]}", repo=repo,
    )


def working_tree_target(path: str, snapshot_dir: str) -> Target:
    """The files on disk, copied once (without .git) so edits during the run change nothing."""
    from testlooper import gitio
    from testlooper.cli.definitions_cmd import definitions_on_disk, existing_directory

    root = existing_directory(path)
    definitions = definitions_on_disk(root)
    source = os.path.join(snapshot_dir, "working-tree")
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(root, source, symlinks=True, ignore=shutil.ignore_patterns(".git"))
    try:
        repo = gitio.open_repo(root)
    except gitio.GitError:
        repo = None
    if repo is None or not repo.head.is_valid():
        return Target(repo_id=str(Path(root).resolve()), definitions=definitions, source_dir=source, commit="",
                      commit_message="", branch="", record=False, repo=repo,
                      note=f"working tree {path} (not a commit: results are not kept in the history)")
    sha = gitio.resolve_rev(repo, "HEAD")
    dirty = bool(gitio.uncommitted_changes(repo))
    note = f"working tree {path} at {sha[:12]}"
    if dirty:
        note += " with uncommitted changes (results are not kept in the history; commit, or use --rev)"
    return Target(repo_id=repo_identity(repo), definitions=definitions, source_dir=source, commit=sha,
                  commit_message=gitio.commit_message(repo, sha), branch=current_branch(repo), record=not dirty,
                  note=note, repo=repo)


def repo_identity(repo) -> str:
    """The repository's name in the history: its absolute path (the same clone, the same history)."""
    root = repo.working_tree_dir if not repo.bare else repo.git_dir
    return str(Path(root).resolve())


def current_branch(repo) -> str:
    try:
        return repo.active_branch.name
    except (TypeError, ValueError):  # detached HEAD
        return ""
