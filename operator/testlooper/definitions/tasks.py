"""Builds, tests and deployments: defaults, stages, variables, dependency references."""

from __future__ import annotations

from . import schema
from .environments import EnvironmentResolver
from .errors import DefinitionsError
from .variables import resolve_overrides, substitute_known
from .yamlload import error_at

RESERVED_NAMES = ("data", "source", "HEAD")
DEFAULT_TIMEOUT_SECONDS = 3600
# More runs than this in one command is a typing mistake, not a measurement (and it would only
# fill the history); the planner caps the sum over a command's tasks the same way.
MAX_RUNS = 100_000
# A run's log is cut past this (its head and tail kept) and the run fails: a runaway test can
# write hundreds of megabytes a second. `max_log_mb` changes it per task.
DEFAULT_MAX_LOG_MB = 1024

# task field -> (environment default key, integer?, default)
_NUMERIC_FIELDS = {
    "timeout": ("test_timeout", True, DEFAULT_TIMEOUT_SECONDS),
    "min_cores": ("test_min_cores", True, 0),
    "max_cores": ("test_max_cores", True, 0),
    "min_ram_gb": ("test_min_ram_gb", False, 0),
    "min_disk_gb": ("test_min_disk_gb", False, 0),
    "max_retries": ("test_max_retries", True, 0),
    "retry_wait_seconds": ("test_retry_wait_seconds", True, 0),
}
_OUTPUT_NAMES = {"timeout": "timeout_seconds"}
_KIND_OF_SECTION = {"builds": "build", "tests": "test", "deployments": "deployment"}


# The stage a task's own `command` makes sorts after all others, as in the original.
COMMAND_STAGE_ORDER = 1_000_000_000
# Artifact directories are relative to the task's output directory; old files wrote them as
# `${TEST_BUILD_OUTPUT_DIR}/x` (or `${TEST_OUTPUT_DIR}`), which means the same.
_OUTPUT_DIRECTORY_PREFIXES = ("${TEST_BUILD_OUTPUT_DIR}", "${TEST_OUTPUT_DIR}", "$TEST_BUILD_OUTPUT_DIR", "$TEST_OUTPUT_DIR")


def relative_to_output(directory: str) -> str:
    for prefix in _OUTPUT_DIRECTORY_PREFIXES:
        if directory == prefix:
            return ""
        if directory.startswith(prefix + "/"):
            return directory[len(prefix) + 1:].strip("/")
    return directory


