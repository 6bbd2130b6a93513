"""Reading commits of a git repository (gitpython), without ever touching its working tree.

Everything reads objects by commit: the working tree, the index and the checked-out branch are
left alone (only `uncommitted_changes` looks at the working tree, and it only reads). Errors a
user can fix (no repository, unknown revision, missing file) are raised as `GitError` with a
one-line message.
"""

from __future__ import annotations

import os
import subprocess
import tempfile

import git

from testlooper.planning import match_glob


class GitError(Exception):
    """A repository, revision or path that cannot be read; the message is one line for a user."""


def open_repo(path: str | os.PathLike) -> git.Repo:
    """The repository whose working tree (or bare repository) is exactly `path`."""
    try:
        return git.Repo(path)
    except git.NoSuchPathError:
        raise GitError(f"{path} does not exist") from None
    except git.InvalidGitRepositoryError:
        raise GitError(f"{path} is not a git repository") from None


def resolve_rev(repo: git.Repo, rev: str) -> str:
    """The full sha of the commit `rev` names (a branch, tag, sha, `HEAD~2`...)."""
    try:
        # --end-of-options: a revision starting with "-" is a name, never an option.
        return repo.git.rev_parse("--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
    except git.GitCommandError:
        hint = "" if repo.head.is_valid() else " (the repository has no commits yet)"
        raise GitError(f"unknown revision {rev!r}{hint}") from None


def list_files(repo: git.Repo, sha: str) -> list[str]:
    """Every file of the commit's tree, recursively, as POSIX paths from the root (submodules left out)."""
    listing = repo.git.ls_tree("-r", "-z", sha)
    files = []
    for entry in filter(None, listing.split("\0")):
        mode_type_object, path = entry.split("\t", 1)
        if mode_type_object.split()[1] == "blob":
            files.append(path)
    return files


def read_file(repo: git.Repo, sha: str, path: str) -> str:
    """The text of `path` (from the tree root) at commit `sha`, decoded as UTF-8."""
    try:
        blob = repo.commit(sha).tree / path
    except KeyError:
        raise GitError(f"{path} does not exist at commit {sha[:12]}") from None
    if blob.type != "blob":
        raise GitError(f"{path} is not a file at commit {sha[:12]}")
    try:
        return blob.data_stream.read().decode("utf-8")
    except UnicodeDecodeError:
        raise GitError(f"{path} at commit {sha[:12]} is not UTF-8 text") from None


def changed_files(repo: git.Repo, sha: str, base: str | None = None) -> list[str] | None:
    """Paths that differ between `base` (default: the first parent) and `sha`.

    None for a root commit without a `base`: there is nothing to compare against, so callers
    treat every path as changed. A rename counts as both its old and its new path.
    """
    if base is None:
        parents = repo.commit(sha).parents
        if not parents:
            return None
        base = parents[0].hexsha
    output = repo.git.diff_tree("-r", "-z", "--name-only", "--no-renames", base, sha)
    return [path for path in output.split("\0") if path]


def first_parent_line(repo: git.Repo, rev: str, limit: int) -> list[str]:
    """Up to `limit` shas from `rev` back along first parents, newest first."""
    output = repo.git.rev_list("--first-parent", f"--max-count={limit}", resolve_rev(repo, rev))
    return output.split()


def commit_message(repo: git.Repo, sha: str) -> str:
    return repo.commit(sha).message


def branches(repo: git.Repo, globs: list[str]) -> dict[str, str]:
    """Local branches whose names match any of `globs`, with the sha each points at."""
    output = repo.git.for_each_ref("--format=%(objectname) %(refname)", "refs/heads/")
    found = {}
    for line in output.splitlines():
        sha, ref = line.split(" ", 1)
        name = ref.removeprefix("refs/heads/")
        if any(match_glob(glob, name) for glob in globs):
            found[name] = sha
    return found


def export_tree(repo: git.Repo, sha: str, dest_dir: str | os.PathLike) -> None:
    """Write the files of commit `sha` into `dest_dir` (created if missing), exactly as committed.

    Reads the commit into a throw-away index and checks that out into `dest_dir`: unlike
    `git archive`, this honours no `export-ignore`/`export-subst` attributes, so a repository
    that marks its tests export-ignore still runs them. The repository's own index and working
    tree are never touched.
    """
    sha = resolve_rev(repo, sha)  # a clear error for an unknown revision
    dest = os.path.abspath(dest_dir)
    os.makedirs(dest, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="testlooper-index-") as scratch:
        env = {**os.environ, "GIT_INDEX_FILE": os.path.join(scratch, "index")}
        base = [repo.git.GIT_PYTHON_GIT_EXECUTABLE, "--git-dir", repo.git_dir, "--work-tree", dest]
        for args in (["read-tree", sha], ["checkout-index", "--all", "--force"]):
            done = subprocess.run(base + args, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise GitError(f"cannot export commit {sha[:12]}: {done.stderr.strip()}")


def uncommitted_changes(repo: git.Repo, leaving_out=()) -> list[str]:
    """Paths that are staged, modified, deleted or untracked (not ignored) in the working tree.

    Nothing at or under the paths in `leaving_out` counts (the runner's own output, spool and
    store, when they lie in the tree): git is told to skip them, so it never lists their files.
    """
    if repo.bare:
        return []
    root = os.path.realpath(repo.working_tree_dir)
    pathspecs = []
    for path in leaving_out:
        relative = os.path.relpath(os.path.realpath(path), root)
        if relative != os.curdir and relative != os.pardir and not relative.startswith(os.pardir + os.sep):
            pathspecs.append(":(top,literal,exclude)" + relative.replace(os.sep, "/"))
    # GIT_OPTIONAL_LOCKS=0: status must not rewrite the index as a side effect of reading it.
    limits = ["--", ":(top)", *pathspecs] if pathspecs else []
    output = repo.git.status(
        "--porcelain=v1", "-z", "--no-renames", "--untracked-files=all", *limits, env={"GIT_OPTIONAL_LOCKS": "0"}
    )
    # Each entry is "XY PATH": two status letters and a space before the path.
    return [entry[3:] for entry in output.split("\0") if entry]
