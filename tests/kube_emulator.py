"""A Kubernetes API for tests: kmock 0.8's emulator, with what kopf, kubectl and the official
client need to work against it as against a cluster.

    python tests/kube_emulator.py --port 0 --crds crds/ --crds tests/fixtures/kube \
        --kubeconfig OUT [--namespace NS ...]

prints `ready URL` on stdout once it serves, and writes a kubeconfig for kubectl, kopf and the
`kubernetes` client. docs/testing.md says what it adds to kmock, why, and what it cannot prove.

Every request is recorded as (API group, resource[/subresource], Kubernetes verb) with the
client that made it: the bearer token of its kubeconfig (see `write_kubeconfig(client=...)`),
else the product in its User-Agent (kubectl sends no token over http, so it is "kubectl").
The testing endpoints, beside the API:

    GET  /_testing/requests[?client=NAME]     every recorded request, oldest first
    GET  /_testing/permissions[?client=NAME]  the distinct (group, resource, verb) used
    POST /_testing/reset                      back to the state at start; closes watches
    POST /_testing/faults  {"verb", "group"?, "resource"?, "status", "times", "client"?,
                            "delay"?}         the next matching requests wait `delay` seconds,
                                              then fail with that status (0: are served)
    POST /_testing/close-watches              ends every open watch, as a restart would
    GET  /_testing/objects                    every stored object
    GET  /_testing/wait?version=V&resource=R&count=N[&group=G&namespace=NS&labelSelector=S
                        &timeout=SECONDS]     answers once R holds N objects (or at the timeout)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import copy
import datetime
import gzip
import importlib.resources
import json
import os
import pathlib
import random
import re
import signal
import string
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import aiohttp.web
import jsonpatch
import kmock
import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kube_jsonpath import JsonPathError, compile_path  # noqa: E402
from kube_schema import CrdSchema  # noqa: E402
from kube_selectors import (SelectorError, label_problem, parse_field_selector,  # noqa: E402
                            parse_label_selector)

# The shim reads kmock's bundled discovery data and subclasses its emulator: both are internals
# that may move in another release, so it refuses to run on any other version.
KMOCK_VERSION = "0.8"
if kmock.__version__ != KMOCK_VERSION:
    raise ImportError(f"tests/kube_emulator.py is written for kmock=={KMOCK_VERSION}, "
                      f"found {kmock.__version__}")

SERVER_VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-testlooper-emulator",
                  "gitCommit": "0" * 40, "gitTreeState": "clean",
                  "buildDate": "2026-01-01T00:00:00Z", "goVersion": "go1.23",
                  "compiler": "gc", "platform": "linux/amd64"}
ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
EVENT_HISTORY = 20_000  # per resource; a watch from an older resourceVersion gets 410 Gone
STARTUP_NAMESPACES = ("default", "kube-system", "kube-public")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# Field selectors beyond metadata.name/namespace, as the API server supports them per resource.
EXTRA_FIELD_SELECTORS = {
    ("", "events"): ["involvedObject.kind", "involvedObject.namespace", "involvedObject.name",
                     "involvedObject.uid", "involvedObject.apiVersion",
                     "involvedObject.resourceVersion", "involvedObject.fieldPath", "reason",
                     "reportingComponent", "source", "type"],
    ("events.k8s.io", "events"): ["regarding.kind", "regarding.namespace", "regarding.name",
                                  "regarding.uid", "reason", "type"],
    ("", "pods"): ["spec.nodeName", "spec.restartPolicy", "spec.schedulerName",
                   "spec.serviceAccountName", "status.phase", "status.podIP",
                   "status.nominatedNodeName"],
    ("", "secrets"): ["type"],
    ("", "namespaces"): ["status.phase"],
}


class ApiError(Exception):
    """An answer in the API server's Status form."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def body(self) -> dict:
        status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                  "message": self.message, "reason": self.reason, "code": self.code}
        if self.details:
            status["details"] = self.details
        return status


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    singular: str
    namespaced: bool
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    verbs: list[str] = field(default_factory=lambda: list(ALL_VERBS))
    subresources: set[str] = field(default_factory=set)
    printer_columns: list[dict] = field(default_factory=list)
    column_paths: list[Callable[[Any], list[Any]]] = field(default_factory=list)
    is_custom: bool = False
    schema: CrdSchema | None = None

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def storage_key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        return "status" in self.subresources


@dataclass(eq=False)  # kept in a set, by identity
class Watcher:
    resource: ResourceType
    namespace: str | None
    matches: Callable[[dict], bool]
    queue: asyncio.Queue
    as_table: bool
    include_object: str


@dataclass
class Fault:
    """The next `times` requests matching verb (and group, resource, client, when given) wait
    `delay` seconds, then fail with `status` (or, with status 0, are served)."""
    verb: str
    group: str | None
    resource: str | None
    status: int
    times: int
    client: str | None
    message: str
    delay: float = 0.0


