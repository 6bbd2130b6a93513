"""The Grafana dashboard (charts/testlooper/dashboards/testlooper.json, which the chart ships in
a ConfigMap): it loads, has a dashboard's shape, and every metric its PromQL names is on the
real operator's /metrics after it has done real runs, with the labels the queries group and
filter by. The operator runs as in tests/test_operator_metrics_e2e.py: the `testlooper operator`
process with Redis against the Kubernetes emulator, this test as the kubelet."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from run_cluster import Kubelet, apply_repo, ended_testruns, pods_path, push_project, redis_url, start_operator  # noqa: F401
from run_helpers import wait_for
from test_operator_metrics_e2e import EvictingKubelet
from test_operator_runs_e2e import POOL
from testlooper.cluster.metrics import OperatorMetrics
from testlooper.kube import pods as pod_builder
from testlooper.kube.objects import testrun_name

DASHBOARD = Path(__file__).resolve().parents[1] / "charts" / "testlooper" / "dashboards" / "testlooper.json"
# Counted only when something goes wrong: on /metrics (HELP and TYPE) from the start, but with no
# sample after a run that went well.
ONLY_ON_ERRORS = {"testlooper_git_poll_errors_total", "testlooper_definitions_errors_total",
                  "testlooper_reconcile_errors_total", "testlooper_store_errors_total",
                  "testlooper_testruns_cancelled_total"}
# Counted only for WorkerPools with provider ec2, which the runs here do not use: on /metrics from
# the start (HELP and TYPE: prometheus_client writes them for a labelled family with no child),
# their labels read from the operator's metric objects. The gauges' samples, with the panels'
# labels, are checked after a real sweep in tests/test_chart_install.py (the ec2-s3 rehearsal).
ONLY_WITH_EC2_POOLS = {"testlooper_ec2_instances", "testlooper_ec2_cost_per_hour", "testlooper_ec2_launches_total",
                       "testlooper_ec2_terminations_total", "testlooper_ec2_orphans_reaped_total"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}
DEFINITIONS = """\
looper_version: 5
environments:
  linux:
    platform: linux
    image: {name: "busybox:1.36"}
tests:
  good/linux:
    command: sh src/good.sh
    dependencies: {src: HEAD}
    min_cores: 1
  wobbly/linux:
    command: sh src/wobbly.sh
    dependencies: {src: HEAD}
    min_cores: 1
    runs: 2
"""
GOOD = """printf '{"adds": true}' > "$TEST_OUTPUT_DIR/testSummary.json"\n"""
WOBBLY = """\
if [ $((TEST_LOOPER_RUN_INDEX % 2)) = 0 ]; then ok=false; else ok=true; fi
printf '{"always": true, "sometimes": %s}' "$ok" > "$TEST_OUTPUT_DIR/testSummary.json"
[ "$ok" = true ]
"""


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def graph_panels(board) -> list[dict]:
    return [panel for panel in board["panels"] if panel["type"] != "row"]


def expressions(board) -> list[str]:
    """Every PromQL expression: the panels' targets and the variables' queries."""
    found = [target["expr"] for panel in graph_panels(board) for target in panel["targets"]]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
            assert match, f"variable {variable['name']}: {query!r} is not label_values(SELECTOR, LABEL)"
            found.append(f"group by ({match.group(2)}) ({match.group(1)})")
    return found


def metrics_and_labels(expression: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression uses. Labels: those of its selectors and
    its by/without groupings (`le` of histogram buckets included)."""
    labels = set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*\"", expression))
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    for grouping in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text):
        labels |= {word.strip() for word in grouping.split(",") if word.strip()}
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w$.])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, is_call = match.group(1), match.group(2)
        if not is_call and word.lower() not in PROMQL_WORDS:
            names.add(word)
    return names, labels


# -- shape -------------------------------------------------------------------------------------


