"""What a user can get wrong, and what the network can do, with the real operator process:
each gives a clear condition, Event or HTTP answer, loses nothing, and never stops the others."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import sys
import time

import pytest
import yaml

from cluster_helpers import NAMESPACE, condition, events, list_testruns, repo_object, signed_push
from git_http import GitHttpServer
from gitrepo import GitRepo
from operator_process import OPERATOR_DIR, OperatorProcess
from run_helpers import wait_for

GOOD_DEFINITIONS = """looper_version: 5
environments:
  linux: {platform: linux, image: {name: "busybox"}}
tests:
  smoke/linux: {command: "true"}
"""


@pytest.fixture(autouse=True)
def needs_kubectl():
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on the PATH (these machines have v1.32 in /usr/bin)")


def make_origin(path, definitions: str = GOOD_DEFINITIONS):
    work = GitRepo(path / "work")
    first = work.commit({"testlooper.yml": definitions}, "first")
    bare = path / "served" / "origin.git"
    bare.parent.mkdir(parents=True, exist_ok=True)
    work.git("clone", "--quiet", "--bare", str(work.path), str(bare))
    work.git("remote", "add", "origin", str(bare))
    return work, bare, first


def apply(kube, *documents: dict) -> None:
    text = yaml.safe_dump_all(documents)
    kube.kubectl("apply", "--validate=false", "-n", NAMESPACE, "-f", "-", input=text)


def repo(name: str, url: str, **spec) -> dict:
    return {"apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo", "metadata": {"name": name},
            "spec": {"url": url, "branches": ["main"], "pollIntervalSeconds": 3600, **spec}}


def secret(name: str, git_hosts: str | None = None, **data: str) -> dict:
    metadata = {"name": name}
    if git_hosts is not None:  # the hosts its credentials may be sent to
        metadata["annotations"] = {"testlooper.dev/git-hosts": git_hosts}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "stringData": data}


@pytest.fixture
def operator(kube, tmp_path):
    kube.create_namespace(NAMESPACE)
    with OperatorProcess(kube, tmp_path, namespaces=[NAMESPACE]) as process:
        yield process
    assert "Traceback" not in process.log(), process.log()


def test_bad_signatures_and_unknown_repositories_change_nothing(kube, operator, tmp_path):
    work, bare, first = make_origin(tmp_path)
    url = f"file://{bare}"
    apply(kube, secret("hook", secret="right-secret"), repo("demo", url, webhookSecret="hook"),
          repo("unsigned", url))
    wait_for(lambda: len(list_testruns(kube)) == 2, what="the first commit's TestRun of each Repo")
    second = work.commit({"x": "2"}, "second")
    work.git("push", "--quiet", "origin", "main")

    status, answer = operator.webhook("/webhooks/github", *signed_push(url, second, secret="wrong-secret"))
    assert (status, answer["message"]) == (401, "signature does not match")
    body, headers = signed_push(url, second, secret="right-secret")
    status, _ = operator.webhook("/webhooks/github", body, {**headers, "X-Hub-Signature-256": "sha256=" + "0" * 64})
    assert status == 401
    status, _ = operator.webhook("/webhooks/github", body, {k: v for k, v in headers.items() if k != "X-Hub-Signature-256"})
    assert status == 401
    status, answer = operator.webhook("/webhooks/github", *signed_push("https://github.com/someone/else", second,
                                                                      secret="right-secret"))
    assert (status, answer["message"]) == (202, "no Repo here tests this repository")
    status, answer = operator.webhook("/webhooks/github", b"{not json", {"X-GitHub-Event": "push"})
    assert status == 400 and "not JSON" in answer["message"]
    status, answer = operator.webhook("/webhooks/github", b"[" * 100_000, {"X-GitHub-Event": "push"})
    assert status == 400 and "nested too deeply" in answer["message"]  # not a 500 with a traceback
    status, answer = operator.webhook("/webhooks/github", b" " * (25 * 1024 * 1024 + 1), {"X-GitHub-Event": "push"})
    assert (status, answer["message"]) == (413, "payload larger than 26214400 bytes")
    time.sleep(1.5)
    assert len(list_testruns(kube)) == 2, "a refused webhook must not make a Repo poll"
    assert operator.metric("testlooper_webhooks_total", provider="github", outcome="bad_signature") == 3
    assert operator.metric("testlooper_webhooks_total", provider="github", outcome="unknown_repo") == 1
    assert operator.metric("testlooper_webhooks_total", provider="github", outcome="bad_payload") == 3

    # The right secret polls the Repo that has it; the Repo without a webhookSecret takes none.
    status, _ = operator.webhook("/webhooks/github", body, headers)
    assert status == 202
    wait_for(lambda: {t["spec"]["repo"] for t in list_testruns(kube) if t["spec"]["commit"] == second} == {"demo"},
             what="only the signed Repo polled")
    time.sleep(1)
    assert {t["spec"]["repo"] for t in list_testruns(kube) if t["spec"]["commit"] == second} == {"demo"}


def test_gitlab_push_hooks_use_their_token(kube, operator, tmp_path):
    work, bare, _first = make_origin(tmp_path)
    url = f"file://{bare}"
    apply(kube, secret("hook", secret="gl-token"), repo("demo", url, webhookSecret="hook"))
    wait_for(lambda: len(list_testruns(kube)) == 1, what="the first TestRun")
    second = work.commit({"x": "2"}, "second")
    work.git("push", "--quiet", "origin", "main")
    body = json.dumps({"object_kind": "push", "ref": "refs/heads/main", "after": second,
                       "project": {"git_http_url": url, "git_ssh_url": url}}).encode()
    status, _ = operator.webhook("/webhooks/gitlab", body, {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "nope"})
    assert status == 401
    status, _ = operator.webhook("/webhooks/gitlab", body, {"X-Gitlab-Event": "Push Hook", "X-Gitlab-Token": "gl-token"})
    assert status == 202
    wait_for(lambda: len(list_testruns(kube)) == 2, what="the pushed commit's TestRun")


def test_unreachable_hosts_and_missing_secrets_show_conditions_and_never_delay_others(kube, operator, tmp_path):
    """One Repo's host accepts connections and never answers (git would wait for minutes), one
    names a Secret that does not exist, one is fine: the fine one is tested at once."""
    _work, bare, first = make_origin(tmp_path)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts into the backlog, never reads: a hung host
    hung_url = f"http://127.0.0.1:{silent.getsockname()[1]}/x.git"
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_url = f"http://127.0.0.1:{closed.getsockname()[1]}/x.git"
    closed.close()
    try:
        apply(kube, repo("hung", hung_url), repo("refused", closed_url),
              repo("no-secret", f"file://{bare}", credentialsSecret="does-not-exist"))
        time.sleep(0.5)
        started = time.monotonic()
        apply(kube, repo("good", f"file://{bare}"))
        wait_for(lambda: [t for t in list_testruns(kube) if t["spec"]["repo"] == "good"], timeout=10,
                 what="the good Repo's TestRun while another host hangs")
        print(f"good Repo tested {time.monotonic() - started:.2f}s after apply, beside a hung host")

        refused = wait_for(lambda: condition(repo_object(kube, "refused"), "GitReachable").get("status") == "False"
                           and repo_object(kube, "refused"), what="GitReachable=False")
        reachable = condition(refused, "GitReachable")
        assert reachable["reason"] == "FetchFailed" and closed_url in reachable["message"]
        assert condition(refused, "Ready")["status"] == "False"
        missing = wait_for(lambda: condition(repo_object(kube, "no-secret"), "GitReachable").get("status") == "False"
                           and repo_object(kube, "no-secret"), what="missing Secret condition")
        assert "credentials Secret 'does-not-exist' not found" in condition(missing, "GitReachable")["message"]
        warnings = [e for e in events(kube) if e.get("reason") == "GitUnreachable"]
        assert {e["involvedObject"]["name"] for e in warnings} >= {"refused", "no-secret"}
        assert [t for t in list_testruns(kube) if t["spec"]["repo"] != "good"] == []

        # The Secret appears later: a spec edit (or the next poll) picks it up, nothing else to do.
        apply(kube, secret("does-not-exist", token="t0ken-for-file-url"))
        kube.kubectl("annotate", "repo", "no-secret", "-n", NAMESPACE, "example.com/poke=1")
        kube.kubectl("patch", "repo", "no-secret", "-n", NAMESPACE, "--type", "merge",
                     "-p", '{"spec": {"pollIntervalSeconds": 3599}}')
        wait_for(lambda: condition(repo_object(kube, "no-secret"), "GitReachable").get("status") == "True",
                 what="reachable once the Secret exists")
    finally:
        # The operator must stop promptly even with a fetch hanging (the fixture checks SIGTERM).
        stopped = time.monotonic()
        assert operator.stop(timeout=20) == 0
        assert time.monotonic() - stopped < 15
        silent.close()


def test_definitions_that_do_not_resolve_give_a_condition_and_an_event_not_a_crash(kube, operator, tmp_path):
    work, bare, _first = make_origin(tmp_path, GOOD_DEFINITIONS.replace('command: "true"', 'comand: "true"'))
    apply(kube, secret("hook", secret="s"), repo("demo", f"file://{bare}", webhookSecret="hook"))
    invalid = wait_for(lambda: condition(repo_object(kube), "DefinitionsValid").get("status") == "False"
                       and repo_object(kube), what="DefinitionsValid=False")
    message = condition(invalid, "DefinitionsValid")["message"]
    assert "testlooper.yml:5:" in message and "comand" in message
    event, = [e for e in events(kube) if e.get("reason") == "DefinitionsInvalid"]
    assert event["type"] == "Warning" and "comand" in event["message"] and "testlooper.yml:5:" in event["message"]
    assert "untestable" in invalid["status"]["branchesSummary"]
    assert list_testruns(kube) == []

    fixed = work.commit({"testlooper.yml": GOOD_DEFINITIONS}, "fix the typo")
    work.git("push", "--quiet", "origin", "main")
    operator.webhook("/webhooks/github", *signed_push(f"file://{bare}", fixed, secret="s"))
    wait_for(lambda: condition(repo_object(kube), "DefinitionsValid").get("status") == "True", what="valid again")
    assert len(list_testruns(kube)) == 1
    assert len([e for e in events(kube) if e.get("reason") == "DefinitionsInvalid"]) == 1


def test_nonsense_edits_are_refused_by_the_schema_and_the_rest_gets_a_condition(kube, operator, tmp_path):
    _work, bare, _first = make_origin(tmp_path)
    apply(kube, repo("demo", f"file://{bare}"))
    wait_for(lambda: len(list_testruns(kube)) == 1, what="the first TestRun")
    # What the schema can say, the API server says (the emulator enforces the CRD's schema).
    refused = kube.kubectl("patch", "repo", "demo", "-n", NAMESPACE, "--type", "merge",
                           "-p", '{"spec": {"pollIntervalSeconds": 5, "branches": "main"}}', check=False)
    assert refused.returncode != 0
    assert "spec.pollIntervalSeconds" in refused.stderr and "spec.branches" in refused.stderr
    # What it cannot (a file that is not in the commit) is a condition naming it.
    kube.kubectl("patch", "repo", "demo", "-n", NAMESPACE, "--type", "merge",
                 "-p", '{"spec": {"definitionsPath": "ci/missing.yml"}}')
    invalid = wait_for(lambda: condition(repo_object(kube), "DefinitionsValid").get("status") == "False"
                       and repo_object(kube), what="DefinitionsValid=False for a missing definitionsPath")
    assert "ci/missing.yml does not exist" in condition(invalid, "DefinitionsValid")["message"]
    assert operator.process.poll() is None


def test_conflicts_and_server_errors_are_retried(kube, operator, tmp_path):
    _work, bare, first = make_origin(tmp_path)
    kube.inject_fault("create", 500, times=2, group="testlooper.dev", resource="testruns", client="operator")
    kube.inject_fault("patch", 409, times=1, group="testlooper.dev", resource="repos/status", client="operator")
    kube.inject_fault("patch", 503, times=2, group="testlooper.dev", resource="testruns/status", client="operator")
    apply(kube, repo("demo", f"file://{bare}"))
    created = wait_for(lambda: list_testruns(kube), what="the TestRun despite two 500s")
    wait_for(lambda: (list_testruns(kube)[0].get("status") or {}).get("phase") == "Pending",
             what="its status despite two 503s")
    wait_for(lambda: condition(repo_object(kube), "Ready").get("status") == "True", what="Repo status despite a 409")
    assert len(created) == 1


def test_credentials_never_reach_logs_events_status_or_metrics(kube, operator, tmp_path):
    token, wrong = "ghp_R3alLookingT0kenValue", "ghp_Wr0ngT0kenValue"
    _work, bare, first = make_origin(tmp_path)
    with GitHttpServer(bare.parent, username="x-access-token", password=token) as server:
        url = server.url("origin.git")
        apply(kube, secret("git", git_hosts="127.0.0.1", token=wrong), secret("hook", secret="s"),
              repo("demo", url, credentialsSecret="git", webhookSecret="hook"))
        refused = wait_for(lambda: condition(repo_object(kube), "GitReachable").get("status") == "False"
                           and repo_object(kube), what="refused credentials")
        assert "failed" in condition(refused, "GitReachable")["message"]
        apply(kube, secret("git", git_hosts="127.0.0.1", token=token))
        operator.webhook("/webhooks/github", *signed_push(url, first, secret="s"))
        wait_for(lambda: len(list_testruns(kube)) == 1, what="fetched with the right token")
        sent = {header for header in server.authorizations if header}
        assert "Basic " + base64.b64encode(f"x-access-token:{token}".encode()).decode() in sent

    _, metrics = operator.get("/metrics")
    everything = "\n".join([
        operator.log(), json.dumps(events(kube)), json.dumps(repo_object(kube)),
        json.dumps(list_testruns(kube)), metrics,
    ])
    for value in (token, wrong, base64.b64encode(token.encode()).decode(),
                  base64.b64encode(f"x-access-token:{token}".encode()).decode()):
        assert value not in everything


def test_credentials_go_only_to_the_hosts_their_secret_names(kube, operator, tmp_path):
    """A Repo anyone may create must not turn a Secret into a token sent to a host of theirs."""
    token = "ghp_N0tForStrangers"
    _work, bare, _first = make_origin(tmp_path)
    with GitHttpServer(bare.parent, username="x-access-token", password=token) as server:
        url = server.url("origin.git")
        apply(kube, secret("unmarked", token=token), secret("elsewhere", git_hosts="git.example.com", token=token),
              repo("grab", url, credentialsSecret="unmarked"), repo("redirect", url, credentialsSecret="elsewhere"))
        for name, named in (("grab", "none"), ("redirect", "git.example.com")):
            refused = wait_for(lambda: condition(repo_object(kube, name), "GitReachable").get("status") == "False"
                               and repo_object(kube, name), what=f"{name} refused")
            assert condition(refused, "GitReachable")["message"] == (
                f"credentials Secret {refused['spec']['credentialsSecret']!r} may be sent only to the hosts its "
                f"annotation testlooper.dev/git-hosts names ({named}), not to 127.0.0.1")
        assert not any(token in header or base64.b64encode(f"x-access-token:{token}".encode()).decode() in header
                       for header in server.authorizations), "the token must never have been sent"


def test_one_operator_for_all_namespaces_with_peering(kube, tmp_path):
    """`--all-namespaces` (the chart's cluster-wide mode) watches every namespace and peers
    through a ClusterKopfPeering."""
    for namespace in ("team-b", "team-c"):
        kube.create_namespace(namespace)
    _work, bare, _first = make_origin(tmp_path)
    for namespace in ("team-b", "team-c"):
        text = json.dumps(repo("demo", f"file://{bare}"))
        kube.kubectl("apply", "--validate=false", "-n", namespace, "-f", "-", input=text)
    with OperatorProcess(kube, tmp_path, namespaces=[], args=["--all-namespaces"], priority=5) as process:
        for namespace in ("team-b", "team-c"):
            wait_for(lambda: len(list_testruns(kube, namespace=namespace)) == 1, what=f"TestRuns in {namespace}")
    used = kube.permissions(client="operator")
    assert ("kopf.dev", "clusterkopfpeerings", "create") in used
    assert not [p for p in used if p[1] == "kopfpeerings"]
    assert "Traceback" not in process.log()



def test_the_history_store_is_checked_at_startup_and_a_dead_one_stops_nothing(kube, tmp_path):
    from redis_server import RedisServer, free_port

    kube.create_namespace(NAMESPACE)
    _work, bare, _first = make_origin(tmp_path)
    with RedisServer() as redis:
        with OperatorProcess(kube, tmp_path, args=["--store", redis.url]) as live:
            pass
    assert f"history store {redis.url} answers" in live.log()
    dead = f"redis://:hunter2pass@127.0.0.1:{free_port()}/0"
    with OperatorProcess(kube, tmp_path, args=["--store", dead], client="operator-dead-store") as process:
        apply(kube, repo("demo", f"file://{bare}"))
        wait_for(lambda: len(list_testruns(kube)) == 1, what="TestRuns while the store is down")
    assert "does not answer" in process.log()
    assert "hunter2pass" not in process.log()


LIB_DEFINITIONS = """looper_version: 5
environments:
  linux: {platform: linux, image: {name: "busybox"}}
builds:
  build/linux: {command: "echo lib > $TEST_BUILD_OUTPUT_DIR/lib.txt"}
"""


def app_pinning(lib_commit: str, written_twice: bool = False) -> str:
    """An app's definitions whose test consumes the build of `lib` at `lib_commit`; with
    `written_twice`, its command key is written twice (a definitions warning)."""
    twice = '    command: "cat lib/lib.txt"\n' if written_twice else ""
    return f"""looper_version: 5
repos:
  lib: lib/{lib_commit}
environments:
  linux: {{platform: linux, image: {{name: "busybox"}}}}
tests:
  uses-lib/linux:
{twice}    command: "cat $TEST_INPUTS/lib/lib.txt"
    dependencies: {{lib: lib/build/linux}}
"""


def test_pinned_repositories_resolve_against_other_repos_in_the_namespace(kube, operator, tmp_path):
    """`repos: {lib: lib/<sha>}` finds the Repo named lib; the app's test consumes lib's build,
    which becomes a TestRun of the app's commit; a pin nothing maps is a condition naming it;
    a key written twice is a Warning Event."""
    _lib_work, lib_bare, lib_sha = make_origin(tmp_path / "lib", LIB_DEFINITIONS)
    app_definitions = app_pinning(lib_sha, written_twice=True)
    _app_work, app_bare, app_sha = make_origin(tmp_path / "app", app_definitions)
    apply(kube, repo("lib", f"file://{lib_bare}"))
    # lib runs nothing of its own (no test needs its build), but its mirror is fetched.
    wait_for(lambda: (repo_object(kube, "lib").get("status") or {}).get("lastPollTime"), what="lib fetched")
    apply(kube, repo("app", f"file://{app_bare}"))
    wait_for(lambda: len([t for t in list_testruns(kube) if t["spec"]["repo"] == "app"]) == 2,
             what="app's test and lib's build")
    app_runs = {t["spec"]["task"]: t for t in list_testruns(kube) if t["spec"]["repo"] == "app"}
    assert sorted(app_runs) == ["lib/build/linux", "uses-lib/linux"]
    assert app_runs["lib/build/linux"]["spec"]["kind"] == "build"
    assert app_runs["uses-lib/linux"]["spec"]["dependsOn"] == [app_runs["lib/build/linux"]["metadata"]["name"]]
    assert app_runs["uses-lib/linux"]["spec"]["commit"] == app_sha
    warning = wait_for(lambda: [e for e in events(kube) if e.get("reason") == "DefinitionsWarning"], what="warning")
    assert "command" in warning[0]["message"] and warning[0]["involvedObject"]["name"] == "app"

    _work, bad_bare, _sha = make_origin(tmp_path / "bad", app_definitions.replace("lib: lib/", "lib: nowhere/"))
    apply(kube, repo("bad", f"file://{bad_bare}"))
    invalid = wait_for(lambda: condition(repo_object(kube, "bad"), "DefinitionsValid").get("status") == "False"
                       and repo_object(kube, "bad"), what="unmapped pin")
    message = condition(invalid, "DefinitionsValid")["message"]
    assert "nowhere" in message and "lib" in message


def test_suspend_stops_polling_and_creating_and_resuming_catches_up(kube, operator, tmp_path):
    work, bare, _first = make_origin(tmp_path)
    url = f"file://{bare}"
    apply(kube, secret("hook", secret="s"), repo("demo", url, webhookSecret="hook"))
    wait_for(lambda: len(list_testruns(kube)) == 1, what="the first TestRun")
    kube.kubectl("patch", "repo", "demo", "-n", NAMESPACE, "--type", "merge", "-p", '{"spec": {"suspend": true}}')
    wait_for(lambda: condition(repo_object(kube), "Ready").get("reason") == "Suspended", what="Suspended")
    second = work.commit({"x": "2"}, "second")
    work.git("push", "--quiet", "origin", "main")
    status, _ = operator.webhook("/webhooks/github", *signed_push(url, second, secret="s"))
    assert status == 202
    time.sleep(1.5)
    assert len(list_testruns(kube)) == 1, "a suspended Repo creates nothing"
    assert "1 running" in repo_object(kube)["status"]["branchesSummary"]
    kube.kubectl("patch", "repo", "demo", "-n", NAMESPACE, "--type", "merge", "-p", '{"spec": {"suspend": false}}')
    wait_for(lambda: len(list_testruns(kube)) == 2, what="the commit pushed while suspended")
    assert condition(repo_object(kube), "Ready")["status"] == "True"


def test_history_of_a_cluster_repo_needs_no_checkout(kube, tmp_path):
    """The operator records each tested branch's first-parent line in the store, so
    `testlooper history --store redis://... --repo NAMESPACE/NAME` works from anywhere; a store
    that was down at startup is asked again and gets the line once it is up."""
    import subprocess
    import sys

    from operator_process import OPERATOR_DIR
    from redis_server import RedisServer, free_port
    from testlooper.store import CaseResult, RunRecord, open_store

    kube.create_namespace(NAMESPACE)
    work, bare, first = make_origin(tmp_path)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    with OperatorProcess(kube, tmp_path, args=["--store", url]) as process:
        apply(kube, secret("hook", secret="s"), repo("demo", f"file://{bare}", webhookSecret="hook"))
        wait_for(lambda: len(list_testruns(kube)) == 1, what="the first TestRun")
        assert "does not answer" in process.log()
        with RedisServer(port=port) as redis:
            second = work.commit({"x": "2"}, "second")
            work.git("push", "--quiet", "origin", "main")
            process.webhook("/webhooks/github", *signed_push(f"file://{bare}", second, secret="s"))
            store = open_store(redis.url)
            wait_for(lambda: store.branch_line(f"{NAMESPACE}/demo", "main") == [second, first], what="the line")
            # What part 2 will record for each run; here, as its RESULT would land.
            store.record_run(RunRecord(f"{NAMESPACE}/demo", second, "smoke/linux", "test", 0, 0, "failed", 1.0, 1,
                                       1.7e9, "main", [CaseResult("test_it", False, 0.1)]))
            store.close()
            env = {**kube.client_env("user"), "PYTHONPATH": str(OPERATOR_DIR)}
            shown = subprocess.run([sys.executable, "-m", "testlooper", "history", "--store", redis.url,
                                    "--repo", f"{NAMESPACE}/demo"], env=env, capture_output=True, text=True,
                                   timeout=60, cwd=tmp_path)
            assert shown.returncode == 0, shown.stderr
            assert second[:12] in shown.stdout and "smoke/linux" in shown.stdout
            unknown = subprocess.run([sys.executable, "-m", "testlooper", "flaky", "--store", redis.url,
                                      "--repo", f"{NAMESPACE}/demo", "--branch", "dev"], env=env,
                                     capture_output=True, text=True, timeout=60, cwd=tmp_path)
            assert (unknown.returncode, unknown.stderr) == (
                2, f"testlooper: error: {NAMESPACE}/demo has no tested branch dev in the store (it has main)\n")


OTHER_DEFINITIONS = GOOD_DEFINITIONS.replace("smoke/linux", "other/linux")


def test_a_spec_edit_made_while_git_is_unreachable_is_applied_when_it_comes_back(kube, operator, tmp_path):
    """The poll that saw the edit could not fetch, so it applied nothing: the first poll that
    fetches must still read every head with the new spec, even though no head moved."""
    work, bare, first = make_origin(tmp_path)
    work.commit({"ci/other.yml": OTHER_DEFINITIONS}, "a second definitions file")
    work.git("push", "--quiet", "origin", "main")
    url = f"file://{bare}"
    apply(kube, secret("hook", secret="s"), repo("demo", url, webhookSecret="hook"))
    wait_for(lambda: [t["spec"]["task"] for t in list_testruns(kube)] == ["smoke/linux"], what="the first TestRun")
    hidden = bare.with_name("hidden.git")
    bare.rename(hidden)
    kube.kubectl("patch", "repo", "demo", "-n", NAMESPACE, "--type", "merge",
                 "-p", '{"spec": {"definitionsPath": "ci/other.yml"}}')
    wait_for(lambda: condition(repo_object(kube), "GitReachable").get("status") == "False", what="git unreachable")
    hidden.rename(bare)
    status, _ = operator.webhook("/webhooks/github", *signed_push(url, work.head(), secret="s"))
    assert status == 202
    wait_for(lambda: condition(repo_object(kube), "GitReachable").get("status") == "True", what="git back")
    wait_for(lambda: sorted(t["spec"]["task"] for t in list_testruns(kube)) == ["other/linux", "smoke/linux"],
             what="the edited definitionsPath read once git answers again")
    obj = repo_object(kube)
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]


def test_a_spec_edit_landing_during_a_fetch_is_read_by_the_next_poll(kube, operator, tmp_path):
    """The poll under way read the old spec: it must not record the edit as observed."""
    work, bare, first = make_origin(tmp_path)
    work.commit({"ci/other.yml": OTHER_DEFINITIONS}, "a second definitions file")
    work.git("push", "--quiet", "origin", "main")
    with GitHttpServer(bare.parent) as server:
        url = server.url("origin.git")
        apply(kube, secret("hook", secret="s"), repo("demo", url, webhookSecret="hook"))
        wait_for(lambda: [t["spec"]["task"] for t in list_testruns(kube)] == ["smoke/linux"], what="the first TestRun")
        server.hold()
        status, _ = operator.webhook("/webhooks/github", *signed_push(url, work.head(), secret="s"))
        assert status == 202
        assert server.held.wait(timeout=20), "the webhook's poll never fetched"
        kube.kubectl("patch", "repo", "demo", "-n", NAMESPACE, "--type", "merge",
                     "-p", '{"spec": {"definitionsPath": "ci/other.yml"}}')
        time.sleep(0.5)  # the watch brings the edit to the operator while its fetch waits
        server.release()
        wait_for(lambda: sorted(t["spec"]["task"] for t in list_testruns(kube)) == ["other/linux", "smoke/linux"],
                 what="the definitionsPath edited during the fetch read by the next poll")


def test_a_force_push_undone_tests_the_commit_that_came_back(kube, operator, tmp_path):
    work, bare, first = make_origin(tmp_path)
    url = f"file://{bare}"
    apply(kube, secret("hook", secret="s"), repo("demo", url, webhookSecret="hook"))
    wait_for(lambda: len(list_testruns(kube)) == 1, what="the first TestRun")

    def push(commit: str, force: bool = False) -> None:
        work.git("push", "--quiet", *(["--force"] if force else []), "origin", f"{commit}:refs/heads/main")
        assert operator.webhook("/webhooks/github", *signed_push(url, commit, secret="s"))[0] == 202

    def phases(commit: str) -> list[str]:
        return [(t.get("status") or {}).get("phase") for t in list_testruns(kube, **{"testlooper.dev/commit": commit})]

    kept = work.commit({"x": "kept"}, "the commit that will come back")
    push(kept)
    wait_for(lambda: phases(kept) == ["Pending"], what="its TestRun")
    work.git("reset", "--quiet", "--hard", first)
    mistake = work.commit({"x": "mistake"}, "pushed by mistake")
    push(mistake, force=True)
    wait_for(lambda: phases(kept) == ["Cancelled"] and phases(mistake) == ["Pending"], what="the mistake")
    push(kept, force=True)  # undone
    wait_for(lambda: phases(kept) == ["Pending"] and phases(mistake) == ["Cancelled"],
             what="the commit that came back tested again")
    testrun, = list_testruns(kube, **{"testlooper.dev/commit": kept})
    assert not testrun["spec"].get("cancel")
    assert "1 running" in repo_object(kube)["status"]["branchesSummary"]


def test_a_pin_to_a_commit_not_fetched_yet_resolves_once_it_is(kube, operator, tmp_path):
    """The app is pushed just after the lib commit it pins, and polled before the lib is: its
    head is untestable only until the lib's mirror has that commit, not until the next push."""
    lib_work, lib_bare, _lib_sha = make_origin(tmp_path / "lib", LIB_DEFINITIONS)
    apply(kube, secret("hook", secret="s"), repo("lib", f"file://{lib_bare}", webhookSecret="hook"))
    wait_for(lambda: (repo_object(kube, "lib").get("status") or {}).get("lastPollTime"), what="lib fetched")
    lib_next = lib_work.commit({"x": "2"}, "what the app is about to pin")
    lib_work.git("push", "--quiet", "origin", "main")
    _app_work, app_bare, app_sha = make_origin(tmp_path / "app", app_pinning(lib_next))
    apply(kube, repo("app", f"file://{app_bare}", webhookSecret="hook"))
    invalid = wait_for(lambda: condition(repo_object(kube, "app"), "DefinitionsValid").get("status") == "False"
                       and repo_object(kube, "app"), what="the pin not fetched yet")
    assert lib_next in condition(invalid, "DefinitionsValid")["message"]
    polls = operator.metric("testlooper_git_poll_duration_seconds_count", repo="app")
    assert operator.webhook("/webhooks/github", *signed_push(f"file://{app_bare}", app_sha, secret="s"))[0] == 202
    wait_for(lambda: operator.metric("testlooper_git_poll_duration_seconds_count", repo="app") > polls,
             what="the app polled again, its head still untestable")
    assert operator.metric("testlooper_definitions_errors_total", repo="app") == 1, "one error, however often read"

    assert operator.webhook("/webhooks/github", *signed_push(f"file://{lib_bare}", lib_next, secret="s"))[0] == 202
    wait_for(lambda: [b["commit"] for b in repo_object(kube, "lib")["status"]["branches"]] == [lib_next],
             what="lib fetched again")
    assert operator.webhook("/webhooks/github", *signed_push(f"file://{app_bare}", app_sha, secret="s"))[0] == 202
    wait_for(lambda: condition(repo_object(kube, "app"), "DefinitionsValid").get("status") == "True",
             what="the app's unmoved head read again")
    assert sorted(t["spec"]["task"] for t in list_testruns(kube) if t["spec"]["repo"] == "app") == [
        "lib/build/linux", "uses-lib/linux"]
    assert len([e for e in events(kube) if e.get("reason") == "DefinitionsInvalid"]) == 1


def test_a_pin_two_repos_could_answer_says_which_two(kube, operator, tmp_path):
    """Two Repos whose URLs both end with the pinned name: the error names them, rather than
    saying that no repository of that name is available."""
    _work, first_lib, lib_sha = make_origin(tmp_path / "team-a", LIB_DEFINITIONS)
    _work, second_lib, _sha = make_origin(tmp_path / "team-b", LIB_DEFINITIONS)
    lib_a, lib_b = first_lib.with_name("lib.git"), second_lib.with_name("lib.git")
    first_lib.rename(lib_a)
    second_lib.rename(lib_b)
    apply(kube, repo("lib-a", f"file://{lib_a}"), repo("lib-b", f"file://{lib_b}"))
    for name in ("lib-a", "lib-b"):
        wait_for(lambda: (repo_object(kube, name).get("status") or {}).get("lastPollTime"), what=f"{name} fetched")
    _work, app_bare, _app_sha = make_origin(tmp_path / "app", app_pinning(lib_sha))
    apply(kube, repo("app", f"file://{app_bare}"))
    invalid = wait_for(lambda: condition(repo_object(kube, "app"), "DefinitionsValid").get("status") == "False"
                       and repo_object(kube, "app"), what="the ambiguous pin")
    message = condition(invalid, "DefinitionsValid")["message"]
    assert "lib-a" in message and "lib-b" in message, message


def test_a_flood_of_forged_pushes_reads_the_secret_once(kube, operator, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    _work, bare, first = make_origin(tmp_path)
    url = f"file://{bare}"
    apply(kube, secret("hook", secret="right"), repo("demo", url, webhookSecret="hook"))
    wait_for(lambda: len(list_testruns(kube)) == 1, what="the first TestRun")
    mark = len(kube.requests(client="operator"))
    forged = signed_push(url, first, secret="forged")
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda _: operator.webhook("/webhooks/github", *forged)[0], range(40)))
    assert answers == [401] * 40
    reads = [r for r in kube.requests(client="operator")[mark:] if r["resource"] == "secrets"]
    assert len(reads) == 1, reads
    assert operator.metric("testlooper_webhooks_total", provider="github", outcome="bad_signature") == 40


