"""The operator's Prometheus metrics, on the API server's /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

POLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


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

    def forget_repo(self, namespace: str, repo: str) -> None:
        """A deleted Repo's series go with it, so /metrics does not grow with every Repo ever seen."""
        for metric in (self.git_poll_seconds, self.git_poll_errors, self.testruns_created,
                       self.testruns_cancelled, self.definitions_errors, self.last_poll):
            try:
                metric.remove(namespace, repo)
            except KeyError:
                pass
