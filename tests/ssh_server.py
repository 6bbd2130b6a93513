"""A real OpenSSH server for tests, on a free loopback port, serving git over ssh.

    with SshServer(tmp_path) as server:
        server.url("/srv/git/origin.git"), server.client_key, server.known_hosts_line

It logs in the current user (root in CI) with one generated key. Tests skip without `sshd`
(Debian's openssh-server, which scripts/bootstrap.sh installs) or when not run as root.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from redis_server import free_port

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)


class SshServer:
    def __init__(self, directory: Path):
        if SSHD is None:
            pytest.skip("sshd is not installed (Debian: openssh-server)")
        if os.geteuid() != 0:
            pytest.skip("the test sshd logs in as the current user, which needs root here")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.user = getpass.getuser()
        host_key = self.directory / "host_key"
        client_key = self.directory / "client_key"
        for key in (host_key, client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        self.client_key = client_key.read_text()
        (self.directory / "authorized_keys").write_text((self.directory / "client_key.pub").read_text())
        host_public = (self.directory / "host_key.pub").read_text().split()
        self.known_hosts_line = f"[127.0.0.1]:{self.port} {host_public[0]} {host_public[1]}\n"
        self.config = self.directory / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
            f"AuthorizedKeysFile {self.directory / 'authorized_keys'}", f"PidFile {self.directory / 'sshd.pid'}",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "PermitRootLogin prohibit-password", "StrictModes no", "LogLevel ERROR", "",
        ]))
        self.process: subprocess.Popen | None = None

    def url(self, path: str) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"

    def __enter__(self) -> "SshServer":
        os.makedirs("/run/sshd", exist_ok=True)  # its privilege-separation folder
        self.process = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)],
                                        stdout=subprocess.DEVNULL, stderr=open(self.directory / "sshd.log", "w"))
        deadline = time.monotonic() + 10
        import socket
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            if self.process.poll() is not None:
                raise AssertionError(f"sshd exited: {(self.directory / 'sshd.log').read_text()}")
            time.sleep(0.05)
        raise AssertionError("sshd did not listen within 10 s")

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
