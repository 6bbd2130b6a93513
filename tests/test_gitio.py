import os
import stat

import pytest

from gitrepo import GitRepo
from testlooper import gitio


@pytest.fixture
def repo(tmp_path):
    return GitRepo(tmp_path / "repo")


def test_open_repo_names_a_path_that_is_not_a_repository(tmp_path):
    with pytest.raises(gitio.GitError, match=f"^{tmp_path} is not a git repository$"):
        gitio.open_repo(tmp_path)


def test_open_repo_names_a_missing_path(tmp_path):
    with pytest.raises(gitio.GitError, match="does not exist$"):
        gitio.open_repo(tmp_path / "nowhere")


def test_open_repo_does_not_search_parent_directories(repo):
    (repo.path / "sub").mkdir()
    with pytest.raises(gitio.GitError, match="sub is not a git repository"):
        gitio.open_repo(repo.path / "sub")


def test_resolve_rev_gives_full_shas_of_commits(repo):
    first = repo.commit({"a.txt": "1"})
    second = repo.commit({"a.txt": "2"})
    repo.git("tag", "-a", "v1", "-m", "annotated tags resolve to their commit", first)
    opened = gitio.open_repo(repo.path)
    assert gitio.resolve_rev(opened, "HEAD") == second
    assert gitio.resolve_rev(opened, "main~1") == first
    assert gitio.resolve_rev(opened, first[:8]) == first
    assert gitio.resolve_rev(opened, "v1") == first


def test_resolve_rev_names_an_unknown_revision(repo):
    repo.commit({"a.txt": "1"})
    opened = gitio.open_repo(repo.path)
    with pytest.raises(gitio.GitError, match=r"^unknown revision 'nope'$"):
        gitio.resolve_rev(opened, "nope")
    with pytest.raises(gitio.GitError, match=r"^unknown revision '--all'$"):
        gitio.resolve_rev(opened, "--all")


def test_resolve_rev_in_a_repository_without_commits(repo):
    with pytest.raises(gitio.GitError, match=r"unknown revision 'HEAD' \(the repository has no commits yet\)"):
        gitio.resolve_rev(gitio.open_repo(repo.path), "HEAD")


def test_list_files_is_recursive_with_posix_paths(repo):
    sha = repo.commit({"top.txt": "", "a/b/deep.yml": "", "a/c.txt": "", "with space.txt": ""})
    assert sorted(gitio.list_files(gitio.open_repo(repo.path), sha)) == [
        "a/b/deep.yml",
        "a/c.txt",
        "top.txt",
        "with space.txt",
    ]


def test_read_file_reads_the_commit_not_the_working_tree(repo):
    sha = repo.commit({"ci/defs.yml": "committed\n"})
    (repo.path / "ci/defs.yml").write_text("edited on disk\n")
    opened = gitio.open_repo(repo.path)
    assert gitio.read_file(opened, sha, "ci/defs.yml") == "committed\n"
    assert (repo.path / "ci/defs.yml").read_text() == "edited on disk\n"
    assert gitio.uncommitted_changes(opened) == ["ci/defs.yml"]


def test_read_file_names_a_missing_path_or_a_directory(repo):
    sha = repo.commit({"ci/defs.yml": "x"})
    opened = gitio.open_repo(repo.path)
    with pytest.raises(gitio.GitError, match=f"^ci/other.yml does not exist at commit {sha[:12]}$"):
        gitio.read_file(opened, sha, "ci/other.yml")
    with pytest.raises(gitio.GitError, match="^ci is not a file"):
        gitio.read_file(opened, sha, "ci")


def test_changed_files_against_first_parent_and_base(repo):
    root = repo.commit({"a.txt": "1", "b.txt": "1", "old/name.txt": "same"})
    (repo.path / "new").mkdir()
    repo.git("mv", "old/name.txt", "new/name.txt")
    second = repo.commit({"a.txt": "2"})
    third = repo.commit({"b.txt": None, "c.txt": "new"})
    opened = gitio.open_repo(repo.path)
    assert gitio.changed_files(opened, root) is None
    assert sorted(gitio.changed_files(opened, second)) == ["a.txt", "new/name.txt", "old/name.txt"]
    assert sorted(gitio.changed_files(opened, third)) == ["b.txt", "c.txt"]
    assert sorted(gitio.changed_files(opened, third, base=root)) == [
        "a.txt", "b.txt", "c.txt", "new/name.txt", "old/name.txt",
    ]


def test_changed_files_of_a_merge_uses_the_first_parent(repo):
    repo.commit({"a.txt": "1"})
    repo.git("checkout", "--quiet", "-b", "feature")
    repo.commit({"feature.txt": "f"})
    repo.git("checkout", "--quiet", "main")
    repo.commit({"main.txt": "m"})
    repo.git("merge", "--quiet", "--no-ff", "--no-edit", "feature")
    assert gitio.changed_files(gitio.open_repo(repo.path), repo.head()) == ["feature.txt"]


def test_first_parent_line_is_newest_first_and_skips_merged_branches(repo):
    first = repo.commit({"a.txt": "1"})
    repo.git("checkout", "--quiet", "-b", "feature")
    side = repo.commit({"side.txt": "s"})
    repo.git("checkout", "--quiet", "main")
    second = repo.commit({"a.txt": "2"})
    repo.git("merge", "--quiet", "--no-ff", "--no-edit", "feature")
    merge = repo.head()
    opened = gitio.open_repo(repo.path)
    assert gitio.first_parent_line(opened, "main", 10) == [merge, second, first]
    assert gitio.first_parent_line(opened, "main", 2) == [merge, second]
    assert side not in gitio.first_parent_line(opened, "HEAD", 10)


