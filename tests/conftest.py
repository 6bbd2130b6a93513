"""Fixtures shared by many test files."""

pytest_plugins = ["kube_fixtures"]  # the Kubernetes emulator: `kube`, `kube_emulator_process`

import pytest

from testlooper.cli.main import main


@pytest.fixture
def cli(capsys):
    """Run `testlooper ARGS` in-process: (exit status, stdout, stderr)."""

    def run(*args: str):
        status = main(list(args))
        captured = capsys.readouterr()
        return status, captured.out, captured.err

    return run