def test_the_dashboard_loads_and_has_a_dashboards_shape():
    board = dashboard()
    assert board["uid"] == "testlooper" and board["title"] == "TestLooper"
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 36
    assert "id" not in board or board["id"] is None  # Grafana assigns it; a fixed one clashes on import
    variables = {variable["name"]: variable for variable in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in board["panels"]:
        area = panel["gridPos"]
        assert area["x"] >= 0 and area["w"] > 0 and area["x"] + area["w"] <= 24, panel["title"]
        for x in range(area["x"], area["x"] + area["w"]):
            for y in range(area["y"], area["y"] + area["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
    for panel in graph_panels(board):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["datasource"] == panel["datasource"], panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]
    for name in ("namespace", "repo", "pool"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"
        assert any(f"${name}" in expression for expression in expressions(board)), name


def test_the_dashboard_shows_what_the_issue_asks_for():
    board = dashboard()
    by_metric: dict[str, list[str]] = {}
    for panel in graph_panels(board):
        for target in panel["targets"]:
            for name in metrics_and_labels(target["expr"])[0]:
                by_metric.setdefault(name, []).append(panel["title"])
    uses = lambda metric, words: any(all(word in title.lower() for word in words) for title in by_metric.get(metric, []))
    assert uses("testlooper_runs_finished_total", ["result"])
    assert uses("testlooper_run_queue_wait_seconds_bucket", ["queue wait"])
    assert uses("testlooper_run_duration_seconds_bucket", ["duration", "percentile"])
    assert uses("testlooper_flaky_cases", ["flaky", "repo"])
    for gauge in ("testlooper_pool_workers", "testlooper_pool_cores", "testlooper_pool_queued_runs"):
        assert uses(gauge, ["pool"]), gauge
    assert uses("testlooper_git_poll_duration_seconds_bucket", ["poll"])
    assert uses("testlooper_git_poll_errors_total", ["poll"])
    assert uses("testlooper_webhooks_total", ["webhook"])
    assert uses("testlooper_ec2_instances", ["ec2", "instances", "state"])
    assert uses("testlooper_ec2_launches_total", ["ec2", "launches"])
    assert uses("testlooper_ec2_terminations_total", ["ec2", "terminations", "reason"])
    assert uses("testlooper_ec2_orphans_reaped_total", ["ec2", "orphans"])
    assert uses("testlooper_ec2_cost_per_hour", ["ec2", "cost"])


def test_the_promql_reader_finds_metrics_and_labels():
    names, labels = metrics_and_labels(
        'histogram_quantile(0.95, sum by (le, pool) (rate(a_seconds_bucket{namespace=~"$ns", pool!="x"}[5m])))'
        ' / on (pool) group_left b_total offset 1h + time() - max(c{d="e{f}"})')
    assert names == {"a_seconds_bucket", "b_total", "c"}
    assert labels == {"le", "pool", "namespace", "d"}


# -- every metric on the real /metrics -----------------------------------------------------------


def declared_labels() -> dict[str, set[str]]:
    """Label names of the operator's counters and histograms, from its own metric objects, for
    the series that have no sample yet."""
    metrics = OperatorMetrics()
    labels = {}
    for family in metrics.registry.collect():
        # A gauge of the Figures collector (GaugeMetricFamily) carries its label names.
        labels.setdefault(family.name, set(getattr(family, "_labelnames", ())))
    for value in vars(metrics).values():
        names = getattr(value, "_labelnames", None)
        if names is not None:
            base = value._name
            for suffix in ("", "_total", "_bucket", "_sum", "_count"):
                labels[base + suffix] = set(names) | ({"le"} if suffix == "_bucket" else set())
    return labels


def test_every_metric_the_dashboard_queries_is_on_the_operators_metrics_after_real_runs(kube, tmp_path, redis_url):
    url, commit = push_project(tmp_path, {"testlooper.yml": DEFINITIONS, "good.sh": GOOD, "wobbly.sh": WOBBLY})
    operator = start_operator(kube, tmp_path, redis_url, POOL, args=["--pool-status-interval", "1"])
    evicted = pod_builder.run_pod_name(testrun_name("demo", commit, "good/linux"), 1, 1)
    with operator:
        apply_repo(kube, url)
        with EvictingKubelet(kube, tmp_path / "node", {evicted}) as kubelet:
            try:
                by_task = wait_for(lambda: ended_testruns(kube, 2), timeout=120, interval=0.3,
                                   what="the two TestRuns ended")
            finally:
                assert kubelet.errors == [], kubelet.errors
        assert {task: item["status"]["result"] for task, item in by_task.items()} == {
            "good/linux": "passed", "wobbly/linux": "flaky"}
        # Webhooks: a GitLab push for this Repo, which has no webhook secret (refused), and a
        # GitHub one for a repository no Repo tests.
        status, _ = operator.webhook("/webhooks/gitlab", json.dumps({"project": {"git_http_url": url}}).encode(),
                                     {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "guess"})
        assert status == 401
        status, _ = operator.webhook("/webhooks/github", json.dumps(
            {"repository": {"clone_url": "https://github.com/elsewhere/other.git"}}).encode(),
            {"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=00"})
        assert status == 202
        wait_for(lambda: flaky_cases(operator) > 0, timeout=20, what="the flaky cases counted")
        status, text = operator.get("/metrics")
        assert status == 200, text
    families = list(text_string_to_metric_families(text))
    sampled: dict[str, set[str]] = {}
    for family in families:
        for sample in family.samples:
            sampled.setdefault(sample.name, set()).update(sample.labels)
    exposed = {family.name for family in families} | {family.name + "_total" for family in families
                                                      if family.type == "counter"}
    declared = declared_labels()
    for expression in expressions(dashboard()):
        names, labels = metrics_and_labels(expression)
        assert names, f"no metric in {expression!r}"
        known_labels = set()
        for name in names:
            if name in ONLY_ON_ERRORS | ONLY_WITH_EC2_POOLS:
                assert name in exposed, f"{name} ({expression}) is not on /metrics"
                known_labels |= declared[name]
            else:
                assert name in sampled, f"{name} ({expression}) has no sample on /metrics after real runs"
                known_labels |= sampled[name]
        assert labels <= known_labels, f"{expression}: labels {sorted(labels - known_labels)} are on no series it reads"


def flaky_cases(operator) -> float:
    status, text = operator.get("/metrics")
    for family in text_string_to_metric_families(text):
        if family.name == "testlooper_flaky_cases":
            return sum(sample.value for sample in family.samples)
    return 0


def test_a_metric_the_operator_does_not_have_would_fail(tmp_path):
    """The check above can fail: a made-up name is no series, and is found as a metric."""
    names, _ = metrics_and_labels('sum(rate(testlooper_runs_finishd_total{namespace=~"$namespace"}[5m]))')
    assert names == {"testlooper_runs_finishd_total"}
    assert "testlooper_runs_finishd_total" not in declared_labels()


def test_the_ec2_families_labels_are_read_from_the_operators_metric_objects():
    """What the /metrics check compares the EC2 panels' labels with, since no EC2 series has a
    sample after the pod runs there."""
    declared = declared_labels()
    assert declared["testlooper_ec2_instances"] == {"namespace", "pool", "state"}
    assert declared["testlooper_ec2_cost_per_hour"] == {"namespace", "pool"}
    assert declared["testlooper_ec2_launches_total"] == {"namespace", "pool", "type"}
    assert declared["testlooper_ec2_terminations_total"] == {"namespace", "pool", "reason"}
    assert declared["testlooper_ec2_orphans_reaped_total"] == {"namespace", "pool"}
    _, labels = metrics_and_labels('sum by (pool, zone) (testlooper_ec2_instances{namespace=~"$namespace"})')
    assert not labels <= declared["testlooper_ec2_instances"]  # a label no EC2 series has is caught