def test_commit_message(repo):
    sha = repo.commit({"a.txt": "1"}, message="Fix the flaky thing\n\nLonger story.")
    assert gitio.commit_message(gitio.open_repo(repo.path), sha) == "Fix the flaky thing\n\nLonger story.\n"


def test_branches_matching_globs(repo):
    first = repo.commit({"a.txt": "1"})
    repo.git("branch", "release/1.0")
    repo.git("branch", "dev/alice")
    second = repo.commit({"a.txt": "2"})
    opened = gitio.open_repo(repo.path)
    assert gitio.branches(opened, ["main", "release/*"]) == {"main": second, "release/1.0": first}
    assert gitio.branches(opened, ["*"]) == {"main": second, "release/1.0": first, "dev/alice": first}
    assert gitio.branches(opened, []) == {}


def test_branches_of_a_bare_repository(tmp_path, repo):
    sha = repo.commit({"a.txt": "1"})
    GitRepo(tmp_path / "mirror.git", bare=True)
    repo.git("push", "--quiet", str(tmp_path / "mirror.git"), "main")
    mirror = gitio.open_repo(tmp_path / "mirror.git")
    assert gitio.branches(mirror, ["main"]) == {"main": sha}
    assert gitio.uncommitted_changes(mirror) == []


def test_export_tree_writes_the_commit_without_touching_the_working_tree(tmp_path, repo):
    sha = repo.commit({"run.sh": "#!/bin/sh\necho hi\n", "src/a.py": "print(1)\n"})
    os.chmod(repo.path / "run.sh", 0o755)
    repo.git("add", "run.sh")
    repo.git("commit", "--quiet", "-m", "executable")
    executable_sha = repo.head()
    (repo.path / "src/a.py").write_text("edited\n")
    os.symlink("src/a.py", repo.path / "link.py")
    repo.commit({}, message="relative symlink")
    opened = gitio.open_repo(repo.path)

    gitio.export_tree(opened, sha, tmp_path / "old")
    assert sorted(p.relative_to(tmp_path / "old").as_posix() for p in (tmp_path / "old").rglob("*")) == [
        "run.sh", "src", "src/a.py",
    ]
    assert (tmp_path / "old/src/a.py").read_text() == "print(1)\n"

    gitio.export_tree(opened, executable_sha, tmp_path / "exe")
    assert (tmp_path / "exe/run.sh").stat().st_mode & stat.S_IXUSR

    gitio.export_tree(opened, "HEAD", tmp_path / "new")
    assert os.readlink(tmp_path / "new/link.py") == "src/a.py"
    assert (tmp_path / "new/src/a.py").read_text() == "edited\n"
    assert gitio.uncommitted_changes(opened) == []


def test_export_tree_keeps_symlinks_as_links_and_ignores_export_attributes(tmp_path, repo):
    os.symlink("/etc/passwd", repo.path / "escape")
    sha = repo.commit({"tests/test_x.py": "x", ".gitattributes": "tests/ export-ignore\n"})
    gitio.export_tree(gitio.open_repo(repo.path), sha, tmp_path / "out")
    assert os.readlink(tmp_path / "out/escape") == "/etc/passwd"  # a link, as committed, never followed
    assert (tmp_path / "out/tests/test_x.py").read_text() == "x"  # export-ignore does not hide tests


def test_export_tree_names_an_unknown_revision(tmp_path, repo):
    repo.commit({"a.txt": "1"})
    with pytest.raises(gitio.GitError, match="unknown revision 'nope'"):
        gitio.export_tree(gitio.open_repo(repo.path), "nope", tmp_path / "out")


def test_uncommitted_changes_lists_staged_modified_deleted_and_untracked(repo):
    repo.commit({"kept.txt": "1", "modified.txt": "1", "deleted.txt": "1", "staged.txt": "1", ".gitignore": "*.log"})
    repo.write({"modified.txt": "2", "deleted.txt": None, "staged.txt": "2", "new/untracked.txt": "x", "a.log": "x"})
    repo.git("add", "staged.txt")
    assert sorted(gitio.uncommitted_changes(gitio.open_repo(repo.path))) == [
        "deleted.txt", "modified.txt", "new/untracked.txt", "staged.txt",
    ]


def test_uncommitted_changes_leave_out_the_given_paths_taken_literally(repo, tmp_path):
    repo.commit({"kept.txt": "1"})
    repo.write({"out*[1]/runs/log.txt": "x", "out1/other.txt": "x", "store.db": "x", "store.db-wal": "x",
                "real-change.txt": "x"})
    opened = gitio.open_repo(repo.path)
    leaving_out = [repo.path / "out*[1]", repo.path / "store.db", repo.path / "store.db-wal",
                   tmp_path / "elsewhere", repo.path]  # outside the tree, or the tree itself: ignored
    assert sorted(gitio.uncommitted_changes(opened, leaving_out=leaving_out)) == [
        "out1/other.txt", "real-change.txt"]
    (repo.path / "real-change.txt").unlink()
    (repo.path / "out1" / "other.txt").unlink()
    assert gitio.uncommitted_changes(opened, leaving_out=leaving_out) == []
