"""kube/api.py against a real HTTP server that is not there yet: calls wait for it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kube_emulator import write_kubeconfig
from redis_server import free_port


def test_a_call_made_while_the_api_server_is_down_succeeds_once_it_is_up(tmp_path, monkeypatch):
    port = free_port()
    write_kubeconfig(str(tmp_path / "kubeconfig"), f"http://127.0.0.1:{port}", client="operator")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps({"apiVersion": "testlooper.dev/v1alpha1", "kind": "TestRunList", "items": [{"x": 1}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args):
            pass

    servers = []

    def come_up_later():
        time.sleep(0.8)  # the first tries are refused
        servers.append(ThreadingHTTPServer(("127.0.0.1", port), Handler))
        servers[0].serve_forever()

    from testlooper.kube.api import KubeApi

    api = KubeApi()
    try:
        started = time.monotonic()
        threading.Thread(target=come_up_later, daemon=True).start()
        items = asyncio.run(api.list_objects("testruns", "team-a"))
        assert items == [{"x": 1}] and time.monotonic() - started >= 0.7
    finally:
        api.close()
        if servers:
            servers[0].shutdown()


def test_a_paged_listing_gives_every_object_once_each_slimmed(kube, monkeypatch):
    from testlooper.kube.api import KubeApi

    kube.create_namespace("paged")
    for index in range(7):
        kube.api("POST", "/apis/testlooper.dev/v1alpha1/namespaces/paged/workerpools", {
            "apiVersion": "testlooper.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": f"pool-{index}"},
            "spec": {"provider": "kubernetes", "platform": "linux", "maxWorkers": index + 1}})
    monkeypatch.setenv("KUBECONFIG", kube.kubeconfig("operator"))
    api = KubeApi()
    try:
        listed = asyncio.run(api.list_objects_paged(
            "workerpools", "paged", lambda pool: (pool["metadata"]["name"], pool["spec"]["maxWorkers"]), page_size=3))
    finally:
        api.close()
    assert sorted(listed) == [(f"pool-{index}", index + 1) for index in range(7)]
    pages = [r for r in kube.requests(client="operator") if r["resource"] == "workerpools" and r["verb"] == "list"]
    assert len(pages) == 3


def test_a_status_write_at_a_version_is_refused_at_once_once_the_object_moved_on(kube, monkeypatch):
    from testlooper.kube.api import Conflict, KubeApi

    kube.create_namespace("versions")
    path = "/apis/testlooper.dev/v1alpha1/namespaces/versions/workerpools"
    created = kube.api("POST", path, {
        "apiVersion": "testlooper.dev/v1alpha1", "kind": "WorkerPool", "metadata": {"name": "pool"},
        "spec": {"provider": "kubernetes", "platform": "linux", "maxWorkers": 2}})
    monkeypatch.setenv("KUBECONFIG", kube.kubeconfig("operator"))
    api = KubeApi()

    async def scenario():
        version = created["metadata"]["resourceVersion"]
        written = await api.patch_status("workerpools", "versions", "pool", {"workers": 1}, resource_version=version)
        assert written["status"]["workers"] == 1 and written["metadata"]["resourceVersion"] != version
        started = time.monotonic()
        try:
            await api.patch_status("workerpools", "versions", "pool", {"workers": 2}, resource_version=version)
        except Conflict:
            pass
        else:
            raise AssertionError("a write at an old version was taken")
        assert time.monotonic() - started < 0.5  # not retried: the caller reads again and decides
        assert await api.patch_status("workerpools", "versions", "gone", {"workers": 2}, resource_version="1") is None
        return await api.get_object("workerpools", "versions", "pool")

    try:
        stored = asyncio.run(scenario())
    finally:
        api.close()
    assert stored["status"]["workers"] == 1


def test_the_authentication_is_asked_of_the_client_again_only_after_a_while(kube, monkeypatch):
    from testlooper.kube import api as kube_api

    kube.create_namespace("auth")
    monkeypatch.setenv("KUBECONFIG", kube.kubeconfig("operator"))
    monkeypatch.setattr(kube_api, "AUTH_REUSE_SECONDS", 0.3)
    api = kube_api.KubeApi()
    asked = []
    real = api._client.update_params_for_auth
    api._client.update_params_for_auth = lambda headers, *args: (asked.append(1), real(headers, *args))

    async def scenario():
        for _ in range(5):
            assert await api.list_objects("workerpools", "auth") == []
        time.sleep(0.4)
        assert await api.list_objects("workerpools", "auth") == []

    try:
        asyncio.run(scenario())
    finally:
        api.close()
    assert len(asked) == 2
    # Every request carried the credentials (the emulator names the client by its token).
    listed = [r for r in kube.requests(client="operator") if r["resource"] == "workerpools" and r["namespace"] == "auth"]
    assert len(listed) == 6
