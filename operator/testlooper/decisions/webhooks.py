"""Push webhooks: which repository a payload names, and whether its signature holds.

Both are pure, so the HTTP handler (cluster/http.py) only reads the request, asks these,
and wakes the Repos they match.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from testlooper.repos.urls import normalize_url

MAX_PAYLOAD_BYTES = 25 * 1024 * 1024  # GitHub caps payloads at 25 MB


class PayloadError(ValueError):
    """A body that is not a push payload we can read."""


def github_signature_valid(secret: str, body: bytes, header: str | None) -> bool:
    """`X-Hub-Signature-256: sha256=<hex HMAC of the raw body>`, compared in constant time."""
    if not secret or not header or not header.startswith("sha256="):
        return False
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected.encode(), header.strip().encode())


def gitlab_token_valid(secret: str, header: str | None) -> bool:
    """`X-Gitlab-Token` is the shared secret itself; compared in constant time."""
    if not secret or header is None:
        return False
    return hmac.compare_digest(secret.encode(), header.encode())


def repository_urls(provider: str, body: bytes) -> set[str]:
    """The normalised URLs (repos/urls.py) by which the payload names its repository."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise PayloadError("the body is not JSON") from None
    except RecursionError:  # `[[[[...`: the parser's stack, not a server error
        raise PayloadError("the body is JSON nested too deeply") from None
    if not isinstance(payload, dict):
        raise PayloadError("the body is not a JSON object")
    if provider == "gitlab":
        sections, keys = ("project", "repository"), ("git_http_url", "git_ssh_url", "http_url", "ssh_url", "url",
                                                      "web_url", "homepage")
    else:
        sections, keys = ("repository",), ("clone_url", "ssh_url", "git_url", "html_url", "url", "svn_url")
    urls = set()
    for section in sections:
        described = payload.get(section)
        if not isinstance(described, dict):
            continue
        for key in keys:
            value = described.get(key)
            if isinstance(value, str) and value:
                urls.add(normalize_url(value))
    if not urls:
        raise PayloadError(f"the payload names no repository ({' or '.join(sections)} URLs)")
    return urls