class KubeEmulator(kmock.KubernetesEmulator):
    """kmock's emulator, routed through our own handlers.

    kmock matches each request against views over every request recorded so far, which makes a
    long run quadratic, and its object store scans all objects per request. The shim keeps
    kmock's HTTP server and its bundled discovery of the built-in resources, and serves the API
    itself from an index keyed by (group, plural) -> (namespace, name).
    """

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        self.store: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
        self.events: dict[tuple[str, str], collections.deque] = {}
        self.events_floor: dict[tuple[str, str], int] = {}
        self.watchers: set[Watcher] = set()
        self.revision = 0
        self.recorded: list[dict] = []
        self.faults: list[Fault] = []
        self.startup_documents: list[dict] = []
        self.startup_namespaces: list[str] = list(STARTUP_NAMESPACES)
        self._changed = asyncio.Event()  # set and replaced on every change, for /_testing/wait
        # For the garbage collector: uid -> (storage key, namespace, name, kind) of every object,
        # owner uid -> the objects whose ownerReferences name it, and the owners whose deletion
        # orphans their dependents.
        self.by_uid: dict[str, tuple[tuple[str, str], str, str, str]] = {}
        self.dependents: dict[str, set[tuple[tuple[str, str], str, str]]] = {}
        self.orphaning: set[str] = set()
        self.types_by_storage: dict[tuple[str, str], ResourceType] = {}
        self._load_builtin_types()

    # ---------- resource types ----------

    def _load_builtin_types(self) -> None:
        # kmock's bundled discovery documents, taken from a K3s cluster's built-in resources.
        data = importlib.resources.files("kmock._internal").joinpath("resources.json.gz")
        for document in json.loads(gzip.decompress(data.read_bytes())):
            group_version = document["groupVersion"]
            group, _, version = group_version.rpartition("/")
            subresources: dict[str, set[str]] = collections.defaultdict(set)
            for entry in document["resources"]:
                if "/" in entry["name"]:
                    parent, sub = entry["name"].split("/", 1)
                    subresources[parent].add(sub)
            for entry in document["resources"]:
                if "/" in entry["name"]:
                    continue
                self._register(ResourceType(
                    group=group, version=version, plural=entry["name"], kind=entry["kind"],
                    singular=entry.get("singularName") or entry["kind"].lower(),
                    namespaced=bool(entry.get("namespaced")),
                    short_names=list(entry.get("shortNames") or []),
                    categories=list(entry.get("categories") or []),
                    verbs=list(entry.get("verbs") or ALL_VERBS),
                    subresources=subresources[entry["name"]]))

    def _register(self, resource: ResourceType) -> None:
        self.types[(resource.group, resource.version, resource.plural)] = resource
        self.types_by_storage[resource.storage_key] = resource
        self.store.setdefault(resource.storage_key, {})
        self.events.setdefault(resource.storage_key,
                               collections.deque(maxlen=EVENT_HISTORY))
        self.events_floor.setdefault(resource.storage_key, 0)

    def register_crd(self, crd: dict) -> list[ResourceType]:
        """Serve the resource a CustomResourceDefinition declares; ValueError if it is wrong."""
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        group, plural, kind = spec.get("group"), names.get("plural"), names.get("kind")
        if not group or not plural or not kind or not spec.get("versions"):
            raise ValueError("a CRD needs spec.group, spec.names.plural, spec.names.kind "
                             "and spec.versions")
        expected_name = f"{plural}.{group}"
        if (crd.get("metadata") or {}).get("name") != expected_name:
            raise ValueError(f"a CRD for {plural} of {group} must be named {expected_name}")
        registered = []
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            columns = list(version.get("additionalPrinterColumns") or [])
            if not columns:
                columns = [{"name": "Age", "type": "date",
                            "jsonPath": ".metadata.creationTimestamp"}]
            try:
                paths = [compile_path(column["jsonPath"]) for column in columns]
            except (JsonPathError, KeyError) as error:
                raise ValueError(f"CRD {expected_name}: printer column: {error}") from None
            openapi = (version.get("schema") or {}).get("openAPIV3Schema")
            try:
                schema = CrdSchema(openapi) if openapi else None
            except Exception as error:  # jsonschema's SchemaError, or a malformed document
                raise ValueError(f"CRD {expected_name}: its schema is invalid: {error}") from None
            resource = ResourceType(
                group=group, version=version["name"], plural=plural, kind=kind,
                singular=names.get("singular") or kind.lower(),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                short_names=list(names.get("shortNames") or []),
                categories=list(names.get("categories") or []),
                subresources=set((version.get("subresources") or {}).keys()),
                printer_columns=columns, column_paths=paths, is_custom=True, schema=schema)
            self._register(resource)
            registered.append(resource)
        return registered

    def _unregister_crd(self, crd: dict) -> None:
        spec = crd.get("spec") or {}
        group, plural = spec.get("group"), (spec.get("names") or {}).get("plural")
        for key in [key for key in self.types if key[0] == group and key[2] == plural]:
            del self.types[key]
        resource = self.types_by_storage.pop((group, plural), None)
        for obj in self.store.pop((group, plural), {}).values():
            self._unindex(resource, obj)

    def load_documents(self, paths: Iterable[str]) -> None:
        """Load the CRDs (and any other objects) of YAML files, or of folders of them."""
        for path in paths:
            target = pathlib.Path(path)
            files = (sorted(list(target.rglob("*.yaml")) + list(target.rglob("*.yml")))
                     if target.is_dir() else [target])
            if target.is_dir() and not files:
                raise ValueError(f"no YAML files in {path}")
            for file in files:
                for document in yaml.safe_load_all(file.read_text()):
                    if document:
                        self.startup_documents.append(document)
        self.reset_state()

    def reset_state(self) -> None:
        for watcher in list(self.watchers):
            watcher.queue.put_nowait(None)
        self.watchers.clear()
        for key in [key for key, resource in self.types.items() if resource.is_custom]:
            del self.types[key]
        self.store = {key: {} for key in self.store if any(
            resource.storage_key == key for resource in self.types.values())}
        for history in self.events.values():
            history.clear()
        self.events_floor = {key: self.revision for key in self.events_floor}
        self.recorded.clear()
        self.faults.clear()
        self.by_uid.clear()
        self.dependents.clear()
        self.orphaning.clear()
        for name in self.startup_namespaces:
            self._create(self._type("", "v1", "namespaces"), None,
                         {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        crds = [d for d in self.startup_documents if d.get("kind") == "CustomResourceDefinition"]
        others = [d for d in self.startup_documents if d.get("kind") != "CustomResourceDefinition"]
        for document in crds + others:
            resource = self._type_of_document(document)
            namespace = (document.get("metadata") or {}).get("namespace") or (
                "default" if resource.namespaced else None)
            try:
                self._create(resource, namespace, copy.deepcopy(document))
            except ApiError as error:
                name = (document.get("metadata") or {}).get("name")
                raise ValueError(f"cannot load {document.get('kind')} {name}: "
                                 f"{error.message}") from None

    def _type_of_document(self, document: dict) -> ResourceType:
        api_version, kind = document.get("apiVersion", ""), document.get("kind", "")
        group, _, version = api_version.rpartition("/")
        for resource in self.types.values():
            if (resource.group, resource.version, resource.kind) == (group, version, kind):
                return resource
        raise ValueError(f"no resource serves {kind} of {api_version}")

    def _type(self, group: str, version: str, plural: str) -> ResourceType:
        resource = self.types.get((group, version, plural))
        if resource is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        return resource

    # ---------- the HTTP entry point ----------

    async def __call__(self, raw: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        body = await raw.read()
        path = raw.path.rstrip("/") or "/"
        query = {key: values[-1] for key, values in parse_qs(raw.query_string,
                                                             keep_blank_values=True).items()}
        record: dict | None = None
        try:
            if path.startswith("/_testing/"):
                return await self._serve_testing(raw, path, query, body)
            route = self._route(raw.method, path, query)
            if route is None:
                return aiohttp.web.json_response(self._serve_discovery(path))
            record = self._record(raw, route)
            await self._inject_fault(record)
            response = await self._serve_resource(raw, route, query, body)
            record["code"] = response.status
            return response
        except ApiError as error:
            if record is not None:
                record["code"] = error.code
            return aiohttp.web.json_response(error.body(), status=error.code)
        except Exception as error:  # a bug of the emulator: say so to the client, loudly
            if record is not None:
                record["code"] = 500
            traceback.print_exc()
            return aiohttp.web.json_response(
                ApiError(500, "InternalError", f"emulator error: {error!r}").body(), status=500)

    def _route(self, method: str, path: str, query: dict) -> dict | None:
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return None
        namespace = None
        if (rest[0] == "namespaces" and len(rest) >= 3
                and not (group == "" and rest[2] in ("status", "finalize"))):
            namespace, rest = rest[1], rest[2:]
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        subresource = "/".join(rest[2:]) or None
        watch = query.get("watch") in ("true", "1")
        if method == "GET":
            verb = "watch" if watch else ("get" if name else "list")
        elif method == "POST" and not name:
            verb = "create"
        elif method == "POST" and subresource:  # e.g. pods/eviction, serviceaccounts/token
            verb = "create"
        elif method == "PUT" and name:
            verb = "update"
        elif method == "PATCH" and name:
            verb = "patch"
        elif method == "DELETE":
            verb = "delete" if name else "deletecollection"
        else:
            raise ApiError(405, "MethodNotAllowed",
                           "the server does not allow this method on the requested resource")
        return {"group": group, "version": version, "plural": plural, "namespace": namespace,
                "name": name, "subresource": subresource, "verb": verb}

    def _client_of(self, raw: aiohttp.web.BaseRequest) -> str:
        authorization = raw.headers.get("Authorization", "")
        if authorization.lower().startswith("bearer "):
            return authorization[7:].strip()
        # kubectl sends no credentials over plain http: it is known by its User-Agent's product.
        return raw.headers.get("User-Agent", "").split("/")[0].split(" ")[0] or "unknown"

    def _record(self, raw: aiohttp.web.BaseRequest, route: dict) -> dict:
        resource = route["plural"] + (f"/{route['subresource']}" if route["subresource"] else "")
        record = {"client": self._client_of(raw), "userAgent": raw.headers.get("User-Agent", ""),
                  "group": route["group"], "version": route["version"], "resource": resource,
                  "verb": route["verb"], "namespace": route["namespace"], "name": route["name"],
                  "method": raw.method, "path": raw.path, "time": time.time()}
        self.recorded.append(record)
        return record

    async def _inject_fault(self, record: dict) -> None:
        for fault in self.faults:
            if fault.times <= 0 or fault.verb != record["verb"]:
                continue
            if fault.group is not None and fault.group != record["group"]:
                continue
            if fault.resource is not None and fault.resource != record["resource"]:
                continue
            if fault.client is not None and fault.client != record["client"]:
                continue
            fault.times -= 1
            if fault.delay:
                await asyncio.sleep(fault.delay)
            if not fault.status:
                return
            reasons = {409: "Conflict", 429: "TooManyRequests", 500: "InternalError",
                       503: "ServiceUnavailable", 504: "Timeout", 403: "Forbidden"}
            raise ApiError(fault.status, reasons.get(fault.status, "InternalError"),
                           fault.message)

    # ---------- discovery ----------

    def _serve_discovery(self, path: str) -> dict:
        parts = [part for part in path.strip("/").split("/") if part]
        if path in ("/version",):
            return SERVER_VERSION
        if path in ("/healthz", "/readyz", "/livez"):
            return {"status": "ok"}
        if parts == []:
            groups = sorted({r.api_version for r in self.types.values()})
            return {"paths": ["/api", "/api/v1", "/apis", "/version", "/healthz"]
                    + [f"/apis/{gv}" for gv in groups if "/" in gv]}
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                    "serverAddress": "127.0.0.1"}]}
        if parts == ["apis"]:
            return {"kind": "APIGroupList", "apiVersion": "v1",
                    "groups": [self._group_document(group) for group in sorted(
                        {r.group for r in self.types.values() if r.group})]}
        if len(parts) == 2 and parts[0] == "apis":
            if not any(r.group == parts[1] for r in self.types.values()):
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return {"kind": "APIGroup", "apiVersion": "v1", **self._group_document(parts[1])}
        if (len(parts) == 2 and parts[0] == "api") or (len(parts) == 3 and parts[0] == "apis"):
            group = "" if parts[0] == "api" else parts[1]
            version = parts[-1]
            resources = [r for r in self.types.values()
                         if (r.group, r.version) == (group, version)]
            if not resources:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            entries = []
            for r in sorted(resources, key=lambda r: r.plural):
                entries.append({"name": r.plural, "singularName": r.singular,
                                "namespaced": r.namespaced, "kind": r.kind, "verbs": r.verbs,
                                "shortNames": r.short_names, "categories": r.categories})
                for sub in sorted(r.subresources):
                    entries.append({"name": f"{r.plural}/{sub}", "singularName": "",
                                    "namespaced": r.namespaced, "kind": r.kind,
                                    "verbs": ["get", "patch", "update"]})
            # The core group's groupVersion is "v1", not "/v1" (kmock 0.8 says "/v1", and
            # `kubectl apply` of any core object then fails).
            return {"kind": "APIResourceList", "apiVersion": "v1",
                    "groupVersion": group + "/" + version if group else version,
                    "resources": entries}
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _group_document(self, group: str) -> dict:
        versions = sorted({r.version for r in self.types.values() if r.group == group},
                          key=_version_priority)
        return {"name": group,
                "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
                "preferredVersion": {"groupVersion": f"{group}/{versions[0]}",
                                     "version": versions[0]}}

    # ---------- resources ----------

    async def _serve_resource(self, raw: aiohttp.web.BaseRequest, route: dict, query: dict,
                              body: bytes) -> aiohttp.web.StreamResponse:
        resource = self._type(route["group"], route["version"], route["plural"])
        namespace, name, verb = route["namespace"], route["name"], route["verb"]
        subresource = route["subresource"]
        if namespace is not None and not resource.namespaced:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if resource.namespaced and namespace is None and verb not in ("list", "watch"):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if subresource is not None and subresource not in resource.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if subresource is not None and subresource != "status":
            raise ApiError(501, "NotImplemented",
                           f"the emulator does not serve {resource.plural}/{subresource}")
        table = _wants_table(raw.headers.get("Accept", ""))
        include_object = query.get("includeObject", "Metadata")
        dry_run = bool(query.get("dryRun"))
        strict = query.get("fieldValidation") == "Strict"

        if verb == "watch":
            return await self._serve_watch(raw, resource, namespace, name, query, table,
                                           include_object)
        if verb == "list":
            listing = self._list(resource, namespace, query)
            if table:
                return aiohttp.web.json_response(
                    self._table(resource, listing["items"], include_object, listing["metadata"]))
            return aiohttp.web.json_response(listing)
        if verb == "get":
            # GET of /status answers the whole object, as the API server does.
            obj = self._view(resource, self._existing(resource, namespace, name))
            if table:
                return aiohttp.web.json_response(self._table(resource, [obj], include_object, {
                    "resourceVersion": obj["metadata"]["resourceVersion"]}))
            return aiohttp.web.json_response(obj)

        data = _parse_body(body, raw.headers.get("Content-Type", ""))
        if verb == "create":
            if not isinstance(data, dict):
                raise ApiError(400, "BadRequest", "the body of a create must be an object")
            obj = self._create(resource, namespace, data, dry_run=dry_run, strict=strict)
            return aiohttp.web.json_response(self._view(resource, obj), status=201)
        if verb == "update":
            if not isinstance(data, dict):
                raise ApiError(400, "BadRequest", "the body of an update must be an object")
            obj = self._update(resource, namespace, name, data, subresource, dry_run=dry_run,
                               strict=strict)
            return aiohttp.web.json_response(self._view(resource, obj))
        if verb == "patch":
            content_type = raw.headers.get("Content-Type", "").split(";")[0].strip()
            obj, created = self._patch(resource, namespace, name, data, content_type,
                                       subresource, query, dry_run=dry_run, strict=strict)
            return aiohttp.web.json_response(self._view(resource, obj),
                                             status=201 if created else 200)
        if verb == "delete":
            options = data if isinstance(data, dict) else {}
            obj = self._delete(resource, namespace, name, options, dry_run=dry_run)
            return aiohttp.web.json_response(self._view(resource, obj))
        # deletecollection
        listing = self._list(resource, namespace, query)
        deleted = [self._delete(resource, item["metadata"].get("namespace"),
                                item["metadata"]["name"], {}, dry_run=dry_run)
                   for item in listing["items"]]
        return aiohttp.web.json_response({
            "kind": f"{resource.kind}List", "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(self.revision)},
            "items": [self._view(resource, obj) for obj in deleted]})

    def _existing(self, resource: ResourceType, namespace: str | None, name: str) -> dict:
        obj = self.store[resource.storage_key].get((namespace or "", name))
        if obj is None:
            raise ApiError(404, "NotFound", f'{resource.qualified} "{name}" not found',
                           {"name": name, "group": resource.group, "kind": resource.plural})
        return obj

    def _view(self, resource: ResourceType, obj: dict) -> dict:
        """The stored object as served through this resource's version."""
        if obj.get("apiVersion") == resource.api_version:
            return obj
        return {**obj, "apiVersion": resource.api_version}

    def _list(self, resource: ResourceType, namespace: str | None, query: dict) -> dict:
        try:
            labels_match = parse_label_selector(query.get("labelSelector", ""))
            fields_match = parse_field_selector(query.get("fieldSelector", ""),
                                                self._field_selectors(resource))
        except SelectorError as error:
            raise ApiError(400, "BadRequest", str(error)) from None
        objects = self.store[resource.storage_key]
        keys = sorted(key for key in objects if namespace is None or key[0] == namespace)
        start_after = None
        if query.get("continue"):
            try:
                start_after = tuple(json.loads(_b64decode(query["continue"])))
            except ValueError:
                raise ApiError(400, "BadRequest", "invalid continue token") from None
        limit = int(query["limit"]) if query.get("limit", "").isdigit() else 0
        items, more = [], False
        for key in keys:
            if start_after is not None and key <= start_after:
                continue
            obj = objects[key]
            if not labels_match(obj["metadata"].get("labels") or {}) or not fields_match(obj):
                continue
            if limit and len(items) == limit:
                more = True
                break
            items.append(self._view(resource, obj))
        metadata: dict[str, Any] = {"resourceVersion": str(self.revision)}
        if more:
            last = items[-1]["metadata"]
            metadata["continue"] = _b64encode(json.dumps([last.get("namespace", ""),
                                                          last["name"]]))
        return {"kind": f"{resource.kind}List", "apiVersion": resource.api_version,
                "metadata": metadata, "items": items}

    def _field_selectors(self, resource: ResourceType) -> list[str]:
        extra = EXTRA_FIELD_SELECTORS.get(resource.storage_key, [])
        return ["metadata.name", "metadata.namespace", *extra]

    # ---------- writes ----------

    def _create(self, resource: ResourceType, namespace: str | None, data: dict,
                dry_run: bool = False, strict: bool = False) -> dict:
        obj = copy.deepcopy(data)
        metadata = obj.setdefault("metadata", {})
        if not isinstance(metadata, dict):
            raise ApiError(400, "BadRequest", "metadata must be an object")
        body_namespace = metadata.get("namespace")
        if resource.namespaced:
            if namespace is None:
                namespace = body_namespace
            if body_namespace and body_namespace != namespace:
                raise ApiError(400, "BadRequest", "the namespace of the provided object does not "
                                                  "match the namespace sent on the request")
            self._check_namespace_open(namespace)
            metadata["namespace"] = namespace
        else:
            metadata.pop("namespace", None)
        self._check_kind(resource, obj)
        if not metadata.get("name"):
            if not metadata.get("generateName"):
                raise ApiError(422, "Invalid", f"{resource.kind} is invalid: metadata.name: "
                                               f"Required value: name or generateName is required")
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            metadata["name"] = metadata["generateName"] + suffix
        name = metadata["name"]
        self._validate(resource, obj)
        # With a status subresource, the API server drops the status sent on create (a node,
        # which its kubelet registers with its status, aside); pods start Pending.
        if resource.has_status and resource.storage_key != ("", "nodes"):
            obj.pop("status", None)
        self._apply_schema(resource, obj, strict)
        key = (metadata.get("namespace", ""), name)
        objects = self.store[resource.storage_key]
        if key in objects:
            raise ApiError(409, "AlreadyExists", f'{resource.qualified} "{name}" already exists',
                           {"name": name, "group": resource.group, "kind": resource.plural})
        for managed in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion",
                        "uid", "generation", "creationTimestamp", "managedFields", "selfLink"):
            metadata.pop(managed, None)
        if resource.storage_key == ("", "pods"):
            obj["status"] = {"phase": "Pending"}
        if resource.storage_key == ("", "namespaces"):
            obj["status"] = {"phase": "Active"}
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
        metadata["uid"] = str(uuid.uuid4())
        metadata["creationTimestamp"] = now_rfc3339()
        metadata["generation"] = 1
        if dry_run:
            metadata["resourceVersion"] = str(self.revision)
            return obj
        if resource.storage_key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            try:
                self.register_crd(obj)
            except ValueError as error:
                raise ApiError(422, "Invalid", str(error)) from None
        metadata["resourceVersion"] = self._next_revision()
        self._put(resource, obj)
        self._emit(resource, "ADDED", obj)
        self._collect_if_orphan(resource, obj)
        return obj

    def _check_namespace_open(self, namespace: str | None) -> None:
        namespaces = self.store[("", "namespaces")]
        found = namespaces.get(("", namespace or ""))
        if found is None:
            raise ApiError(404, "NotFound", f'namespaces "{namespace}" not found',
                           {"name": namespace, "kind": "namespaces"})
        if found["metadata"].get("deletionTimestamp"):
            raise ApiError(403, "Forbidden", f"unable to create new content in namespace "
                                             f"{namespace} because it is being terminated")

    def _check_kind(self, resource: ResourceType, obj: dict) -> None:
        # Built-in endpoints default the kind and apiVersion from the URL; custom resources
        # are decoded without a type, so they must say theirs.
        if resource.is_custom and (not obj.get("kind") or not obj.get("apiVersion")):
            missing = "Kind" if not obj.get("kind") else "apiVersion"
            raise ApiError(400, "BadRequest", f"Object '{missing}' is missing in the body")
        obj.setdefault("kind", resource.kind)
        obj.setdefault("apiVersion", resource.api_version)
        if obj["kind"] != resource.kind:
            raise ApiError(400, "BadRequest", f"the kind {obj['kind']!r} does not match the "
                                              f"resource {resource.qualified} ({resource.kind})")
        group_version = obj["apiVersion"]
        group = group_version.rpartition("/")[0]
        if group != resource.group:
            raise ApiError(400, "BadRequest", f"the apiVersion {group_version!r} does not match "
                                              f"the resource {resource.qualified}")
        obj["kind"] = resource.kind
        obj["apiVersion"] = resource.api_version

    def _validate(self, resource: ResourceType, obj: dict) -> None:
        """The checks the API server makes of every object's metadata (not the schema)."""
        if resource.storage_key == ("", "secrets") and obj.get("stringData") is not None:
            # As the API server does on every write: stringData is merged into data (base64).
            string_data = obj.pop("stringData") or {}
            obj["data"] = {**(obj.get("data") or {}), **{k: _b64encode(v) for k, v in string_data.items()}}
        metadata = obj["metadata"]
        name = metadata["name"]
        pattern, limit = ((DNS_LABEL, 63) if resource.storage_key == ("", "namespaces")
                          else (DNS_SUBDOMAIN, 253))
        if not isinstance(name, str) or len(name) > limit or not pattern.match(name):
            raise ApiError(422, "Invalid",
                           f'{resource.kind} "{name}" is invalid: metadata.name: Invalid value: '
                           f'"{name}": a lowercase RFC 1123 '
                           f'{"label" if limit == 63 else "subdomain"} of at most {limit} '
                           f"characters is required", {"name": name, "kind": resource.plural})
        for key, value in (metadata.get("labels") or {}).items():
            problem = label_problem(key, value)
            if problem:
                raise ApiError(422, "Invalid", f'{resource.kind} "{name}" is invalid: '
                                               f"metadata.labels: {problem}",
                               {"name": name, "kind": resource.plural})
        for key, value in (metadata.get("annotations") or {}).items():
            if not isinstance(value, str):
                raise ApiError(400, "BadRequest", f"annotation {key!r}: the value must be a "
                                                  f"string")
        finalizers = metadata.get("finalizers") or []
        if not isinstance(finalizers, list) or not all(isinstance(f, str) for f in finalizers):
            raise ApiError(422, "Invalid", "metadata.finalizers must be a list of strings")

    def _apply_schema(self, resource: ResourceType, obj: dict, strict: bool) -> None:
        """Prune, default and validate a custom resource by its CRD's schema, as the API server
        does before storing it: 422 Invalid listing every problem, or 400 for an unknown field
        when the client asked for fieldValidation=Strict."""
        if resource.schema is None:
            return
        unknown = resource.schema.prune(obj)
        name = obj["metadata"]["name"]
        if unknown and strict:
            fields = ", ".join(f'unknown field "{path.lstrip(".")}"' for path in unknown)
            raise ApiError(400, "BadRequest", f"strict decoding error: {fields}")
        resource.schema.apply_defaults(obj)
        problems = resource.schema.validate(obj)
        if problems:
            causes = [{"reason": "FieldValueRequired" if message == "Required value"
                       else "FieldValueInvalid", "field": path, "message": message}
                      for path, message in problems]
            listed = [f"{path}: {message}" for path, message in problems]
            summary = listed[0] if len(listed) == 1 else "[" + ", ".join(listed) + "]"
            raise ApiError(422, "Invalid", f'{resource.kind}.{resource.group} "{name}" is '
                                           f"invalid: {summary}",
                           {"name": name, "group": resource.group, "kind": resource.kind,
                            "causes": causes})

    def _update(self, resource: ResourceType, namespace: str | None, name: str, data: dict,
                subresource: str | None, dry_run: bool = False, strict: bool = False) -> dict:
        old = self._existing(resource, namespace, name)
        new = copy.deepcopy(data)
        new.setdefault("metadata", {})
        if new["metadata"].get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the name "
                                              "on the URL")
        self._check_kind(resource, new)
        return self._commit(resource, old, new, subresource, dry_run, strict)

    def _patch(self, resource: ResourceType, namespace: str | None, name: str, data: Any,
               content_type: str, subresource: str | None, query: dict,
               dry_run: bool = False, strict: bool = False) -> tuple[dict, bool]:
        key = (namespace or "", name)
        if content_type == "application/apply-patch+yaml":
            # Server-side apply, naively: create when absent, else a merge patch. There is no
            # field ownership, so no apply conflicts, and lists are replaced, not merged.
            if not isinstance(data, dict):
                raise ApiError(400, "BadRequest", "an apply patch must be an object")
            if key not in self.store[resource.storage_key]:
                data = copy.deepcopy(data)
                data.setdefault("metadata", {})["name"] = name
                return self._create(resource, namespace, data, dry_run=dry_run,
                                    strict=strict), True
            content_type = "application/merge-patch+json"
        old = self._existing(resource, namespace, name)
        base = copy.deepcopy(old)
        if content_type == "application/json-patch+json":
            if not isinstance(data, list):
                raise ApiError(400, "BadRequest", "a JSON patch must be a list of operations")
            try:
                new = jsonpatch.apply_patch(base, data)
            except jsonpatch.JsonPatchTestFailed as error:
                raise ApiError(422, "Invalid", f"the server rejected our request due to an "
                                               f"error in our request: {error}") from None
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
                raise ApiError(422, "Invalid", f"the JSON patch cannot be applied: {error}"
                               ) from None
        elif content_type in ("application/merge-patch+json",
                              "application/strategic-merge-patch+json"):
            # A strategic merge patch is read as a merge patch: lists are replaced, not merged
            # by their keys (docs/testing.md).
            if not isinstance(data, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be an object")
            new = _merge_patch(base, data)
        else:
            raise ApiError(415, "UnsupportedMediaType",
                           "the body of the request was in an unknown format - accepted media "
                           "types include: application/json-patch+json, "
                           "application/merge-patch+json, application/apply-patch+yaml, "
                           "application/strategic-merge-patch+json")
        if not isinstance(new, dict) or not isinstance(new.get("metadata"), dict):
            raise ApiError(422, "Invalid", "the patched object must keep its metadata")
        return self._commit(resource, old, new, subresource, dry_run, strict), False

    def _commit(self, resource: ResourceType, old: dict, new: dict, subresource: str | None,
                dry_run: bool, strict: bool = False) -> dict:
        """Store `new` in place of `old`, as the API server does after a PUT or a PATCH."""
        old_metadata, metadata = old["metadata"], new["metadata"]
        name = old_metadata["name"]
        sent_version = metadata.get("resourceVersion")
        if sent_version is not None and str(sent_version) != old_metadata["resourceVersion"]:
            raise ApiError(409, "Conflict",
                           f'Operation cannot be fulfilled on {resource.qualified} "{name}": the '
                           f"object has been modified; please apply your changes to the latest "
                           f"version and try again",
                           {"name": name, "group": resource.group, "kind": resource.plural})
        if resource.has_status:
            if subresource == "status":
                # Through /status only the status changes.
                status = new.get("status")
                new = copy.deepcopy(old)
                if status is None:
                    new.pop("status", None)
                else:
                    new["status"] = status
                metadata = new["metadata"]
            elif "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        for managed in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp",
                        "deletionGracePeriodSeconds", "generation"):
            if managed in old_metadata:
                metadata[managed] = old_metadata[managed]
            else:
                metadata.pop(managed, None)
        metadata["resourceVersion"] = old_metadata["resourceVersion"]
        new["kind"], new["apiVersion"] = old["kind"], old["apiVersion"]
        self._validate(resource, new)
        self._apply_schema(resource, new, strict)
        if old_metadata.get("deletionTimestamp"):
            added = set(metadata.get("finalizers") or []) - set(old_metadata.get("finalizers")
                                                                or [])
            if added:
                raise ApiError(422, "Invalid", f'{resource.kind} "{name}" is invalid: '
                                               f"metadata.finalizers: Forbidden: no new "
                                               f"finalizers can be added if the object is being "
                                               f"deleted")
        if new == old:
            return old  # a no-op write: no new resourceVersion, no watch event
        if _spec_part(new, resource) != _spec_part(old, resource):
            metadata["generation"] = int(old_metadata.get("generation", 1)) + 1
        if dry_run:
            return new
        if resource.storage_key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            try:
                self.register_crd(new)
            except ValueError as error:
                raise ApiError(422, "Invalid", str(error)) from None
        metadata["resourceVersion"] = self._next_revision()
        if metadata.get("deletionTimestamp") and not metadata.get("finalizers"):
            self._take(resource, new)
            self._emit(resource, "DELETED", new)
            self._after_removal(resource, new)
        else:
            self._put(resource, new)
            self._emit(resource, "MODIFIED", new)
            self._collect_if_orphan(resource, new)
        return new

    def _delete(self, resource: ResourceType, namespace: str | None, name: str, options: dict,
                dry_run: bool = False) -> dict:
        old = self._existing(resource, namespace, name)
        preconditions = options.get("preconditions") or {}
        for field_name in ("uid", "resourceVersion"):
            expected = preconditions.get(field_name)
            if expected is not None and str(expected) != old["metadata"].get(field_name):
                raise ApiError(409, "Conflict",
                               f'Operation cannot be fulfilled on {resource.qualified} "{name}": '
                               f"Precondition failed: {field_name}", {"name": name})
        if dry_run:
            return old
        metadata = old["metadata"]
        if options.get("propagationPolicy") == "Orphan" or options.get("orphanDependents"):
            self.orphaning.add(metadata["uid"])
        if metadata.get("deletionTimestamp"):
            return old
        finalizers = list(metadata.get("finalizers") or [])
        is_namespace = resource.storage_key == ("", "namespaces")
        if finalizers or is_namespace:
            new = copy.deepcopy(old)
            new["metadata"]["deletionTimestamp"] = now_rfc3339()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["metadata"]["resourceVersion"] = self._next_revision()
            if is_namespace:
                new["status"] = {"phase": "Terminating"}
            self._put(resource, new)
            self._emit(resource, "MODIFIED", new)
            if is_namespace:
                self._empty_namespace(name)
            return new
        removed = copy.deepcopy(old)
        removed["metadata"]["resourceVersion"] = self._next_revision()
        self._take(resource, removed)
        self._emit(resource, "DELETED", removed)
        self._after_removal(resource, removed)
        return removed

    def _empty_namespace(self, namespace: str) -> None:
        """The namespace controller: delete everything in a terminating namespace, then the
        namespace itself once its last object is gone (finalizers are honoured)."""
        seen: set[tuple[str, str]] = set()
        for resource in list(self.types.values()):
            if not resource.namespaced or resource.storage_key in seen:
                continue
            seen.add(resource.storage_key)
            for key in [k for k in self.store[resource.storage_key] if k[0] == namespace]:
                self._delete(resource, namespace, key[1], {})
        self._remove_namespace_if_empty(namespace)

    def _remove_namespace_if_empty(self, namespace: str) -> None:
        holder = self.store[("", "namespaces")].get(("", namespace))
        if holder is None or not holder["metadata"].get("deletionTimestamp"):
            return
        for key, objects in self.store.items():
            if key != ("", "namespaces") and any(k[0] == namespace for k in objects):
                return
        removed = copy.deepcopy(holder)
        removed["metadata"]["resourceVersion"] = self._next_revision()
        namespaces = self._type("", "v1", "namespaces")
        self._take(namespaces, removed)
        self._emit(namespaces, "DELETED", removed)

    def _after_removal(self, resource: ResourceType, obj: dict) -> None:
        if resource.storage_key == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self._unregister_crd(obj)
        self._collect_dependents(obj)
        namespace = obj["metadata"].get("namespace")
        if namespace:
            self._remove_namespace_if_empty(namespace)

    # ---------- storage and the garbage collector ----------

    def _put(self, resource: ResourceType, obj: dict) -> None:
        metadata = obj["metadata"]
        objects = self.store[resource.storage_key]
        key = (metadata.get("namespace", ""), metadata["name"])
        if key in objects:
            self._unindex(resource, objects[key])
        objects[key] = obj
        self.by_uid[metadata["uid"]] = (resource.storage_key, key[0], key[1], obj["kind"])
        for reference in metadata.get("ownerReferences") or []:
            self.dependents.setdefault(str(reference.get("uid")), set()).add(
                (resource.storage_key, *key))

    def _take(self, resource: ResourceType, obj: dict) -> None:
        metadata = obj["metadata"]
        self.store[resource.storage_key].pop((metadata.get("namespace", ""), metadata["name"]))
        self._unindex(resource, obj)

    def _unindex(self, resource: ResourceType | None, obj: dict) -> None:
        metadata = obj["metadata"]
        self.by_uid.pop(metadata.get("uid"), None)
        if resource is None:
            return
        entry = (resource.storage_key, metadata.get("namespace", ""), metadata["name"])
        for reference in metadata.get("ownerReferences") or []:
            self.dependents.get(str(reference.get("uid")), set()).discard(entry)

    def _has_live_owner(self, obj: dict) -> bool:
        """Whether an owner the object names still exists: same uid, kind and name, and in the
        object's namespace or cluster-scoped (a reference across namespaces never resolves)."""
        namespace = obj["metadata"].get("namespace", "")
        for reference in obj["metadata"].get("ownerReferences") or []:
            found = self.by_uid.get(str(reference.get("uid")))
            if found and found[2] == reference.get("name") and found[3] == reference.get("kind") \
                    and found[1] in ("", namespace):
                return True
        return False

    def _collect_if_orphan(self, resource: ResourceType, obj: dict) -> None:
        """Background garbage collection of an object all of whose owners are gone, e.g. one
        created with an owner reference to a uid that does not exist."""
        if obj["metadata"].get("ownerReferences") and not self._has_live_owner(obj):
            self._delete(resource, obj["metadata"].get("namespace"), obj["metadata"]["name"], {})

    def _collect_dependents(self, owner: dict) -> None:
        uid = owner["metadata"].get("uid")
        dependents = self.dependents.pop(uid, set())
        orphan = uid in self.orphaning
        self.orphaning.discard(uid)
        for storage_key, namespace, name in sorted(dependents):
            resource = self.types_by_storage.get(storage_key)
            obj = self.store.get(storage_key, {}).get((namespace, name))
            if resource is None or obj is None:
                continue
            if orphan:  # the dependents stay, without the reference to their owner
                kept = [r for r in obj["metadata"]["ownerReferences"] if r.get("uid") != uid]
                new = copy.deepcopy(obj)
                if kept:
                    new["metadata"]["ownerReferences"] = kept
                else:
                    new["metadata"].pop("ownerReferences")
                self._commit(resource, obj, new, None, dry_run=False)
            elif not self._has_live_owner(obj):
                self._delete(resource, namespace or None, name, {})

    def _next_revision(self) -> str:
        self.revision += 1
        return str(self.revision)

    # ---------- watches ----------

    def _emit(self, resource: ResourceType, event_type: str, obj: dict) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
        revision = int(obj["metadata"]["resourceVersion"])
        history = self.events[resource.storage_key]
        if len(history) == history.maxlen:
            self.events_floor[resource.storage_key] = history[0][0]
        history.append((revision, event_type, obj))
        for watcher in self.watchers:
            if watcher.resource.storage_key != resource.storage_key:
                continue
            if watcher.namespace is not None and obj["metadata"].get("namespace") != \
                    watcher.namespace:
                continue
            if watcher.matches(obj):
                watcher.queue.put_nowait((event_type, obj))

    async def _serve_watch(self, raw: aiohttp.web.BaseRequest, resource: ResourceType,
                           namespace: str | None, name: str | None, query: dict, table: bool,
                           include_object: str) -> aiohttp.web.StreamResponse:
        try:
            labels_match = parse_label_selector(query.get("labelSelector", ""))
            fields_match = parse_field_selector(query.get("fieldSelector", ""),
                                                self._field_selectors(resource))
        except SelectorError as error:
            raise ApiError(400, "BadRequest", str(error)) from None

        def matches(obj: dict) -> bool:
            return ((name is None or obj["metadata"]["name"] == name)
                    and labels_match(obj["metadata"].get("labels") or {}) and fields_match(obj))

        queue: asyncio.Queue = asyncio.Queue()
        since = query.get("resourceVersion", "")
        if since in ("", "0"):
            for key, obj in sorted(self.store[resource.storage_key].items()):
                if (namespace is None or key[0] == namespace) and matches(obj):
                    queue.put_nowait(("ADDED", obj))
        elif not since.isdigit() or int(since) < self.events_floor[resource.storage_key]:
            queue.put_nowait(("ERROR", {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": f"too old resource version: {since}", "reason": "Expired",
                "code": 410}))
        else:
            for revision, event_type, obj in self.events[resource.storage_key]:
                if revision > int(since) and (namespace is None or obj["metadata"].get(
                        "namespace") == namespace) and matches(obj):
                    queue.put_nowait((event_type, obj))
        watcher = Watcher(resource, namespace, matches, queue, table, include_object)
        self.watchers.add(watcher)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw)
        timeout = float(query["timeoutSeconds"]) if query.get("timeoutSeconds") else None
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                if item is None:
                    break
                event_type, obj = item
                if event_type != "ERROR":
                    obj = self._view(resource, obj)
                    if table:
                        obj = self._table(resource, [obj], include_object, {
                            "resourceVersion": obj["metadata"]["resourceVersion"]})
                line = json.dumps({"type": event_type, "object": obj}) + "\n"
                await response.write(line.encode())
                if event_type == "ERROR":
                    break
        except ConnectionResetError:  # the client went away
            pass
        finally:
            self.watchers.discard(watcher)
        try:
            await response.write_eof()
        except ConnectionResetError:
            pass
        return response

    # ---------- tables for kubectl get ----------

    def _table(self, resource: ResourceType, items: list[dict], include_object: str,
               metadata: dict) -> dict:
        columns = resource.printer_columns or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        paths = resource.column_paths or [compile_path(".metadata.creationTimestamp")]
        definitions = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                        "description": "Name must be unique within a namespace."}]
        for column in columns:
            definitions.append({"name": column["name"], "type": column.get("type", "string"),
                                "format": column.get("format", ""),
                                "description": column.get("description", ""),
                                "priority": column.get("priority", 0)})
        rows = []
        for obj in items:
            cells: list[Any] = [obj["metadata"]["name"]]
            for column, path in zip(columns, paths):
                cells.append(_cell(path(obj), column.get("type", "string")))
            if include_object == "None":
                row_object = None
            elif include_object == "Object":
                row_object = obj
            else:
                row_object = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                              "metadata": obj["metadata"]}
            rows.append({"cells": cells, "object": row_object})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": metadata,
                "columnDefinitions": definitions, "rows": rows}

    # ---------- testing endpoints ----------

    async def _serve_testing(self, raw: aiohttp.web.BaseRequest, path: str, query: dict,
                             body: bytes) -> aiohttp.web.StreamResponse:
        client = query.get("client")
        if path == "/_testing/requests" and raw.method == "GET":
            records = [r for r in self.recorded if client is None or r["client"] == client]
            return aiohttp.web.json_response({"requests": records})
        if path == "/_testing/permissions" and raw.method == "GET":
            used = sorted({(r["group"], r["resource"], r["verb"]) for r in self.recorded
                           if client is None or r["client"] == client})
            return aiohttp.web.json_response({"permissions": [
                {"group": g, "resource": res, "verb": v} for g, res, v in used]})
        if path == "/_testing/reset" and raw.method == "POST":
            self.reset_state()
            return aiohttp.web.json_response({"resourceVersion": str(self.revision)})
        if path == "/_testing/faults" and raw.method == "POST":
            spec = json.loads(body or b"{}")
            self.faults.append(Fault(
                verb=spec["verb"], group=spec.get("group"), resource=spec.get("resource"),
                status=int(spec.get("status", 500)), times=int(spec.get("times", 1)),
                client=spec.get("client"), delay=float(spec.get("delay", 0)),
                message=spec.get("message", "injected by the test")))
            return aiohttp.web.json_response({"faults": len(self.faults)})
        if path == "/_testing/close-watches" and raw.method == "POST":
            # As when the API server restarts: every watch ends; clients resume from the
            # resourceVersion they last saw.
            closed = len(self.watchers)
            for watcher in list(self.watchers):
                watcher.queue.put_nowait(None)
            return aiohttp.web.json_response({"closed": closed})
        if path == "/_testing/wait" and raw.method == "GET":
            # Long-poll until a resource holds `count` objects (in `namespace`, matching
            # `labelSelector`), so that a bench waits without loading the server with lists.
            resource = self._type(query.get("group", ""), query["version"], query["resource"])
            wanted = int(query["count"])
            deadline = time.monotonic() + float(query.get("timeout", "60"))
            labels_match = parse_label_selector(query.get("labelSelector", ""))
            while True:
                count = sum(1 for (namespace, _), obj in
                            self.store[resource.storage_key].items()
                            if query.get("namespace") in (None, namespace)
                            and labels_match(obj["metadata"].get("labels") or {}))
                remaining = deadline - time.monotonic()
                if count >= wanted or remaining <= 0:
                    return aiohttp.web.json_response({"count": count, "reached": count >= wanted})
                try:
                    await asyncio.wait_for(self._changed.wait(), remaining)
                    # Recount at most every 2 ms: a fan-out of thousands of objects would
                    # otherwise cost a recount per object.
                    await asyncio.sleep(0.002)
                except asyncio.TimeoutError:
                    pass
        if path == "/_testing/objects" and raw.method == "GET":
            # Every stored object, e.g. for a test that greps them all for a leaked secret.
            return aiohttp.web.json_response({
                "resourceVersion": str(self.revision),
                "objects": [obj for objects in self.store.values() for obj in objects.values()]})
        raise ApiError(404, "NotFound", f"no testing endpoint {raw.method} {path}")


