"""kube/api.py against a real HTTP server that is not there yet: calls wait for it."""

from __future__ import annotations

import asyncio
import os
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kube_emulator import write_kubeconfig
from redis_server import free_port


def run_closing(api, coroutine):
    """`asyncio.run` of `coroutine`, then the API's aiohttp session closed in that loop."""
    async def main():
        try:
            return await coroutine
        finally:
            await api.aclose()
    return asyncio.run(main())


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
        items = run_closing(api, api.list_objects("testruns", "team-a"))
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
        listed = run_closing(api, api.list_objects_paged(
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
        stored = run_closing(api, scenario())
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
        run_closing(api, scenario())
    finally:
        api.close()
    assert len(asked) == 2
    # Every request carried the credentials (the emulator names the client by its token).
    listed = [r for r in kube.requests(client="operator") if r["resource"] == "workerpools" and r["namespace"] == "auth"]
    assert len(listed) == 6


def _certificates(directory) -> tuple[str, str, str]:
    """A CA, and a server certificate for 127.0.0.1 signed by it (openssl, as a cluster's CA)."""
    import subprocess

    ca_key, ca, key, request, cert = (str(directory / name) for name in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt"))
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "1",
        "-subj", "/CN=test-cluster-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request, "-subj", "/CN=127.0.0.1")
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", request, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert, "-days", "1",
        "-extfile", str(directory / "san.cnf"))
    return ca, cert, key


def test_the_in_loop_requests_speak_tls_with_the_kubeconfigs_ca_and_token(tmp_path, monkeypatch):
    """As against a real API server: HTTPS checked against the kubeconfig's CA, the bearer
    token sent, a 409 answered as Conflict and a 404 as None; a server whose certificate the
    CA did not sign is refused, never spoken to in clear."""
    import ssl

    import yaml

    ca, cert, key = _certificates(tmp_path)
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            if self.path.endswith("/workerpools/gone"):
                return self._answer(404, {"kind": "Status", "code": 404})
            self._answer(200, {"kind": "WorkerPoolList", "items": [{"metadata": {"name": "p"}}]})

        def do_PATCH(self):
            length = int(self.headers.get("Content-Length") or 0)
            seen.append((self.command, self.path, json.loads(self.rfile.read(length))))
            self._answer(409, {"kind": "Status", "code": 409, "reason": "Conflict"})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def kubeconfig(authority: str) -> str:
        path = tmp_path / f"kubeconfig-{os.path.basename(authority)}"
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "tls",
            "clusters": [{"name": "tls", "cluster": {"server": f"https://127.0.0.1:{server.server_port}",
                                                     "certificate-authority": authority}}],
            "users": [{"name": "operator", "user": {"token": "s3cret-token"}}],
            "contexts": [{"name": "tls", "context": {"cluster": "tls", "user": "operator"}}]}))
        return str(path)

    from testlooper.kube import api as kube_api

    try:
        monkeypatch.setenv("KUBECONFIG", kubeconfig(ca))
        api = kube_api.KubeApi()

        async def scenario():
            assert await api.list_objects("workerpools", "team-a") == [{"metadata": {"name": "p"}}]
            assert await api.get_object("workerpools", "team-a", "gone") is None
            try:
                await api.patch_status("workerpools", "team-a", "p", {"workers": 1}, resource_version="7")
            except kube_api.Conflict:
                return True
            return False

        assert run_closing(api, scenario())
        api.close()
        assert seen[0] == ("GET", "/apis/testlooper.dev/v1alpha1/namespaces/team-a/workerpools",
                           "Bearer s3cret-token")
        assert seen[2] == ("PATCH", "/apis/testlooper.dev/v1alpha1/namespaces/team-a/workerpools/p/status",
                           {"metadata": {"resourceVersion": "7"}, "status": {"workers": 1}})

        # Another CA: the server is not the cluster's, and nothing is sent to it.
        other, _, _ = _certificates(tmp_path / "other" if (tmp_path / "other").mkdir() is None else tmp_path)
        monkeypatch.setenv("KUBECONFIG", kubeconfig(other))
        monkeypatch.setattr(kube_api, "BACKOFFS", ())
        stranger = kube_api.KubeApi()
        before = len(seen)
        try:
            run_closing(stranger, stranger.list_objects("workerpools", "team-a"))
        except ConnectionError as exc:
            assert "certificate" in str(exc).lower(), exc
        else:
            raise AssertionError("a server the CA did not sign was trusted")
        finally:
            stranger.close()
        assert len(seen) == before
    finally:
        server.shutdown()
