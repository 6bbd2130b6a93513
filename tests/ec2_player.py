"""Plays EC2's machines for the tests: what tests/kubelet.py and run_cluster.Kubelet are for pods,
this is for instances on a moto_server.

    with Ec2Player(f"http://127.0.0.1:{moto_port}", tmp_path / "ec2") as player:
        ...                                  # the operator (or a test) launches instances
        boot = wait_for(lambda: player.boot_of_run(run_id))
        boot.instance_type, boot.ami, boot.tags, boot.user_data, boot.platform
        player.hold(lambda boot: boot.run_id.endswith(".1"))   # never boot these
        player.kill_agent(instance_id)           # the agent dies; the script shuts the machine down
        player.freeze(instance_id)               # every process dies, the instance stays "running"
        player.terminate_behind_back(instance_id)  # as from the console: the machine goes with it
    # at the end of the `with`: every machine's processes are killed (machine_processes() == [])

A thread lists the instances carrying one of the worker tags in state pending or running (moto
starts them running at once) and takes each new one, once: it reads its user-data back
(DescribeInstanceAttribute userData) and boots it in a thread of its own:

- Linux: the user-data script itself runs under bash, as cloud-init would run it, with
  TESTLOOPER_WORK_ROOT and TESTLOOPER_HOSTS_FILE pointing into the machine's folder
  (``ROOT/<instance id>/``) and a PATH that holds a bare machine's tools only: the host's
  core tools and python3 (this interpreter), and recording shims for ``shutdown``,
  ``poweroff``, ``halt`` and ``iptables``. There is no docker: the task's commands run on the
  machine, as on an AMI without docker. A shutdown terminates the instance in moto, as
  ``InstanceInitiatedShutdownBehavior=terminate`` would, and powers the machine off.
- Windows (no PowerShell can run here): what the script does is done by this player, read off
  the script (``parse_windows_user_data``: the operator URL, the run id, the token, the hosts
  lines, whether it shuts down): the hosts lines are written, the agent is downloaded from
  ``GET <url>/agent.py`` (30 tries, 0.2 s apart where the script waits 10 s), run with python
  as the script runs it, and when it ends the instance is terminated (``Stop-Computer`` in the
  script's ``finally``). The task's commands run with /bin/sh, since the agent runs on Linux.

A machine is powered off (each of its processes killed, found by a marker in their environment
whatever process group they moved to) when it shuts itself down, when its instance leaves
pending/running in moto (the operator, or a test, terminated it), when frozen, and when the
player stops. Each boot is recorded (``boots``: instance id -> Boot, in the order taken), with
why its machine stopped; errors in a boot thread go to ``errors``, for the test to show.

Beside it: ``Ec2FaultProxy`` (moto behind a proxy that answers the next N calls of an action
with EC2's throttling error, and reports chosen instances' status checks impaired, which moto
never does), ``moto_client``, ``reset_moto`` and
``make_network`` (the VPC, subnet and security group a pool's spec names).
"""

from __future__ import annotations

import base64
import http.client
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import boto3

MACHINE_MARKER = "TESTLOOPER_EC2_PLAYER_MACHINE"  # in every process of a machine: <player>:<instance id>
BOOTING_STATES = ("pending", "running")
RUN_TAG = "testlooper:run"
# What a bare machine image brings, besides python3: enough for the agent and the tasks' shell
# commands. Tools not on this host are left out.
MACHINE_TOOLS = ("bash", "sh", "cat", "mkdir", "env", "sed", "sort", "sleep", "sync", "chmod", "curl", "ls", "cp",
                 "mv", "rm", "tr", "head", "tail", "grep", "wc", "date", "true", "false", "test", "printf", "echo",
                 "basename", "dirname", "find", "tar", "gzip", "touch", "id", "uname", "expr", "seq", "tee", "kill",
                 "ps", "awk", "cut", "readlink", "ln", "stat", "mktemp")
POWER_COMMANDS = ("shutdown", "poweroff", "halt")
WINDOWS_DOWNLOAD_TRIES = 30
WINDOWS_DOWNLOAD_PAUSE = 0.2


