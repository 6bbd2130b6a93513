"""Another repository's source in the cluster, end to end: the real operator process, the
emulator, redis-server and the kubelet of test_operator_runs_e2e. The app pins `lib` at a
commit; its test takes lib's source (a sub-folder, and the whole tree) as inputs and consumes
lib's build, which runs on lib's pinned source. lib moves on after the pin: the runs still get
the pinned commit's files, served from the lib Repo's mirror."""

from __future__ import annotations

from cluster_helpers import NAMESPACE, list_testruns, repo_object
from gitrepo import GitRepo
from run_helpers import wait_for
from run_cluster import Kubelet, ended_testruns, redis_url, start_operator  # noqa: F401
from test_operator_runs_e2e import POOL
from test_workerapi_cluster import mirror  # noqa: F401 - a fixture
from testlooper.decisions.repo import with_pins

LIB_DEFINITIONS = """\
looper_version: 5
environments:
  linux: {platform: linux, image: {name: "busybox:1.36"}}
builds:
  tool/linux:
    command: sh src/make-tool.sh
    dependencies: {src: HEAD}
"""
MAKE_TOOL = 'mkdir -p "$TEST_BUILD_OUTPUT_DIR" && cat src/data/version.txt > "$TEST_BUILD_OUTPUT_DIR/tool-version"\n'
CHECK = """\
tool=$(cat "$TEST_INPUTS/tool/tool-version")
data=$(cat "$TEST_INPUTS/libdata/version.txt")
whole=$(cat "$TEST_INPUTS/lib/data/version.txt")
echo "tool=$tool data=$data whole=$whole"
ok() { if [ "$1" = "$2" ]; then echo true; else echo false; fi; }
printf '{"tool_is_pinned": %s, "data_is_pinned": %s, "whole_tree_is_pinned": %s}' \\
  "$(ok "$tool" v1)" "$(ok "$data" v1)" "$(ok "$whole" v1)" > "$TEST_OUTPUT_DIR/testSummary.json"
"""


def app_definitions(lib_commit: str) -> str:
    return f"""\
looper_version: 5
repos:
  lib: lib/{lib_commit}
environments:
  linux: {{platform: linux, image: {{name: "busybox:1.36"}}}}
tests:
  uses-lib/linux:
    command: sh src/check.sh
    dependencies: {{src: HEAD, lib: lib, libdata: lib/source/data, tool: lib/tool/linux}}
"""


def origin(path, files: dict[str, str]) -> tuple[GitRepo, str, str]:
    work = GitRepo(path / "work")
    commit = work.commit(files, "first")
    bare = path / "origin.git"
    GitRepo(bare, bare=True)
    work.git("push", "--quiet", str(bare), "HEAD:main")
    return work, f"file://{bare}", commit


def add_repo(kube, name: str, url: str) -> None:
    kube.api("POST", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/repos", {
        "apiVersion": "testlooper.dev/v1alpha1", "kind": "Repo", "metadata": {"name": name},
        "spec": {"url": url, "branches": ["main"], "pollIntervalSeconds": 3600}})


