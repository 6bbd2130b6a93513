"""Environments: root and derived ones, ordered inheritance, mixins, setup scripts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from . import schema
from .variables import ResolvedVariables, resolve_variables
from .yamlload import error_at


@dataclass
class Environment:
    """One environment as written (after macros), checked; or another repository's environment,
    already resolved there, standing in as a base (`foreign`)."""

    name: str
    bases: list[str]  # empty for a root environment and for `base: []`
    platform: str | None  # None: not a root (derived, or a mixin written `base: []`)
    image: dict | None
    variables: dict[str, str]
    # input key -> reference text, or (for another repository's environment) the resolved dict
    dependencies: dict[str, object]
    setup_script: str  # a root's: its image's and its own; otherwise its own part
    test_defaults: dict  # test_* keys as written, but for the stage-building ones below
    test_stages: list[tuple] = field(default_factory=list)  # (stage as written, its mapping, key path)
    pre_command: str = ""  # versions 2 and 3: test_preCommand
    pre_cleanup: str = ""  # versions 2 and 3: test_preCleanupCommand
    source: object = field(repr=False, default=None)  # the PDict, for error positions
    foreign: bool = False

    @property
    def is_root(self) -> bool:
        return self.platform is not None


@dataclass
class EffectiveEnvironment:
    """An environment with its inheritance applied."""

    name: str
    platform: str  # "" for an environment without a root (a mixin)
    image: dict
    inheritance: list[str]
    variables: dict[str, str]  # merged, as written
    resolved: ResolvedVariables
    dependencies: dict[str, object]
    setup_script: str
    test_defaults: dict
    test_stages: list[tuple]
    pre_command: str
    pre_cleanup: str
    root: str | None


def parse_environment(name: str, value, path: tuple, version: int = 5) -> Environment:
    env = schema.need_mapping(value, path, f"environment {name!r}")
    derived = "base" in env
    allowed = (schema.DERIVED_ENVIRONMENT_KEYS if derived else schema.ROOT_ENVIRONMENT_KEYS)[version]
    kind = "a derived environment (one with 'base')" if derived else "a root environment"
    schema.check_keys(env, allowed, path, f"{kind} of looper_version {version}")
    platform = image = None
    if derived:
        # `base: []` is an environment with no base at all: a mixin, adding variables and defaults.
        bases = schema.string_list(env["base"], path + ("base",), "'base'", env, "base")
    else:
        bases = []
        platform = schema.need_string(env.get("platform"), path + ("platform",), "'platform'", env, "platform")
        if platform not in schema.PLATFORMS:
            raise error_at(f"platform {platform!r} is not one of: {', '.join(schema.PLATFORMS)}",
                           path + ("platform",), env, "platform")
        image = parse_image(env.get("image"), path + ("image",), env)
    setup = env.get("setup_script_contents", "")
    setup = schema.need_string(setup, path + ("setup_script_contents",), "'setup_script_contents'", env, "setup_script_contents")
    if image and image.get("setup_script_contents"):
        setup = "\n".join(s for s in (image["setup_script_contents"], setup) if s)
    dependencies = schema.string_mapping(env.get("dependencies"), path + ("dependencies",), "'dependencies'", env, "dependencies")
    stages = []
    if "test_stages" in env:
        written = schema.need_list(env["test_stages"], path + ("test_stages",), "'test_stages'", env, "test_stages")
        stages = [(stage, env, path + ("test_stages", i)) for i, stage in enumerate(written)]
    pre = {key: schema.need_string(env.get(key, ""), path + (key,), f"'{key}'", env, key)
           for key in ("test_preCommand", "test_preCleanupCommand")}
    stage_keys = ("test_stages", "test_preCommand", "test_preCleanupCommand")
    return Environment(
        name=name, bases=bases, platform=platform, image=image,
        variables=schema.string_mapping(env.get("variables"), path + ("variables",), "'variables'", env, "variables"),
        dependencies=dependencies, setup_script=setup,
        test_defaults={k: env[k] for k in schema.TEST_DEFAULT_KEYS[version] if k in env and k not in stage_keys},
        test_stages=stages, pre_command=pre["test_preCommand"], pre_cleanup=pre["test_preCleanupCommand"],
        source=env,
    )


def parse_image(value, path: tuple, parent) -> dict:
    if value is None:
        raise error_at("a root environment needs an 'image'", path, parent, None)
    image = schema.need_mapping(value, path, "'image'", parent, "image")
    schema.check_keys(image, schema.IMAGE_KEYS, path, "an image")
    sources = [k for k in schema.IMAGE_SOURCES if k in image]
    if len(sources) != 1:
        raise error_at(
            "an image needs exactly one of: " + ", ".join(schema.IMAGE_SOURCES)
            + (f" (found {', '.join(sources)})" if sources else ""), path, parent, "image")
    result = {}
    for key, item in image.items():
        result[key] = schema.need_string(item, path + (key,), f"'{key}'", image, key)
    return result


def merge_lineages(lineages: list[list[str]], bases: list[str]) -> list[str]:
    """The ancestors of an environment whose bases (later first) are `bases` with these
    `lineages`, each once, every environment before its own ancestors.

    As the original did, this is C3's merge over the lineages followed by each base on its own,
    so the order the bases are written in is a preference, not a constraint. A hierarchy that
    still cannot be ordered resolves too: each environment then keeps its last place in the
    walk, so shared ancestors come last.
    """
    sequences = [list(lineage) for lineage in lineages] + [[base] for base in bases]
    merged: list[str] = []
    while True:
        sequences = [sequence for sequence in sequences if sequence]
        if not sequences:
            return merged
        for sequence in sequences:
            if not any(sequence[0] in other[1:] for other in sequences):
                head = sequence[0]
                break
        else:
            return _keep_last_places(lineages)
        merged.append(head)
        for sequence in sequences:
            if sequence[0] == head:
                del sequence[0]


def _keep_last_places(lineages: list[list[str]]) -> list[str]:
    seen: set[str] = set()
    result = []
    for item in reversed([item for lineage in lineages for item in lineage]):
        if item not in seen:
            seen.add(item)
            result.append(item)
    result.reverse()
    return result


# Resolves `pin/env` (another repository's environment) to a stand-in Environment; None when
# the first segment names no pin.
ForeignEnvironments = Callable[[str, tuple, object, object], "Environment | None"]


class EnvironmentResolver:
    """Applies inheritance, caching each environment's effective form."""

    def __init__(self, environments: dict[str, Environment], repos: set[str],
                 foreign: ForeignEnvironments | None = None):
        self.environments = environments
        self.local_names = list(environments)
        self.repos = repos
        self.foreign = foreign
        self.linearized: dict[str, list[str]] = {}
        self.effective_cache: dict[tuple, EffectiveEnvironment] = {}

    def linearize(self, name: str, chain: tuple = ()) -> list[str]:
        """[name] + ancestors, nearest first, later bases first, each once (see merge_lineages)."""
        if name in self.linearized:
            return self.linearized[name]
        if name in chain:
            cycle = list(chain[chain.index(name):]) + [name]
            env = self.environments[chain[-1]]
            raise error_at(f"environments inherit in a cycle: {' -> '.join(cycle)}",
                           ("environments", chain[-1], "base"), env.source, "base")
        env = self.environments[name]
        for base in env.bases:
            self.check_known(base, ("environments", name, "base"), env.source, "base", "base environment")
        later_first = list(reversed(env.bases))
        result = [name] + merge_lineages([self.linearize(b, chain + (name,)) for b in later_first], later_first)
        self.linearized[name] = result
        return result

    def check_known(self, name: str, path, source, key, what: str) -> None:
        if name in self.environments:
            return
        if "/" in name and name.split("/", 1)[0] in self.repos and self.foreign is not None:
            stand_in = self.foreign(name, path, source, key)
            if stand_in is not None:
                self.environments[name] = stand_in
                return
        known = ", ".join(sorted(self.local_names)) or "none defined"
        raise error_at(f"{what} {name!r} is not defined (environments: {known})", path, source, key)

    def effective(self, name: str, mixins: tuple = ()) -> EffectiveEnvironment:
        """The environment `name` with `mixins` merged on top, in order (later wins).

        A task with mixins behaves like a derived environment with `base: [name, *mixins]`,
        except that the platform and image come from `name`'s root when it has one;
        `inheritance` then lists everything merged, nearest first.
        """
        key = (name,) + mixins
        if key in self.effective_cache:
            return self.effective_cache[key]
        own = self.linearize(name)
        if mixins:
            later_first = list(reversed((name,) + mixins))
            lineage = merge_lineages([self.linearize(member) for member in later_first], later_first)
        else:
            lineage = own
        envs = self.environments
        root = next((n for n in own if envs[n].is_root), None) or next((n for n in lineage if envs[n].is_root), None)
        if root is not None:
            root_env = envs[root]
            for member in lineage:
                env = envs[member]
                if env.is_root and env.platform != root_env.platform:
                    raise error_at(
                        f"environment {name!r} mixes platforms: {root!r} is {root_env.platform}, "
                        f"{member!r} is {env.platform}", ("environments", name), envs[name].source)
        variables: dict[str, str] = {}
        dependencies: dict[str, object] = {}
        defaults: dict = {}
        stages: list[tuple] = []
        for member in reversed(lineage):  # root first, so nearer environments overwrite
            env = envs[member]
            variables.update(env.variables)
            dependencies.update(env.dependencies)
            defaults.update(env.test_defaults)
            stages.extend(env.test_stages)  # the root's first, then each nearer environment's
        # The root's setup (its image's and its own), then each other environment's, root first.
        extras = [envs[m].setup_script for m in reversed(lineage) if not envs[m].is_root and envs[m].setup_script]
        base = envs[root].setup_script if root is not None else ""
        setup = base + "\n" + "\n".join(extras) if extras else base
        result = EffectiveEnvironment(
            name=name, platform=envs[root].platform if root else "", image=dict(envs[root].image) if root else {},
            inheritance=lineage[1:] if not mixins else lineage,
            variables=variables, resolved=resolve_variables(variables, ("environments", name, "variables")),
            dependencies=dependencies, setup_script=setup, test_defaults=defaults, test_stages=stages,
            pre_command="\n".join(envs[m].pre_command for m in reversed(lineage) if envs[m].pre_command),
            pre_cleanup="\n".join(envs[m].pre_cleanup for m in reversed(lineage) if envs[m].pre_cleanup),
            root=root,
        )
        self.effective_cache[key] = result
        return result

    def to_json(self) -> dict:
        result = {}
        for name in self.local_names:
            eff = self.effective(name)
            result[name] = {
                "platform": eff.platform, "image": eff.image,
                "variables": eff.resolved.values,
                "inheritance": eff.inheritance, "setup_script": eff.setup_script,
            }
        return result