def _version_priority(version: str) -> tuple:
    """Kubernetes' version order: GA before beta before alpha, higher numbers first."""
    match = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not match:
        return (3, version)
    major, stage, minor = match.groups()
    rank = {"None": 0, "beta": 1, "alpha": 2}[str(stage)]
    return (rank, -int(major), -int(minor or 0))


def _wants_table(accept: str) -> bool:
    for option in accept.split(","):
        parameters = {p.strip() for p in option.split(";")}
        if "as=Table" in parameters and "g=meta.k8s.io" in parameters and "v=v1" in parameters:
            return True
    return False


def _cell(values: list[Any], column_type: str) -> Any:
    """One Table cell as the API server computes it for a CRD column: the first value found,
    typed by the column; a wrong type or nothing found gives null; a date becomes an age."""
    if not values or values[0] is None:
        return None
    value = values[0]
    if column_type == "integer":
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else None
    if column_type == "number":
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
            else None
    if column_type == "boolean":
        return value if isinstance(value, bool) else None
    if column_type == "date":
        if not isinstance(value, str):
            return None
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return "<invalid>"
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return human_duration(datetime.datetime.now(datetime.UTC) - moment)
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def human_duration(elapsed: datetime.timedelta) -> str:
    """An age the way kubectl shows one: 45s, 3m20s, 25m, 4h10m, 30h, 3d4h, 20d, 3y40d."""
    seconds = int(elapsed.total_seconds())
    if seconds < -1:
        return "<invalid>"
    seconds = max(seconds, 0)
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m" + (f"{seconds % 60}s" if seconds % 60 else "")
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h" + (f"{minutes % 60}m" if minutes % 60 else "")
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{days}d" + (f"{hours % 24}h" if hours % 24 else "")
    if days < 365 * 2:
        return f"{days}d"
    if days < 365 * 8:
        years = days // 365
        return f"{years}y" + (f"{days % 365}d" if days % 365 else "")
    return f"{days // 365}y"


