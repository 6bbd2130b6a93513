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


# moto cannot be told when an instance was launched, and the operator waits out a launch grace
# before it takes an instance for an orphan: this runs moto_server with its instances' clock
# set back by the seconds written in a file (read at each launch; none or empty: no shift).
_LAUNCH_CLOCK_SERVER = """\
import datetime, sys
import moto.ec2.models.instances as instances
from moto.server import main
clock_file, real_utcnow = sys.argv.pop(1), instances.utcnow
def shifted_utcnow():
    try:
        with open(clock_file) as clock:
            offset = float(clock.read().strip() or 0)
    except OSError:
        offset = 0.0
    return real_utcnow() - datetime.timedelta(seconds=offset)
instances.utcnow = shifted_utcnow
main(sys.argv[1:])
"""


def start_moto_server(launch_clock_file=None) -> tuple[subprocess.Popen, int]:
    """The process and its port, once it accepts connections (the test fails if it cannot).
    ``launch_clock_file``: a file whose number of seconds, when written, sets the LaunchTime of
    the instances launched then that far back (an instance that looks launched long ago)."""
    if not os.path.exists(MOTO_SERVER):
        pytest.fail("moto_server is missing: pip install 'moto[server]' (the test extras)")
    port = free_port()
    command = [MOTO_SERVER] if launch_clock_file is None else [sys.executable, "-c", _LAUNCH_CLOCK_SERVER,
                                                               str(launch_clock_file)]
    process = subprocess.Popen(command + ["-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
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


@pytest.fixture(scope="module")
def moto_port():
    """One moto_server for a test module (each test resets its state: `point_boto3_at`)."""
    process, port = start_moto_server()
    yield port
    process.kill()
    process.wait()


def point_boto3_at(monkeypatch, port: int) -> None:
    """boto3 in this process, and the processes it starts, reaches moto_server on `port` with
    test keys; the emulator's state is reset, so every test starts from nothing."""
    import urllib.request

    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}.items():
        monkeypatch.setenv(name, value)
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
