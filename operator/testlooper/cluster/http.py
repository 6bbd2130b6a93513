"""The operator's one HTTP server: /healthz, /readyz, /metrics, the push webhooks, and the worker
API at /runs/... when a worker backend is given (workerapi/protocol.py, the same code the local
runner serves). aiohttp, which kopf already brings.

Webhooks: a push names its repository by URL; every Repo whose `spec.url` is that repository
(compared in normal form, repos/urls.py) is checked against its own `webhookSecret`, and the
ones whose secret signs the body are polled at once. A payload no Repo matches gets 202 and
nothing else; one that matches but no secret signs gets 401 and changes nothing.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from testlooper.cluster.context import OperatorContext, WatchedRepo
from testlooper.decisions.webhooks import (
    MAX_PAYLOAD_BYTES, PayloadError, github_signature_valid, gitlab_token_valid, repository_urls,
)
from testlooper.workerapi.protocol import mount_worker_api

logger = logging.getLogger(__name__)
CONTEXT = web.AppKey("context", OperatorContext)
WEBHOOK_SECRET_TTL_SECONDS = 10


def build_app(context: OperatorContext, worker_backend=None) -> web.Application:
    app = web.Application(client_max_size=MAX_PAYLOAD_BYTES)
    app[CONTEXT] = context
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/webhooks/github", github_webhook)
    app.router.add_post("/webhooks/gitlab", gitlab_webhook)
    app.router.add_post("/githubReceivedAPush", github_webhook)  # the path old TestLooper hooks call
    if worker_backend is not None:
        mount_worker_api(app, worker_backend)
    return app


async def start_server(context: OperatorContext, worker_backend=None) -> web.AppRunner:
    runner = web.AppRunner(build_app(context, worker_backend), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, context.options.api_host, context.options.api_port)
    await site.start()
    return runner


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the event loop answers."""
    return web.json_response({"ok": True})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: kopf has started its watches."""
    context: OperatorContext = request.app[CONTEXT]
    if not context.ready.is_set():
        return web.json_response({"ok": False, "reason": "the operator is starting"}, status=503)
    return web.json_response({"ok": True, "repos": len(context.repos)})


async def metrics(request: web.Request) -> web.Response:
    context: OperatorContext = request.app[CONTEXT]
    body = generate_latest(context.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def github_webhook(request: web.Request) -> web.Response:
    event = request.headers.get("X-GitHub-Event", "push")
    signature = request.headers.get("X-Hub-Signature-256")
    return await _receive(request, "github", event, lambda secret, body: github_signature_valid(secret, body, signature))


async def gitlab_webhook(request: web.Request) -> web.Response:
    event = request.headers.get("X-Gitlab-Event", "Push Hook")
    token = request.headers.get("X-Gitlab-Token")
    kind = "push" if event in ("Push Hook", "Tag Push Hook", "System Hook") else event
    return await _receive(request, "gitlab", kind, lambda secret, body: gitlab_token_valid(secret, token))


async def _receive(request: web.Request, provider: str, event: str, signed) -> web.Response:
    # Anyone can call these before a signature is checked: a few at a time, so that a flood of
    # 25 MB bodies cannot take the operator's memory or its API quota (each reads Secrets).
    context: OperatorContext = request.app[CONTEXT]
    async with context.webhook_slots:
        return await _receive_one(request, context, provider, event, signed)


async def _receive_one(request: web.Request, context: OperatorContext, provider: str, event: str,
                       signed) -> web.Response:
    counter = context.metrics.webhooks
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        counter.labels(provider, "bad_payload").inc()
        return _answer(413, f"payload larger than {MAX_PAYLOAD_BYTES} bytes")
    if event == "ping":
        counter.labels(provider, "ignored").inc()
        return _answer(200, "pong")
    try:
        urls = repository_urls(provider, body)
    except PayloadError as exc:
        counter.labels(provider, "bad_payload").inc()
        return _answer(400, str(exc))
    candidates = context.repos.matching(urls)
    if not candidates:
        counter.labels(provider, "unknown_repo").inc()
        return _answer(202, "no Repo here tests this repository")
    woken = []
    for repo in candidates:
        secret = await _webhook_secret(context, repo)
        if secret and signed(secret, body):
            woken.append(repo)
    if not woken:
        counter.labels(provider, "bad_signature").inc()
        # One answer whichever Repo refused. (That a URL has Repos at all shows, 401 against the
        # 202 of an unknown URL, which the issue asks for; what they are called does not.)
        return _answer(401, "signature does not match")
    for repo in woken:
        repo.wake.set()
    counter.labels(provider, "accepted").inc()
    if event != "push":
        return _answer(202, f"{event} event: polling anyway")
    return _answer(202, f"polling {len(woken)} Repo(s)")


async def _webhook_secret(context: OperatorContext, repo: WatchedRepo) -> str:
    """The key `secret` of the Repo's webhookSecret Secret; "" when it has none (such a Repo
    takes no webhooks: an unsigned push could otherwise make it poll at will)."""
    if not repo.webhook_secret:
        return ""
    key = (repo.namespace, repo.webhook_secret)
    cached = context.webhook_secrets.get(key)
    if cached is not None and time.monotonic() - cached[0] < WEBHOOK_SECRET_TTL_SECONDS:
        data = cached[1]
    else:
        # Kept briefly, and read once however many requests ask at the same moment: a burst of
        # pushes (or of forged ones) costs one read per Secret; a rotated secret is taken
        # within the TTL.
        reading = context.webhook_secret_reads.get(key)
        if reading is None:
            reading = context.webhook_secret_reads[key] = asyncio.ensure_future(
                _read_and_keep(context, key))
        try:
            data = await asyncio.shield(reading)
        except Exception as exc:
            logger.warning("Repo %s/%s: webhook Secret %r unreadable: %s", repo.namespace, repo.name,
                           repo.webhook_secret, type(exc).__name__)
            return ""
    if not data or "secret" not in data:
        return ""
    try:
        return base64.b64decode(data["secret"]).decode("utf-8").strip()
    except (ValueError, UnicodeDecodeError):
        return ""


async def _read_and_keep(context: OperatorContext, key: tuple[str, str]) -> dict | None:
    """Read a webhook Secret and keep it, in one step: no request can find the read finished
    but its answer not kept yet, and start a second read."""
    try:
        data = await context.api.read_secret_data(*key)
        context.webhook_secrets[key] = (time.monotonic(), data)
        return data
    finally:
        context.webhook_secret_reads.pop(key, None)


def _answer(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=json.dumps({"message": message}) + "\n", content_type="application/json")


async def stop_server(runner: web.AppRunner) -> None:
    await asyncio.wait_for(runner.cleanup(), timeout=10)
