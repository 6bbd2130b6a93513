"""`--isolation container`: run each stage in the task's image through docker or podman.

The agent still runs on the host (it needs Python; the image needs only /bin/sh, as with
Prow's pod utilities). The agent's shell becomes `ENGINE run ... IMAGE /bin/sh -c`, with the
workspace mounted at the same path and the task's environment passed by name.
"""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess

ENGINES = ("docker", "podman")
# The agent's own variables, all passed into the container (their values come from the agent).
TASK_ENVIRONMENT = (
    "TEST_SRC_DIR", "TEST_INPUTS", "TEST_OUTPUT_DIR", "TEST_BUILD_OUTPUT_DIR", "TEST_SCRATCH_DIR",
    "TEST_CCACHE_DIR", "TEST_CORES_AVAILABLE", "TEST_RAM_GB_AVAILABLE", "TEST_LOOPER_TEST_ID",
    "TEST_LOOPER_RUN_INDEX", "TEST_LOOPER_ATTEMPT", "TEST_LOOPER_TEST_LIST_OUTPUT", "TEST_LOOPER_TESTS_TO_RUN",
)
RUN_LABEL = "dev.testlooper.run"
SHELL_ENV = "TESTLOOPER_SHELL"  # read by the agent: the shell prefix its commands run through


class ContainerError(Exception):
    """Container isolation cannot be used; the message says why and what to do."""


def find_engine() -> str:
    """The first working container engine, or a ContainerError saying why there is none."""
    problems = []
    for name in ENGINES:
        path = shutil.which(name)
        if path is None:
            continue
        try:
            probe = subprocess.run([path, "info"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as exc:
            problems.append(f"{name} did not answer: {exc}")
            continue
        if probe.returncode == 0:
            return path
        detail = (probe.stderr or probe.stdout).strip().splitlines()
        problems.append(f"{name} is installed but not usable ({detail[-1] if detail else f'exit {probe.returncode}'})")
    if not problems:
        raise ContainerError("--isolation container needs docker or podman, and neither is installed; "
                             "install one, or run on the host (the default, --isolation host)")
    raise ContainerError("--isolation container: " + "; ".join(problems))


def image_for(task: dict, engine: str, source_dir: str) -> str:
    """The image to run a task in, building it first when the definitions give a Dockerfile."""
    image = task.get("image") or {}
    if image.get("name"):
        return image["name"]
    if image.get("dockerfile") or image.get("dockerfile_contents"):
        contents = image.get("dockerfile_contents")
        key = contents if contents is not None else image["dockerfile"]
        tag = "testlooper-local/" + hashlib.sha256(key.encode()).hexdigest()[:16]
        command = [engine, "build", "--quiet", "--tag", tag]
        if contents is not None:
            command += ["--file", "-", source_dir]
        else:
            command += ["--file", f"{source_dir}/{image['dockerfile']}", source_dir]
        built = subprocess.run(command, input=contents, capture_output=True, text=True)
        if built.returncode != 0:
            raise ContainerError(f"building the image of {task['name']} failed: {built.stderr.strip()[-500:]}")
        return tag
    raise ContainerError(f"{task['name']} runs on a machine image (base_ami), not a container; "
                         "run it on the host or with the operator's EC2 pool")


def shell_prefix(engine: str, image: str, task: dict, workdir: str, run_id: str) -> str:
    """The agent's TESTLOOPER_SHELL for one run: each command becomes a container."""
    names = list(TASK_ENVIRONMENT) + sorted(task.get("variables", {}))
    words = [engine, "run", "--rm", "--init", "--network", "host", "--label", f"{RUN_LABEL}={run_id}",
             "--volume", f"{workdir}:{workdir}",
             "--workdir", f"{workdir}/src" if task.get("working_directory") == "source" else f"{workdir}/inputs"]
    for name in names:
        words += ["--env", name]
    words += [image, "/bin/sh", "-c"]
    return shlex.join(words)


def remove_run_containers(engine: str, run_id: str) -> None:
    """Containers a killed stage left behind (killing the client does not stop them)."""
    listed = subprocess.run([engine, "ps", "--all", "--quiet", "--filter", f"label={RUN_LABEL}={run_id}"],
                            capture_output=True, text=True)
    ids = listed.stdout.split()
    if ids:
        subprocess.run([engine, "rm", "--force", *ids], capture_output=True)
