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
