"""What the handlers share, handed to them by kopf as `memo`: the options, the API client, the
metrics, and the Repos being polled (so a webhook can wake them)."""

from __future__ import annotations

import asyncio
import dataclasses
import os

from testlooper.cluster.store_health import StoreHealth
from testlooper.decisions.phases import Settings
from testlooper.repos.urls import normalize_url

WEBHOOK_CONCURRENCY = 8  # webhook requests handled at once; more wait their turn
EVENT_COMPONENT = "testlooper-operator"  # what the operator's Events name as their source (kopf's and ours)


@dataclasses.dataclass(frozen=True)
class OperatorOptions:
    """Everything `testlooper operator` accepts, as data (see cli/operator_cmd.py for the flags)."""

    namespaces: tuple[str, ...] = ()
    all_namespaces: bool = False
    standalone: bool = False
    peering_name: str = "testlooper"
    priority: int = 0
    store_url: str = ""
    api_host: str = "0.0.0.0"
    api_port: int = 8080
    api_url: str = ""
    cache_dir: str = "/var/cache/testlooper"
    max_concurrent_polls: int = 4
    pool_status_interval: float = 10.0
    worker_image: str = "ghcr.io/testlooper/worker:latest"  # the image of a run pod's prepare and report containers
    operator_namespace: str = ""  # where the operator secret is kept ("" : the first watched namespace)
    run_settings: Settings = Settings()  # the phase machine's limits (--max-infra-retries, --pending-timeout...)
    s3_bucket: str = ""  # artifacts go to this bucket (boto3's environment: endpoint, credentials) when set
    s3_prefix: str = ""  # the keys' prefix in it ("" or ending in "/")
    ec2_api_url: str = ""  # how EC2 workers reach the worker API ("": api_url)
    ec2_sweep_interval: float = 60.0  # EC2 pools: orphan sweep, status and gauges this often
    ec2_boot_timeout: float = 0.0  # a new instance's first heartbeat within this (0: by platform)
    ec2_orphan_grace: float = 120.0  # an instance with no live run is reaped once this old

    @property
    def runs_enabled(self) -> bool:
        """Runs become pods only with a store (its Redis keeps the worker API's state) and a URL
        the pods reach the operator at."""
        return bool(self.store_url and self.api_url)

    @property
    def secret_namespace(self) -> str:
        return self.operator_namespace or (self.namespaces[0] if self.namespaces else "default")


@dataclasses.dataclass
class WatchedRepo:
    namespace: str
    name: str
    uid: str
    url_key: str  # repos.urls.normalize_url of spec.url
    webhook_secret: str  # the name of the Secret holding key `secret`, or ""
    wake: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # Set when one of its TestRuns ended: the daemon recounts its branch tallies, without a fetch.
    retally: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    lines_recorded: dict = dataclasses.field(default_factory=dict)  # branch -> head whose line the store has


class RepoRegistry:
    """The Repos whose daemons run in this process, by uid."""

    def __init__(self):
        self._repos: dict[str, WatchedRepo] = {}

    def register(self, namespace: str, name: str, uid: str, spec: dict) -> WatchedRepo:
        watched = self._repos.get(uid)
        if watched is None:
            watched = self._repos[uid] = WatchedRepo(namespace, name, uid, "", "")
        watched.url_key = normalize_url(str(spec.get("url") or ""))
        watched.webhook_secret = str(spec.get("webhookSecret") or "")
        return watched

    def unregister(self, uid: str) -> None:
        self._repos.pop(uid, None)

    def get(self, uid: str) -> WatchedRepo | None:
        return self._repos.get(uid)

    def in_namespace(self, namespace: str) -> list[WatchedRepo]:
        return [repo for repo in self._repos.values() if repo.namespace == namespace]

    def matching(self, url_keys: set[str]) -> list[WatchedRepo]:
        return [repo for repo in self._repos.values() if repo.url_key in url_keys]

    def __len__(self) -> int:
        return len(self._repos)


class OperatorContext:
    def __init__(self, options: OperatorOptions, api, metrics):
        self.options = options
        self.api = api
        self.metrics = metrics
        self.repos = RepoRegistry()
        self.poll_slots = asyncio.Semaphore(max(1, options.max_concurrent_polls))
        self.ready = asyncio.Event()
        self.store = None  # the history store (--store), opened at startup
        self.store_health = StoreHealth(metrics)  # whether it answers (cluster/store_health.py)
        self.runs = None  # the RunController (cluster/runs.py) when runs are enabled
        self.flaky_cases = None  # cluster/run_metrics.FlakyCases when there is a store
        self.webhook_slots = asyncio.Semaphore(WEBHOOK_CONCURRENCY)
        self.webhook_secrets: dict[tuple[str, str], tuple[float, dict | None]] = {}  # (ns, name) -> (read at, data)
        self.webhook_secret_reads: dict[tuple[str, str], asyncio.Future] = {}  # reads in flight

    def mirror_path(self, namespace: str, name: str, uid: str) -> str:
        # By uid: a Repo deleted and created again under the same name (maybe with another URL)
        # never reads the old one's mirror.
        return os.path.join(self.options.cache_dir, "mirrors", f"{namespace}--{name}--{uid}.git")
