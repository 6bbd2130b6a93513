"""Prometheus metrics of a long-running local watcher (`testlooper watch --metrics-port`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200)


class WatchMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.runs = Counter("testlooper_runs", "Finished runs (each attempt), by kind and result",
                            ["kind", "result"], registry=self.registry)
        self.durations = Histogram("testlooper_run_duration_seconds", "Duration of finished runs",
                                   ["kind"], buckets=DURATION_BUCKETS, registry=self.registry)
        self.cases = Counter("testlooper_test_cases", "Individual test case results", ["result"],
                             registry=self.registry)
        self.queue = Gauge("testlooper_queue_length", "Runs waiting to start", registry=self.registry)
        self.running = Gauge("testlooper_runs_in_progress", "Runs executing now", registry=self.registry)
        self.commits = Counter("testlooper_commits", "Commits looked at, by outcome (tested, untestable, no_definitions)",
                               ["outcome"], registry=self.registry)
        self.last_poll = Gauge("testlooper_last_poll_timestamp_seconds", "When the branches were last polled",
                               registry=self.registry)

    def serve(self, port: int, address: str = "127.0.0.1"):
        """Serves /metrics; returns the server (port 0 picks a free one: server.server_port)."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return server

    def outcome(self, outcome) -> None:
        self.runs.labels(outcome.kind, outcome.result).inc()
        if outcome.result not in ("blocked", "cancelled"):
            self.durations.labels(outcome.kind).observe(outcome.duration_seconds)
        failed = sum(1 for case in outcome.cases if not case["success"])
        if outcome.cases:
            self.cases.labels("passed").inc(len(outcome.cases) - failed)
            self.cases.labels("failed").inc(failed)

    def queued(self, waiting: int, running: int) -> None:
        self.queue.set(waiting)
        self.running.set(running)
