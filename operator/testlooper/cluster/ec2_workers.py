"""The run attempts of WorkerPools with provider ec2, as EC2 instances: what cluster/runs.py
calls where a pod pool would make, list or delete pods.

- `observe` gives the phase machine a TestRun's instances as it reads pods
  (decisions/ec2.py `observe_instance`); `launch` starts the instance of a run attempt (the
  machine's CreatePod), `terminate` ends it (its DeletePod).
- `usage` is what admission counts: every instance of the pool not terminated, at the size of
  its type, from a fresh describe plus the launches this process made that a describe may not
  list yet (EC2's describe lags behind run_instances).
- `sweep` runs at startup and every --ec2-sweep-interval per pool: it terminates orphans
  (our worker tag, no live run and not being launched, older than --ec2-orphan-grace), asks EC2 which instances fail
  their status checks, writes the pool's status (`instances`, `costPerHour`) and gauges, and
  has the TestRuns whose instances changed decide again.

One describe (paginated, filtered by the worker tag) serves every decision made within
DESCRIBE_TTL_SECONDS; boto3 calls run in threads, so a slow EC2 never stalls the event loop.
An instance's tag `<workerTag>` is `<namespace>/<pool>`: pools of the same name in two
namespaces never see each other's instances.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import ipaddress
import logging
import time
import urllib.parse

from testlooper.decisions import ec2 as placement
from testlooper.decisions.phases import PLACED
from testlooper.decisions.pools import Usage
from testlooper.kube import pods as pod_builder
from testlooper.workerapi import tokens
from testlooper.workerapi.cluster import parse_run_id

logger = logging.getLogger(__name__)

DESCRIBE_TTL_SECONDS = 2.0  # a decision reuses a pool's describe this recent
EC2_THREADS = 8  # boto3 calls at once; their own threads, so that EC2 backing off never holds Redis's
UNRECORDED_MEMORY_SECONDS = 3600.0  # a launch whose status write never came is forgotten after this
LEAVING_MEMORY = 10000  # instances whose first "going" sighting is remembered


async def _describe_or_error(run, fleet):
    """The fleet's describe, its Ec2Error kept as the value: the shared task may outlive every
    caller (each is shielded from it), and kopf re-raises the exception of any task that ends
    while it stops, so a describe failing then (EC2 gone at the exit) made the operator exit
    with a traceback."""
    from testlooper.ec2.fleet import Ec2Error

    try:
        return await run(fleet.describe)
    except Ec2Error as error:
        return error


def _failed(future) -> bool:
    """A describe that ended without the pool's instances: not to be reused."""
    if not future.done():
        return False
    return future.cancelled() or future.exception() is not None or isinstance(future.result(), Exception)


