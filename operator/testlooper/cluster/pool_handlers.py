"""WorkerPools: their status says what their pods (or EC2 instances) hold and what is queued
for them, and whether their spec is accepted.

What the pods hold is counted the way admission counts it (`count_pool_usage`, shared with
cluster/runs.py's admission round), so the status, the pool gauges and admission agree. A pool
with provider ec2 is also swept (`ec2_sweep`, at startup and every --ec2-sweep-interval):
cluster/ec2_workers.py says what that does.
"""

from __future__ import annotations

import json
import logging
import time

import kopf

from testlooper.cluster import run_metrics
from testlooper.cluster.context import OperatorContext
from testlooper.decisions.ec2 import is_ec2
from testlooper.decisions.pools import Usage, counting_view, pool_status, pool_usage, run_sizes
from testlooper.ec2.fleet import Ec2Error
from testlooper.kube.models import SpecError, parse_workerpool_spec
from testlooper.kube.objects import MANAGED_BY, MANAGED_BY_LABEL, condition, set_condition

logger = logging.getLogger(__name__)


ACCEPTED = "Accepted"
EC2_AVAILABLE = "Ec2Available"  # an EC2 pool: whether its last sweep could list its instances


def register(registry: kopf.OperatorRegistry, interval: float, ec2_interval: float = 60.0) -> None:
    kopf.timer("testlooper.dev", "v1alpha1", "workerpools", registry=registry, id="usage", interval=interval,
               initial_delay=0.5)(count_usage)
    # At startup too (after a moment for the TestRuns' first decisions): orphans left by a
    # crash are reaped within a sweep interval of the operator coming back.
    kopf.timer("testlooper.dev", "v1alpha1", "workerpools", registry=registry, id="ec2-sweep", interval=ec2_interval,
               initial_delay=1.0, when=lambda spec, **_: spec.get("provider") == "ec2")(ec2_sweep)
    kopf.on.event("testlooper.dev", "v1alpha1", "workerpools", registry=registry, id="forget-pool",
                  when=lambda type, **_: type == "DELETED")(forget_pool)
    kopf.on.event("testlooper.dev", "v1alpha1", "workerpools", registry=registry, id="pool-changed",
                  when=lambda type, **_: type != "DELETED")(pool_changed)


_seen_specs: dict[tuple[str, str], str] = {}  # (namespace, pool) -> its spec as last seen


async def pool_changed(name: str, namespace: str, body: kopf.Body, memo: OperatorContext, **_) -> None:
    """A pool created or its spec changed (not its status): the TestRuns no pool took yet may
    fit it now, so they decide again."""
    # The spec itself, not metadata.generation: the emulator does not count generations.
    seen = json.dumps(dict(body.get("spec") or {}), sort_keys=True)
    if _seen_specs.get((namespace, name)) == seen or memo.runs is None:
        return
    _seen_specs[(namespace, name)] = seen
    memo.runs.pools_changed(namespace)
    try:
        for testrun in await memo.api.list_objects_paged("testruns", namespace, counting_view):
            status = testrun.get("status") or {}
            if status.get("phase") == "Queued" and not status.get("workerPool"):
                memo.runs.poke(namespace, testrun["metadata"]["name"])
    except Exception as exc:  # the next change, or the TestRun's own, tries again
        logger.warning("WorkerPool %s/%s: the TestRuns waiting for a pool not woken: %s: %s", namespace, name,
                       type(exc).__name__, exc)


async def count_pool_usage(api, namespace: str, pools: list[dict], testruns: list[dict]) -> dict[str, Usage]:
    """What each pool of `namespace` holds, from the managed pods of the namespace and of each
    pool's own spec.namespace (`decisions.pools.pool_usage`). EC2 pools hold no pods: the
    caller adds what their instances hold (cluster/ec2_workers.py `usage`)."""
    pods = []
    for pod_namespace in sorted({namespace} | {(p.get("spec") or {}).get("namespace") or namespace for p in pools}):
        pods += await api.list_core("pods", pod_namespace, f"{MANAGED_BY_LABEL}={MANAGED_BY}")
    return pool_usage(pods, run_sizes(testruns, pools))


def accepted_condition(body: kopf.Body, now: str) -> tuple[list[dict] | None, str | None]:
    """The pool's conditions with Accepted said (None when unchanged), and the refusal's
    message (None when the spec is accepted)."""
    try:
        parse_workerpool_spec(dict(body.get("spec") or {}))
        refusal = None
        said = condition(ACCEPTED, True, "SpecAccepted", "the spec is accepted", now, body["metadata"].get("generation"))
    except SpecError as exc:
        refusal = str(exc)
        said = condition(ACCEPTED, False, "SpecRefused", refusal, now, body["metadata"].get("generation"))
    conditions = list((body.get("status") or {}).get("conditions") or [])
    updated = set_condition(conditions, said)
    return (None if _without_times(conditions) == _without_times(updated) else updated), refusal


