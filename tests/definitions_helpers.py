"""Shared helpers for the definitions tests: resolve YAML text given inline."""

from __future__ import annotations

import textwrap

import pytest

from testlooper.definitions import DefinitionsError, resolve_text

HEADER = """\
looper_version: 5
environments:
  linux:
    platform: linux
    image: {name: "debian:12"}
"""


def resolve(text: str, files: dict[str, str] | None = None, header: bool = True, filename: str = "testlooper.yml") -> dict:
    body = textwrap.dedent(text)
    full = HEADER + body if header else body
    read_file = None
    if files is not None:
        def read_file(path: str) -> str:
            if path not in files:
                raise OSError(f"no such file: {path}")
            return textwrap.dedent(files[path])
    return resolve_text(full, filename, read_file)


def resolve_error(text: str, files: dict[str, str] | None = None, header: bool = True) -> DefinitionsError:
    with pytest.raises(DefinitionsError) as info:
        resolve(text, files, header)
    return info.value