def test_pinned_sources_and_a_pinned_build_run_on_the_pinned_commit(kube, tmp_path, redis_url):  # noqa: F811
    lib_work, lib_url, lib_v1 = origin(tmp_path / "lib", {
        "testlooper.yml": LIB_DEFINITIONS, "make-tool.sh": MAKE_TOOL, "data/version.txt": "v1\n"})
    _, app_url, _ = origin(tmp_path / "app", {"testlooper.yml": app_definitions(lib_v1), "check.sh": CHECK})
    operator = start_operator(kube, tmp_path, redis_url, POOL)
    with operator:
        add_repo(kube, "lib", lib_url)
        wait_for(lambda: (repo_object(kube, "lib").get("status") or {}).get("lastPollTime"), what="lib fetched")
        # lib moves on, and its mirror has the new commit (a spec change polls at once): what
        # the app's runs get is still the commit the app pins.
        lib_v2 = lib_work.commit({"data/version.txt": "v2\n"}, "v2")
        lib_work.git("push", "--quiet", lib_url.removeprefix("file://"), "HEAD:main")
        kube.api("PATCH", f"/apis/testlooper.dev/v1alpha1/namespaces/{NAMESPACE}/repos/lib",
                 {"spec": {"pollIntervalSeconds": 3599}}, content_type="application/merge-patch+json")
        wait_for(lambda: [b.get("commit") for b in (repo_object(kube, "lib").get("status") or {}).get("branches", [])]
                 == [lib_v2], what="lib's mirror fetched v2")
        add_repo(kube, "app", app_url)
        with Kubelet(kube, tmp_path / "node") as kubelet:
            try:
                by_task = wait_for(lambda: ended_testruns(kube, 2), timeout=90, interval=0.3,
                                   what="the app's test and lib's build ended")
            except AssertionError:
                raise AssertionError([(t["spec"]["task"], t.get("status")) for t in list_testruns(kube)]
                                     + [operator.log()[-5000:]]) from None
            finally:
                assert kubelet.errors == [], kubelet.errors
        build, test = by_task["lib/tool/linux"], by_task["uses-lib/linux"]
        assert build["spec"]["definition"]["pins"] == {"lib": {"repository": "lib", "commit": lib_v1}}
        assert test["spec"]["definition"]["pins"] == {"lib": {"repository": "lib", "commit": lib_v1}}
        assert (build["status"]["phase"], build["status"]["result"]) == ("Succeeded", "passed"), build["status"]
        assert (test["status"]["phase"], test["status"]["result"], test["status"]["cases"]) == (
            "Succeeded", "passed", {"total": 3, "passed": 3, "failed": 0}), test["status"]
    assert "Traceback" not in operator.log()


def test_with_pins_keeps_the_commits_a_task_reads():
    repos = {"lib": {"repository": "lib", "commit": "a" * 40, "path": ""},
             "data": {"repository": "team/data", "commit": "b" * 40, "path": "sub"},
             "unused": {"repository": "x", "commit": "c" * 40, "path": ""}}
    task = {"name": "t", "dependencies": {"src": {"kind": "source", "repo": "HEAD", "path": ""},
                                          "d": {"kind": "source", "repo": "data", "path": "sub/x"},
                                          "b": {"kind": "build", "repo": "lib", "build": "b", "artifact": ""}}}
    assert with_pins(task, repos)["pins"] == {"data": {"repository": "team/data", "commit": "b" * 40},
                                              "lib": {"repository": "lib", "commit": "a" * 40}}
    assert "pins" not in task  # a copy
    own = {"name": "t", "dependencies": {"src": {"kind": "source", "repo": "HEAD", "path": ""}}}
    assert with_pins(own, repos) is own
    assert with_pins({"name": "b", "repo": "lib", "dependencies": {}}, repos)["pins"] == {
        "lib": {"repository": "lib", "commit": "a" * 40}}


def test_a_pinned_source_that_cannot_be_served_is_a_404_saying_why(tmp_path, redis_url, mirror):  # noqa: F811
    from test_workerapi_cluster import Api
    from testlooper.workerapi.cluster import InputSource
    from worker_helpers import call_api

    api = Api(tmp_path, redis_url, mirror)
    try:
        why = "pin 'lib': no repository named 'lib' is available; pinned repositories are the Repos of namespace ns"
        run_id, token = api.add(1, inputs={"lib": InputSource("source", unavailable=why)})
        status, body = call_api(api, "GET", f"/runs/{run_id}/inputs/lib", token=token)
        assert status == 404 and why in body.decode()
        pinned = InputSource("source", path="lib", git_dir=api.git_dir, commit=api.commit)
        run_id, token = api.add(2, inputs={"lib": pinned})
        assert call_api(api, "GET", f"/runs/{run_id}/inputs/lib", token=token)[0] == 200
    finally:
        api.close()
