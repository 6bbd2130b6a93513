"""The folders a local run writes: checked before anything runs, so that a folder the user
cannot write there is one line at the start, not a traceback (or lost results) half way."""

from __future__ import annotations

import os
import tempfile


def why_unwritable(directory: str) -> str | None:
    """Why no file can be written in `directory` (made if need be), or None if one can.

    A real write, not `os.access`: permission bits say nothing to root, and a read-only or
    full file system is found only by writing.
    """
    if os.path.exists(directory) and not os.path.isdir(directory):
        return "it is a file, not a folder"
    try:
        os.makedirs(directory, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=directory, prefix=".testlooper-probe-")
        os.close(handle)
        os.remove(probe)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
