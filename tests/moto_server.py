"""A real `moto_server` process (EC2, S3...) on a free loopback port, for the tests that point
boto3 at it with AWS_ENDPOINT_URL."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from redis_server import free_port

MOTO_SERVER = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")


def start_moto_server() -> tuple[subprocess.Popen, int]:
    """The process and its port, once it accepts connections (the test fails if it cannot)."""
    if not os.path.exists(MOTO_SERVER):
        pytest.fail("moto_server is missing: pip install 'moto[server]' (the test extras)")
    port = free_port()
    process = subprocess.Popen([MOTO_SERVER, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                pytest.fail("moto_server did not start")
            time.sleep(0.1)
