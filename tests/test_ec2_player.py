"""The EC2 player (tests/ec2_player.py) proven on its own, before the operator uses it: instances
launched on a real moto_server with the real adapter (Ec2Fleet) and the real user-data
(ec2/user_data.py), booted against a real worker API serving the agent and the runs."""

from __future__ import annotations

import pytest

from ec2_player import (
    LINUX_AMI, WINDOWS_AMI, Ec2Player, Ec2FaultProxy, UserDataUnreadable, make_network, moto_client,
    parse_windows_user_data, reset_moto,
)
from moto_server import start_moto_server
from run_helpers import wait_for
from test_workerapi_cluster import Api, mirror, redis_url  # noqa: F401 - fixtures
from testlooper.ec2 import user_data
from testlooper.ec2.fleet import Ec2Fleet
from testlooper.ec2.model import LaunchRequest
from worker_helpers import make_task

HOSTS = {"build-cache.internal": "10.0.0.7"}


@pytest.fixture(scope="module")
def moto_endpoint():
    process, port = start_moto_server()
    yield f"http://127.0.0.1:{port}"
    process.kill()
    process.wait()


@pytest.fixture
def ec2(moto_endpoint):
    reset_moto(moto_endpoint)
    client = moto_client(moto_endpoint)
    network = make_network(client)
    fleet = Ec2Fleet(client, "big", subnet_id=network["subnet"], security_group_ids=[network["group"]])
    return moto_endpoint, client, fleet, network


@pytest.fixture
def api(tmp_path, redis_url, mirror):  # noqa: F811
    served = Api(tmp_path, redis_url, mirror)
    yield served
    served.close()


def state_of(client, instance_id):
    raw = client.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    return raw["State"]["Name"]


def launch(fleet, api, index, platform, command="echo ran-on-the-machine", *, instance_type="t3.micro", **options):
    run_id, token = api.add(index, task=make_task(command))
    make = user_data.windows if platform == "windows" else user_data.linux
    script = make(api.url, run_id, token, None, HOSTS, **options)
    ami = WINDOWS_AMI if platform == "windows" else LINUX_AMI
    instance_id = fleet.launch(LaunchRequest(run_id, instance_type, ami, platform), script, {"repo": "ns/repo"})
    return run_id, token, instance_id, script


@pytest.mark.parametrize("platform", ["linux", "windows"])
def test_an_instance_boots_its_user_data_runs_its_run_and_is_terminated_by_its_shutdown(ec2, api, tmp_path, platform):
    endpoint, client, fleet, network = ec2
    run_id, token, instance_id, script = launch(fleet, api, 1, platform, instance_type="r5.8xlarge")
    # Not ours: no worker tag. The player never touches it.
    stranger = client.run_instances(ImageId=LINUX_AMI, InstanceType="t3.micro", MinCount=1,
                                    MaxCount=1)["Instances"][0]["InstanceId"]
    with Ec2Player(endpoint, tmp_path / "ec2") as player:
        boot = wait_for(lambda: player.boots.get(instance_id), what="the instance taken")
        wait_for(lambda: boot.powered_off, timeout=60, what=lambda: f"its machine's end; console: {boot.console()}")
        assert player.errors == []
        assert (boot.powered_off, boot.exit_code) == ("shutdown", 0), boot.console()
        assert api.results == [(run_id, "passed")]
        assert (boot.platform, boot.instance_type, boot.run_id) == (platform, "r5.8xlarge", run_id)
        assert boot.ami == (WINDOWS_AMI if platform == "windows" else LINUX_AMI)
        assert boot.user_data == script and boot.shutdown_behaviour == "terminate"
        assert boot.tags["testlooper-worker"] == "big" and boot.tags["testlooper:repo"] == "ns/repo"
        assert (boot.subnet_id, boot.security_group_ids) == (network["subnet"], [network["group"]])
        assert boot.hosts_file.read_text() == "127.0.0.1 localhost\n10.0.0.7 build-cache.internal\n"
        assert token not in boot.console()
        if platform == "linux":  # the script's own doing, through the shims
            assert boot.recorded() == ["iptables -I OUTPUT -d 169.254.169.254 -j REJECT", "shutdown -h now"]
        else:  # the player's, read off the script
            assert (boot.windows.api_url, boot.windows.run_id, boot.windows.token) == (api.url, run_id, token)
            assert boot.recorded() == ["firewall block 169.254.169.254"]
        assert state_of(client, instance_id) == "terminated"
        assert stranger not in player.boots and state_of(client, stranger) == "running"
    assert player.machine_processes() == []


def test_a_kept_machine_stays_running_after_its_run(ec2, api, tmp_path):
    endpoint, client, fleet, _network = ec2
    run_id, _token, instance_id, _script = launch(fleet, api, 1, "linux", shutdown=False)
    with Ec2Player(endpoint, tmp_path / "ec2") as player:
        boot = wait_for(lambda: player.boots.get(instance_id), what="the instance taken")
        wait_for(lambda: boot.exit_code is not None, timeout=60, what="its script's end")
        assert api.results == [(run_id, "passed")] and boot.powered_off == ""
        assert state_of(client, instance_id) == "running"
    assert boot.powered_off == "player stopped" and player.machine_processes() == []