def moto_client(endpoint_url: str, region: str = "us-east-1", *, botocore_retries: bool = True):
    """A boto3 EC2 client of moto_server, with the fake keys it takes (the test's own
    environment is left alone); ``botocore_retries=False`` as the operator's make_client has it."""
    from botocore.config import Config

    config = None if botocore_retries else Config(retries={"total_max_attempts": 1, "mode": "standard"})
    return boto3.client("ec2", endpoint_url=endpoint_url, region_name=region, config=config,
                        aws_access_key_id="testing", aws_secret_access_key="testing")


def reset_moto(endpoint_url: str) -> None:
    """A fresh emulator state (moto's stock AMIs survive it)."""
    urllib.request.urlopen(urllib.request.Request(f"{endpoint_url}/moto-api/reset", method="POST"), timeout=30).close()


def make_network(client) -> dict:
    """A VPC, a subnet in it and a security group, as a pool's spec names them."""
    vpc = client.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = client.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    group = client.create_security_group(GroupName="workers", Description="workers", VpcId=vpc)["GroupId"]
    return {"vpc": vpc, "subnet": subnet, "group": group}


# Two of moto's stock images (its ami list): their ids fit the CRD's pattern.
LINUX_AMI = "ami-1e749f67"  # ubuntu trusty
WINDOWS_AMI = "ami-b7e93bce"  # Windows Server 2016 base


def _is_agent(command_line: bytes) -> bool:
    """Whether a /proc cmdline is the agent's (not, say, curl downloading agent.py)."""
    argv = command_line.split(b"\0")
    return b"--run-id" in argv and any(argument.endswith(b"agent.py") for argument in argv)


class UserDataUnreadable(Exception):
    """The user-data is not what ec2/user_data.py writes; the message says what is missing."""


@dataclass
class WindowsScript:
    """What the player reads off a Windows user-data script to do what it would do."""

    api_url: str
    run_id: str
    token: str
    host_lines: list[str]
    agent_arguments: list[str]  # after --workdir: --heartbeat-seconds N
    shuts_down: bool
    closes_metadata: bool


def _ps_string(text: str) -> str:
    return text.replace("''", "'")


def parse_windows_user_data(script: str) -> WindowsScript:
    """The values ec2/user_data.windows writes, read back from its script (a small parser of
    that script's form, not of PowerShell)."""
    if not script.startswith("<powershell>") or "</powershell>" not in script:
        raise UserDataUnreadable("no <powershell> block")
    body = script[len("<powershell>"):script.index("</powershell>")]

    def assigned(variable):
        found = re.search(rf"^\s*\${re.escape(variable)} = '((?:[^']|'')*)'\s*$", body, re.MULTILINE)
        if not found:
            raise UserDataUnreadable(f"no ${variable} = '...' line")
        return _ps_string(found.group(1))

    hosts = re.search(r"^\$HostLines = @\(\n(.*?)^\)", body, re.MULTILINE | re.DOTALL)
    if not hosts:
        raise UserDataUnreadable("no $HostLines = @( ... ) block")
    host_lines = [_ps_string(line.strip()[1:-1]) for line in hosts.group(1).splitlines() if line.strip()]
    # The agent's line; what follows its --workdir (--heartbeat-seconds N) is passed on as is.
    agent_line = re.search(r"^\s*& \$Python\.Source -S -E \$Agent --api \$ApiUrl --run-id \$RunId "
                           r"--workdir \(Join-Path \$Work 'run'\)((?: [A-Za-z0-9.-]+)*)\s*$", body, re.MULTILINE)
    if not agent_line:
        raise UserDataUnreadable("no line running the agent as ec2/user_data.py writes it")
    if '"$ApiUrl/agent.py"' not in body:
        raise UserDataUnreadable("no download of $ApiUrl/agent.py")
    finally_block = body.rsplit("} finally {", 1)[-1] if "} finally {" in body else ""
    return WindowsScript(api_url=assigned("ApiUrl"), run_id=assigned("RunId"),
                         token=assigned("env:TESTLOOPER_WORKER_TOKEN"), host_lines=host_lines,
                         agent_arguments=agent_line.group(1).split(),
                         shuts_down="Stop-Computer -Force" in finally_block,
                         closes_metadata="New-NetFirewallRule" in body)


