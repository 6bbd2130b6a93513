"""`testlooper operator`: kopf with explicit settings, and the HTTP server beside it.

kopf is started through `kopf.operator()` in our own event loop rather than `kopf run`, so the
settings are set in one place from the command line (kopf's own style: settings are data) and
the HTTP server shares the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import faulthandler
import logging
import os
import signal
import threading
import time

import kopf

from testlooper.cluster import http, pool_handlers, repo_handlers, testrun_handlers
from testlooper.cluster.context import EVENT_COMPONENT, OperatorContext, OperatorOptions
from testlooper.cluster.metrics import OperatorMetrics
from testlooper.cluster.store_health import StoreHealth
from testlooper.workerapi.protocol import stop_pipe_readers

FINALIZER = "testlooper.dev/finalizer"
logger = logging.getLogger("testlooper.operator")


# The kinds our handlers only watch (kopf.on.event): no change handler, daemon or timer of ours
# compares their old and new essence, so building it is work thrown away (see below).
EVENT_ONLY_KINDS = frozenset({"TestRun", "Pod"})


class EventOnlyKindsDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf's diff-base in annotations, skipped for kinds that only have event handlers.

    kopf builds every event's "essence" (a deep copy of the whole object, status included) and
    compares it with the stored one before it looks at which handlers there are. For a TestRun
    or a run pod that is most of kopf's cost per event (bench/bench_runs.py), and nothing of
    ours reads it: a change handler, a daemon's or a timer's idling would, and these kinds have
    none. An object without `kind` keeps kopf's way (only slower)."""

    def __init__(self, event_only_kinds, **kwargs):
        super().__init__(**kwargs)
        self.event_only_kinds = frozenset(event_only_kinds)

    def build(self, *, body, extra_fields=None):
        if body.get("kind") in self.event_only_kinds:
            return None
        return super().build(body=body, extra_fields=extra_fields)

    def fetch(self, *, body):
        if body.get("kind") in self.event_only_kinds:
            return None
        return super().fetch(body=body)


def kopf_settings(options: OperatorOptions) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="testlooper.dev")
    settings.persistence.diffbase_storage = EventOnlyKindsDiffBase(
        EVENT_ONLY_KINDS, prefix="testlooper.dev", key="last-handled-configuration")
    settings.posting.reporting_component = EVENT_COMPONENT  # the TestRuns' Events say so too (cluster/runs.py)
    settings.posting.reporting_instance = os.environ.get("HOSTNAME", EVENT_COMPONENT)
    settings.posting.event_name_prefix = "testlooper-"
    settings.peering.name = options.peering_name
    settings.peering.priority = options.priority
    settings.peering.standalone = options.standalone
    settings.peering.clusterwide = options.all_namespaces
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.error_backoffs = (1, 2, 4, 8, 16, 30)
    return settings


def build_registry(options: OperatorOptions) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    # A registry of our own has no login handler: use the official client's (in-cluster, else
    # KUBECONFIG), the same configuration kube/api.py loads.
    kopf.on.login(registry=registry)(kopf.login_via_client)
    repo_handlers.register(registry)
    testrun_handlers.register(registry, runs_enabled=options.runs_enabled)
    pool_handlers.register(registry, options.pool_status_interval, options.ec2_sweep_interval)
    kopf.on.cleanup(registry=registry)(end_background_tasks)
    return registry


GC_YOUNG_THRESHOLD = 3000  # allocations between two collections of the youngest objects (Python's default: 700)


def tune_garbage_collector() -> None:
    """What is loaded by now (modules, the CRD models) lives as long as the process: frozen,
    the collector no longer walks it. And the operator allocates a great many short-lived
    objects per request and watch event (decoded JSON): at Python's default, a collection of
    the youngest ran every 700 allocations. Measured with bench/bench_runs.py (docs/operator.md):
    5-10 % less CPU per run. A higher threshold saves a little more CPU but lets garbage
    linger: at 10,000, 5,000 TestRuns held 290-303 MB (the target is 300), at 3,000 about 274."""
    import gc

    gc.collect()  # what startup left unreachable goes first: frozen, it would stay for good
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def end_background_tasks(memo: OperatorContext, **_) -> None:
    """At kopf's cleanup, once its watches have stopped: the run controller's admission loops
    never end by themselves, nor does a delayed recount of flaky cases, and kopf waits 5 s for
    every task still running before it cancels them, so each stop of the operator took up to
    5 s longer. (serve's own close of them, after kopf, is then a no-op.)"""
    if memo.runs is not None:
        await memo.runs.close()
    if memo.flaky_cases is not None:
        await memo.flaky_cases.close()


