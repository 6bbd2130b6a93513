"""TestRuns: these handlers are the only writers of a TestRun's status. Without runs (no
--store or no --api-url) decisions/testrun.py decides the part-1 statuses; with them every
event asks cluster/runs.py for a decision of the phase machine.

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
from testlooper.kube.objects import timestamp

logger = logging.getLogger(__name__)


def register(registry: kopf.OperatorRegistry, runs_enabled: bool = False) -> None:
    if not runs_enabled:
        kopf.on.event("testlooper.dev", "v1alpha1", "testruns", registry=registry, id="status",
                      when=needs_status)(testrun_event)
        return
    # Runs become pods (cluster/runs.py): every change of a TestRun or of one of its pods asks
    # for a decision. The run pods are watched by cluster/runs.py itself (`_watch_run_pods`).
    kopf.on.event("testlooper.dev", "v1alpha1", "testruns", registry=registry, id="runs")(testrun_changed)


async def testrun_changed(type: str | None, body: kopf.Body, name: str, namespace: str, memo: OperatorContext,
                          **_) -> None:
    memo.runs.adopt_kopf_context()
    if type == "DELETED":
        memo.runs.forget(namespace, name)
    else:
        # The object as the watch brought it (the decisions read it from cluster/watch_cache.py).
        metadata = dict(body.get("metadata") or {})
        metadata.setdefault("namespace", namespace)
        metadata.setdefault("name", name)
        metadata.pop("managedFields", None)  # much of the object on a real cluster, read by nothing of ours
        memo.runs.testrun_changed({"apiVersion": body.get("apiVersion"), "kind": body.get("kind"), "metadata": metadata,
                                   "spec": dict(body.get("spec") or {}), "status": dict(body.get("status") or {})},
                                  version=metadata.get("resourceVersion"))


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
    now = timestamp(datetime.datetime.now(datetime.timezone.utc))
    patch = decide_status(dict(body.get("spec") or {}), dict(body.get("status") or {}),
                          dict(body.get("metadata", {}).get("annotations") or {}), now)
    if patch is None:
        return
    try:
        await memo.api.patch_status("testruns", namespace, name, patch)
    except Exception as exc:  # the next event (or kopf's re-list) brings it back
        memo.metrics.reconcile_errors.labels("TestRun").inc()
        logger.warning("TestRun %s/%s: status not written: %s", namespace, name, exc)
