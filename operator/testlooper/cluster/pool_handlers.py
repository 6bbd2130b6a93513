"""WorkerPools: their status counts what is queued for them and in use, from the TestRuns."""

from __future__ import annotations

import logging

import kopf

from testlooper.cluster.context import OperatorContext
from testlooper.decisions.pools import pool_status

logger = logging.getLogger(__name__)


def register(registry: kopf.OperatorRegistry, interval: float) -> None:
    kopf.timer("testlooper.dev", "v1alpha1", "workerpools", registry=registry, id="usage", interval=interval,
               initial_delay=0.5)(count_usage)


async def count_usage(name: str, namespace: str, body: kopf.Body, memo: OperatorContext, **_) -> None:
    try:
        pools = await memo.api.list_objects("workerpools", namespace)
        testruns = await memo.api.list_objects("testruns", namespace)
        usage = pool_status(dict(body), pools, testruns)
        if {k: (body.get("status") or {}).get(k) for k in usage} != usage:
            await memo.api.patch_status("workerpools", namespace, name, usage)
    except Exception as exc:
        memo.metrics.reconcile_errors.labels("WorkerPool").inc()
        logger.warning("WorkerPool %s/%s: usage not counted: %s", namespace, name, exc)
