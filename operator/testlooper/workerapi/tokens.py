"""Per-run tokens: ``hex(HMAC-SHA256(operator secret, run id))``.

A token is derived, not stored: the operator can check one after a restart knowing only its
secret, and a token opens only the run whose id it was derived from.
"""

from __future__ import annotations

import hashlib
import hmac


def run_token(secret: bytes, run_id: str) -> str:
    if not secret:
        raise ValueError("the operator secret must not be empty")
    return hmac.new(secret, run_id.encode("utf-8"), hashlib.sha256).hexdigest()


def verify(secret: bytes, run_id: str, token: str) -> bool:
    """True when ``token`` is the run's token; the comparison takes the same time however much matches."""
    if not isinstance(token, str) or not token:
        return False
    return hmac.compare_digest(run_token(secret, run_id).encode("ascii"), token.encode("utf-8", "replace"))