@dataclass
class Boot:
    """One instance the player took, and what became of its machine."""

    instance_id: str
    instance_type: str
    ami: str
    tags: dict
    user_data: str
    platform: str  # linux (a #! script) or windows (<powershell>), from the user-data's form
    root: Path  # the machine's folder: work/, hosts, record, console.log
    subnet_id: str = ""
    security_group_ids: list = field(default_factory=list)
    shutdown_behaviour: str = ""  # DescribeInstanceAttribute instanceInitiatedShutdownBehavior
    held: bool = False
    exit_code: int | None = None  # of the Linux script, or of the Windows agent
    powered_off: str = ""  # "" while up; "shutdown", "gone", "frozen" or "player stopped"
    taken_at: float = 0.0  # time.monotonic()
    powered_off_at: float | None = None
    windows: WindowsScript | None = None

    @property
    def run_id(self) -> str:
        return self.tags.get(RUN_TAG, "")

    @property
    def hosts_file(self) -> Path:
        return self.root / "hosts"

    def console(self) -> str:
        """What the machine's boot script (or, on Windows, the agent) wrote."""
        path = self.root / "console.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def recorded(self) -> list[str]:
        """The shims' record: `shutdown -h now`, `iptables ...`, `firewall ...`."""
        path = self.root / "record"
        return path.read_text().splitlines() if path.exists() else []