def _without_times(conditions: list[dict]) -> list[dict]:
    return [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in conditions]


async def count_usage(name: str, namespace: str, body: kopf.Body, memo: OperatorContext, **_) -> None:
    from testlooper.cluster.runs import accepted_pools
    from testlooper.decisions.phases import format_time

    try:
        conditions, refusal = accepted_condition(body, format_time(time.time()))
        if refusal is not None and conditions is not None:
            logger.warning("WorkerPool %s/%s is refused, and takes no run: %s", namespace, name, refusal)
        pools = accepted_pools(await memo.api.list_objects("workerpools", namespace))
        # A page at a time, each reduced to what is counted: 5,000 TestRuns are never all held whole.
        testruns = await memo.api.list_objects_paged("testruns", namespace, counting_view)
        usage = await count_pool_usage(memo.api, namespace, pools, testruns)
        this = next((pool for pool in pools if pool["metadata"]["name"] == name), None)
        if memo.runs is not None and is_ec2(this):  # what its instances hold, as last described
            try:
                usage.update(await memo.runs.ec2.usage(namespace, [this], fresh=False))
            except Ec2Error:
                pass  # the sweep says it, in the condition Ec2Available; the pods' count goes on
        run_metrics.testruns_listed(memo, namespace, testruns)
        run_metrics.pools_counted(memo, namespace, pools, testruns, usage)
        status = pool_status(dict(body), pools, testruns, usage.get(name, Usage()))
        if conditions is not None:
            status["conditions"] = conditions
        if {k: (body.get("status") or {}).get(k) for k in status} != status:
            await memo.api.patch_status("workerpools", namespace, name, status)
    except Exception as exc:
        memo.metrics.reconcile_errors.labels("WorkerPool").inc()
        logger.warning("WorkerPool %s/%s: usage not counted: %s", namespace, name, exc)


async def ec2_sweep(name: str, namespace: str, body: kopf.Body, memo: OperatorContext, **_) -> None:
    """An EC2 pool's orphans terminated, status checks read, status `instances` and
    `costPerHour` and the EC2 gauges written, and the TestRuns whose instances went decide."""
    if memo.runs is None:
        return
    from testlooper.cluster.runs import accepted_pools

    from testlooper.decisions.phases import format_time

    pool = dict(body)
    if not accepted_pools([pool]):
        return  # refused: count_usage says why; its instances are left as they are until it is mended
    current = body.get("status") or {}
    try:
        testruns = await memo.api.list_objects_paged("testruns", namespace, counting_view)
        try:
            status, to_decide = await memo.runs.ec2.sweep(pool, testruns)
            unreachable = memo.runs.ec2.unreachable_url()
            if unreachable is not None:  # orphans still go, but nothing is launched
                logger.warning("WorkerPool %s/%s launches nothing: %s", namespace, name, unreachable)
            said = condition(EC2_AVAILABLE, unreachable is None, "UnreachableApiUrl" if unreachable else "Listed",
                             unreachable or "EC2 answers", format_time(time.time()), None)
        except Ec2Error as exc:  # no credentials, no permission, no network: said where the user looks
            logger.warning("WorkerPool %s/%s: %s", namespace, name, exc)
            status, to_decide = {}, []
            said = condition(EC2_AVAILABLE, False, "Ec2Error", str(exc), format_time(time.time()), None)
        conditions = set_condition(current.get("conditions") or [], said)
        if _without_times(conditions) != _without_times(current.get("conditions") or []):
            status["conditions"] = conditions
        for key in to_decide:
            memo.runs.poke(*key)
        if status and {key: current.get(key) for key in status} != status:
            await memo.api.patch_status("workerpools", namespace, name, status)
    except Exception as exc:
        memo.metrics.reconcile_errors.labels("WorkerPool").inc()
        logger.warning("WorkerPool %s/%s: EC2 instances not swept: %s: %s", namespace, name, type(exc).__name__, exc)


async def forget_pool(name: str, namespace: str, body: kopf.Body, memo: OperatorContext, **_) -> None:
    memo.metrics.forget_pool(namespace, name)
    _seen_specs.pop((namespace, name), None)
    if memo.runs is None:
        return
    if is_ec2(dict(body)):
        try:  # nothing watches or sweeps its instances from now on: they go with it
            await memo.runs.ec2.reap_pool(dict(body))
        except Exception as exc:
            logger.warning("WorkerPool %s/%s was deleted, and its instances could not be terminated: %s: %s "
                           "(terminate those tagged %s yourself)", namespace, name, type(exc).__name__, exc,
                           f"{((body.get('spec') or {}).get('ec2') or {}).get('workerTag') or 'testlooper-worker'}="
                           f"{namespace}/{name}")
    memo.runs.ec2.forget_pool(namespace, name)
