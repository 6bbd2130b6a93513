"""The operator's git mirrors: real repositories over file:// and over smart HTTP with credentials."""

from __future__ import annotations

import base64
import socket
import subprocess
import tempfile

import pytest

from git_http import GitHttpServer
from gitrepo import GitRepo
from testlooper.repos.mirror import GitCredentials, GitMirror, MirrorError
from testlooper.repos.urls import normalize_url, redact


def make_origin(tmp_path):
    work = GitRepo(tmp_path / "work")
    first = work.commit({"a.txt": "1"}, "first")
    work.git("branch", "dev")
    bare = tmp_path / "served" / "project.git"
    bare.parent.mkdir(parents=True)
    work.git("clone", "--quiet", "--bare", str(work.path), str(bare))
    work.git("remote", "add", "origin", str(bare))
    return work, bare, first


def test_fetch_mirrors_branches_force_pushes_and_deletions(tmp_path):
    work, bare, first = make_origin(tmp_path)
    mirror = GitMirror(tmp_path / "mirror.git", f"file://{bare}")
    assert mirror.fetch() == {"main": first, "dev": first}

    second = work.commit({"a.txt": "2"}, "second")
    work.git("push", "--quiet", "origin", "main")
    work.git("push", "--quiet", "origin", "--delete", "dev")
    assert mirror.fetch() == {"main": second}

    work.git("reset", "--quiet", "--hard", first)
    rewritten = work.commit({"a.txt": "rewritten"}, "rewritten")
    work.git("push", "--quiet", "--force", "origin", "main")
    assert mirror.fetch() == {"main": rewritten}
    assert mirror.reachable({first, second}, [rewritten]) == {first}


def test_https_credentials_reach_git_and_never_its_messages(tmp_path):
    _work, bare, first = make_origin(tmp_path)
    with GitHttpServer(bare.parent, username="ci-bot", password="s3cret-passw0rd") as server:
        good = GitMirror(tmp_path / "good.git", server.url("project.git"),
                         GitCredentials(username="ci-bot", password="s3cret-passw0rd"))
        assert good.fetch()["main"] == first

        wrong = GitMirror(tmp_path / "wrong.git", server.url("project.git"),
                          GitCredentials(username="ci-bot", password="not-the-passw0rd"))
        with pytest.raises(MirrorError) as refused:
            wrong.fetch()
        assert "not-the-passw0rd" not in str(refused.value)
        assert "failed" in str(refused.value)

        anonymous = GitMirror(tmp_path / "anon.git", server.url("project.git"))
        with pytest.raises(MirrorError):
            anonymous.fetch()  # no prompt, no hang: a clear failure


def test_a_token_is_sent_as_basic_auth_with_the_conventional_user(tmp_path):
    _work, bare, first = make_origin(tmp_path)
    with GitHttpServer(bare.parent, username="x-access-token", password="ghp_exampletoken123") as server:
        mirror = GitMirror(tmp_path / "m.git", server.url("project.git"), GitCredentials(token="ghp_exampletoken123"))
        assert mirror.fetch()["main"] == first


def test_credentials_in_the_url_are_redacted_from_errors(tmp_path):
    port = _closed_port()
    mirror = GitMirror(tmp_path / "m.git", f"http://bot:hunter22secret@127.0.0.1:{port}/x.git")
    with pytest.raises(MirrorError) as unreachable:
        mirror.fetch(timeout=20)
    assert "hunter22secret" not in str(unreachable.value)
    assert "***@" in str(unreachable.value)


def test_a_failure_says_what_git_said_went_wrong_not_its_boilerplate(tmp_path):
    """git ends every ssh or local failure with 'Could not read from remote repository. Please
    make sure you have the correct access rights and the repository exists.': the cause is
    the line before. (An unknown ssh host: test_ssh_keys_and_known_hosts_over_a_real_sshd.)"""
    missing = GitMirror(tmp_path / "missing.git", f"file://{tmp_path}/nowhere.git")
    with pytest.raises(MirrorError) as refused:
        missing.fetch()
    assert "does not appear to be a git repository" in str(refused.value)
    closed = GitMirror(tmp_path / "closed.git", f"ssh://git@127.0.0.1:{_closed_port()}/x.git")
    with pytest.raises(MirrorError) as refused:
        closed.fetch(timeout=20)
    assert "Connection refused" in str(refused.value)
    assert "access rights" not in str(refused.value)