async def serve(options: OperatorOptions) -> None:
    from testlooper.kube.api import KubeApi

    os.makedirs(os.path.join(options.cache_dir, "mirrors"), exist_ok=True)
    # What the first poll needs, loaded now rather than in the middle of it.
    import git  # noqa: F401
    import testlooper.kube.objects  # noqa: F401  (and the pydantic models)
    import testlooper.planning  # noqa: F401
    import testlooper.repos.definitions  # noqa: F401
    from testlooper import definitions  # noqa: F401

    tune_garbage_collector()

    api = KubeApi()
    context = OperatorContext(options, api, OperatorMetrics())
    context.store = await asyncio.to_thread(open_history_store, options.store_url)
    context.store_health = StoreHealth(context.metrics, context.store)
    store_monitor = asyncio.ensure_future(context.store_health.monitor()) if context.store is not None else None
    if context.store is not None:
        from testlooper.cluster.run_metrics import FlakyCases

        context.flaky_cases = FlakyCases(context)
    worker_backend = await start_runs(context) if options.runs_enabled else None
    runner = await http.start_server(context, worker_backend)
    logger.info("serving /healthz, /metrics, webhooks%s on %s:%d", " and the worker API" if worker_backend else "",
                options.api_host, options.api_port)
    if not options.standalone:
        # kopf only patches its peering object; a first replica creates it, so that a fresh
        # install needs no extra manifest per namespace.
        for namespace in (None,) if options.all_namespaces else options.namespaces:
            await api.ensure_peering(options.peering_name, namespace)
    try:
        # kopf handles SIGTERM and SIGINT itself: it stops the watches, then the daemons.
        await kopf.operator(
            registry=build_registry(options),
            settings=kopf_settings(options),
            clusterwide=options.all_namespaces,
            namespaces=list(options.namespaces),
            standalone=options.standalone,
            priority=options.priority,
            # Naming the peering makes it mandatory in kopf (watches wait for the KopfPeering CRD),
            # which is right for replicas and wrong for --standalone.
            peering_name=None if options.standalone else options.peering_name,
            memo=context,
            ready_flag=context.ready,
        )
    finally:
        if store_monitor is not None:
            store_monitor.cancel()
        if context.runs is not None:
            await context.runs.close()
        if context.flaky_cases is not None:
            await context.flaky_cases.close()
        await http.stop_server(runner)
        await api.aclose()
        api.close()
        if context.store is not None:
            context.store.close()
        logger.info("stopped")


async def start_runs(context: OperatorContext):
    """The worker API's backend and the controller that turns runs into pods (cluster/runs.py)."""
    import redis

    from testlooper.cluster.runs import RunController, TestRunDirectory, ensure_operator_secret
    from testlooper.workerapi.cluster import ClusterBackend, SourceCache

    options = context.options
    secret = await ensure_operator_secret(context.api, options.secret_namespace)

    async def on_result(run, result):
        namespace, name = run.run_id.split(".")[:2]
        context.store_health.answered()
        if context.runs is not None:
            context.runs.poke(namespace, name)

    async def on_unrecorded(run, message):  # the store is down: its decision says so on the TestRun
        namespace, name = run.run_id.split(".")[:2]
        if context.runs is not None:
            context.runs.poke(namespace, name)

    directory = TestRunDirectory(context)
    backend = ClusterBackend(
        secret=secret, runs=directory, client=redis.Redis.from_url(options.store_url),
        history=context.store, artifacts=await asyncio.to_thread(artifact_store, options),
        source_cache=SourceCache(os.path.join(options.cache_dir, "sources")), on_result=on_result,
        on_unrecorded=on_unrecorded, on_store_error=context.store_health.failed)
    context.runs = RunController(context, secret=secret, backend=backend, worker_image=options.worker_image,
                                 directory=directory)
    context.store_health.on_change = context.runs.store_changed
    logger.info("runs become pods; workers reach the operator at %s", options.api_url)
    return backend


