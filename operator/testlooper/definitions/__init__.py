"""The test-definitions engine: TestLooper's in-repo file format, resolved to plain data.

Pure: it reads nothing but the text it is given, what `read_file` returns for includes, and
what a `Repositories` object returns for other repositories' commits.
"""

from .errors import DefinitionsError, DefinitionsWarning
from .pins import Repositories, RepositoryLookupError
from .resolver import (
    DEFINITIONS_FILE_NAMES,
    DEFINITIONS_FILE_SUFFIX,
    LOOPER_VERSION,
    SUPPORTED_VERSIONS,
    find_definitions_file,
    is_definitions_file,
    resolve_text,
)

__all__ = [
    "DEFINITIONS_FILE_NAMES",
    "DEFINITIONS_FILE_SUFFIX",
    "DefinitionsError",
    "DefinitionsWarning",
    "LOOPER_VERSION",
    "Repositories",
    "RepositoryLookupError",
    "SUPPORTED_VERSIONS",
    "find_definitions_file",
    "is_definitions_file",
    "resolve_text",
]
