"""A test kubelet: runs a built pod's containers as local processes, as a kubelet would.

    kubelet = TestKubelet(tmp_path / "node", secrets={name: secret_object})
    run = kubelet.run_pod(pod)          # pod: the dict kube/pods.build_run_pod made
    run.phase, run.exit_codes           # "Succeeded"/"Failed", {container: exit code}

What it does as a kubelet does: init containers one after another (a failing one fails the pod
and no other container starts), then every container at once; each with the pod's own command,
args, workingDir and env (``valueFrom.secretKeyRef`` resolved from the given Secret objects);
``activeDeadlineSeconds`` (counted from the pod's start) ends the pod: SIGTERM to every running
container, SIGKILL after ``terminationGracePeriodSeconds``, reason ``DeadlineExceeded``. When a
container's main process exits, whatever it left in its process group is killed, as the end of
a container's PID namespace would.

What it does differently, by design: images are not pulled, every container runs on this host
with this host's programs. So it refuses a pod whose containers need more than ``/bin/sh`` (the
test container) and the agent run by ``python3`` (the worker containers), and any volume but
``emptyDir`` and ``secret``.

The mount-root mapping: each volume is a folder ``ROOT/volumes/<name>`` (a Secret volume holds
its keys as files, with its ``defaultMode``). Every string in a container's command, args, env
values and workingDir that is a path under one of that container's mountPaths is rewritten to
the same path under the volume's folder. The worker image's agent (``pods.AGENT_IN_IMAGE``) is
this repository's ``operator/testlooper/worker/agent.py`` and ``python3`` is this interpreter.
A container's output goes to ``ROOT/logs/<container>.log``. Unlike a container's PID 1, a
``/bin/sh`` here does not ignore SIGTERM.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from testlooper.kube import pods

AGENT_FILE = Path(__file__).resolve().parents[1] / "operator" / "testlooper" / "worker" / "agent.py"
ALLOWED_SHELL = "/bin/sh"


class PodRefused(Exception):
    """The pod needs something this kubelet cannot give it."""


class PodAbandoned(Exception):
    """The test is over: its ``stop`` event was set while the pod ran; every container was killed."""


@dataclass
class PodRun:
    phase: str  # Succeeded or Failed
    reason: str  # "" or DeadlineExceeded
    init_exit_codes: dict = field(default_factory=dict)
    exit_codes: dict = field(default_factory=dict)
    volumes: dict = field(default_factory=dict)  # volume name -> its folder
    logs: dict = field(default_factory=dict)  # container name -> its output file
    mounts: dict = field(default_factory=dict)  # container name -> [volume names]
    environments: dict = field(default_factory=dict)  # container name -> the env it was given

    def log_text(self, container):
        return Path(self.logs[container]).read_text(errors="replace")

    def status(self, pod):
        """The pod's final ``status`` as a kubelet reports it, to patch into the API."""
        images = {container["name"]: container["image"]
                  for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]}
        status = {"phase": self.phase,
                  "initContainerStatuses": [_terminated(name, code, images[name])
                                            for name, code in self.init_exit_codes.items()],
                  "containerStatuses": [_terminated(name, code, images[name]) for name, code in self.exit_codes.items()]}
        if self.reason:
            status["reason"] = self.reason
            status["message"] = "Pod was active on the node longer than the specified deadline"
        return status


def running_status(pod):
    """The ``status`` of a pod whose containers have all started (after its init containers)."""
    spec = pod["spec"]
    return {"phase": "Running",
            "initContainerStatuses": [_terminated(container["name"], 0, container["image"])
                                      for container in spec.get("initContainers", [])],
            "containerStatuses": [{"name": container["name"], "image": container["image"], "imageID": "",
                                   "ready": True, "restartCount": 0, "started": True,
                                   "state": {"running": {}}} for container in spec["containers"]]}