def test_secret_data_is_decoded_and_checked():
    encode = lambda text: base64.b64encode(text.encode()).decode()  # noqa: E731
    assert GitCredentials.from_secret_data({"token": encode("abc\n")}).token == "abc"
    both = GitCredentials.from_secret_data({"username": encode("u"), "password": encode("Zq9-pass")})
    assert (both.username, both.password) == ("u", "Zq9-pass")
    assert "Zq9" not in repr(both) and "Zq9" not in str(both)
    with pytest.raises(ValueError, match="none of the keys"):
        GitCredentials.from_secret_data({"other": encode("x")})
    with pytest.raises(ValueError, match="no username"):
        GitCredentials.from_secret_data({"password": encode("p")})
    with pytest.raises(ValueError, match="not base64"):
        GitCredentials.from_secret_data({"token": "%%%"})


@pytest.mark.parametrize("url", [
    "https://github.com/Org/Repo.git", "https://github.com/org/repo", "git@github.com:Org/Repo.git",
    "ssh://git@github.com/Org/Repo/", "git://github.com/org/repo.git", "https://user:pw@github.com:443/org/repo",
])
def test_urls_of_one_repository_have_one_normal_form(url):
    assert normalize_url(url) == "github.com/org/repo"


def test_normal_forms_keep_what_tells_repositories_apart():
    assert normalize_url("file:///srv/git/x.git") == "/srv/git/x"
    assert normalize_url("https://gitlab.example.com:8443/a/b.git") == "gitlab.example.com:8443/a/b"
    assert normalize_url("https://github.com/org/repo2") != normalize_url("https://github.com/org/repo")


def test_redact():
    assert redact("fatal: https://u:p@host/x failed") == "fatal: https://***@host/x failed"
    assert redact("token abcdef in text", ("abcdef",)) == "token *** in text"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ssh_keys_and_known_hosts_over_a_real_sshd(tmp_path, monkeypatch):
    from ssh_server import SshServer

    # The key's private folder goes in a temp folder of this test's own, so that what other
    # processes do in /tmp meanwhile cannot change what is checked at the end.
    private_root = tmp_path / "private"
    private_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_root))

    _work, bare, first = make_origin(tmp_path)
    with SshServer(tmp_path / "sshd") as server:
        url = server.url(str(bare))
        good = GitMirror(tmp_path / "good.git", url,
                         GitCredentials(ssh_private_key=server.client_key, known_hosts=server.known_hosts_line))
        assert good.fetch(timeout=60)["main"] == first

        unknown_host = GitMirror(tmp_path / "unknown.git", url, GitCredentials(ssh_private_key=server.client_key))
        with pytest.raises(MirrorError, match="[Hh]ost key verification failed"):
            unknown_host.fetch(timeout=60)  # never trusted on first use

        other_key = tmp_path / "other"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)], check=True)
        wrong_key = GitMirror(tmp_path / "wrong.git", url,
                              GitCredentials(ssh_private_key=other_key.read_text(), known_hosts=server.known_hosts_line))
        with pytest.raises(MirrorError, match="Permission denied") as refused:
            wrong_key.fetch(timeout=60)
        assert "PRIVATE KEY" not in str(refused.value)
    assert list(private_root.iterdir()) == [], "the private key folder exists only while a fetch runs"


def test_a_host_that_stops_sending_is_given_up_on_long_before_the_fetch_timeout(tmp_path):
    """A host that accepts and never answers would hold one of the few poll slots for the
    whole fetch timeout; a stall ends the fetch instead."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        mirror = GitMirror(tmp_path / "m.git", f"http://127.0.0.1:{silent.getsockname()[1]}/x.git", stall_seconds=2)
        with pytest.raises(MirrorError) as stalled:
            mirror.fetch(timeout=120)
        assert "too slow" in str(stalled.value)  # curl's words, not "took longer than 120s"
    finally:
        silent.close()


def test_reachability_is_asked_of_git_once_per_pair_of_commits(tmp_path):
    """Each poll asks which commits of unended TestRuns the heads contain; the answer for two
    given commits never changes, so an idle poll runs no git for it."""
    work, bare, first = make_origin(tmp_path)
    second = work.commit({"a.txt": "2"}, "second")
    work.git("push", "--quiet", "origin", "main")
    calls = tmp_path / "calls.log"
    wrapper = tmp_path / "git-logging"
    wrapper.write_text(f'#!/bin/sh\necho "$@" >> {calls}\nexec git "$@"\n')
    wrapper.chmod(0o755)
    mirror = GitMirror(tmp_path / "m.git", f"file://{bare}", git_executable=str(wrapper))
    heads = mirror.fetch()
    assert mirror.reachable({first, second}, [heads["dev"], heads["main"]]) == {first, second}
    asked = calls.read_text().count("merge-base")
    assert asked >= 1
    again = GitMirror(tmp_path / "m.git", f"file://{bare}", git_executable=str(wrapper))  # the next poll's
    assert again.reachable({first, second}, [heads["dev"], heads["main"]]) == {first, second}
    assert calls.read_text().count("merge-base") == asked