def test_a_worker_thread_stuck_at_shutdown_does_not_keep_the_operator_from_exiting(tmp_path):
    """A blocking call that never returns (a host that does not answer) must not hold a pod told
    to stop until Kubernetes kills it: the operator waits a moment, names the thread, shows its
    stack and exits."""
    script = tmp_path / "stuck.py"
    script.write_text(
        "import asyncio, time\n"
        "from testlooper.cluster import app\n"
        "async def serve(options):\n"
        "    asyncio.get_running_loop().run_in_executor(None, time.sleep, 3600)\n"
        "    await asyncio.sleep(0.2)\n"
        "app.serve = serve\n"
        "app.EXIT_GRACE_SECONDS = 0.5\n"
        "raise SystemExit(app.run(None))\n")
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "PYTHONPATH": str(OPERATOR_DIR)})
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started < 30
    assert "exiting with 1 worker thread(s) still busy: operator_0" in done.stderr, done.stderr
    assert "Thread 0x" in done.stderr and "concurrent/futures/thread.py" in done.stderr, done.stderr


def test_the_idle_git_archive_readers_do_not_hold_the_operators_exit(tmp_path):
    """The threads that read `git archive` pipes for the worker API wait idle once a source has
    been served; the exit lets them go instead of waiting its whole grace for them (every
    operator that served a run's source took 10 s to stop, and logged them as stuck)."""
    script = tmp_path / "served.py"
    script.write_text(
        "import asyncio\n"
        "from testlooper.cluster import app\n"
        "from testlooper.workerapi import protocol\n"
        "async def serve(options):\n"
        "    await asyncio.get_running_loop().run_in_executor(protocol._pipe_readers(), sum, [1, 2])\n"
        "app.serve = serve\n"
        "app.EXIT_GRACE_SECONDS = 30\n"
        "raise SystemExit(app.run(None))\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={**__import__("os").environ, "PYTHONPATH": str(OPERATOR_DIR)})
    assert done.returncode == 0, done.stderr
    assert "still busy" not in done.stderr, done.stderr
