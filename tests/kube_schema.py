"""What the API server does with a CRD's structural schema, for the emulator: prune unknown
fields, apply defaults, then validate.

    schema = CrdSchema(crd_version["schema"]["openAPIV3Schema"])
    unknown = schema.prune(obj)        # paths of the dropped fields, e.g. ".spec.colour"
    schema.apply_defaults(obj)
    problems = schema.validate(obj)    # [("spec.pollIntervalSeconds", "Invalid value: 5: ...")]

Validation runs jsonschema (draft 4, the dialect of OpenAPI 3.0's schemas) over the object's
content outside metadata. Keywords the API server adds (`nullable`, `x-kubernetes-*`) are
translated or ignored; CEL rules (`x-kubernetes-validations`) are not run.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonschema

ROOT_FIELDS = ("apiVersion", "kind", "metadata")


def _to_json_schema(schema: Any) -> Any:
    """OpenAPI 3.0 schema -> JSON Schema draft 4: `nullable` becomes a null type, and the
    extensions are dropped (an int-or-string field accepts either)."""
    if isinstance(schema, list):
        return [_to_json_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    converted = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key in ("default", "example", "description"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            converted[key] = {name: _to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            converted[key] = _to_json_schema(value)
        else:
            converted[key] = value
    if schema.get("nullable") and "type" in converted:
        converted["type"] = [converted["type"], "null"]
        if "enum" in converted:
            converted["enum"] = [*converted["enum"], None]
    converted.pop("nullable", None)
    if schema.get("x-kubernetes-int-or-string"):
        converted.pop("type", None)
        converted["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return converted


class CrdSchema:
    def __init__(self, schema: dict):
        self.schema = schema
        root = copy.deepcopy(schema)
        for field in ROOT_FIELDS:  # the server checks these itself
            (root.get("properties") or {}).pop(field, None)
            if field in (root.get("required") or []):
                root["required"].remove(field)
        self._validator = jsonschema.Draft4Validator(_to_json_schema(root))
        jsonschema.Draft4Validator.check_schema(_to_json_schema(root))

    def prune(self, obj: dict) -> list[str]:
        """Drop the fields the schema does not declare (outside preserve-unknown-fields), as
        the API server does; returns their paths."""
        dropped: list[str] = []
        _prune_object(obj, self.schema, "", dropped, root=True)
        return dropped

    def apply_defaults(self, obj: dict) -> None:
        _default(obj, self.schema, root=True)

    def validate(self, obj: dict) -> list[tuple[str, str]]:
        content = {key: value for key, value in obj.items() if key not in ROOT_FIELDS}
        problems = []
        for error in sorted(self._validator.iter_errors(content),
                            key=lambda e: [str(p) for p in e.absolute_path]):
            path = ".".join(str(part) if not isinstance(part, int) else f"[{part}]"
                            for part in error.absolute_path).replace(".[", "[")
            missing = re.fullmatch(r"'(.+)' is a required property", error.message)
            if error.validator == "required" and missing:
                path, message = (f"{path}.{missing.group(1)}" if path else missing.group(1),
                                 "Required value")
            else:  # the API server's wording: `Invalid value: VALUE: why`
                message = f"Invalid value: {json.dumps(error.instance)}: {error.message}"
            problems.append((path or "<root>", message))
        return problems


def _prune_object(obj: dict, schema: dict, path: str, dropped: list[str],
                  root: bool = False) -> None:
    properties = schema.get("properties") or {}
    additional = schema.get("additionalProperties")
    for key in list(obj):
        if root and key in ROOT_FIELDS:
            continue
        child_path = f"{path}.{key}"
        if key in properties:
            _prune_value(obj[key], properties[key], child_path, dropped)
        elif isinstance(additional, dict):
            _prune_value(obj[key], additional, child_path, dropped)
        elif additional is True or schema.get("x-kubernetes-preserve-unknown-fields"):
            continue
        else:
            del obj[key]
            dropped.append(child_path)


def _prune_value(value: Any, schema: dict, path: str, dropped: list[str]) -> None:
    if isinstance(value, dict):
        _prune_object(value, schema, path, dropped)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            _prune_value(item, schema["items"], f"{path}[{index}]", dropped)


def _default(value: Any, schema: dict, root: bool = False) -> None:
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for name, sub_schema in properties.items():
            if root and name in ROOT_FIELDS:
                continue
            if name not in value and "default" in sub_schema:
                value[name] = copy.deepcopy(sub_schema["default"])
            if name in value:
                _default(value[name], sub_schema)
        additional = schema.get("additionalProperties")
        if isinstance(additional, dict):
            for name in value:
                if name not in properties:
                    _default(value[name], additional)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default(item, schema["items"])