def _terminated(name, code, image):
    return {"name": name, "image": image, "imageID": "", "ready": False, "restartCount": 0, "started": False,
            "state": {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error"}}}


class TestKubelet:
    __test__ = False  # not a pytest test class, despite its name

    def __init__(self, root, *, secrets=None, agent_file=AGENT_FILE, python=sys.executable, path=None, shell=None,
                 stop=None):
        """``path``: the containers' PATH (default this host's, whose programs the tasks use);
        ``shell``: the program that runs a container's ``/bin/sh`` command (default /bin/sh), to
        try the stage script with the shells test images bring (busybox, bash); ``stop``: a
        threading.Event whose setting kills every container (PodAbandoned), for a test's end."""
        self.stop = stop
        self.root = Path(root)
        self.shell = shell
        self.path = path or os.environ.get("PATH", "/usr/bin:/bin")
        self.secrets = dict(secrets or {})
        self.agent_file = str(agent_file)
        self.python = python

    def run_pod(self, pod, *, timeout=120, on_running=None):
        """Runs the pod to its end and returns how each container ended. ``timeout`` guards the
        test itself; the pod's own deadline is its activeDeadlineSeconds. ``on_running(pod)`` is
        called once every container has started (when a kubelet reports the pod Running)."""
        spec = pod["spec"]
        containers = list(spec.get("initContainers", [])) + list(spec["containers"])
        for container in containers:
            self._check_runnable(container)
        run = PodRun(phase="Pending", reason="")
        run.volumes = self._make_volumes(spec.get("volumes", []))
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        deadline = started + spec["activeDeadlineSeconds"] if spec.get("activeDeadlineSeconds") else None
        guard = started + timeout
        grace = spec.get("terminationGracePeriodSeconds", 30)
        for container in spec.get("initContainers", []):
            process = self._start(pod, container, run)
            code, past_deadline = self._wait([(container["name"], process)], deadline, guard, grace)
            run.init_exit_codes[container["name"]] = code[container["name"]]
            if past_deadline:
                run.phase, run.reason = "Failed", "DeadlineExceeded"
                return run
            if code[container["name"]] != 0:
                run.phase = "Failed"
                return run
        run.phase = "Running"
        started_containers = [(container["name"], self._start(pod, container, run)) for container in spec["containers"]]
        if on_running is not None:
            on_running(pod)
        codes, past_deadline = self._wait(started_containers, deadline, guard, grace)
        run.exit_codes = codes
        run.reason = "DeadlineExceeded" if past_deadline else ""
        run.phase = "Succeeded" if not past_deadline and all(code == 0 for code in codes.values()) else "Failed"
        return run

    # -- what may run

    def _check_runnable(self, container):
        argv = list(container.get("command", [])) + list(container.get("args", []))
        name = container["name"]
        if not argv:
            raise PodRefused(f"container {name}: no command; this kubelet does not read images' entrypoints")
        if argv[0] == ALLOWED_SHELL:
            return
        if argv[0] == pods.PYTHON:
            script = next((word for word in argv[1:] if not word.startswith("-")), "")
            mounted = [mount["mountPath"] for mount in container.get("volumeMounts", [])]
            if script == pods.AGENT_IN_IMAGE or any(script.startswith(path.rstrip("/") + "/") for path in mounted):
                return
            raise PodRefused(f"container {name}: python3 runs {script!r}, not the agent")
        raise PodRefused(f"container {name} runs {argv[0]!r}: this kubelet runs only /bin/sh and the agent")

    # -- volumes

    def _make_volumes(self, volumes):
        folders = {}
        for volume in volumes:
            folder = self.root / "volumes" / volume["name"]
            folder.mkdir(parents=True, exist_ok=False)
            if "emptyDir" in volume:
                pass
            elif "secret" in volume:
                self._fill_secret(folder, volume["secret"])
            else:
                raise PodRefused(f"volume {volume['name']}: only emptyDir and secret volumes are supported")
            folders[volume["name"]] = folder
        return folders

    def _fill_secret(self, folder, source):
        data = self._secret_data(source["secretName"])
        items = source.get("items") or [{"key": key, "path": key} for key in data]
        for item in items:
            if item["key"] not in data:
                raise PodRefused(f"Secret {source['secretName']} has no key {item['key']!r}")
            path = folder / item["path"]
            path.write_bytes(data[item["key"]])
            path.chmod(item.get("mode", source.get("defaultMode", 0o644)))

    def _secret_data(self, name):
        if name not in self.secrets:
            raise PodRefused(f"the pod needs Secret {name}, which does not exist")
        secret = self.secrets[name]
        data = {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}
        data.update({key: value.encode() for key, value in (secret.get("stringData") or {}).items()})
        return data

    # -- processes

    def _start(self, pod, container, run):
        mounts = {mount["mountPath"].rstrip("/"): run.volumes[mount["name"]]
                  for mount in container.get("volumeMounts", [])}
        run.mounts[container["name"]] = [mount["name"] for mount in container.get("volumeMounts", [])]
        rewrite = lambda text: self._rewrite(text, mounts)  # noqa: E731
        argv = [rewrite(word) for word in list(container.get("command", [])) + list(container.get("args", []))]
        if argv[0] == pods.PYTHON:
            argv[0] = self.python
        elif argv[0] == ALLOWED_SHELL and self.shell:
            argv[:1] = self.shell
        environment = {"PATH": self.path, "HOSTNAME": pod["metadata"]["name"]}
        for variable in container.get("env", []):
            if "value" in variable:
                environment[variable["name"]] = rewrite(variable["value"])
            elif "secretKeyRef" in variable.get("valueFrom", {}):
                reference = variable["valueFrom"]["secretKeyRef"]
                environment[variable["name"]] = self._secret_data(reference["name"])[reference["key"]].decode()
            else:
                raise PodRefused(f"container {container['name']}: env {variable['name']} comes from an unsupported source")
        run.environments[container["name"]] = dict(environment)
        working_directory = rewrite(container["workingDir"]) if container.get("workingDir") else str(self.root)
        log_path = self.root / "logs" / f"{container['name']}.log"
        run.logs[container["name"]] = str(log_path)
        with open(log_path, "ab") as output:
            return subprocess.Popen(argv, cwd=working_directory, env=environment, stdin=subprocess.DEVNULL,
                                    stdout=output, stderr=subprocess.STDOUT, start_new_session=True)

    def _rewrite(self, text, mounts):
        if text == pods.AGENT_IN_IMAGE:
            return self.agent_file
        for mount_path, folder in sorted(mounts.items(), key=lambda item: -len(item[0])):
            if text == mount_path:
                return str(folder)
            if text.startswith(mount_path + "/"):
                return str(folder) + text[len(mount_path):]
        return text

    def _wait(self, processes, deadline, guard, grace):
        """Waits for every process; past the deadline, SIGTERM then SIGKILL after ``grace``.
        Returns ({name: exit code}, whether the deadline ended them)."""
        codes, past_deadline, killed_at = {}, False, None
        while len(codes) < len(processes):
            for name, process in processes:
                if name not in codes and process.poll() is not None:
                    codes[name] = process.returncode
                    _kill_group(process.pid, signal.SIGKILL)  # the container's leftovers go with it
            now = time.monotonic()
            if now > guard:
                for _name, process in processes:
                    _kill_group(process.pid, signal.SIGKILL)
                raise AssertionError("the pod did not end within the test's timeout")
            if self.stop is not None and self.stop.is_set():
                for _name, process in processes:
                    _kill_group(process.pid, signal.SIGKILL)
                raise PodAbandoned("the test ended while the pod ran")
            if deadline is not None and now >= deadline and not past_deadline:
                past_deadline, killed_at = True, now
                for name, process in processes:
                    if name not in codes:  # a runtime signals the container's PID 1 only
                        _signal(process.pid, signal.SIGTERM)
            if killed_at is not None and now >= killed_at + grace:
                for name, process in processes:
                    if name not in codes:
                        _kill_group(process.pid, signal.SIGKILL)
            time.sleep(0.05)
        return codes, past_deadline


def _signal(pid, signum):
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _kill_group(group, signum):
    try:
        os.killpg(group, signum)
    except (ProcessLookupError, PermissionError):
        pass


def run_agent_alone(pod, secrets, workdir, *, timeout=120):
    """The simpler stand-in for tests that do not care about the pod's layout: runs the local
    agent for the pod's run, with the token read through the pod's annotations
    (``testlooper.dev/run-id``, ``testlooper.dev/token-secret``) from the given Secret objects.
    Returns the agent's exit status."""
    annotations = pod["metadata"]["annotations"]
    secret = secrets[annotations[pods.TOKEN_SECRET_ANNOTATION]]
    token = base64.b64decode(secret["data"][pods.TOKEN_KEY]).decode()
    api_url = next(variable["value"] for variable in pod["spec"]["initContainers"][0]["env"]
                   if variable["name"] == pods.API_URL_ENV)
    environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TESTLOOPER_WORKER_TOKEN": token}
    done = subprocess.run([sys.executable, "-S", "-E", str(AGENT_FILE), "--api", api_url,
                           "--run-id", annotations[pods.RUN_ID_ANNOTATION], "--workdir", str(workdir),
                           "--heartbeat-seconds", "0.2"], env=environment, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout)
    return done.returncode