def _spec_part(obj: dict, resource: ResourceType) -> dict:
    """What a change of bumps metadata.generation: everything but metadata (and status, when
    the status has its own subresource)."""
    return {key: value for key, value in obj.items()
            if key != "metadata" and not (key == "status" and resource.has_status)}


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge, null removes a key, anything else (lists too) replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _parse_body(body: bytes, content_type: str) -> Any:
    if not body:
        return None
    if "protobuf" in content_type or "cbor" in content_type:
        # kubectl's typed commands (`kubectl create configmap`, `create secret`) send protobuf.
        raise ApiError(415, "UnsupportedMediaType",
                       f"the emulator reads JSON and YAML bodies only, not {content_type}: "
                       f"use `kubectl apply -f` or `kubectl create -f`")
    try:
        if "yaml" in content_type:
            return yaml.safe_load(body)
        return json.loads(body)
    except ValueError as error:
        raise ApiError(400, "BadRequest", f"the body is not valid JSON or YAML: {error}") from None


def _b64encode(text: str) -> str:
    import base64
    return base64.urlsafe_b64encode(text.encode()).decode()


def _b64decode(text: str) -> str:
    import base64
    return base64.urlsafe_b64decode(text.encode()).decode()


def write_kubeconfig(path: str, url: str, client: str = "tests",
                     namespace: str = "default") -> str:
    """A kubeconfig for kubectl and the kubernetes client; the bearer token names the client in
    the emulator's request record."""
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "emulator",
        "clusters": [{"name": "emulator", "cluster": {"server": url}}],
        "users": [{"name": client, "user": {"token": client}}],
        "contexts": [{"name": "emulator", "context": {"cluster": "emulator", "user": client,
                                                      "namespace": namespace}}],
    }
    with open(path, "w") as file:
        yaml.safe_dump(config, file)
    return path


async def serve(port: int, host: str, crds: list[str], namespaces: list[str],
                kubeconfig: str | None) -> None:
    emulator = KubeEmulator()
    emulator.startup_namespaces += [n for n in namespaces if n not in emulator.startup_namespaces]
    emulator.load_documents(crds)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with emulator, kmock.Server(emulator, host=host, port=port or None) as server:
        url = f"http://{host}:{server.port}"
        if kubeconfig:
            write_kubeconfig(kubeconfig, url)
        print(f"ready {url}", flush=True)
        await stop.wait()
        for watcher in list(emulator.watchers):
            watcher.queue.put_nowait(None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--crds", action="append", default=[],
                        help="a YAML file or a folder of them (CRDs and other objects); "
                             "repeatable")
    parser.add_argument("--namespace", action="append", default=[],
                        help="a namespace to create at start (and on reset); repeatable")
    parser.add_argument("--kubeconfig", help="write a kubeconfig for this emulator here")
    args = parser.parse_args(argv)
    try:
        asyncio.run(serve(args.port, args.host, args.crds, args.namespace, args.kubeconfig))
    except (ValueError, OSError) as error:
        print(f"kube_emulator: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
