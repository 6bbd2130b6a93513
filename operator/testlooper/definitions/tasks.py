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

    def parse(self, section: str, name: str, value, section_source) -> tuple[dict, dict]:
        """Returns (TASK without dependencies/hash, raw dependency references)."""
        kind = _KIND_OF_SECTION[section]
        path = (section, name)
        self.check_name(section, name, section_source)
        task = schema.need_mapping(value, path, f"{kind} {name!r}", section_source, name)
        schema.check_keys(task, schema.TASK_KEYS, path, f"a {kind}")
        if "runs" in task and kind != "test":
            raise error_at(f"'runs' applies to tests only, not to a {kind}", path + ("runs",), task, "runs")

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

        own_vars = schema.string_mapping(task.get("variables"), path + ("variables",), "'variables'", task, "variables")
        try:
            variables = resolve_overrides(env.resolved, own_vars, path + ("variables",))
        except DefinitionsError as exc:
            raise error_at(exc.message, path + ("variables",), task, "variables") from None

        resolved = {
            "name": name, "kind": kind, "environment": env_name, "platform": env.platform,
            "image": env.image, "variables": variables,
            "stages": self.stages(task, env.test_defaults, kind, variables, path),
            "setup_script": env.setup_script,
        }
        defaults = env.test_defaults
        for field_name, (default_key, integer, fallback) in _NUMERIC_FIELDS.items():
            if field_name in task:
                value_, where, holder = task[field_name], path + (field_name,), (task, field_name)
            elif default_key in defaults:
                value_, where, holder = defaults[default_key], ("environments", env_name, default_key), (None, None)
            else:
                resolved[_OUTPUT_NAMES.get(field_name, field_name)] = fallback
                continue
            if isinstance(value_, str):
                value_ = substitute_known(value_, variables)
            number = schema.need_number(value_, where, f"'{field_name}'", holder[0], holder[1], integer=integer)
            if field_name == "timeout" and number < 1:
                # Refused rather than read as "no timeout": a hung run would hold its machine
                # forever, and CI must end. A long task says so with a large number.
                raise error_at(f"'{field_name}' must be at least 1 second, not 0 (there is no \"no timeout\": "
                               "give a large number of seconds instead)", where, holder[0], holder[1])
            resolved[_OUTPUT_NAMES.get(field_name, field_name)] = number
        resolved["runs"] = self.bounded_count(task, "runs", variables, path, 1, MAX_RUNS, 1)
        resolved["max_log_mb"] = self.bounded_count(task, "max_log_mb", variables, path, 1, 1024 * 1024,
                                                    DEFAULT_MAX_LOG_MB)
        for label in ("project", "configuration"):
            raw = task.get(label, defaults.get(f"test_{label}", ""))
            text = schema.need_string(raw, path + (label,), f"'{label}'", task, label)
            resolved[label] = substitute_known(text, variables)

        references = dict(env.dependencies)
        own_refs = schema.string_mapping(task.get("dependencies"), path + ("dependencies",), "'dependencies'", task, "dependencies")
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

    def stages(self, task, defaults: dict, kind: str, variables: dict, path: tuple) -> list[dict]:
        if "command" in task and "stages" in task:
            raise error_at("give either 'command' or 'stages', not both", path + ("stages",), task, "stages")
        if "command" in task:
            command = schema.need_string(task["command"], path + ("command",), "'command'", task, "command")
            cleanup = schema.need_string(task.get("cleanup", ""), path + ("cleanup",), "'cleanup'", task, "cleanup")
            whole_output = {"name": "", "directory": "", "include_patterns": [], "exclude_patterns": [], "format": "Tar"}
            raw = [{"command": command, "cleanup": cleanup, "always_run": False, "order": 0,
                    "artifacts": [whole_output], "list_tests_command": "", "run_tests_command": ""}]
        else:
            if "cleanup" in task:
                raise error_at("'cleanup' goes with 'command'; with 'stages' give each stage its own",
                               path + ("cleanup",), task, "cleanup")
            if "stages" in task:
                written, where = task["stages"], path + ("stages",)
            elif "test_stages" in defaults:
                written, where = defaults["test_stages"], path + ("stages",)
            else:
                raise error_at(f"a {kind} needs a 'command' or 'stages' (or its environment's 'test_stages')", path, task)
            stage_list = schema.need_list(written, where, "'stages'", task, "stages")
            if not stage_list:
                raise error_at("'stages' must not be empty", where, task, "stages")
            raw = [self.stage(stage, where + (i,), task) for i, stage in enumerate(stage_list)]
            raw.sort(key=lambda s: s["order"])  # stable: equal orders keep their written order
        names = set()
        for stage in raw:
            for key in ("command", "cleanup", "list_tests_command", "run_tests_command"):
                stage[key] = substitute_known(stage[key], variables)
            for artifact in stage["artifacts"]:
                artifact["name"] = substitute_known(artifact["name"], variables)
                artifact["directory"] = substitute_known(artifact["directory"], variables)
                artifact["include_patterns"] = [substitute_known(p, variables) for p in artifact["include_patterns"]]
                artifact["exclude_patterns"] = [substitute_known(p, variables) for p in artifact["exclude_patterns"]]
                if artifact["name"] in names:
                    raise error_at(f"artifact name {artifact['name']!r} is used twice", path + ("stages",), task, "stages")
                names.add(artifact["name"])
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