def artifact_store(options: OperatorOptions):
    """Where the runs' artifacts go: the S3 bucket of --s3-bucket, else the cache volume.

    The bucket is checked now and what is wrong said in one line (no bucket, no credentials,
    no answer). It is used anyway: uploads answer 503 until it works, and the agents retry,
    as with a store that does not answer."""
    from testlooper.cluster.runs import artifacts_root
    from testlooper.workerapi.cluster import DiskArtifactStore, S3ArtifactStore

    if not options.s3_bucket:
        return DiskArtifactStore(artifacts_root(options.cache_dir))
    store = S3ArtifactStore(options.s3_bucket, prefix=options.s3_prefix,
                            spool_dir=os.path.join(options.cache_dir, "s3-spool"))
    where = f"s3://{options.s3_bucket}/{options.s3_prefix}"
    problem = store.check()
    if problem:
        logger.error("artifact bucket %s cannot be used: %s; build artifacts cannot be stored until it can "
                     "(their uploads are refused with 503 and the agents retry)", where, problem)
    else:
        logger.info("artifacts go to %s (endpoint %s)", where, store.endpoint)
    return store


def open_history_store(url: str):
    """The history store, or None without --store. One that does not answer is said at startup
    and kept anyway: Redis clients reconnect, and what needs it retries at the next poll."""
    if not url:
        logger.warning("no --store: results and branch lines are not recorded in a history store")
        return None
    from testlooper.store import StoreError, open_store, store_identity

    try:
        store = open_store(url)
    except (StoreError, ValueError, OSError) as exc:
        logger.warning("history store %s does not answer: %s", store_identity(url), exc)
        return _ReopeningStore(url)
    try:
        store.ping()
    except (StoreError, OSError) as exc:
        logger.warning("history store %s does not answer: %s", store_identity(url), exc)
    else:
        logger.info("history store %s answers", store_identity(url))
    return store


class _ReopeningStore:
    """A store that could not be opened at startup: each call tries to open it again."""

    def __init__(self, url: str):
        self.url = url
        self._store = None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def __getattr__(self, name: str):
        if self._store is None:
            from testlooper.store import StoreUnavailable, open_store

            try:
                self._store = open_store(self.url)
            except (ValueError, OSError) as exc:
                raise StoreUnavailable(str(exc)) from None
        return getattr(self._store, name)


EXIT_GRACE_SECONDS = 10.0  # worker threads still busy this long after the loop has stopped are left


def run(options: OperatorOptions) -> int:
    # SIGUSR1 writes every thread's stack to the log (`kubectl exec ... -- kill -USR1 1`): the
    # way to see where a stuck operator is stuck.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    loop = asyncio.new_event_loop()
    executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="operator")
    loop.set_default_executor(executor)
    try:
        loop.run_until_complete(serve(options))
        leftover = asyncio.all_tasks(loop)
        for task in leftover:
            task.cancel()
        if leftover:
            loop.run_until_complete(asyncio.gather(*leftover, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
    # asyncio.run would wait without end for the default executor's threads (a blocking call
    # to a host that does not answer), and so would the interpreter's exit: a pod told to stop
    # would hang until it is killed. Give them a moment, then say which ones and go.
    executor.shutdown(wait=False, cancel_futures=True)
    stop_pipe_readers()
    deadline = time.monotonic() + EXIT_GRACE_SECONDS
    busy = [thread for thread in threading.enumerate() if thread.name.startswith(("operator", "git-archive"))]
    for thread in busy:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    stuck = [thread.name for thread in busy if thread.is_alive()]
    if stuck:
        logger.warning("exiting with %d worker thread(s) still busy: %s; their stacks follow", len(stuck),
                       ", ".join(stuck))
        faulthandler.dump_traceback(all_threads=True)
        logging.shutdown()
        os._exit(0)
    return 0
