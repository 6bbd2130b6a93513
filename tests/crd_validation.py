"""What the API server does with a custom resource written against one of our CRDs.

In order, as kube-apiserver does it: unknown fields are refused (kubectl's default
`--validate=strict`) or pruned (a client that does not ask for strict field validation), then
defaults are filled in, then the object is validated against the structural schema. The
k8s-only keywords (`x-kubernetes-*`) have no JSON Schema meaning and are dropped before
jsonschema validates.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema

FORBIDDEN_IN_STRUCTURAL = {"$ref", "$defs", "definitions", "anyOf", "oneOf", "allOf", "not",
                           "nullable", "title", "const", "exclusiveMinimum", "exclusiveMaximum"}


def version_schema(crd: dict) -> dict:
    (version,) = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def structural_problems(node: dict, path: str = "") -> list[str]:
    """Why `node` is not a structural schema the API server (and our generator's promise) accepts."""
    problems = []
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if "type" not in node and not preserve:
        problems.append(f"{path or '/'}: no type")
    for keyword in FORBIDDEN_IN_STRUCTURAL & node.keys():
        problems.append(f"{path or '/'}: forbidden keyword {keyword}")
    additional = node.get("additionalProperties")
    if isinstance(additional, bool):
        problems.append(f"{path or '/'}: additionalProperties must be a schema, not {additional}")
    if additional is not None and "properties" in node:
        problems.append(f"{path or '/'}: both properties and additionalProperties")
    if node.get("type") == "array" and "items" not in node:
        problems.append(f"{path or '/'}: an array without items")
    if "default" in node and node["default"] is None:
        problems.append(f"{path or '/'}: a null default")
    for name, child in node.get("properties", {}).items():
        problems += structural_problems(child, f"{path}/{name}")
    if isinstance(additional, dict):
        problems += structural_problems(additional, f"{path}/*")
    if "items" in node:
        problems += structural_problems(node["items"], f"{path}[]")
    return problems


def as_jsonschema(node: Any) -> Any:
    """The structural schema with the k8s-only keywords dropped: plain JSON Schema (draft 4)."""
    if isinstance(node, dict):
        return {key: as_jsonschema(value) for key, value in node.items()
                if not key.startswith("x-kubernetes-")}
    if isinstance(node, list):
        return [as_jsonschema(value) for value in node]
    return node


def unknown_fields(schema: dict, value: Any, path: str = "") -> list[str]:
    """The paths of the fields the schema does not know (which the API server would prune)."""
    found = []
    if isinstance(value, dict) and schema.get("type") == "object" and path != ".metadata":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return found
        if "additionalProperties" in schema:
            for key, child in value.items():
                found += unknown_fields(schema["additionalProperties"], child, f"{path}.{key}")
            return found
        properties = schema.get("properties", {})
        for key, child in value.items():
            if key not in properties:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(properties[key], child, f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, child in enumerate(value):
            found += unknown_fields(schema["items"], child, f"{path}[{index}]")
    return found


def pruned(schema: dict, value: Any, path: str = "") -> Any:
    if isinstance(value, dict) and schema.get("type") == "object" and path != ".metadata":
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        if "additionalProperties" in schema:
            return {key: pruned(schema["additionalProperties"], child, f"{path}.{key}")
                    for key, child in value.items()}
        properties = schema.get("properties", {})
        return {key: pruned(properties[key], child, f"{path}.{key}")
                for key, child in value.items() if key in properties}
    if isinstance(value, list) and "items" in schema:
        return [pruned(schema["items"], child, f"{path}[{index}]") for index, child in enumerate(value)]
    return value


def defaulted(schema: dict, value: Any) -> Any:
    """Fill in defaults as the API server does: a missing property with a default gets it, then
    every present property (including a just-defaulted object) is defaulted in turn."""
    if isinstance(value, dict) and schema.get("type") == "object":
        value = dict(value)
        properties = schema.get("properties", {})
        for key, child_schema in properties.items():
            if key not in value and "default" in child_schema:
                value[key] = copy.deepcopy(child_schema["default"])
        for key in list(value):
            if key in properties:
                value[key] = defaulted(properties[key], value[key])
            elif isinstance(schema.get("additionalProperties"), dict):
                value[key] = defaulted(schema["additionalProperties"], value[key])
        return value
    if isinstance(value, list) and "items" in schema:
        return [defaulted(schema["items"], child) for child in value]
    return value


def admit(crd: dict, obj: dict, strict: bool = True) -> tuple[dict, list[str]]:
    """(the object as stored, the problems that make the API server refuse it)."""
    schema = version_schema(crd)
    problems = []
    if strict:
        problems += [f"unknown field {path[1:]}" for path in unknown_fields(schema, obj)]
    stored = defaulted(schema, pruned(schema, obj))
    validator = jsonschema.Draft4Validator(as_jsonschema(schema), format_checker=jsonschema.FormatChecker())
    for error in validator.iter_errors(stored):
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
        problems.append(f"{where[1:] or '<root>'}: {error.message}")
    return stored, problems
