"""The user-data that turns a fresh EC2 instance into the worker of one run (docs/ec2.md).

Both scripts do the same: write the pool's ``hostIps`` into the hosts file, download the agent
from the operator (``GET {api}/agent.py``), run it for the run with the run's token in its
environment, and shut the machine down whatever happened, so that the instance, launched with
InstanceInitiatedShutdownBehavior=terminate, ends with its run.

A script carries the operator's URL, the run id and that run's token, and nothing else secret:
no ssh key, no AWS credential, no operator secret. The token opens only its own run, until the
run ends. Every value is checked against a narrow character set before it is written into a
script, so none can end a quoted string or start a command.
"""

from __future__ import annotations

import ipaddress
import re
import shlex

LINUX_WORK_ROOT = "/var/lib/testlooper"
WINDOWS_WORK_ROOT = r"C:\testlooper"
TOKEN_VARIABLE = "TESTLOOPER_WORKER_TOKEN"
INSTANCE_METADATA_ADDRESS = "169.254.169.254"
MAX_USER_DATA_BYTES = 16 * 1024  # EC2's limit, before base64

_URL = re.compile(r"https?://[A-Za-z0-9._~:/?#\[\]@!&()*+,;=%-]+\Z")
_RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,200}\Z")
_TOKEN = re.compile(r"[A-Za-z0-9._~-]{16,512}\Z")
_IMAGE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]{0,400}\Z")
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")


class UserDataError(ValueError):
    """A value that cannot go into a worker's user-data; the message names it."""


def _checked(name: str, value: str, pattern: re.Pattern) -> str:
    if not isinstance(value, str) or not pattern.match(value):
        raise UserDataError(f"user-data: {name} {value!r} has characters a bootstrap script cannot carry")
    return value


def _checked_hosts(host_ips) -> list[tuple[str, str]]:
    lines = []
    for hostname, address in sorted((host_ips or {}).items()):
        _checked("hostIps name", hostname, _HOSTNAME)
        try:
            ip = str(ipaddress.ip_address(address))
        except ValueError:
            raise UserDataError(f"user-data: hostIps {hostname!r} -> {address!r} is not an IP address") from None
        lines.append((ip, hostname))
    return lines


def _common(api_url, run_id, token, image, host_ips):
    api_url = _checked("the operator URL", api_url, _URL).rstrip("/")
    _checked("the run id", run_id, _RUN_ID)
    _checked("the run's token", token, _TOKEN)
    if image:
        _checked("the image", image, _IMAGE)
    return api_url, _checked_hosts(host_ips)


def linux(api_url: str, run_id: str, token: str, image: str | None = None, host_ips=None, *,
          shutdown: bool = True, heartbeat_seconds: float = 5.0) -> str:
    """A bash script (cloud-init runs it as root at first boot).

    With ``image`` and a working docker, each command of the task runs in that image, on
    docker's bridge network (which IMDSv2's one-hop limit keeps away from the instance
    metadata, and so from this user-data); else the commands run on the machine itself, and
    the metadata address is closed with iptables before the agent starts.
    """
    api_url, hosts = _common(api_url, run_id, token, image, host_ips)
    quote = shlex.quote
    host_lines = "".join(f"{ip} {name}\n" for ip, name in hosts)
    add_hosts = " ".join(f"--add-host {quote(f'{name}:{ip}')}" for ip, name in hosts)
    finish = 'shutdown -h now || poweroff || halt -p' if shutdown else 'true'
    return _within_limit(f"""#!/bin/bash
# TestLooper worker for run {run_id}: written by the operator (testlooper/ec2/user_data.py).
# It holds the operator URL, the run id and the run's token: nothing else secret.
set -u
umask 077
API_URL={quote(api_url)}
RUN_ID={quote(run_id)}
IMAGE={quote(image or "")}
WORK="${{TESTLOOPER_WORK_ROOT:-{LINUX_WORK_ROOT}}}"
HOSTS_FILE="${{TESTLOOPER_HOSTS_FILE:-/etc/hosts}}"

# The instance ends with its run: shutting down terminates it (InstanceInitiatedShutdownBehavior).
finish() {{
    status=$?
    echo "testlooper: the worker is done (status $status); shutting down"
    sync
    {finish}
}}
trap finish EXIT

say() {{ echo "testlooper: $*"; }}

cat >>"$HOSTS_FILE" <<'TESTLOOPER_HOSTS'
{host_lines}TESTLOOPER_HOSTS

mkdir -p "$WORK/run"
PYTHON=$(command -v python3 || command -v python || true)
if [ -z "$PYTHON" ]; then
    say "no python3 on this machine image: the agent cannot run"
    exit 1
fi

fetch() {{
    if command -v curl >/dev/null 2>&1; then
        curl --fail --silent --show-error --max-time 120 --output "$2" "$1"
    else
        "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "$1" "$2"
    fi
}}
# The operator may be restarting: keep asking for a while.
attempt=1
until fetch "$API_URL/agent.py" "$WORK/agent.py"; do
    if [ "$attempt" -ge 30 ]; then
        say "cannot download the agent from $API_URL/agent.py"
        exit 1
    fi
    attempt=$((attempt + 1))
    sleep 10
done

if [ -n "$IMAGE" ] && command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    say "running the task's commands in $IMAGE"
    docker pull --quiet "$IMAGE" || say "cannot pull $IMAGE; docker run will try again"
    # The agent's shell: each command runs in the image, the run's folder mounted at the same
    # path, the task's environment passed by name (the token is never in it: the agent pops it).
    cat >"$WORK/in-image.sh" <<TESTLOOPER_SHELL
#!/bin/bash
names=()
for name in \\$(env | sed -n 's/^\\([A-Za-z_][A-Za-z0-9_]*\\)=.*/\\1/p' | sort -u); do
    case "\\$name" in PATH|HOME|HOSTNAME|PWD|OLDPWD|SHLVL|TERM|USER|LOGNAME|SHELL|_) continue ;; esac
    names+=(--env "\\$name")
done
exec docker run --rm --init --volume "$WORK/run:$WORK/run" --workdir "\\$PWD" {add_hosts} "\\${{names[@]}}" "$IMAGE" /bin/sh -c "\\$1"
TESTLOOPER_SHELL
    chmod 0700 "$WORK/in-image.sh"
    export TESTLOOPER_SHELL="$WORK/in-image.sh"
else
    if [ -n "$IMAGE" ]; then
        say "no working docker on this machine image: the task's commands run on the machine itself"
    fi
    # The commands run here, beside the instance metadata, which serves this script: closed.
    if command -v iptables >/dev/null 2>&1; then
        iptables -I OUTPUT -d {INSTANCE_METADATA_ADDRESS} -j REJECT || say "cannot close the instance metadata"
    fi
fi

say "starting the agent for run $RUN_ID"
export {TOKEN_VARIABLE}={quote(token)}
"$PYTHON" -S -E "$WORK/agent.py" --api "$API_URL" --run-id "$RUN_ID" --workdir "$WORK/run" --heartbeat-seconds {_beat(heartbeat_seconds)}
""")


