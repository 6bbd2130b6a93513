"""WorkerPools: their status says what their pods hold and what is queued for them.

What the pods hold is counted the way admission counts it (`count_pool_usage`, shared with
cluster/runs.py's admission round), so the status, the pool gauges and admission agree.
"""

from __future__ import annotations

import logging

import kopf

from testlooper.cluster import run_metrics
from testlooper.cluster.context import OperatorContext
from testlooper.decisions.pools import Usage, counting_view, pool_status, pool_usage, run_sizes
from testlooper.kube.objects import MANAGED_BY, MANAGED_BY_LABEL

logger = logging.getLogger(__name__)


def register(registry: kopf.OperatorRegistry, interval: float) -> None:
    kopf.timer("testlooper.dev", "v1alpha1", "workerpools", registry=registry, id="usage", interval=interval,
               initial_delay=0.5)(count_usage)
    kopf.on.event("testlooper.dev", "v1alpha1", "workerpools", registry=registry, id="forget-pool",
                  when=lambda type, **_: type == "DELETED")(forget_pool)


async def count_pool_usage(api, namespace: str, pools: list[dict], testruns: list[dict]) -> dict[str, Usage]:
    """What each pool of `namespace` holds, from the managed pods of the namespace and of each
    pool's own spec.namespace (`decisions.pools.pool_usage`)."""
    pods = []
    for pod_namespace in sorted({namespace} | {(p.get("spec") or {}).get("namespace") or namespace for p in pools}):
        pods += await api.list_core("pods", pod_namespace, f"{MANAGED_BY_LABEL}={MANAGED_BY}")
    return pool_usage(pods, run_sizes(testruns, pools))


async def count_usage(name: str, namespace: str, body: kopf.Body, memo: OperatorContext, **_) -> None:
    try:
        pools = await memo.api.list_objects("workerpools", namespace)
        # A page at a time, each reduced to what is counted: 5,000 TestRuns are never all held whole.
        testruns = await memo.api.list_objects_paged("testruns", namespace, counting_view)
        usage = await count_pool_usage(memo.api, namespace, pools, testruns)
        run_metrics.testruns_listed(memo, namespace, testruns)
        run_metrics.pools_counted(memo, namespace, pools, testruns, usage)
        status = pool_status(dict(body), pools, testruns, usage.get(name, Usage()))
        if {k: (body.get("status") or {}).get(k) for k in status} != status:
            await memo.api.patch_status("workerpools", namespace, name, status)
    except Exception as exc:
        memo.metrics.reconcile_errors.labels("WorkerPool").inc()
        logger.warning("WorkerPool %s/%s: usage not counted: %s", namespace, name, exc)


async def forget_pool(name: str, namespace: str, memo: OperatorContext, **_) -> None:
    memo.metrics.forget_pool(namespace, name)
