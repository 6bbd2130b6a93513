"""Folders that truly cannot be written, and a disk that truly fills up, for fault tests.

Root ignores permission bits, so as root a read-only folder is a read-only bind mount of it,
and a small disk is a tmpfs of that size; without root, permission bits make a folder
read-only, and a small disk cannot be made (the test is skipped, saying why).
"""

from __future__ import annotations

import os
import stat
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextmanager
def read_only(folder: Path):
    """`folder` and everything in it cannot be written while the block runs."""
    if os.geteuid() == 0:
        _mount("--bind", str(folder), str(folder))
        try:
            _mount("-o", "remount,ro,bind", str(folder))
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
        return
    modes = {path: path.stat().st_mode for path in [folder, *folder.rglob("*")]}
    for path, mode in modes.items():
        path.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        yield
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


@contextmanager
def small_disk(folder: Path, size: str):
    """`folder` is a file system of `size` bytes (tmpfs syntax: 1m) while the block runs."""
    if os.geteuid() != 0:
        pytest.skip("a small file system (tmpfs) can be mounted only as root")
    folder.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder))
    try:
        yield
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)
