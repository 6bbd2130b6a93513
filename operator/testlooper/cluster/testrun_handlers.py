"""TestRuns: this handler is the only writer of a TestRun's status (decisions/testrun.py decides).

It is an event handler, not a change handler: it keeps no progress annotations and adds no
finalizer, so a TestRun costs one status patch when it appears and one when it is cancelled.
"""

from __future__ import annotations

import datetime
import logging

import kopf

from testlooper.cluster.context import OperatorContext
from testlooper.decisions.repo import ENDED_PHASES
from testlooper.decisions.testrun import decide_status

logger = logging.getLogger(__name__)


def register(registry: kopf.OperatorRegistry) -> None:
    kopf.on.event("testlooper.dev", "v1alpha1", "testruns", registry=registry, id="status",
                  when=needs_status)(testrun_event)


def needs_status(body: kopf.Body, **_) -> bool:
    """Cheap pre-filter: most events (our own status patches coming back) need nothing, and
    skipping the handler call for them is most of kopf's cost per event."""
    status = body.get("status") or {}
    phase = status.get("phase")
    if not phase:
        return True
    return bool((body.get("spec") or {}).get("cancel")) and phase not in ENDED_PHASES


async def testrun_event(type: str | None, body: kopf.Body, name: str, namespace: str, memo: OperatorContext,
                        **_) -> None:
    if type == "DELETED" or body.get("metadata", {}).get("deletionTimestamp"):
        return
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    patch = decide_status(dict(body.get("spec") or {}), dict(body.get("status") or {}),
                          dict(body.get("metadata", {}).get("annotations") or {}), now)
    if patch is None:
        return
    try:
        await memo.api.patch_status("testruns", namespace, name, patch)
    except Exception as exc:  # the next event (or kopf's re-list) brings it back
        memo.metrics.reconcile_errors.labels("TestRun").inc()
        logger.warning("TestRun %s/%s: status not written: %s", namespace, name, exc)