def test_the_knobs_hold_kill_the_agent_freeze_and_terminate_behind_the_back(ec2, api, tmp_path):
    endpoint, client, fleet, _network = ec2
    launched = {name: launch(fleet, api, index, platform, "sleep 60")
                for index, (name, platform) in enumerate([("held", "linux"), ("killed", "linux"),
                                                          ("killed-windows", "windows"), ("frozen", "linux"),
                                                          ("terminated", "linux"), ("left", "windows")], start=1)}
    instance = {name: values[2] for name, values in launched.items()}
    with Ec2Player(endpoint, tmp_path / "ec2") as player:
        player.hold(lambda boot: boot.run_id == launched["held"][0])
        boots = wait_for(lambda: len(player.boots) == 6 and player.boots, what="the six instances taken")
        for name in ("killed", "killed-windows"):
            # Once its agent runs, it dies; the script goes on and shuts the machine down.
            wait_for(lambda: player.kill_agent(instance[name]) == 1, timeout=30, what=f"{name}'s agent to kill")
        for name in ("frozen", "terminated", "left"):
            wait_for(lambda: player.agent_running(instance[name]), timeout=30, what=f"{name}'s agent running")
        player.freeze(instance["frozen"])
        player.terminate_behind_back(instance["terminated"])
        for name, reason in (("killed", "shutdown"), ("killed-windows", "shutdown"), ("frozen", "frozen"),
                             ("terminated", "gone")):
            wait_for(lambda: boots[instance[name]].powered_off, timeout=30, what=f"{name}'s machine off")
            assert boots[instance[name]].powered_off == reason, name
        assert boots[instance["held"]].held and boots[instance["held"]].powered_off == ""
        assert not (boots[instance["held"]].root / "console.log").exists()
        states = {name: state_of(client, instance[name]) for name in instance}
        assert states == {"held": "running", "killed": "terminated", "killed-windows": "terminated",
                          "frozen": "running", "terminated": "terminated", "left": "running"}
        assert api.results == []  # no run sent a RESULT: every agent died before its sleep ended
        # Only the one machine left up has processes: a machine off has none.
        assert set(player.machine_processes()) == set(player.machine_processes(instance["left"])) != set()
        assert player.errors == []
    assert boots[instance["left"]].powered_off == "player stopped"
    assert player.machine_processes() == []


def test_a_windows_script_not_of_user_data_pys_form_is_refused_saying_what_is_missing():
    script = user_data.windows("http://operator:8080", "ns.tr.1.1", "t" * 64, None, HOSTS)
    parsed = parse_windows_user_data(script)
    assert (parsed.api_url, parsed.run_id, parsed.token) == ("http://operator:8080", "ns.tr.1.1", "t" * 64)
    assert parsed.host_lines == ["10.0.0.7 build-cache.internal"] and parsed.shuts_down and parsed.closes_metadata
    assert parsed.agent_arguments == ["--heartbeat-seconds", "5"]
    assert parse_windows_user_data(user_data.windows("http://operator:8080", "ns.tr.1.1", "t" * 64,
                                                     heartbeat_seconds=0.5)).agent_arguments == ["--heartbeat-seconds", "0.5"]
    assert not parse_windows_user_data(user_data.windows("http://operator:8080", "ns.tr.1.1", "t" * 64,
                                                         shutdown=False)).shuts_down
    for broken, missing in ((script.replace("$RunId = ", "$Run = "), "no $RunId = '...' line"),
                            (script.replace("-S -E $Agent", "$Agent"), "no line running the agent"),
                            ("#!/bin/bash\n", "no <powershell> block")):
        with pytest.raises(UserDataUnreadable, match=missing.replace("$", r"\$")):
            parse_windows_user_data(broken)


def test_the_fault_proxy_throttles_the_next_calls_of_an_action_and_impairs_chosen_instances(ec2):
    endpoint, _client, _fleet, network = ec2
    with Ec2FaultProxy(endpoint) as proxy:
        pauses = []
        fleet = Ec2Fleet(moto_client(proxy.url, botocore_retries=False), "big", subnet_id=network["subnet"], sleep=pauses.append,
                         jitter=lambda low, high: high)
        proxy.throttle("RunInstances", 2)
        instance_id = fleet.launch(LaunchRequest("ns.tr.1.1", "t3.micro", LINUX_AMI), "x", {})
        assert [instance.instance_id for instance in fleet.describe()] == [instance_id]
        assert proxy.throttled == ["RunInstances", "RunInstances"] and pauses == [0.5, 1.0]
        assert fleet.throttled == 2
        other = fleet.launch(LaunchRequest("ns.tr.2.1", "t3.micro", LINUX_AMI), "x", {})
        assert fleet.impaired([instance_id, other]) == set()
        proxy.impair(instance_id)
        assert fleet.impaired([instance_id, other]) == {instance_id}