def _beat(seconds: float) -> str:
    """The agent's heartbeat interval as a plain number (it goes into the script as is)."""
    seconds = float(seconds)
    if not 0.1 <= seconds <= 3600:
        raise UserDataError(f"the heartbeat interval must be between 0.1 and 3600 seconds, not {seconds:g}")
    return f"{seconds:g}"


def _within_limit(script: str) -> str:
    if len(script.encode()) > MAX_USER_DATA_BYTES:
        raise UserDataError(f"user-data: the script is {len(script.encode())} bytes, over EC2's "
                            f"{MAX_USER_DATA_BYTES} (too many hostIps?)")
    return script


def _ps(value: str) -> str:
    """A PowerShell single-quoted string (the values are checked: no quote of any kind in them)."""
    return "'" + value.replace("'", "''") + "'"


def windows(api_url: str, run_id: str, token: str, image: str | None = None, host_ips=None, *,
            shutdown: bool = True, heartbeat_seconds: float = 5.0) -> str:
    """A PowerShell script in EC2Launch's <powershell> tags, run as SYSTEM at first boot.

    The task's commands run on the machine itself (Windows containers are not used: the
    ``image`` is checked and otherwise ignored); the metadata address is closed with a firewall
    rule before the agent starts.
    """
    api_url, hosts = _common(api_url, run_id, token, image, host_ips)
    host_lines = "\n".join(f"    {_ps(f'{ip} {name}')}" for ip, name in hosts)
    finish = "Stop-Computer -Force" if shutdown else "# the machine is kept (reuse)"
    return _within_limit(f"""<powershell>
# TestLooper worker for run {run_id}: written by the operator (testlooper/ec2/user_data.py).
# It holds the operator URL, the run id and the run's token: nothing else secret.
$ErrorActionPreference = 'Stop'
$ApiUrl = {_ps(api_url)}
$RunId = {_ps(run_id)}
$Work = {_ps(WINDOWS_WORK_ROOT)}
$HostsFile = Join-Path $env:SystemRoot 'System32\\drivers\\etc\\hosts'
$HostLines = @(
{host_lines}
)
try {{
    if ($HostLines.Count -gt 0) {{
        Add-Content -Path $HostsFile -Value $HostLines -Encoding ASCII
    }}
    New-Item -ItemType Directory -Force -Path (Join-Path $Work 'run') | Out-Null
    [Net.ServicePointManager]::SecurityProtocol = [Net.SecurityProtocolType]::Tls12
    $Agent = Join-Path $Work 'agent.py'
    $Attempt = 1
    while ($true) {{
        try {{
            Invoke-WebRequest -UseBasicParsing -Uri "$ApiUrl/agent.py" -OutFile $Agent
            break
        }} catch {{
            if ($Attempt -ge 30) {{ throw "cannot download the agent from $ApiUrl/agent.py" }}
            $Attempt += 1
            Start-Sleep -Seconds 10
        }}
    }}
    $Python = Get-Command -Name @('python', 'python3') -CommandType Application -ErrorAction SilentlyContinue |
        Select-Object -First 1
    if ($null -eq $Python) {{ throw 'no python on this machine image: the agent cannot run' }}
    try {{
        New-NetFirewallRule -DisplayName 'testlooper: no instance metadata' -Direction Outbound `
            -RemoteAddress {INSTANCE_METADATA_ADDRESS} -Action Block | Out-Null
    }} catch {{
        Write-Output "testlooper: cannot close the instance metadata: $($_.Exception.Message)"
    }}
    Write-Output "testlooper: starting the agent for run $RunId"
    $env:{TOKEN_VARIABLE} = {_ps(token)}
    & $Python.Source -S -E $Agent --api $ApiUrl --run-id $RunId --workdir (Join-Path $Work 'run') --heartbeat-seconds {_beat(heartbeat_seconds)}
    Write-Output "testlooper: the agent ended with exit code $LASTEXITCODE"
}} catch {{
    Write-Output "testlooper: $($_.Exception.Message)"
}} finally {{
    Remove-Item -Path Env:{TOKEN_VARIABLE} -ErrorAction SilentlyContinue
    {finish}
}}
</powershell>
<persist>false</persist>
""")
