"""Whether the operator's Redis (the history store, and the worker API's results, heartbeats and
logs) answers, as the metrics `testlooper_store_up` (1/0) and `testlooper_store_errors_total`
say, and since when it answers again.

Every caller that finds Redis unreachable says so (`failed`); a monitor pings it every few
seconds (every second while it is down), so the gauge comes back to 1 even when nothing else
asks, and `back_since` says when it did: the phase machine counts no heartbeat as missed
before then, since no agent could send one (docs/operator.md, "When Redis is down").
"""

from __future__ import annotations

import asyncio
import logging
import time

logger = logging.getLogger(__name__)

PING_SECONDS_UP = 5.0
PING_SECONDS_DOWN = 1.0


class StoreHealth:
    def __init__(self, metrics=None, store=None):
        self.metrics = metrics
        self.store = store
        self.on_change = None  # called with the new state (True: up) when it changes
        self.up = True
        self.back_since = 0.0  # time.time() it last came back (0: never down)

    def failed(self, operation: str, error: BaseException | str) -> None:
        if self.metrics is not None:
            self.metrics.store_errors.labels(operation).inc()
            self.metrics.store_up.set(0)
        if self.up:
            logger.warning("the store is unreachable (%s): %s; runs wait, agents retry", operation, error)
            self.up = False
            if self.on_change is not None:
                self.on_change(False)

    def answered(self) -> None:
        if not self.up:
            self.back_since = time.time()
            logger.info("the store answers again")
            self.up = True
            if self.on_change is not None:
                self.on_change(True)
        if self.metrics is not None:
            self.metrics.store_up.set(1)

    async def monitor(self) -> None:
        """Pings the store until cancelled."""
        while True:
            try:
                await asyncio.to_thread(self.store.ping)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # StoreUnavailable, a connection error: said, and asked again
                self.failed("ping", exc)
            else:
                self.answered()
            await asyncio.sleep(PING_SECONDS_UP if self.up else PING_SECONDS_DOWN)


# -- the TestRun condition saying its runs' reports wait for the store ---------------------------

RECORDED = "Recorded"
STORE_UNAVAILABLE = "StoreUnavailable"
UNRECORDED_MESSAGE = ("the store is unreachable: this TestRun's RESULTs, heartbeats and logs cannot be recorded "
                      "now; its agents retry, and its runs are judged once it answers")


def recorded_conditions(status: dict, reports_known: bool, now: str) -> list[dict] | None:
    """The TestRun's conditions after a decision: `Recorded` False (reason StoreUnavailable)
    while its runs' reports could not be read, gone once they could; None when they stay."""
    from testlooper.kube.objects import condition, set_condition

    conditions = status.get("conditions") or []
    present = next((c for c in conditions if c.get("type") == RECORDED), None)
    if reports_known:
        return None if present is None else [c for c in conditions if c.get("type") != RECORDED]
    if present is not None and present.get("status") == "False":
        return None
    return set_condition(conditions, condition(RECORDED, False, STORE_UNAVAILABLE, UNRECORDED_MESSAGE, now, None))
