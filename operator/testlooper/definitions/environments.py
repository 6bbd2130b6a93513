"""Environments: root and derived ones, ordered inheritance, mixins, setup scripts."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import schema
from .variables import ResolvedVariables, resolve_variables
from .yamlload import error_at


@dataclass
class Environment:
    """One environment as written (after macros), checked."""

    name: str
    bases: list[str]  # empty for a root environment
    platform: str | None
    image: dict | None
    variables: dict[str, str]
    dependencies: dict[str, str]  # input key -> reference text
    setup_script: str  # this environment's own part
    test_defaults: dict  # test_* keys as written (checked later, per task)
    source: object = field(repr=False, default=None)  # the PDict, for error positions


@dataclass
class EffectiveEnvironment:
    """An environment with its inheritance applied."""

    name: str
    platform: str
    image: dict
    inheritance: list[str]
    variables: dict[str, str]  # merged, as written
    resolved: ResolvedVariables
    dependencies: dict[str, str]
    setup_script: str
    test_defaults: dict
    root: str


def parse_environment(name: str, value, path: tuple) -> Environment:
    env = schema.need_mapping(value, path, f"environment {name!r}")
    derived = "base" in env
    allowed = schema.DERIVED_ENVIRONMENT_KEYS if derived else schema.ROOT_ENVIRONMENT_KEYS
    kind = "a derived environment (one with 'base')" if derived else "a root environment"
    schema.check_keys(env, allowed, path, kind)
    platform = image = None
    if derived:
        bases = schema.string_list(env["base"], path + ("base",), "'base'", env, "base")
        if not bases:
            raise error_at("'base' must name at least one environment", path + ("base",), env, "base")
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
    return Environment(
        name=name, bases=bases, platform=platform, image=image,
        variables=schema.string_mapping(env.get("variables"), path + ("variables",), "'variables'", env, "variables"),
        dependencies=dependencies, setup_script=setup,
        test_defaults={k: env[k] for k in schema.TEST_DEFAULT_KEYS if k in env}, source=env,
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
    """C3's merge: the ancestors of an environment whose bases (in precedence order) are
    `bases` with these `lineages`, each once, every environment before its own ancestors.

    A hierarchy C3 cannot order (Python would refuse such a class) still resolves: each
    environment then keeps its last place in the walk, so shared ancestors come last.
    """
    sequences = [list(lineage) for lineage in lineages] + [list(bases)]
    merged: list[str] = []
    while any(sequences):
        for sequence in sequences:
            if sequence and not any(sequence[0] in other[1:] for other in sequences):
                head = sequence[0]
                break
        else:
            return _keep_last_places(lineages)
        merged.append(head)
        for sequence in sequences:
            if sequence and sequence[0] == head:
                del sequence[0]
    return merged


def _keep_last_places(lineages: list[list[str]]) -> list[str]:
    seen: set[str] = set()
    result = []
    for item in reversed([item for lineage in lineages for item in lineage]):
        if item not in seen:
            seen.add(item)
            result.append(item)
    result.reverse()
    return result


class EnvironmentResolver:
    """Applies inheritance, caching each environment's effective form."""

    def __init__(self, environments: dict[str, Environment], repos: set[str]):
        self.environments = environments
        self.repos = repos
        self.linearized: dict[str, list[str]] = {}
        self.effective_cache: dict[tuple, EffectiveEnvironment] = {}

    def linearize(self, name: str, chain: tuple = ()) -> list[str]:
        """[name] + ancestors, nearest first, later bases first, each once: Python's method
        resolution order (C3) over the bases reversed."""
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
        if "/" in name and name.split("/", 1)[0] in self.repos:
            raise error_at(f"{what} {name!r} is in another repository; resolving other repositories' "
                           "environments needs the operator (not supported by this version)", path, source, key)
        known = ", ".join(sorted(self.environments)) or "none defined"
        raise error_at(f"{what} {name!r} is not defined (environments: {known})", path, source, key)

    def effective(self, name: str, mixins: tuple = ()) -> EffectiveEnvironment:
        """The environment `name` with `mixins` merged on top, in order (later wins).

        A task with mixins behaves like a derived environment with `base: [name, *mixins]`,
        except that the platform and image always come from `name`; `inheritance` then lists
        everything merged, nearest first.
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
        root = next(n for n in own if not self.environments[n].bases)
        root_env = self.environments[root]
        for member in lineage:
            env = self.environments[member]
            if not env.bases and env.platform != root_env.platform:
                raise error_at(
                    f"environment {name!r} mixes platforms: {root!r} is {root_env.platform}, {member!r} is {env.platform}",
                    ("environments", name), self.environments[name].source)
        variables: dict[str, str] = {}
        dependencies: dict[str, str] = {}
        defaults: dict = {}
        for member in reversed(lineage):  # root first, so nearer environments overwrite
            env = self.environments[member]
            variables.update(env.variables)
            dependencies.update(env.dependencies)
            defaults.update(env.test_defaults)
        setup = "\n".join(s for s in (self.environments[m].setup_script for m in reversed(lineage)) if s)
        result = EffectiveEnvironment(
            name=name, platform=root_env.platform, image=dict(root_env.image),
            inheritance=lineage[1:] if not mixins else lineage,
            variables=variables, resolved=resolve_variables(variables, ("environments", name, "variables")),
            dependencies=dependencies, setup_script=setup, test_defaults=defaults, root=root,
        )
        self.effective_cache[key] = result
        return result

    def to_json(self) -> dict:
        result = {}
        for name in self.environments:
            eff = self.effective(name)
            result[name] = {
                "platform": eff.platform, "image": eff.image,
                "variables": eff.resolved.values,
                "inheritance": eff.inheritance, "setup_script": eff.setup_script,
            }
        return result
