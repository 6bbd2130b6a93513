"""The original TestLooper's fixtures (tests/fixtures/original) in real git repositories.

The original's tests used a fake source control where `addCommit("repo0/c0", ...)` made commit
`c0` of repository `repo0`. `SourceControl` does the same with real repositories: each commit
replaces the whole tree and is tagged with its name, so pins such as `repo0/c0` resolve
unchanged through `GitRepositories`.
"""

from __future__ import annotations

from pathlib import Path

from gitrepo import GitRepo
from testlooper import gitio
from testlooper.repos.definitions import definitions_at_commit
from testlooper.repos.lookup import GitRepositories

FIXTURES = Path(__file__).parent / "fixtures" / "original"
PLACEHOLDER = "__replace_this_hash__"


def fixture(*parts: str) -> str:
    return FIXTURES.joinpath(*parts).read_text()


class SourceControl:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.repos: dict[str, GitRepo] = {}
        self.shas: dict[str, str] = {}

    def repo(self, repository: str) -> GitRepo:
        if repository not in self.repos:
            self.repos[repository] = GitRepo(self.root / repository.replace("/", "__"))
        return self.repos[repository]

    def add_commit(self, name: str, definitions: str | None = None, files: dict[str, str] | None = None) -> str:
        """Commit `name` ("repository/commit"): a tree of `files` plus, unless None, `definitions`
        as testDefinitions.yml."""
        repository, _, tag = name.rpartition("/")
        repo = self.repo(repository)
        for existing in filter(None, repo.git("ls-files").splitlines()):
            (repo.path / existing).unlink()
        tree = dict(files or {})
        if definitions is not None:
            tree["testDefinitions.yml"] = definitions
        sha = repo.commit(tree, message=f"a message: {name}")
        repo.git("tag", "--force", tag)
        self.shas[name] = sha
        return sha

    def add_project(self, branch: str, project: str, pinned: str | None = None) -> str:
        """An original test project at `branch` (master, dev, v3-era) as commit `project/<sha>`;
        `pinned`, the sha of the project it pins, replaces the placeholder as the original's tests did."""
        folder = FIXTURES / branch / project
        files = {path.name: path.read_text() for path in folder.iterdir()}
        if pinned is not None:
            files["testDefinitions.yml"] = files["testDefinitions.yml"].replace(PLACEHOLDER, pinned)
        definitions = files.pop("testDefinitions.yml")
        return self.add_commit(f"{project}/{branch}", definitions, files)

    def lookup(self) -> GitRepositories:
        return GitRepositories({name: repo.path for name, repo in self.repos.items()})

    def resolve(self, name: str, warn=None) -> dict:
        """The resolved definitions of commit `name`, its pins read through `lookup()`."""
        repository = name.rpartition("/")[0]
        repo = gitio.open_repo(self.repo(repository).path)
        return definitions_at_commit(repo, self.shas[name], repositories=self.lookup(),
                                     warn=warn or (lambda warning: None))
