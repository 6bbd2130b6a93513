"""Real git repositories in temporary directories, built commit by commit for tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

# The machine's own git configuration (signing, hooks paths, default branch) must not leak in.
_GIT_ENV = {
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_AUTHOR_NAME": "Tess Looper",
    "GIT_AUTHOR_EMAIL": "tess@example.com",
    "GIT_COMMITTER_NAME": "Tess Looper",
    "GIT_COMMITTER_EMAIL": "tess@example.com",
}


class GitRepo:
    """A repository at `path` with branch `main`; `commit` writes files and commits them."""

    def __init__(self, path: Path, bare: bool = False):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.git("init", "--quiet", "--initial-branch=main", *(["--bare"] if bare else []))

    def git(self, *args: str) -> str:
        result = subprocess.run(
            ["git", *args],
            cwd=self.path,
            env={**os.environ, **_GIT_ENV},
            check=True,
            capture_output=True,
            text=True,
        )
        return result.stdout.strip()

    def write(self, files: dict[str, str | None]) -> None:
        """Write `files` (path -> text) into the working tree; None deletes the file."""
        for name, text in files.items():
            target = self.path / name
            if text is None:
                target.unlink()
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(text)

    def commit(self, files: dict[str, str | None], message: str = "change") -> str:
        """Write `files`, commit everything in the working tree, and return the new sha."""
        self.write(files)
        self.git("add", "--all")
        self.git("commit", "--quiet", "--allow-empty", "--message", message)
        return self.head()

    def head(self) -> str:
        return self.git("rev-parse", "HEAD")