class TaskParser:
    """Turns one written task into the resolved TASK dict (without dependencies and hash)."""

    def __init__(self, environments: EnvironmentResolver, repos: set[str]):
        self.environments = environments
        self.repos = repos

    def check_name(self, section: str, name: str, source) -> None:
        path = (section, name)
        segments = name.split("/")
        if not name or any(not s for s in segments):
            raise error_at(f"task name {name!r} has an empty path segment", path, source, name)
        first = segments[0]
        if first in RESERVED_NAMES:
            raise error_at(f"task name {name!r} starts with the reserved name {first!r} "
                           f"(reserved: {', '.join(RESERVED_NAMES)})", path, source, name)
        if first in self.repos:
            raise error_at(f"task name {name!r} starts with {first!r}, which is the name of a repo under 'repos'",
                           path, source, name)

    def parse(self, section: str, name: str, value, section_source, version: int = 5) -> tuple[dict, dict]:
        """Returns (TASK without dependencies/hash, raw dependency references)."""
        kind = _KIND_OF_SECTION[section]
        path = (section, name)
        self.check_name(section, name, section_source)
        task = schema.need_mapping(value, path, f"{kind} {name!r}", section_source, name)
        schema.check_keys(task, schema.TASK_KEYS[version], path, f"a {kind} of looper_version {version}")
        if "runs" in task and kind != "test":
            raise error_at(f"'runs' applies to tests only, not to a {kind}", path + ("runs",), task, "runs")
        if "portExpose" in task and kind != "deployment":
            raise error_at(f"'portExpose' applies to deployments only, not to a {kind}", path + ("portExpose",),
                           task, "portExpose")

        env_name = schema.need_string(task.get("environment", name.rsplit("/", 1)[-1]),
                                      path + ("environment",), "'environment'", task, "environment")
        self.environments.check_known(env_name, path + ("environment",), task,
                                      "environment" if "environment" in task else None,
                                      "environment" if "environment" in task
                                      else f"environment (the last segment of the name {name!r})")
        mixins = tuple(schema.string_list(task.get("mixins", []), path + ("mixins",), "'mixins'", task, "mixins"))
        for mixin in mixins:
            self.environments.check_known(mixin, path + ("mixins",), task, "mixins", "mixin")
        env = self.environments.effective(env_name, mixins)
        if env.root is None:
            raise error_at(f"environment {env_name!r} has no root environment (one with 'platform' and 'image') "
                           "among its bases; it can only be a mixin or a base", path + ("environment",), task,
                           "environment" if "environment" in task else None)

        own_vars = schema.string_mapping(task.get("variables"), path + ("variables",), "'variables'", task, "variables")
        try:
            variables = resolve_overrides(env.resolved, own_vars, path + ("variables",))
        except DefinitionsError as exc:
            raise error_at(exc.message, path + ("variables",), task, "variables") from None

        resolved = {
            "name": name, "kind": kind, "environment": env_name, "platform": env.platform,
            "image": env.image, "variables": variables,
            "stages": self.stages(task, env, kind, variables, path),
            "setup_script": env.setup_script,
        }
        defaults = env.test_defaults
        for field_name, (default_key, integer, fallback) in _NUMERIC_FIELDS.items():
            candidates = []
            if field_name in task:
                candidates.append((task[field_name], path + (field_name,), (task, field_name)))
            if default_key in defaults:
                candidates.append((defaults[default_key], ("environments", env_name, default_key), (None, None)))
            number = fallback
            for value_, where, holder in candidates:
                if isinstance(value_, str):
                    value_ = substitute_known(value_, variables)
                number = schema.need_number(value_, where, f"'{field_name}'", holder[0], holder[1], integer=integer)
                if field_name == "timeout" and number == 0:
                    # As the original read it: 0 is "not set", so the environment's test_timeout
                    # (or the default) applies, and that is what is shown. Never "no timeout".
                    number = fallback
                    continue
                break
            resolved[_OUTPUT_NAMES.get(field_name, field_name)] = number
        resolved["runs"] = self.bounded_count(task, "runs", variables, path, 1, MAX_RUNS, 1)
        resolved["max_log_mb"] = self.bounded_count(task, "max_log_mb", variables, path, 1, 1024 * 1024,
                                                    DEFAULT_MAX_LOG_MB)
        # As the original: the environment's name (not its mixins'), and the name's first segment.
        label_defaults = {"configuration": env_name, "project": name.split("/", 1)[0]}
        for label in ("project", "configuration"):
            raw = task.get(label) or defaults.get(f"test_{label}") or label_defaults[label]
            text = schema.need_string(raw, path + (label,), f"'{label}'", task, label)
            resolved[label] = substitute_known(text, variables)
        # Version 2 ran every command in the source checkout; from 3 on, in $TEST_INPUTS.
        resolved["working_directory"] = "source" if version == 2 else "inputs"
        resolved["disabled"] = schema.need_bool(task.get("disabled", False), path + ("disabled",), "'disabled'",
                                                task, "disabled")
        if kind == "deployment":
            ports = schema.need_mapping(task.get("portExpose", {}), path + ("portExpose",), "'portExpose'",
                                        task, "portExpose")
            resolved["port_expose"] = {
                port_name: schema.need_number(port, path + ("portExpose", port_name), f"port {port_name!r}",
                                              ports, port_name)
                for port_name, port in ports.items()}

        references = dict(env.dependencies)
        own_refs = schema.string_mapping(task.get("dependencies"), path + ("dependencies",), "'dependencies'", task, "dependencies")
        if version == 2 and "src" not in own_refs and "src" not in references:
            references["src"] = "HEAD"  # version 2 gave every task its commit's source; 3 dropped that
        references.update(own_refs)
        return resolved, {"references": references, "source": task, "own": set(own_refs)}

    @staticmethod
    def bounded_count(task, key: str, variables: dict, path: tuple, lowest: int, highest: int, default: int) -> int:
        """A whole number from `lowest` to `highest`; every wrong value gets the one message
        naming both the type and the bounds (a boolean or 1.5 is not a count)."""
        if key not in task:
            return default
        value = task[key]
        if isinstance(value, str):
            value = substitute_known(value, variables)
            value = int(value) if value.strip().lstrip("+-").isdigit() else value
        if isinstance(value, bool) or not isinstance(value, int) or not lowest <= value <= highest:
            shown = value if isinstance(value, int) and not isinstance(value, bool) else schema.describe(value)
            raise error_at(f"'{key}' must be a whole number from {lowest} to {highest}, not {shown}",
                           path + (key,), task, key)
        return value

    def stages(self, task, env, kind: str, variables: dict, path: tuple) -> list[dict]:
        """The environments' `test_stages` (root first), then the task's own `stages`, then its
        `command` as one more stage; sorted by `order`, ties keeping that order."""
        raw = [self.stage(stage, where, holder) for stage, holder, where in env.test_stages]
        if "stages" in task:
            where = path + ("stages",)
            stage_list = schema.need_list(task["stages"], where, "'stages'", task, "stages")
            raw.extend(self.stage(stage, where + (i,), task) for i, stage in enumerate(stage_list))
        if "command" in task or "cleanup" in task:
            command = schema.need_string(task.get("command", ""), path + ("command",), "'command'", task, "command")
            cleanup = schema.need_string(task.get("cleanup", ""), path + ("cleanup",), "'cleanup'", task, "cleanup")
            if env.pre_command:  # versions 2 and 3
                command = env.pre_command + "\n" + command
            if env.pre_cleanup:
                cleanup = env.pre_cleanup + "\n" + cleanup
            whole_output = {"name": "", "directory": "", "include_patterns": [], "exclude_patterns": [], "format": "Tar"}
            raw.append({"command": command, "cleanup": cleanup, "always_run": False, "order": COMMAND_STAGE_ORDER,
                        "artifacts": [whole_output], "list_tests_command": "", "run_tests_command": ""})
        raw.sort(key=lambda s: s["order"])  # stable: equal orders keep their written order
        names = []
        for stage in raw:
            for key in ("command", "cleanup", "list_tests_command", "run_tests_command"):
                stage[key] = substitute_known(stage[key], variables)
            for artifact in stage["artifacts"]:
                artifact["name"] = substitute_known(artifact["name"], variables)
                artifact["directory"] = relative_to_output(substitute_known(artifact["directory"], variables))
                artifact["include_patterns"] = [substitute_known(p, variables) for p in artifact["include_patterns"]]
                artifact["exclude_patterns"] = [substitute_known(p, variables) for p in artifact["exclude_patterns"]]
                if artifact["name"] in names:
                    what = (f"artifact {artifact['name']!r}" if artifact["name"]
                            else "the unnamed artifact (the whole output, which 'command' also makes)")
                    raise error_at(f"{what} is defined twice", path, task)
                names.append(artifact["name"])
        if "" in names and len(names) > 1:
            others = ", ".join(n for n in names if n)
            raise error_at("the unnamed artifact (the whole output, which 'command' makes) must be the task's only "
                           f"artifact, but it also has: {others}", path, task)
        return raw

    def stage(self, value, path: tuple, task) -> dict:
        stage = schema.need_mapping(value, path, "a stage", task, "stages")
        schema.check_keys(stage, schema.STAGE_KEYS, path, "a stage")
        text = {}
        for key in ("command", "cleanup", "list_tests_command", "run_tests_command"):
            text[key] = schema.need_string(stage.get(key, ""), path + (key,), f"'{key}'", stage, key)
        if text["list_tests_command"] and not text["run_tests_command"]:
            raise error_at("'list_tests_command' needs a 'run_tests_command'", path, stage)
        if not text["command"] and not text["run_tests_command"]:
            raise error_at("a stage needs a 'command' (or 'run_tests_command')", path, stage)
        if text["command"] and text["run_tests_command"]:
            raise error_at("a stage gives either 'command' or 'run_tests_command', not both", path, stage)
        artifacts = schema.need_list(stage.get("artifacts", []), path + ("artifacts",), "'artifacts'", stage, "artifacts")
        return {
            "command": text["command"] or text["run_tests_command"],
            "cleanup": text["cleanup"],
            "always_run": schema.need_bool(stage.get("always_run", False), path + ("always_run",), "'always_run'", stage, "always_run"),
            "order": schema.need_number(stage.get("order", 0), path + ("order",), "'order'", stage, "order", integer=False),
            "artifacts": [self.artifact(a, path + ("artifacts", i), stage) for i, a in enumerate(artifacts)],
            "list_tests_command": text["list_tests_command"],
            "run_tests_command": text["run_tests_command"],
        }

    @staticmethod
    def artifact(value, path: tuple, stage) -> dict:
        artifact = schema.need_mapping(value, path, "an artifact", stage, "artifacts")
        schema.check_keys(artifact, schema.ARTIFACT_KEYS, path, "an artifact")
        fmt = schema.need_string(artifact.get("format", "Tar"), path + ("format",), "'format'", artifact, "format")
        if fmt not in schema.ARTIFACT_FORMATS:
            raise error_at(f"format {fmt!r} is not one of: {', '.join(schema.ARTIFACT_FORMATS)}",
                           path + ("format",), artifact, "format")
        return {
            "name": schema.need_string(artifact.get("name", ""), path + ("name",), "'name'", artifact, "name"),
            "directory": schema.need_string(artifact.get("directory", ""), path + ("directory",), "'directory'", artifact, "directory"),
            "include_patterns": schema.string_list(artifact.get("include_patterns", []), path + ("include_patterns",),
                                                   "'include_patterns'", artifact, "include_patterns"),
            "exclude_patterns": schema.string_list(artifact.get("exclude_patterns", []), path + ("exclude_patterns",),
                                                   "'exclude_patterns'", artifact, "exclude_patterns"),
            "format": fmt,
        }