class Ec2Player:
    def __init__(self, endpoint_url: str, root, *, worker_tags=("testlooper-worker",), region="us-east-1",
                 poll_seconds: float = 0.1, python: str = sys.executable):
        self.endpoint_url = endpoint_url
        self.root = Path(root)
        self.worker_tags = list(worker_tags)
        self.poll_seconds = poll_seconds
        self.python = python
        self.client = moto_client(endpoint_url, region)
        self.boots: dict[str, Boot] = {}
        self.errors: list[str] = []
        self.player_id = uuid.uuid4().hex[:12]
        self._holds: list = []
        self._gone: set[str] = set()
        self._frozen: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop_thread = threading.Thread(target=self._loop, daemon=True, name="ec2-player")

    def __enter__(self):
        self.root.mkdir(parents=True, exist_ok=True)
        self._loop_thread.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def stop(self):
        """Powers every machine off and waits for the threads; nothing of them is left running."""
        self._stop.set()
        if self._loop_thread.is_alive():
            self._loop_thread.join(timeout=30)
        for thread in list(self._threads):
            thread.join(timeout=30)
        self._kill_marked(f"{MACHINE_MARKER}={self.player_id}:".encode(), prefix=True)

    # -- knobs and readings ------------------------------------------------------------------------

    def hold(self, match) -> None:
        """Instances for which ``match(boot)`` is true are taken but never booted (a machine stuck
        before its user-data runs); ``boot.held`` says so."""
        self._holds.append(match)

    def boot_of_run(self, run_id: str) -> Boot | None:
        with self._lock:
            return next((boot for boot in self.boots.values() if boot.run_id == run_id), None)

    def kill_agent(self, instance_id: str) -> int:
        """SIGKILLs the agent of the machine (the rest of its boot script goes on: on Linux the
        script's trap shuts the machine down, on Windows its ``finally`` does). Returns how many
        processes were killed."""
        return len(self._kill_marked(self._marker(instance_id), only=_is_agent))

    def freeze(self, instance_id: str) -> None:
        """Every process of the machine dies and nothing shuts it down: the instance stays in
        state running and its agent falls silent (a hung machine)."""
        with self._lock:
            self._frozen.add(instance_id)

    def terminate_behind_back(self, instance_id: str) -> None:
        """Terminates the instance in EC2 as someone at the console would; its machine goes."""
        self.client.terminate_instances(InstanceIds=[instance_id])

    def machine_processes(self, instance_id: str | None = None) -> list[int]:
        """The pids of every process still running on the instance's machine (by default: on
        any machine of this player)."""
        if instance_id is None:
            return [pid for pid, _ in self._marked(f"{MACHINE_MARKER}={self.player_id}:".encode(), prefix=True)]
        return [pid for pid, _ in self._marked(self._marker(instance_id))]

    def agent_running(self, instance_id: str) -> bool:
        return any(_is_agent(command) for _pid, command in self._marked(self._marker(instance_id)))

    def _marker(self, instance_id: str) -> bytes:
        return f"{MACHINE_MARKER}={self.player_id}:{instance_id}".encode()

    def live_instances(self) -> list[dict]:
        """moto's instances with a worker tag in a state that is not terminated (what counts
        against a pool's caps), as describe_instances gives them."""
        return self._describe(("pending", "running", "shutting-down", "stopping", "stopped"))

    # -- the watch --------------------------------------------------------------------------------

    def _describe(self, states) -> list[dict]:
        found = []
        paginator = self.client.get_paginator("describe_instances")
        for page in paginator.paginate(Filters=[{"Name": "tag-key", "Values": self.worker_tags},
                                                {"Name": "instance-state-name", "Values": list(states)}]):
            for reservation in page.get("Reservations", []):
                found.extend(reservation.get("Instances", []))
        return found

    def _loop(self):
        while not self._stop.is_set():
            try:
                up = self._describe(BOOTING_STATES)
            except Exception as error:  # moto stopped under us at the test's end, or a bug: said
                if not self._stop.is_set():
                    self.errors.append(f"describe_instances: {type(error).__name__}: {error}")
                self._stop.wait(self.poll_seconds)
                continue
            up_ids = {raw["InstanceId"] for raw in up}
            with self._lock:
                self._gone |= set(self.boots) - up_ids
            for raw in up:
                if raw["InstanceId"] not in self.boots:
                    try:
                        self._take(raw)
                    except Exception as error:
                        self.errors.append(f"{raw['InstanceId']}: cannot take it: {type(error).__name__}: {error}")
            self._stop.wait(self.poll_seconds)

    def _take(self, raw):
        instance_id = raw["InstanceId"]
        attribute = self.client.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        encoded = (attribute.get("UserData") or {}).get("Value", "")
        user_data = base64.b64decode(encoded).decode() if encoded else ""
        behaviour = self.client.describe_instance_attribute(InstanceId=instance_id,
                                                            Attribute="instanceInitiatedShutdownBehavior")
        platform = "windows" if user_data.startswith("<powershell>") else "linux"
        boot = Boot(instance_id=instance_id, instance_type=raw.get("InstanceType", ""), ami=raw.get("ImageId", ""),
                    tags={tag["Key"]: tag["Value"] for tag in raw.get("Tags", [])}, user_data=user_data,
                    platform=platform, root=self.root / instance_id, subnet_id=raw.get("SubnetId", ""),
                    security_group_ids=[group["GroupId"] for group in raw.get("SecurityGroups", [])],
                    shutdown_behaviour=behaviour["InstanceInitiatedShutdownBehavior"].get("Value", ""),
                    taken_at=time.monotonic())
        boot.root.mkdir(parents=True)
        boot.held = any(match(boot) for match in self._holds)
        with self._lock:
            self.boots[instance_id] = boot
        if boot.held:
            return
        thread = threading.Thread(target=self._boot, args=(boot,), daemon=True, name=f"ec2-{instance_id}")
        self._threads.append(thread)
        thread.start()

    # -- one machine ------------------------------------------------------------------------------

    def _boot(self, boot: Boot):
        process = None
        try:
            if boot.platform == "linux":
                process = self._start_linux(boot)
            else:
                process = self._start_windows(boot)
        except Exception as error:
            self.errors.append(f"{boot.instance_id}: cannot boot: {type(error).__name__}: {error}")
        self._watch(boot, process)

    def _machine_environment(self, boot, bin_dir):
        return {"PATH": str(bin_dir), "HOME": str(boot.root), "LANG": "C.UTF-8",
                MACHINE_MARKER: f"{self.player_id}:{boot.instance_id}"}

    def _machine_bin(self, boot) -> Path:
        """The machine's PATH: the host's core tools, python3, and the recording shims."""
        bin_dir = boot.root / "bin"
        bin_dir.mkdir()
        for tool in MACHINE_TOOLS:
            found = shutil.which(tool)
            if found:
                os.symlink(found, bin_dir / tool)
        os.symlink(self.python, bin_dir / "python3")
        record, power = boot.root / "record", boot.root / "power"
        for command in POWER_COMMANDS:
            shim = bin_dir / command
            shim.write_text(f'#!/bin/sh\necho "{command} $*" >> {record}\ntouch {power}\n')
            shim.chmod(0o755)
        iptables = bin_dir / "iptables"  # the host's must never be touched (the tests may run as root)
        iptables.write_text(f'#!/bin/sh\necho "iptables $*" >> {record}\n')
        iptables.chmod(0o755)
        return bin_dir

    def _start_linux(self, boot):
        bin_dir = self._machine_bin(boot)
        script = boot.root / "user-data.sh"
        script.write_text(boot.user_data)
        boot.hosts_file.write_text("127.0.0.1 localhost\n")
        environment = self._machine_environment(boot, bin_dir)
        environment.update({"TESTLOOPER_WORK_ROOT": str(boot.root / "work"),
                            "TESTLOOPER_HOSTS_FILE": str(boot.hosts_file)})
        with open(boot.root / "console.log", "ab") as console:
            return subprocess.Popen([str(bin_dir / "bash"), str(script)], cwd=boot.root, env=environment,
                                    stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def _start_windows(self, boot):
        bin_dir = self._machine_bin(boot)
        boot.hosts_file.write_text("127.0.0.1 localhost\n")
        try:
            script = boot.windows = parse_windows_user_data(boot.user_data)
        except UserDataUnreadable:
            (boot.root / "power").touch()  # what the script's finally would still do
            raise
        with open(boot.hosts_file, "a") as hosts:
            hosts.writelines(line + "\n" for line in script.host_lines)
        work = boot.root / "work"
        (work / "run").mkdir(parents=True)
        agent = work / "agent.py"
        for attempt in range(1, WINDOWS_DOWNLOAD_TRIES + 1):
            try:
                with urllib.request.urlopen(f"{script.api_url}/agent.py", timeout=10) as answer:
                    agent.write_bytes(answer.read())
                break
            except (urllib.error.URLError, OSError):
                if attempt == WINDOWS_DOWNLOAD_TRIES or self._powering_off(boot):
                    (boot.root / "console.log").write_text(
                        f"testlooper: cannot download the agent from {script.api_url}/agent.py\n")
                    (boot.root / "power").touch()
                    return None
                time.sleep(WINDOWS_DOWNLOAD_PAUSE)
        if script.closes_metadata:
            with open(boot.root / "record", "a") as record:
                record.write("firewall block 169.254.169.254\n")
        environment = self._machine_environment(boot, bin_dir)
        environment["TESTLOOPER_WORKER_TOKEN"] = script.token
        with open(boot.root / "console.log", "ab") as console:
            return subprocess.Popen([self.python, "-S", "-E", str(agent), "--api", script.api_url,
                                     "--run-id", script.run_id, "--workdir", str(work / "run"),
                                     *script.agent_arguments],
                                    cwd=work, env=environment, stdin=subprocess.DEVNULL, stdout=console,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def _powering_off(self, boot) -> bool:
        return (self._stop.is_set() or boot.instance_id in self._gone or boot.instance_id in self._frozen
                or (boot.root / "power").exists())

    def _watch(self, boot, process):
        """Waits for the machine's end: its shutdown (the instance is terminated in moto), its
        instance gone from pending/running, a freeze, or the player's stop."""
        while True:
            if process is not None and boot.exit_code is None and process.poll() is not None:
                boot.exit_code = process.returncode
                if boot.platform == "windows" and boot.windows and boot.windows.shuts_down:
                    (boot.root / "power").touch()  # the script's finally: Stop-Computer -Force
            if (boot.root / "power").exists():
                reason = "shutdown"
            elif boot.instance_id in self._gone:
                reason = "gone"
            elif boot.instance_id in self._frozen:
                reason = "frozen"
            elif self._stop.is_set():
                reason = "player stopped"
            else:
                time.sleep(0.05)
                continue
            break
        self._power_off(boot, process)
        if reason == "shutdown":
            try:  # InstanceInitiatedShutdownBehavior=terminate
                self.client.terminate_instances(InstanceIds=[boot.instance_id])
            except Exception as error:
                if not self._stop.is_set():
                    self.errors.append(f"{boot.instance_id}: cannot terminate it at its shutdown: {error}")
        boot.powered_off, boot.powered_off_at = reason, time.monotonic()

    def _power_off(self, boot, process):
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._kill_marked(self._marker(boot.instance_id))
        if process is not None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.errors.append(f"{boot.instance_id}: its boot process did not die")
            if boot.exit_code is None:
                boot.exit_code = process.returncode

    # -- processes, by the marker in their environment ---------------------------------------------

    def _marked(self, marker: bytes, prefix=False):
        found, own = [], os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == own:
                continue
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
                with open(f"/proc/{entry}/environ", "rb") as environ:
                    variables = environ.read().split(b"\0")
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    command = cmdline.read()
            except OSError:
                continue
            if any(variable.startswith(marker) if prefix else variable == marker for variable in variables):
                found.append((int(entry), command))
        return found

    def _kill_marked(self, marker: bytes, prefix=False, only=None):
        """SIGKILLs the marked processes, again until none is left (one may fork meanwhile)."""
        killed = []
        for _ in range(20):
            batch = [(pid, command) for pid, command in self._marked(marker, prefix)
                     if only is None or only(command)]
            batch = [(pid, command) for pid, command in batch if pid not in {k for k, _ in killed}]
            if not batch:
                break
            for pid, _command in batch:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            killed += batch
            if only is not None:
                break
            time.sleep(0.05)
        return killed


class Ec2FaultProxy:
    """An HTTP proxy in front of moto_server for what moto never does: it answers the next N
    requests of an EC2 action with EC2's throttling error instead of passing them on, and
    reports the instance status check of chosen instances ``impaired`` in DescribeInstanceStatus.

        with Ec2FaultProxy(moto_endpoint) as proxy:   # the operator's AWS_ENDPOINT_URL: proxy.url
            proxy.throttle("RunInstances", 2)
            proxy.throttled                              # [action, ...] as they were answered
            proxy.impair(instance_id)
    """

    def __init__(self, upstream: str, port: int = 0):
        """``port``: where to listen (0: any free one), e.g. an endpoint the operator was given
        before EC2 "came up"."""
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.throttled: list[str] = []
        self.impaired: set[str] = set()
        self._pending: dict[str, tuple[int, str, int]] = {}
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                proxy._handle(self)

            do_POST = do_GET

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="ec2-throttle")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def throttle(self, action: str, times: int, code: str = "RequestLimitExceeded", status: int = 503) -> None:
        with self._lock:
            self._pending[action] = (times, code, status)

    def impair(self, instance_id: str) -> None:
        """From now on, the instance's status check reads ``impaired`` (a broken machine)."""
        with self._lock:
            self.impaired.add(instance_id)

    def _impaired_statuses(self, answer: bytes) -> bytes:
        text = answer.decode()
        for instance_id in sorted(self.impaired):
            text = re.sub(rf"(<instanceId>{re.escape(instance_id)}</instanceId>.*?<instanceStatus>.*?)"
                          r"<status>ok</status>(</instanceStatus>)", r"\1<status>impaired</status>\2", text,
                          flags=re.DOTALL)
        return text.encode()

    def _take_throttle(self, action):
        with self._lock:
            times, code, status = self._pending.get(action, (0, "", 0))
            if times <= 0:
                return None
            self._pending[action] = (times - 1, code, status)
            self.throttled.append(action)
            return code, status

    def _handle(self, request):
        body = request.rfile.read(int(request.headers.get("Content-Length") or 0))
        action = (urllib.parse.parse_qs(body.decode(errors="replace")).get("Action") or [""])[0]
        throttled = self._take_throttle(action)
        if throttled:
            code, status = throttled
            answer = (f"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Errors><Error><Code>{code}</Code>"
                      f"<Message>Request limit exceeded.</Message></Error></Errors><RequestID>throttled</RequestID>"
                      f"</Response>").encode()
            request.send_response(status)
            request.send_header("Content-Type", "text/xml")
            request.send_header("Content-Length", str(len(answer)))
            request.end_headers()
            request.wfile.write(answer)
            return
        connection = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            headers = {key: value for key, value in request.headers.items() if key.lower() != "content-length"}
            connection.request(request.command, request.path, body=body, headers=headers)
            reply = connection.getresponse()
            answer = reply.read()
            if action == "DescribeInstanceStatus" and self.impaired:
                answer = self._impaired_statuses(answer)
            request.send_response(reply.status)
            for key, value in reply.getheaders():
                if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                    request.send_header(key, value)
            request.send_header("Content-Length", str(len(answer)))
            request.end_headers()
            request.wfile.write(answer)
        finally:
            connection.close()
