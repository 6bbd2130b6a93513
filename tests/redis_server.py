"""Start and stop Debian's `redis-server` for tests and benches, on a free 127.0.0.1 port.

    with RedisServer() as server:
        store = open_store(server.url)

`persistent=True` keeps an append-only file in the server's directory, so that after `kill()`
(SIGKILL: the server dies as in a crash) `start()` brings the data back, as a production
Redis with persistence would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

START_TIMEOUT_SECONDS = 10


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _running(pid: int) -> bool:
    """Whether the process exists and is not a zombie: the daemonized server is not our child,
    and a container's init may be slow to reap it."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class RedisServer:
    def __init__(self, persistent: bool = False, port: int | None = None):
        self.persistent = persistent
        self.port = port or free_port()  # a given port: a server that comes up where a client waits
        self.directory = tempfile.mkdtemp(prefix="testlooper-redis-")
        self.pidfile = os.path.join(self.directory, "redis.pid")
        self.logfile = os.path.join(self.directory, "redis.log")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed (apt-get install -y redis-server)")
        persistence = (["--appendonly", "yes", "--appendfsync", "always"] if self.persistent
                       else ["--appendonly", "no"])
        subprocess.run(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persistence, "--dir", self.directory, "--daemonize", "yes",
             "--pidfile", self.pidfile, "--logfile", self.logfile],
            check=True)
        self._wait_for_ping()
        return self

    def _wait_for_ping(self) -> None:
        # No retries inside ping(): this loop is the retry, bounded by its deadline.
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1,
                             retry=Retry(NoBackoff(), 0))
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    # BusyLoadingError (replaying the append-only file) is a ConnectionError.
                    if time.monotonic() > deadline:
                        with open(self.logfile) as log:
                            raise RuntimeError(f"redis-server on port {self.port} did not "
                                               f"answer; its log ends:\n{log.read()[-2000:]}")
                    time.sleep(0.02)
        finally:
            client.close()

    def _pid(self) -> int | None:
        try:
            with open(self.pidfile) as file:
                return int(file.read())
        except (FileNotFoundError, ValueError):
            return None

    def kill(self) -> None:
        """Kill the server at once (SIGKILL) and wait until it is gone."""
        self._signal_and_wait(signal.SIGKILL)

    def stop(self) -> None:
        self._signal_and_wait(signal.SIGTERM)

    def _signal_and_wait(self, signum: int) -> None:
        pid = self._pid()
        if pid is None:
            return
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while _running(pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server {pid} did not stop")
            time.sleep(0.01)
        # A killed server leaves its pidfile behind; a second stop must not signal a stranger.
        if os.path.exists(self.pidfile):
            os.remove(self.pidfile)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)
