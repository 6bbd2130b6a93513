"""The operator's Prometheus metrics, on the API server's /metrics.

Counters and histograms are counted where the operator acts (cluster/run_metrics.py says
where each comes from). The gauges are not kept as running totals: `Figures` holds what the
operator last counted from the objects themselves (the TestRuns, the pools' pods, the store's
statistics) and is read at each scrape, so they are right after a restart too, and a deleted
TestRun, pool or Repo drops out of them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
RUN_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
QUEUE_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
TESTRUN_PHASES = ("Pending", "Blocked", "Queued", "Running", "Succeeded", "Failed", "Error", "Cancelled")
RUN_RESULTS = ("passed", "failed", "timeout", "error", "cancelled")
CASE_RESULTS = ("passed", "failed")
TASK_KINDS = ("build", "test")


class Figures:
    """The gauges' values as last counted, by namespace; a collector read at each scrape."""

    def __init__(self):
        self.phases: dict[str, dict[str, int]] = {}  # namespace -> phase -> TestRuns
        self.pools: dict[str, dict[str, tuple[int, float, int]]] = {}  # namespace -> pool -> (workers, cores, queued)
        self.flaky: dict[tuple[str, str], dict[str, int]] = {}  # (namespace, repo) -> branch -> flaky cases
        # (namespace, pool) -> (instances by EC2 state, estimated cost per hour or None), as the last sweep saw
        self.ec2: dict[tuple[str, str], tuple[dict[str, int], float | None]] = {}

    def collect(self):
        testruns = GaugeMetricFamily("testlooper_testruns", "TestRuns by phase, as last listed",
                                     labels=["namespace", "phase"])
        for namespace, counts in sorted(self.phases.items()):
            for phase, count in counts.items():
                testruns.add_metric([namespace, phase], count)
        yield testruns
        workers = GaugeMetricFamily("testlooper_pool_workers", "Run pods a WorkerPool holds (not Succeeded or Failed)",
                                    labels=["namespace", "pool"])
        cores = GaugeMetricFamily("testlooper_pool_cores", "Cores the WorkerPool's live run pods hold",
                                  labels=["namespace", "pool"])
        queued = GaugeMetricFamily("testlooper_pool_queued_runs", "Runs waiting for room in the WorkerPool",
                                   labels=["namespace", "pool"])
        for namespace, pools in sorted(self.pools.items()):
            for pool, (pool_workers, pool_cores, pool_queued) in sorted(pools.items()):
                workers.add_metric([namespace, pool], pool_workers)
                cores.add_metric([namespace, pool], pool_cores)
                queued.add_metric([namespace, pool], pool_queued)
        yield from (workers, cores, queued)
        flaky = GaugeMetricFamily("testlooper_flaky_cases",
                                  "Cases flaky over the last tested commits of a tested branch's head (as `testlooper flaky`)",
                                  labels=["namespace", "repo", "branch"])
        for (namespace, repo), branches in sorted(self.flaky.items()):
            for branch, count in sorted(branches.items()):
                flaky.add_metric([namespace, repo, branch], count)
        yield flaky
        instances = GaugeMetricFamily("testlooper_ec2_instances",
                                      "An EC2 WorkerPool's instances by EC2 state, as its last sweep listed them",
                                      labels=["namespace", "pool", "state"])
        cost = GaugeMetricFamily("testlooper_ec2_cost_per_hour",
                                 "Estimated cost of an hour of an EC2 WorkerPool's instances not terminated, from its "
                                 "instance types' hourlyPrice (absent when one has none)", labels=["namespace", "pool"])
        for (namespace, pool), (by_state, rate) in sorted(self.ec2.items()):
            for state, count in sorted(by_state.items()):
                instances.add_metric([namespace, pool, state], count)
            if rate is not None:
                cost.add_metric([namespace, pool], rate)
        yield from (instances, cost)


class OperatorMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.git_poll_seconds = Histogram(
            "testlooper_git_poll_duration_seconds", "Time to fetch a Repo's mirror and read its new heads",
            ["namespace", "repo"], buckets=POLL_BUCKETS, registry=self.registry)
        self.git_poll_errors = Counter(
            "testlooper_git_poll_errors_total", "Polls that could not fetch the repository",
            ["namespace", "repo"], registry=self.registry)
        self.webhooks = Counter(
            "testlooper_webhooks_total",
            "Push webhooks received, by provider and outcome (accepted, unknown_repo, bad_signature, bad_payload, ignored)",
            ["provider", "outcome"], registry=self.registry)
        self.testruns_created = Counter(
            "testlooper_testruns_created_total", "TestRuns created, by Repo", ["namespace", "repo"],
            registry=self.registry)
        self.testruns_cancelled = Counter(
            "testlooper_testruns_cancelled_total", "TestRuns cancelled because no tested branch contains their commit",
            ["namespace", "repo"], registry=self.registry)
        self.reconcile_errors = Counter(
            "testlooper_reconcile_errors_total", "Reconciles that failed and will be retried, by resource kind",
            ["kind"], registry=self.registry)
        self.definitions_errors = Counter(
            "testlooper_definitions_errors_total", "Branch heads whose definitions did not resolve",
            ["namespace", "repo"], registry=self.registry)
        self.store_errors = Counter(
            "testlooper_store_errors_total", "History store calls that failed and will be retried, by operation",
            ["operation"], registry=self.registry)
        self.store_up = Gauge(
            "testlooper_store_up", "1 when the store (Redis: history, results, heartbeats, logs) answers, else 0",
            registry=self.registry)
        self.repos = Gauge("testlooper_repos", "Repos the operator is polling", registry=self.registry)
        self.last_poll = Gauge("testlooper_last_poll_timestamp_seconds", "When a Repo was last polled",
                               ["namespace", "repo"], registry=self.registry)
        self.runs_finished = Counter(
            "testlooper_runs_finished_total", "Runs (one pod's worth of a TestRun) that ended, by result",
            ["namespace", "repo", "result"], registry=self.registry)
        self.run_duration = Histogram(
            "testlooper_run_duration_seconds", "From a run's pod running to its RESULT",
            ["namespace", "repo", "kind"], buckets=RUN_BUCKETS, registry=self.registry)
        self.queue_wait = Histogram(
            "testlooper_run_queue_wait_seconds", "From a run becoming runnable to its pod being created",
            ["namespace", "pool"], buckets=QUEUE_BUCKETS, registry=self.registry)
        self.test_cases = Counter(
            "testlooper_test_cases_total", "Test cases reported in the RESULTs of runs that ended, by result",
            ["namespace", "repo", "result"], registry=self.registry)
        self.infra_retries = Counter(
            "testlooper_infra_retries_total", "Attempts lost to the infrastructure (retried or given up), by reason",
            ["namespace", "reason"], registry=self.registry)
        self.ec2_launches = Counter(
            "testlooper_ec2_launches_total", "EC2 instances launched for runs, by instance type",
            ["namespace", "pool", "type"], registry=self.registry)
        self.ec2_terminations = Counter(
            "testlooper_ec2_terminations_total",
            "EC2 instances the operator terminated, by reason (RunEnded, Retried, Orphan, ...)",
            ["namespace", "pool", "reason"], registry=self.registry)
        self.ec2_orphans = Counter(
            "testlooper_ec2_orphans_reaped_total", "Instances with the pool's worker tag and no live run, terminated",
            ["namespace", "pool"], registry=self.registry)
        self.figures = Figures()
        self.registry.register(self.figures)

    def forget_repo(self, namespace: str, repo: str) -> None:
        """A deleted Repo's series go with it, so /metrics does not grow with every Repo ever seen."""
        for metric in (self.git_poll_seconds, self.git_poll_errors, self.testruns_created,
                       self.testruns_cancelled, self.definitions_errors, self.last_poll):
            _remove(metric, namespace, repo)
        for metric, values in ((self.runs_finished, RUN_RESULTS), (self.run_duration, TASK_KINDS),
                               (self.test_cases, CASE_RESULTS)):
            for value in values:
                _remove(metric, namespace, repo, value)
        self.figures.flaky.pop((namespace, repo), None)

    def forget_pool(self, namespace: str, pool: str) -> None:
        """A deleted WorkerPool's series go."""
        _remove(self.queue_wait, namespace, pool)
        _remove(self.ec2_orphans, namespace, pool)
        self.figures.pools.get(namespace, {}).pop(pool, None)
        self.figures.ec2.pop((namespace, pool), None)


def _remove(metric, *labels: str) -> None:
    try:
        metric.remove(*labels)
    except KeyError:
        pass
