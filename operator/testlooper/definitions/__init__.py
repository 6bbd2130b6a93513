"""The test-definitions engine: TestLooper's in-repo file format, resolved to plain data.

Pure: it reads nothing but the text it is given (and, for `includes`, what `read_file` returns).
"""

from .errors import DefinitionsError
from .resolver import (
    DEFINITIONS_FILE_NAMES,
    DEFINITIONS_FILE_SUFFIX,
    LOOPER_VERSION,
    find_definitions_file,
    is_definitions_file,
    resolve_text,
)

__all__ = [
    "DEFINITIONS_FILE_NAMES",
    "DEFINITIONS_FILE_SUFFIX",
    "DefinitionsError",
    "LOOPER_VERSION",
    "find_definitions_file",
    "is_definitions_file",
    "resolve_text",
]
