"""A bare git mirror of one remote repository, kept by the operator under its cache directory.

The operator is the only place that holds git credentials: they reach git through environment
variables and a private key file that exists only while a fetch runs, never through the command
line (which `ps` shows) and never in a message (git's errors are redacted before they leave here).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from testlooper.repos.urls import redact

FETCH_TIMEOUT_SECONDS = 300
# A fetch that receives (almost) nothing for this long is given up on: a host that accepts
# connections and never answers must not hold one of the operator's few poll slots for the
# whole FETCH_TIMEOUT_SECONDS.
STALL_SECONDS = 60
STALL_BYTES_PER_SECOND = 1000
_GIT_BOILERPLATE = frozenset({
    "fatal: Could not read from remote repository.",
    "Please make sure you have the correct access rights",
    "and the repository exists.",
})


# (mirror path, ancestor sha, descendant sha) -> whether the descendant contains the ancestor.
_ANCESTRY: dict[tuple[str, str, str], bool] = {}
_ANCESTRY_LIMIT = 50_000  # about 17 MB; 100 Repos x 50 commits x 5 heads is 25,000


class MirrorError(Exception):
    """The remote cannot be read (unreachable, refused credentials, unknown host key): one line,
    with every credential redacted."""


@dataclasses.dataclass(frozen=True)
class GitCredentials:
    """What a Repo's credentials Secret holds: an https token, or a user name and password, or an
    ssh private key with the hosts it may talk to."""

    token: str = ""
    username: str = ""
    password: str = ""
    ssh_private_key: str = ""
    known_hosts: str = ""

    def __repr__(self) -> str:  # a stray log line of this object shows which kind, never the values
        kinds = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) and f.name != "known_hosts"]
        return f"GitCredentials({', '.join(kinds) or 'none'})"

    @classmethod
    def from_secret_data(cls, data: dict[str, str]) -> "GitCredentials":
        """From a Secret's `data` (base64, as the API returns it). Raises ValueError naming what is missing."""
        decoded = {}
        for key, value in (data or {}).items():
            try:
                decoded[key] = base64.b64decode(value, validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                raise ValueError(f"key {key!r} is not base64-encoded UTF-8 text") from None
        credentials = cls(
            token=decoded.get("token", "").strip(),
            username=decoded.get("username", "").strip(),
            password=decoded.get("password", ""),
            ssh_private_key=decoded.get("ssh-privatekey", ""),
            known_hosts=decoded.get("known_hosts", ""),
        )
        if not (credentials.token or credentials.password or credentials.ssh_private_key):
            raise ValueError("it has none of the keys token, username/password or ssh-privatekey")
        if credentials.password and not credentials.username:
            raise ValueError("it has a password but no username")
        return credentials

    def secrets(self) -> tuple[str, ...]:
        return tuple(s for s in (self.token, self.password, self.ssh_private_key) if s)


class GitMirror:
    """A bare repository at `path` mirroring the branches of `url`."""

    def __init__(self, path: str | os.PathLike, url: str, credentials: GitCredentials | None = None,
                 git_executable: str = "git", stall_seconds: int = STALL_SECONDS):
        self.path = Path(path)
        self.stall_seconds = stall_seconds
        self.url = url
        self.credentials = credentials or GitCredentials()
        self.git_executable = git_executable
        self._running: subprocess.Popen | None = None
        self._aborted = False

    def fetch(self, timeout: float = FETCH_TIMEOUT_SECONDS) -> dict[str, str]:
        """Fetch every branch (force-pushed and deleted ones too) and return {branch: sha}."""
        if not (self.path / "HEAD").exists():
            self.path.mkdir(parents=True, exist_ok=True)
            self._git(["init", "--bare", "--quiet"], timeout=60)
        with tempfile.TemporaryDirectory(prefix="testlooper-git-") as private:
            os.chmod(private, 0o700)
            env = self._fetch_environment(Path(private))
            # The URL goes on the command line (it may not hold credentials: redacted in errors
            # anyway); refspecs with + take force pushes, --prune drops deleted branches.
            self._git(["fetch", "--prune", "--no-tags", "--quiet", "--", self.url, "+refs/heads/*:refs/heads/*"],
                      env=env, timeout=timeout)
        return self.heads()

    def heads(self) -> dict[str, str]:
        listing = self._git(["for-each-ref", "--format=%(objectname) %(refname)", "refs/heads/"])
        heads = {}
        for line in listing.splitlines():
            sha, ref = line.split(" ", 1)
            heads[ref.removeprefix("refs/heads/")] = sha
        return heads

    def repo(self):
        """The mirror as a git.Repo, for the readers in gitio and repos.definitions."""
        import git

        return git.Repo(self.path)

    def is_ancestor(self, ancestor: str, descendant: str) -> bool:
        # Whether one commit contains another is fixed by their shas: each poll asks it again
        # for every unended TestRun's commit and every head, so the answers are kept.
        key = (str(self.path), ancestor, descendant)
        known = _ANCESTRY.get(key)
        if known is not None:
            return known
        done = subprocess.run([self.git_executable, "--git-dir", str(self.path), "merge-base", "--is-ancestor",
                               ancestor, descendant], capture_output=True, timeout=60)
        if done.returncode not in (0, 1):  # an unknown commit, say: not an answer to keep
            return False
        if len(_ANCESTRY) >= _ANCESTRY_LIMIT:
            _ANCESTRY.clear()
        _ANCESTRY[key] = done.returncode == 0
        return done.returncode == 0

    def reachable(self, commits: set[str], heads: list[str]) -> set[str]:
        """Those of `commits` that some head in `heads` contains."""
        return {commit for commit in commits if any(commit == head or self.is_ancestor(commit, head) for head in heads)}

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def _fetch_environment(self, private: Path) -> dict[str, str]:
        env = {
            **os.environ,
            "GIT_TERMINAL_PROMPT": "0",  # fail, never wait for a password on a terminal nobody reads
            "GIT_ASKPASS": "/bin/false",
            "SSH_ASKPASS": "/bin/false",
        }
        config = [
            ("credential.helper", ""),  # never a helper's stored passwords of this machine
            ("http.lowSpeedLimit", str(STALL_BYTES_PER_SECOND)),
            ("http.lowSpeedTime", str(self.stall_seconds)),
        ]
        credentials = self.credentials
        if credentials.token or credentials.password:
            user = credentials.username or "x-access-token"  # GitHub's and GitLab's name for a token
            secret = credentials.password or credentials.token
            basic = base64.b64encode(f"{user}:{secret}".encode()).decode()
            config.append(("http.extraHeader", f"Authorization: Basic {basic}"))
            # The header goes with every request: never to wherever a redirect points.
            config.append(("http.followRedirects", "false"))
        # ssh: a host that does not answer the connection, or stops answering keepalives.
        alive_interval = max(1, self.stall_seconds // 4)
        ssh_options = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                       "-o", f"ConnectTimeout={self.stall_seconds}",
                       "-o", f"ServerAliveInterval={alive_interval}", "-o", "ServerAliveCountMax=4"]
        if credentials.ssh_private_key:
            key = private / "id"
            key.write_text(credentials.ssh_private_key.rstrip("\n") + "\n")
            key.chmod(0o600)
            ssh_options += ["-i", str(key), "-o", "IdentitiesOnly=yes"]
        known_hosts = private / "known_hosts"
        known_hosts.write_text(credentials.known_hosts)
        ssh_options += ["-o", f"UserKnownHostsFile={known_hosts}"]
        env["GIT_SSH_COMMAND"] = " ".join(["ssh", *ssh_options])
        # GIT_CONFIG_COUNT passes settings through the environment: not visible in `ps`, unlike -c.
        env["GIT_CONFIG_COUNT"] = str(len(config))
        for index, (key, value) in enumerate(config):
            env[f"GIT_CONFIG_KEY_{index}"] = key
            env[f"GIT_CONFIG_VALUE_{index}"] = value
        return env

    def _git(self, args: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> str:
        command = [self.git_executable, "--git-dir", str(self.path), *args]
        process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, start_new_session=True)
        self._running = process
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill(process)
            raise MirrorError(f"git {args[0]} of {redact(self.url)} took longer than {timeout:g}s") from None
        finally:
            self._running = None
        if self._aborted:
            raise MirrorError(f"git {args[0]} of {redact(self.url)} was stopped")
        if process.returncode != 0:
            raise MirrorError(self._describe_failure(args[0], stderr))
        return stdout

    def abort(self) -> None:
        """Stop the git command running now, from another thread (the operator is stopping or
        the Repo went away): a fetch that hangs on a dead host must not hold up either."""
        self._aborted = True
        process = self._running
        if process is not None:
            self._kill(process)

    @staticmethod
    def _kill(process: subprocess.Popen) -> None:
        import signal

        try:
            os.killpg(process.pid, signal.SIGKILL)  # git and the ssh or https helper it started
        except ProcessLookupError:
            pass
        process.wait()

    def _describe_failure(self, verb: str, stderr: str) -> str:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        # git ends with the same advice whatever went wrong; what ssh or the server said before
        # it ("Host key verification failed.", "Permission denied (publickey).") is the news.
        useful = [line for line in lines if not line.startswith("hint:") and line not in _GIT_BOILERPLATE]
        detail = "; ".join(useful[-2:]) if useful else "no message from git"
        return redact(f"git {verb} of {self.url} failed: {detail}", self.credentials.secrets())
