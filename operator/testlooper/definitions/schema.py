"""Shape checks for the expanded document: known keys only, and the right type for each.

Every check names the key path and, through PDict/PList marks, the line it came from.
"""

from __future__ import annotations

from .macros import variable_value
from .yamlload import PDict, error_at

SUPPORTED_VERSIONS = (2, 3, 4, 5)
# Keys each version's files may use, as the original's last release of that version read them.
_COMMON_TOP_LEVEL_KEYS = ("looper_version", "repos", "includes", "environments", "builds", "tests", "deployments")
TOP_LEVEL_KEYS = {
    2: _COMMON_TOP_LEVEL_KEYS,
    3: _COMMON_TOP_LEVEL_KEYS,
    4: _COMMON_TOP_LEVEL_KEYS + ("prioritize",),
    5: _COMMON_TOP_LEVEL_KEYS + ("test_sets", "triggers"),
}
_COMMON_TEST_DEFAULT_KEYS = (
    "test_timeout", "test_min_cores", "test_max_cores", "test_min_ram_gb", "test_min_disk_gb",
    "test_max_retries", "test_retry_wait_seconds", "test_configuration", "test_project",
)
# Versions 2 and 3 prefixed each command with the environments' `test_preCommand`; version 4
# replaced that with `test_stages`.
TEST_DEFAULT_KEYS = {
    2: _COMMON_TEST_DEFAULT_KEYS + ("test_preCommand", "test_preCleanupCommand"),
    3: _COMMON_TEST_DEFAULT_KEYS + ("test_preCommand", "test_preCleanupCommand"),
    4: _COMMON_TEST_DEFAULT_KEYS + ("test_stages",),
    5: _COMMON_TEST_DEFAULT_KEYS + ("test_stages",),
}
_ENVIRONMENT_KEYS = ("variables", "dependencies", "setup_script_contents")
ROOT_ENVIRONMENT_KEYS = {v: ("platform", "image") + _ENVIRONMENT_KEYS + keys for v, keys in TEST_DEFAULT_KEYS.items()}
DERIVED_ENVIRONMENT_KEYS = {v: ("base",) + _ENVIRONMENT_KEYS + keys for v, keys in TEST_DEFAULT_KEYS.items()}
IMAGE_KEYS = ("name", "dockerfile", "dockerfile_contents", "base_ami", "setup_script_contents")
IMAGE_SOURCES = ("name", "dockerfile", "dockerfile_contents", "base_ami")
_COMMON_TASK_KEYS = (
    "command", "cleanup", "environment", "mixins", "dependencies", "variables", "timeout",
    "min_cores", "max_cores", "min_ram_gb", "max_retries", "retry_wait_seconds",
    "project", "configuration", "runs", "max_log_mb", "portExpose",
)
# `disabled` went away with version 5 (test sets and triggers took its place); `stages` and
# `min_disk_gb` came with version 4.
TASK_KEYS = {
    2: _COMMON_TASK_KEYS + ("disabled",),
    3: _COMMON_TASK_KEYS + ("disabled",),
    4: _COMMON_TASK_KEYS + ("stages", "min_disk_gb", "disabled"),
    5: _COMMON_TASK_KEYS + ("stages", "min_disk_gb"),
}
STAGE_KEYS = ("command", "cleanup", "always_run", "order", "artifacts", "list_tests_command", "run_tests_command")
ARTIFACT_KEYS = ("name", "directory", "include_patterns", "exclude_patterns", "format")
ARTIFACT_FORMATS = ("Tar", "Zip", "Files")
TRIGGER_KEYS = ("name", "paths", "test_sets")
REPO_PIN_KEYS = ("reference", "branch", "auto", "prioritize", "path")
REPO_IMPORT_KEYS = ("import", "path")
PLATFORMS = ("linux", "windows")


def check_keys(value, allowed, path, what: str) -> None:
    unknown = [k for k in value if k not in allowed]
    if unknown:
        names = ", ".join(repr(k) for k in unknown)
        raise error_at(
            f"unknown key{'s' if len(unknown) > 1 else ''} {names} in {what} (allowed: {', '.join(allowed)})",
            path + (unknown[0],), value, unknown[0],
        )


def need_mapping(value, path, what: str, parent=None, key=None) -> PDict:
    if not isinstance(value, dict):
        raise error_at(f"{what} must be a mapping, not {describe(value)}", path, parent if parent is not None else value, key)
    return value


def need_list(value, path, what: str, parent=None, key=None) -> list:
    if not isinstance(value, list):
        raise error_at(f"{what} must be a list, not {describe(value)}", path, parent if parent is not None else value, key)
    return value


def need_string(value, path, what: str, parent=None, key=None) -> str:
    value = variable_value(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(value, str):
        raise error_at(f"{what} must be a string, not {describe(value)}", path, parent, key)
    return value


def need_number(value, path, what: str, parent=None, key=None, integer: bool = True):
    """Numbers may arrive as strings after macro substitution (`timeout: ${T}`)."""
    if isinstance(value, str):
        try:
            value = int(value) if integer else float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "a whole number" if integer else "a number"
        raise error_at(f"{what} must be {kind}, not {describe(value)}", path, parent, key)
    if value < 0:
        raise error_at(f"{what} must not be negative", path, parent, key)
    if not integer and float(value).is_integer():
        return int(value)
    return value


def need_bool(value, path, what: str, parent=None, key=None) -> bool:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise error_at(f"{what} must be true or false, not {describe(value)}", path, parent, key)
    return value


def string_list(value, path, what: str, parent=None, key=None) -> list[str]:
    """A string or a list of strings, as lists of one are often written bare."""
    if isinstance(value, str):
        return [value]
    items = need_list(value, path, what, parent, key)
    return [need_string(item, path + (i,), f"{what} item", parent, key) for i, item in enumerate(items)]


def string_mapping(value, path, what: str, parent=None, key=None) -> dict[str, str]:
    """Variables: a mapping of names to strings (plain scalars become strings)."""
    if value is None:
        return {}
    mapping = need_mapping(value, path, what, parent, key)
    result = {}
    for name, item in mapping.items():
        if type(item) is not str:
            item = variable_value(item)
        if not isinstance(item, str):
            raise error_at(f"variable {name!r} must be a string, not {describe(item)}", path + (name,), mapping, name)
        result[name] = item
    return result


def describe(value) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"the {type(value).__name__} {value!r}"