class Ec2Workers:
    def __init__(self, context, secret: bytes, *, heartbeat_seconds: float = 5.0, client_factory=None):
        self.context = context
        self.secret = secret
        self.heartbeat_seconds = heartbeat_seconds  # how often the agents beat (as a pod's do)
        self._client_factory = client_factory
        self._clients: dict[str, object] = {}  # region -> boto3 EC2 client
        self._fleets: dict[tuple[str, str], tuple[tuple, object]] = {}  # (namespace, pool) -> (settings, Ec2Fleet)
        self._described: dict[tuple[str, str], tuple[float, asyncio.Future]] = {}
        # Launched by this process and not yet listed by a describe: run id -> Instance.
        self._launched: dict[tuple[str, str], dict[str, placement.Instance]] = {}
        self._leaving: dict[str, float] = {}  # instance id -> when it was first seen going or gone
        self._impaired: set[str] = set()  # instance ids whose status checks failed, at the last sweep
        # Run ids launched by this process whose TestRun's status does not say so yet (its
        # decision is still launching the others, or its write failed): never orphans.
        self._unrecorded: dict[str, float] = {}
        self._executor = concurrent.futures.ThreadPoolExecutor(EC2_THREADS, thread_name_prefix="ec2")

    async def _run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(function, *args))

    def recorded(self, namespace: str, testrun: str) -> None:
        """The TestRun's status was written: the launches it made are in it (or adopted)."""
        prefix = f"{namespace}.{testrun}."
        for run_id in [run_id for run_id in self._unrecorded if run_id.startswith(prefix)]:
            del self._unrecorded[run_id]

    # -- the pool's fleet ---------------------------------------------------------------------

    def fleet(self, pool: dict):
        from testlooper.ec2.fleet import Ec2Fleet, make_client

        namespace, name = pool["metadata"]["namespace"], pool["metadata"]["name"]
        ec2 = (pool.get("spec") or {}).get("ec2") or {}
        settings = (ec2.get("region"), ec2.get("workerTag") or "testlooper-worker", ec2.get("subnetId"),
                    tuple(ec2.get("securityGroupIds") or ()), ec2.get("keyName"), ec2.get("instanceProfile"))
        known = self._fleets.get((namespace, name))
        if known is not None and known[0] == settings:
            return known[1]
        region = settings[0]
        client = self._clients.get(region)
        if client is None:
            client = self._clients[region] = (self._client_factory or make_client)(region)
        fleet = Ec2Fleet(client, f"{namespace}/{name}", settings[1], subnet_id=settings[2],
                         security_group_ids=settings[3], key_name=settings[4], instance_profile=settings[5],
                         sleep=time.sleep)
        self._fleets[(namespace, name)] = (settings, fleet)
        return fleet

    def unreachable_url(self) -> str | None:
        """Why EC2 workers could not reach the operator at the URL their user-data would carry,
        when that is plain (none, or a cluster-internal name): then no instance is launched,
        rather than billed until its boot times out. None when it may be reachable."""
        url = self.context.options.ec2_api_url or self.context.options.api_url
        host = (urllib.parse.urlsplit(url).hostname or "") if url else ""
        if not host:
            return "no URL for EC2 workers to reach the operator at: set --ec2-api-url"
        try:
            ipaddress.ip_address(host)
            return None  # an address: routed or not, the network says
        except ValueError:
            pass
        if host.endswith((".svc", ".svc.cluster.local", ".cluster.local")) or "." not in host and host != "localhost":
            return (f"EC2 workers cannot reach the operator at {url}, a cluster-internal address: set --ec2-api-url "
                    "(the chart's operator.ec2ApiUrl, or its Ingress)")
        return None

    def forget_pool(self, namespace: str, name: str) -> None:
        for table in (self._fleets, self._described, self._launched):
            table.pop((namespace, name), None)

    # -- what the pool holds ------------------------------------------------------------------

    async def instances(self, pool: dict, fresh: bool = False) -> list[placement.Instance]:
        """The pool's instances, every state (terminated ones too, while EC2 still lists them),
        with those launched here and not listed yet."""
        key = (pool["metadata"]["namespace"], pool["metadata"]["name"])
        entry = self._described.get(key)
        now = time.monotonic()
        if fresh or entry is None or now - entry[0] > DESCRIBE_TTL_SECONDS or _failed(entry[1]):
            fleet = self.fleet(pool)
            entry = (now, asyncio.ensure_future(_describe_or_error(self._run, fleet)))
            self._described[key] = entry
        described = await asyncio.shield(entry[1])
        if isinstance(described, Exception):
            raise described
        name = key[1]
        seen = {instance.run_id for instance in described if instance.run_id}
        launched = self._launched.setdefault(key, {})
        for run_id in [run_id for run_id, instance in launched.items()
                       if run_id in seen or time.time() - instance.launch_time > placement.LAUNCH_GRACE_SECONDS]:
            del launched[run_id]
        found = [placement.Instance(instance_id=i.instance_id, type=i.type, state=i.state, run_id=i.run_id,
                                    launch_time=i.launch_time or 0.0, pool=name,
                                    status_ok=False if i.instance_id in self._impaired else None)
                 for i in described]
        wall = time.time()
        for instance in found:
            if instance.state in placement.GOING_STATES and instance.instance_id not in self._leaving:
                if len(self._leaving) > LEAVING_MEMORY:
                    self._leaving.clear()
                self._leaving[instance.instance_id] = wall
        return found + list(launched.values())

    async def usage(self, namespace: str, pools: list[dict], fresh: bool = True) -> dict[str, Usage]:
        """What each EC2 pool of `pools` holds (instances not terminated, at their type's size)."""
        held = {}
        for pool in pools:
            if placement.is_ec2(pool):
                workers, cores, ram = placement.usage(placement.Ec2Pool.from_resource(pool),
                                                      await self.instances(pool, fresh=fresh))
                held[pool["metadata"]["name"]] = Usage(workers, cores, ram)
        return held

    async def observe(self, testrun: dict, pool: dict) -> list:
        """The TestRun's instances as the phase machine reads pods. Terminated instances stay
        listed for an hour: only the one of a run's current attempt is shown (it says the
        attempt was lost), so that old attempts' are not deleted again at every decision."""
        metadata = testrun["metadata"]
        prefix = f"{metadata['namespace']}.{metadata['name']}."
        current = {(int(index), int(entry.get("attempt") or 1))
                   for index, entry in ((testrun.get("status") or {}).get("active") or {}).items()
                   if entry.get("state") == PLACED}
        observed = {}
        for instance in await self.instances(pool):
            if not instance.run_id or not instance.run_id.startswith(prefix):
                continue
            try:
                _, _, run, attempt = parse_run_id(instance.run_id)
            except ValueError:
                continue
            if instance.state == "terminated" and (run, attempt) not in current:
                continue
            seen = placement.observe_instance(instance, run, attempt, leaving_since=self._leaving.get(instance.instance_id))
            # Two instances for one attempt (never by us: the launch is idempotent): the live one counts.
            if (run, attempt) not in observed or observed[(run, attempt)].phase == "Failed":
                observed[(run, attempt)] = seen
        return list(observed.values())

    # -- launching and terminating ------------------------------------------------------------

    async def launch(self, testrun: dict, pool: dict, run: int, attempt: int) -> bool:
        """Starts the instance of one run attempt; False when it had been launched already.
        Raises ValueError when no instance can be made for it (no type holds it, a bad value
        for the user-data)."""
        from testlooper.ec2 import user_data

        metadata, spec = testrun["metadata"], testrun.get("spec") or {}
        namespace = metadata["namespace"]
        definition = spec.get("definition") or {}
        kind = placement.instance_type_for(pool, definition)
        if isinstance(kind, placement.Unschedulable):
            raise ValueError(kind.message)
        ec2_pool = placement.Ec2Pool.from_resource(pool)
        run_id = pod_builder.run_id(namespace, metadata["name"], run, attempt)
        existing = [i for i in await self.instances(pool) if i.run_id == run_id and i.state != "terminated"]
        if existing:
            return False
        api_url = self.context.options.ec2_api_url or self.context.options.api_url
        image = task_image(definition, pool)
        host_ips = ((pool.get("spec") or {}).get("ec2") or {}).get("hostIps") or {}
        script = (user_data.windows if ec2_pool.platform == "windows" else user_data.linux)(
            api_url, run_id, tokens.run_token(self.secret, run_id), image, host_ips,
            heartbeat_seconds=self.heartbeat_seconds)
        fleet = self.fleet(pool)
        request = placement.Launch(run_id, kind, ec2_pool.ami, ec2_pool.platform)
        self._unrecorded[run_id] = time.time()  # before the call: a sweep may come while it is made
        instance_id = await self._run(fleet.launch, request, script, {"repo": f"{namespace}/{spec.get('repo', '')}"})
        key = (namespace, pool["metadata"]["name"])
        self._launched.setdefault(key, {})[run_id] = placement.Instance(
            instance_id=instance_id, type=kind.type, state="pending", run_id=run_id, launch_time=time.time(),
            pool=key[1])
        self.context.metrics.ec2_launches.labels(namespace, key[1], kind.type).inc()
        logger.info("TestRun %s/%s run %d attempt %d: launched %s (%s) in pool %s", namespace, metadata["name"], run,
                    attempt, instance_id, kind.type, key[1])
        return True

    async def terminate(self, pool: dict, run_id: str, reason: str) -> None:
        """Terminates the instance(s) of one run attempt (none known: nothing to do; the sweep
        reaps whatever a describe had not listed yet)."""
        ids = [i.instance_id for i in await self.instances(pool)
               if i.run_id == run_id and i.state not in placement.LEAVING_STATES]
        if not ids:
            return
        done = await self._run(self.fleet(pool).terminate, ids)
        self._counted_terminations(pool, reason, len(done))
        self._launched.get((pool["metadata"]["namespace"], pool["metadata"]["name"]), {}).pop(run_id, None)
        self._described.pop((pool["metadata"]["namespace"], pool["metadata"]["name"]), None)  # states changed

    def _counted_terminations(self, pool: dict, reason: str, count: int) -> None:
        if count:
            self.context.metrics.ec2_terminations.labels(pool["metadata"]["namespace"], pool["metadata"]["name"],
                                                         reason).inc(count)

    # -- the periodic sweep -------------------------------------------------------------------

    async def sweep(self, pool: dict, testruns: list[dict]) -> tuple[dict, list[tuple[str, str]]]:
        """Orphans terminated, status checks read; returns the pool's status fields and the
        TestRuns to decide again (an instance of theirs failed its checks, is going or gone).
        `testruns`: the namespace's TestRuns (counting_view is enough)."""
        namespace, name = pool["metadata"]["namespace"], pool["metadata"]["name"]
        ec2_pool = placement.Ec2Pool.from_resource(pool)
        fleet = self.fleet(pool)
        instances = await self.instances(pool, fresh=True)
        live = live_run_ids(testruns, name)
        now = time.time()
        for run_id in [r for r, since in self._unrecorded.items() if now - since > UNRECORDED_MEMORY_SECONDS]:
            del self._unrecorded[run_id]
        orphaned = placement.orphans(instances, live | set(self._unrecorded), now,
                                     getattr(self.context.options, "ec2_orphan_grace", placement.LAUNCH_GRACE_SECONDS))
        if orphaned:
            done = await self._run(fleet.terminate, orphaned)
            by_id = {i.instance_id: i for i in instances}
            for instance_id in done:
                logger.warning("pool %s/%s: terminated orphan instance %s (%s): it carries no live run (%s)",
                               namespace, name, instance_id, by_id[instance_id].type,
                               by_id[instance_id].run_id or "untagged")
            self.context.metrics.ec2_orphans.labels(namespace, name).inc(len(done))
            self._counted_terminations(pool, "Orphan", len(done))
            if done:
                instances = await self.instances(pool, fresh=True)
        running = [i.instance_id for i in instances if i.state == "running"]
        impaired = await self._run(fleet.impaired, running) if running else set()
        listed = {i.instance_id for i in instances}
        self._impaired = {i for i in self._impaired if i not in running and i in listed} | impaired
        instances = await self.instances(pool)  # with the status checks just read
        self.context.metrics.figures.ec2[(namespace, name)] = (placement.counts_by_state(ec2_pool, instances),
                                                              placement.cost_rate(ec2_pool, instances))
        to_decide = set()
        by_run = {i.run_id: i for i in instances if i.run_id}
        for run_id in live:
            instance = by_run.get(run_id)
            if instance is None or instance.state not in ("pending", "running") or instance.instance_id in impaired:
                _, testrun, _, _ = parse_run_id(run_id)
                to_decide.add((namespace, testrun))
        status = {"instances": placement.status_entries(ec2_pool, instances),
                  "costPerHour": placement.cost_rate(ec2_pool, instances)}
        return status, sorted(to_decide)


    async def reap_pool(self, pool: dict) -> None:
        """The pool was deleted: every instance of its own (its worker tag) is terminated, for
        nothing will watch or sweep them any more."""
        namespace, name = pool["metadata"]["namespace"], pool["metadata"]["name"]
        instances = await self.instances(pool, fresh=True)
        going = [i.instance_id for i in instances if i.state not in placement.LEAVING_STATES]
        if going:
            done = await self._run(self.fleet(pool).terminate, going)
            logger.warning("WorkerPool %s/%s was deleted: its instances %s are terminated", namespace, name,
                           ", ".join(done) or "(none left)")
            self._counted_terminations(pool, "PoolDeleted", len(done))
        self.forget_pool(namespace, name)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def live_run_ids(testruns: list[dict], pool_name: str) -> set[str]:
    """The run ids of the attempts the TestRuns placed in the pool have running now."""
    live = set()
    for testrun in testruns:
        status = testrun.get("status") or {}
        if status.get("workerPool") != pool_name:
            continue
        metadata = testrun.get("metadata") or {}
        for index, entry in (status.get("active") or {}).items():
            if entry.get("state") == PLACED:
                live.add(pod_builder.run_id(metadata.get("namespace", ""), metadata.get("name", ""), int(index),
                                            int(entry.get("attempt") or 1)))
    return live


def task_image(task: dict, pool: dict) -> str | None:
    """The image a Linux instance runs the task's commands in under docker (the task's, else the
    pool's defaultImage); None: on the machine itself."""
    image = (task or {}).get("image") or {}
    name = image.get("name") if isinstance(image, dict) else None
    return name or (pool.get("spec") or {}).get("defaultImage") or None
