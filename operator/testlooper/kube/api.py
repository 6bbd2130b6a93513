"""The Kubernetes API as the operator uses it, with retries: the requests the operator makes by
the hundred (its custom resources, run pods and Secrets) over aiohttp in the event loop, with
the official client's configuration and authentication; the rest through the official client,
run in threads.

Every call the operator makes goes through here, which keeps the RBAC it needs in one place to
read (the chart's rules, charts/testlooper/templates/_helpers.tpl, must grant exactly these, and the RBAC
coverage test checks that it does). Conflicts (409 on a write), throttling (429) and server or
connection errors are retried with backoff; "already exists" on a create and "not found" on a
delete are successes, since names are deterministic and the goal is the state, not the call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable
from urllib.parse import quote

GROUP = "testlooper.dev"
VERSION = "v1alpha1"
RETRIED_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
BACKOFFS = (0.2, 0.5, 1, 2, 4)
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_SECONDS = 60
LIST_PAGE_SIZE = 500
WATCH_SECONDS = 300  # a watch asks the server to end it after this, and is made again
AUTH_REUSE_SECONDS = 10.0  # the client's authentication headers are asked for again after this

logger = logging.getLogger(__name__)


class KubeApi:
    def __init__(self, threads: int = 8):
        from kubernetes import client, config

        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        api_client = client.ApiClient()
        api_client.user_agent = "testlooper-operator"
        self._client = api_client
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube-api")
        self._auth_cache: tuple[float, dict[str, str], str] | None = None
        self._session = None  # aiohttp's, made in the loop of the first request (`_session_here`)
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._api_exception = client.ApiException
        import urllib3

        # A refused or dropped connection reaches us as urllib3's MaxRetryError or ProtocolError,
        # which are not OSErrors.
        self._transport_error = urllib3.exceptions.HTTPError

    def close(self) -> None:
        """Stops the threads. An aiohttp session still open is closed if its loop can still run
        it (`aclose` is the way from inside the loop)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._client.close()
        session, self._session = self._session, None
        loop = self._session_loop
        if session is not None and not session.closed and not loop.is_closed() and not loop.is_running():
            loop.run_until_complete(session.close())

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None and not session.closed:
            await session.close()

    async def _call(self, function: Callable[..., Any], *args, ok_statuses: tuple[int, ...] = (), **kwargs) -> Any:
        """Call `function` (a coroutine function, or a blocking one run in a thread), retrying
        what may succeed later. A status in `ok_statuses` returns None instead of raising."""
        loop = asyncio.get_running_loop()
        for attempt, backoff in enumerate((*BACKOFFS, None)):
            try:
                if asyncio.iscoroutinefunction(function):
                    return await function(*args, **kwargs)
                return await loop.run_in_executor(self._pool, lambda: function(*args, **kwargs))
            except self._api_exception as exc:
                if exc.status in ok_statuses:
                    return None
                if exc.status not in RETRIED_STATUSES or backoff is None:
                    raise
                reason = exc.reason
            except (ConnectionError, OSError, self._transport_error) as exc:  # the server may be restarting
                if backoff is None:
                    raise
                reason = type(exc).__name__
            delay = backoff * (1 + random.random() / 2)
            logger.debug("retrying %s after %s (attempt %d, in %.1fs)", getattr(function, "__name__", "call"),
                         reason, attempt + 1, delay)
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    # -- custom resources ------------------------------------------------------------------------
    # These skip the client's generated methods for plain HTTP with the client's own
    # configuration and authentication: the generated methods validate every argument with
    # pydantic and walk every body to serialise it, which cost more CPU than the request itself
    # when a commit creates hundreds of TestRuns (bench/bench_operator.py).

    def _auth(self) -> tuple[dict[str, str], str]:
        """The authentication headers and the server's URL, as the client's configuration gives
        them, reused for AUTH_REUSE_SECONDS: asking it costs more than a small request (with a
        kubeconfig it reloads the file's settings every time, to refresh an expiring token)."""
        now = time.monotonic()
        cached = self._auth_cache
        if cached is None or now - cached[0] > AUTH_REUSE_SECONDS:
            headers: dict[str, str] = {}
            self._client.update_params_for_auth(headers, [], ["BearerToken"], "", "GET", None)
            cached = self._auth_cache = (now, headers, self._client.configuration.host)
        return cached[1], cached[2]

    async def _send(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                    query: dict[str, str] | None = None, decode: bool = True) -> Any:
        """One request in the event loop: no thread to hand over to and back, and aiohttp's C
        parser. A request costs the operator about a fifth of the CPU it did through the
        official client in a thread (docs/operator.md, "Measured"). Its answer decoded (None
        unless `decode`); ApiException for a status outside 2xx, ConnectionError when no
        answer came."""
        import aiohttp

        headers, host = await self._headers()
        data = None
        if body is not None:
            headers["Content-Type"] = content_type
            data = json.dumps(body).encode()
        session = self._session_here()
        try:
            async with session.request(method, host + path, params=query, data=data, headers=headers,
                                       proxy=self._client.configuration.proxy or None) as response:
                payload = await response.read()
                status, reason = response.status, response.reason
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:  # retried by `_call`
            raise ConnectionError(f"{method} {path}: {type(exc).__name__}: {exc}") from None
        if not 200 <= status < 300:
            raise self._refused(status, reason, payload)
        return json.loads(payload) if payload and decode else None

    def _refused(self, status: int, reason: str | None, payload: bytes) -> Exception:
        """The client's ApiException for an answer outside 2xx, as its own calls raise it."""
        error = self._api_exception(status=status, reason=reason)
        error.body = payload.decode("utf-8", "replace")
        return error

    async def _headers(self) -> tuple[dict[str, str], str]:
        """A request's headers and the server's URL. The authentication is asked of the client
        in a thread when it must be asked again (`_auth`): with a kubeconfig it rereads files,
        and an exec plugin runs a process."""
        cached = self._auth_cache
        if cached is not None and time.monotonic() - cached[0] <= AUTH_REUSE_SECONDS:
            auth, host = cached[1], cached[2]
        else:
            auth, host = await asyncio.get_running_loop().run_in_executor(self._pool, self._auth)
        return {"Accept": "application/json", "User-Agent": self._client.user_agent, **auth}, host

    def _session_here(self):
        """The aiohttp session of the running loop (one per loop: a session cannot move)."""
        import aiohttp

        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            configuration = self._client.configuration
            self._session_loop = loop
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=_ssl_context(configuration), limit=32),
                timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS), auto_decompress=True)
        return self._session

    @staticmethod
    def _path(plural: str, namespace: str, name: str = "", subresource: str = "") -> str:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{quote(namespace)}/{plural}"
        if name:
            path += f"/{quote(name)}"
        if subresource:
            path += f"/{subresource}"
        return path

    async def list_objects(self, plural: str, namespace: str, label_selector: str = "") -> list[dict]:
        query = {"labelSelector": label_selector} if label_selector else None
        answer = await self._call(self._send, "GET", self._path(plural, namespace), query=query)
        return answer.get("items") or []

    async def list_objects_paged(self, plural: str, namespace: str, slim: Callable[[dict], dict],
                                 page_size: int = LIST_PAGE_SIZE) -> list[dict]:
        """Every object, listed `page_size` at a time, each reduced by `slim` as its page
        arrives: a loop over thousands of TestRuns never holds them all whole at once (a
        namespace's 5,000 TestRuns are some 15 MB of JSON, many times that decoded)."""
        items: list[dict] = []
        query = {"limit": str(page_size)}
        while True:
            answer = await self._call(self._send, "GET", self._path(plural, namespace), query=query)
            items.extend(slim(item) for item in answer.get("items") or [])
            token = (answer.get("metadata") or {}).get("continue")
            if not token:
                return items
            query = {"limit": str(page_size), "continue": token}

    async def create_object(self, plural: str, namespace: str, body: dict) -> bool:
        """True when created, False when an object of that name existed already (names are
        deterministic, so that is the object we wanted)."""
        try:
            await self._call(self._create_once, plural, namespace, body)
        except AlreadyExists:
            return False
        return True

    async def _create_once(self, plural: str, namespace: str, body: dict):
        # A 409 on create means "exists": raised as AlreadyExists so that `_call` does not retry it.
        try:
            return await self._send("POST", self._path(plural, namespace), body, decode=False)
        except self._api_exception as exc:
            if exc.status == 409:
                raise AlreadyExists(body["metadata"]["name"]) from None
            raise

    async def patch_object(self, plural: str, namespace: str, name: str, patch: dict) -> dict | None:
        """A merge patch of the main resource; None when it is gone."""
        return await self._call(self._send, "PATCH", self._path(plural, namespace, name), patch,
                                MERGE_PATCH, ok_statuses=(404,))

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict,
                           resource_version: str = "") -> dict | None:
        """A merge patch of `status` through the status subresource; None when the object is gone.
        With `resource_version`, only if the object is still at that version: else it raises
        Conflict at once (not retried: the caller decides again from the object as it is now)."""
        path = self._path(plural, namespace, name, "status")
        if not resource_version:
            return await self._call(self._send, "PATCH", path, {"status": status}, MERGE_PATCH, ok_statuses=(404,))
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        return await self._call(self._patch_at_version, path, body, ok_statuses=(404,))

    async def _patch_at_version(self, path: str, body: dict):
        try:
            return await self._send("PATCH", path, body, MERGE_PATCH)
        except self._api_exception as exc:
            if exc.status == 409:
                raise Conflict(path) from None
            raise

    async def delete_object(self, plural: str, namespace: str, name: str) -> None:
        await self._call(self._send, "DELETE", self._path(plural, namespace, name), ok_statuses=(404,), decode=False)

    async def get_object(self, plural: str, namespace: str, name: str) -> dict | None:
        """One object as stored now (None when there is none): what a decision starts from,
        since an event's body may be older than the status last written."""
        return await self._call(self._send, "GET", self._path(plural, namespace, name), ok_statuses=(404,))

    async def ensure_peering(self, name: str, namespace: str | None) -> bool:
        """Create kopf's peering object (a KopfPeering in `namespace`, or a ClusterKopfPeering
        when None) unless it exists; kopf itself only patches it. True when created."""
        body = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering" if namespace else "ClusterKopfPeering",
                "metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "testlooper"}}}
        if namespace:
            create = lambda: self.custom.create_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", body)  # noqa: E731
        else:
            create = lambda: self.custom.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", body)  # noqa: E731
        return await self._call(create, ok_statuses=(409,)) is not None

    # -- core ------------------------------------------------------------------------------------
    # Pods and Secrets of the runs go through the same REST layer as the custom resources.

    @staticmethod
    def _core_path(plural: str, namespace: str | None, name: str = "") -> str:
        """The path of `plural` in `namespace`, or of every namespace's when None."""
        if namespace is None:
            return f"/api/v1/{plural}"
        return f"/api/v1/namespaces/{quote(namespace)}/{plural}" + (f"/{quote(name)}" if name else "")

    async def list_core(self, plural: str, namespace: str, label_selector: str = "") -> list[dict]:
        """`pods` or `secrets` of the namespace with those labels."""
        query = {"labelSelector": label_selector} if label_selector else None
        answer = await self._call(self._send, "GET", self._core_path(plural, namespace), query=query)
        return answer.get("items") or []

    async def create_core(self, plural: str, namespace: str, body: dict) -> bool:
        """True when created, False when one of that name existed already (a run's pod and
        Secret have deterministic names: that is the one wanted)."""
        try:
            await self._call(self._create_core_once, plural, namespace, body)
        except AlreadyExists:
            return False
        return True

    async def _create_core_once(self, plural: str, namespace: str, body: dict):
        try:
            return await self._send("POST", self._core_path(plural, namespace), body, decode=False)
        except self._api_exception as exc:
            if exc.status == 409:
                raise AlreadyExists(body["metadata"]["name"]) from None
            raise

    async def delete_core(self, plural: str, namespace: str, name: str) -> None:
        await self._call(self._send, "DELETE", self._core_path(plural, namespace, name), ok_statuses=(404,),
                         decode=False)


    async def list_core_versioned(self, plural: str, namespace: str | None,
                                  label_selector: str = "") -> tuple[list[dict], str]:
        """`list_core` (of every namespace when `namespace` is None), and the listing's
        resourceVersion, where a watch of the same goes on from."""
        path = self._core_path(plural, namespace)
        answer = await self._call(self._send, "GET", path, query={"labelSelector": label_selector} if label_selector else None)
        return answer.get("items") or [], (answer.get("metadata") or {}).get("resourceVersion") or ""

    async def watch_core(self, plural: str, namespace: str | None, label_selector: str, resource_version: str):
        """The events of `plural` (in `namespace`, or every namespace) after `resource_version`,
        as (type, object) pairs, until the server ends the watch (after WATCH_SECONDS) or it
        fails: ApiException for a refused watch, ConnectionError for a lost one."""
        import aiohttp

        path = self._core_path(plural, namespace)
        query = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": str(WATCH_SECONDS),
                 "resourceVersion": resource_version}
        if label_selector:
            query["labelSelector"] = label_selector
        headers, host = await self._headers()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT_SECONDS, sock_read=WATCH_SECONDS + 30)
        try:
            async with self._session_here().get(host + path, params=query, headers=headers, timeout=timeout,
                                                proxy=self._client.configuration.proxy or None) as response:
                if response.status != 200:
                    raise self._refused(response.status, response.reason, await response.read())
                pending = bytearray()
                async for chunk in response.content.iter_any():
                    pending += chunk
                    while (end := pending.find(b"\n")) >= 0:
                        line = bytes(pending[:end])
                        del pending[:end + 1]
                        if line.strip():
                            event = json.loads(line)
                            yield event.get("type") or "", event.get("object") or {}
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise ConnectionError(f"watch of {path}: {type(exc).__name__}: {exc}") from None

    async def create_event(self, involved: dict, type_: str, reason: str, message: str, component: str,
                           instance: str) -> None:
        """A core/v1 Event on `involved` (an object as the API returns it), as kubectl describe
        shows them: named by the server (generateName), counted once."""
        metadata = involved.get("metadata") or {}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"generateName": f"{component}-", "namespace": metadata.get("namespace", "")},
            "involvedObject": {"apiVersion": involved.get("apiVersion", ""), "kind": involved.get("kind", ""),
                               "name": metadata.get("name", ""), "namespace": metadata.get("namespace", ""),
                               "uid": metadata.get("uid", "")},
            "type": type_, "reason": reason, "message": message,
            "source": {"component": component}, "reportingComponent": component, "reportingInstance": instance,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1}
        await self._call(self._send, "POST", self._core_path("events", metadata.get("namespace", "")), body,
                         decode=False)

    async def read_secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Secret's `data` (base64 values), or None when there is no such Secret."""
        secret = await self.read_secret(namespace, name)
        return None if secret is None else secret["data"]

    async def read_secret(self, namespace: str, name: str) -> dict | None:
        """`{"data": {key: base64}, "annotations": {...}}` of the Secret, or None when there is none."""
        secret = await self._call(self.core.read_namespaced_secret, name, namespace, ok_statuses=(404,))
        if secret is None:
            return None
        return {"data": dict(secret.data or {}), "annotations": dict(secret.metadata.annotations or {})}


def _ssl_context(configuration):
    """The TLS the official client's configuration asks for (None for plain HTTP): its CA, its
    client certificate, whether to verify at all, and the name to check."""
    import ssl

    if not configuration.host.startswith("https"):
        return None
    context = ssl.create_default_context(cafile=configuration.ssl_ca_cert or None)
    if not configuration.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif configuration.assert_hostname is False:
        context.check_hostname = False
    if configuration.cert_file:
        context.load_cert_chain(configuration.cert_file, configuration.key_file or None)
    return context


class AlreadyExists(Exception):
    pass


class Conflict(Exception):
    """A write whose resourceVersion precondition no longer holds."""
