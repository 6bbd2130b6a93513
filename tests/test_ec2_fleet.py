"""The EC2 adapter against a real `moto_server` process, with real boto3 pointed at it by
AWS_ENDPOINT_URL, as the operator would be at EC2."""

from __future__ import annotations

import base64
import urllib.parse

import boto3
import pytest
from botocore.awsrequest import AWSResponse

from moto_server import moto_port, point_boto3_at  # noqa: F401 (moto_port: a fixture)
from redis_server import free_port
from testlooper.ec2.fleet import RUN_TAG, Ec2Error, Ec2Fleet, client_token, make_client
from testlooper.ec2.model import LaunchRequest


@pytest.fixture
def aws(moto_port, monkeypatch):
    point_boto3_at(monkeypatch, moto_port)
    return make_client("us-east-1")


@pytest.fixture
def network(aws):
    vpc = aws.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = aws.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    group = aws.create_security_group(GroupName="workers", Description="workers", VpcId=vpc)["GroupId"]
    if "ami" not in _AMI:  # moto's stock images survive its reset; listing them is slow
        _AMI["ami"] = aws.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    return {"vpc": vpc, "subnet": subnet, "group": group, "ami": _AMI["ami"]}


_AMI = {}


def fleet_for(_emulator, network, pool="big", **options):
    """A fleet on a client of its own: it counts every request its client sends."""
    return Ec2Fleet(options.pop("client", None) or make_client("us-east-1"), pool, subnet_id=network["subnet"], security_group_ids=[network["group"]],
                    key_name=None, sleep=options.pop("sleep", lambda seconds: None), **options)


def test_a_launch_has_the_type_ami_tags_shutdown_behaviour_and_user_data_asked_for(aws, network):
    boto3.client("iam").create_instance_profile(InstanceProfileName="worker-profile")
    fleet = fleet_for(aws, network, instance_profile="worker-profile")
    user_data = "#!/bin/sh\necho hello\n"
    instance_id = fleet.launch(LaunchRequest("ns.tr.1.1", "r5.8xlarge", network["ami"]), user_data,
                               {"repo": "ns/repo"})

    raw = aws.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
    assert raw["InstanceType"] == "r5.8xlarge" and raw["ImageId"] == network["ami"]
    assert raw["SubnetId"] == network["subnet"]
    assert [group["GroupId"] for group in raw["SecurityGroups"]] == [network["group"]]
    assert raw["IamInstanceProfile"]["Arn"].endswith("/worker-profile")
    tags = {tag["Key"]: tag["Value"] for tag in raw["Tags"]}
    assert tags == {"testlooper-worker": "big", "testlooper:pool": "big", "testlooper:run": "ns.tr.1.1",
                    "testlooper:repo": "ns/repo", "Name": "testlooper ns.tr.1.1"}
    volume_ids = [mapping["Ebs"]["VolumeId"] for mapping in raw["BlockDeviceMappings"]]
    volume_tags = {tag["Key"]: tag["Value"] for tag in aws.describe_volumes(VolumeIds=volume_ids)["Volumes"][0]["Tags"]}
    assert volume_tags["testlooper:run"] == "ns.tr.1.1" and volume_tags["testlooper-worker"] == "big"
    shutdown = aws.describe_instance_attribute(InstanceId=instance_id, Attribute="instanceInitiatedShutdownBehavior")
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    read_back = aws.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")["UserData"]["Value"]
    assert base64.b64decode(read_back).decode() == user_data
    assert fleet.api_calls == 1


def sent_client_tokens(fleet):
    """The ClientToken of every RunInstances request, read off the wire."""
    tokens = []

    def record(request, **_):
        fields = urllib.parse.parse_qs(request.body.decode() if isinstance(request.body, bytes) else request.body)
        tokens.append(fields["ClientToken"][0])

    fleet.client.meta.events.register("before-send.ec2.RunInstances", record)
    return tokens


def test_a_run_always_launches_with_one_idempotency_token_and_another_attempt_with_another(aws, network):
    # EC2 returns the first instance for a repeated token; moto does not implement that, so
    # what is shown here is our half: the token sent is the run's own, stable across retries.
    fleet = fleet_for(aws, network)
    tokens = sent_client_tokens(fleet)
    for run_id in ("ns.tr.1.1", "ns.tr.1.1", "ns.tr.1.2"):
        fleet.launch(LaunchRequest(run_id, "t3.micro", network["ami"]), "x", {})
    assert tokens == [client_token("ns.tr.1.1")] * 2 + [client_token("ns.tr.1.2")]
    assert tokens[0] != tokens[2] and len(client_token("a" * 300)) <= 64


def test_describe_lists_only_this_pools_instances_in_one_call(aws, network):
    big = fleet_for(aws, network, pool="big")
    windows = fleet_for(aws, network, pool="windows")
    mine = {big.launch(LaunchRequest(f"ns.tr.{index}.1", "t3.micro", network["ami"]), "x", {}) for index in range(3)}
    windows.launch(LaunchRequest("ns.win.1.1", "t3.micro", network["ami"]), "x", {})
    # Someone else's machine, and one with our tag for another worker tag: neither is ours.
    aws.run_instances(ImageId=network["ami"], InstanceType="t3.micro", MinCount=1, MaxCount=1)
    aws.run_instances(ImageId=network["ami"], InstanceType="t3.micro", MinCount=1, MaxCount=1,
                      TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": "other-worker", "Value": "big"}]}])
    calls_before = big.api_calls
    found = big.describe()
    assert big.api_calls == calls_before + 1
    assert {instance.instance_id for instance in found} == mine
    assert {instance.run_id for instance in found} == {"ns.tr.0.1", "ns.tr.1.1", "ns.tr.2.1"}
    assert all(instance.pool == "big" and instance.type == "t3.micro" and instance.launch_time is not None
               and instance.state in ("pending", "running") for instance in found)


def test_a_long_listing_is_read_page_by_page_and_each_page_is_counted(aws, network, monkeypatch):
    import testlooper.ec2.fleet as fleet_module

    monkeypatch.setattr(fleet_module, "DESCRIBE_PAGE_SIZE", 5)  # EC2's smallest page
    fleet = fleet_for(aws, network)
    ids = {fleet.launch(LaunchRequest(f"ns.tr.{index}.1", "t3.micro", network["ami"]), "x", {}) for index in range(7)}
    calls_before = fleet.api_calls
    assert {instance.instance_id for instance in fleet.describe()} == ids
    assert fleet.api_calls == calls_before + 2


def test_fleets_sharing_a_client_count_only_their_own_requests(aws, network):
    shared = make_client("us-east-1")
    big = fleet_for(aws, network, pool="big", client=shared)
    windows = fleet_for(aws, network, pool="windows", client=shared)
    big.launch(LaunchRequest("ns.tr.1.1", "t3.micro", network["ami"]), "x", {})
    windows.describe()
    shared.describe_vpcs()
    assert (big.api_calls, windows.api_calls) == (1, 1)


def test_terminate_ends_our_instances_in_batches_and_skips_ones_ec2_no_longer_knows(aws, network, monkeypatch):
    import testlooper.ec2.fleet as fleet_module

    monkeypatch.setattr(fleet_module, "TERMINATE_BATCH", 2)
    fleet = fleet_for(aws, network)
    ids = [fleet.launch(LaunchRequest(f"ns.tr.{index}.1", "t3.micro", network["ami"]), "x", {}) for index in range(3)]
    calls_before = fleet.api_calls
    assert sorted(fleet.terminate(ids + ids[:1])) == sorted(ids)
    assert fleet.api_calls == calls_before + 2  # three ids, two per batch
    assert {instance.state for instance in fleet.describe()} == {"terminated"}
    assert fleet.describe(states=("pending", "running")) == []
    assert fleet.terminate([]) == [] and fleet.api_calls == calls_before + 4  # two describes, no terminate
    assert fleet.terminate(["i-0123456789abcdef0", ids[0]]) == [ids[0]]


def test_an_instance_terminated_behind_our_back_shows_as_terminated(aws, network):
    fleet = fleet_for(aws, network)
    kept = fleet.launch(LaunchRequest("ns.tr.1.1", "t3.micro", network["ami"]), "x", {})
    gone = fleet.launch(LaunchRequest("ns.tr.2.1", "t3.micro", network["ami"]), "x", {})
    aws.terminate_instances(InstanceIds=[gone])  # someone, from the console
    states = {instance.instance_id: instance.state for instance in fleet.describe()}
    assert states[gone] == "terminated" and states[kept] in ("pending", "running")


def test_status_checks_name_the_impaired_instances_in_one_call_per_hundred(aws, network):
    fleet = fleet_for(aws, network)
    ids = [fleet.launch(LaunchRequest(f"ns.tr.{index}.1", "t3.micro", network["ami"]), "x", {}) for index in (1, 2)]
    before = fleet.api_calls
    assert fleet.impaired(ids) == set()  # moto's checks are always ok
    assert fleet.api_calls == before + 1
    # EC2's answer for an instance whose system check failed (moto cannot say it: answered here).
    body = ("<DescribeInstanceStatusResponse><requestId>x</requestId><instanceStatusSet><item>"
            f"<instanceId>{ids[1]}</instanceId><instanceState><code>16</code><name>running</name></instanceState>"
            "<systemStatus><status>impaired</status></systemStatus><instanceStatus><status>ok</status></instanceStatus>"
            "</item></instanceStatusSet></DescribeInstanceStatusResponse>").encode()
    fleet.client.meta.events.register_last("before-send.ec2.DescribeInstanceStatus",
                                           lambda request, **_: AWSResponse(request.url, 200, {}, _Raw(body)))
    assert fleet.impaired(ids) == {ids[1]}
    assert fleet.impaired([f"i-{index:017x}" for index in range(250)]) == set() and fleet.api_calls == before + 5


def throttle(client, operation, times, code="RequestLimitExceeded", status=503):
    """Answers the next `times` requests of `operation` with EC2's throttling error, before they
    reach moto: botocore's before-send hook may return the response itself."""
    left = {"count": times}
    body = (f"<Response><Errors><Error><Code>{code}</Code><Message>Request limit exceeded.</Message>"
            f"</Error></Errors><RequestID>x</RequestID></Response>").encode()

    def answer(request, **_):
        if left["count"] <= 0:
            return None
        left["count"] -= 1
        return AWSResponse(request.url, status, {}, _Raw(body))

    client.meta.events.register_last(f"before-send.ec2.{operation}", answer)
    return left


class _Raw:
    def __init__(self, body):
        self._body = body

    def stream(self, **_):
        yield self._body

    def read(self, *_):
        body, self._body = self._body, b""
        return body


def test_throttling_is_retried_with_growing_jittered_pauses_then_succeeds(aws, network):
    pauses = []
    fleet = fleet_for(aws, network, sleep=pauses.append, jitter=lambda low, high: high)
    throttle(fleet.client, "RunInstances", 3)
    throttle(fleet.client, "DescribeInstances", 2, code="Throttling", status=400)
    instance_id = fleet.launch(LaunchRequest("ns.tr.1.1", "t3.micro", network["ami"]), "x", {})
    assert [instance.instance_id for instance in fleet.describe()] == [instance_id]
    assert pauses == [0.5, 1.0, 2.0, 0.5, 1.0]  # jitter's upper bound: the backoff itself
    assert fleet.throttled == 5 and fleet.api_calls == 4 + 3


def test_throttling_that_never_ends_is_one_line_error_and_the_jitter_is_random(aws, network):
    pauses = []
    fleet = fleet_for(aws, network, sleep=pauses.append, max_attempts=4, max_delay=1.0)
    throttle(fleet.client, "TerminateInstances", 10)
    with pytest.raises(Ec2Error) as raised:
        fleet.terminate(["i-0123456789abcdef0"])
    assert str(raised.value) == "EC2 TerminateInstances failed: still throttled (RequestLimitExceeded) after 4 attempts"
    assert len(pauses) == 3 and all(0 <= pause <= bound for pause, bound in zip(pauses, (0.5, 1.0, 1.0)))


def test_other_errors_are_one_line_naming_the_call_and_never_show_the_user_data(aws, network):
    fleet = fleet_for(aws, network)
    fleet.instance_profile = "no-such-profile"
    with pytest.raises(Ec2Error) as raised:
        fleet.launch(LaunchRequest("ns.tr.1.1", "t3.micro", network["ami"]), "token=SECRET-TOKEN", {})
    message = str(raised.value)
    assert message.startswith("EC2 RunInstances failed: ") and "\n" not in message
    assert "no-such-profile" in message and "SECRET-TOKEN" not in message


def test_an_unreachable_endpoint_is_a_one_line_error(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}.items():
        monkeypatch.setenv(name, value)
    fleet = Ec2Fleet(make_client("us-east-1"), "big")
    with pytest.raises(Ec2Error) as raised:
        fleet.describe()
    assert str(raised.value).startswith("EC2 DescribeInstances failed: Could not connect")
    assert RUN_TAG == "testlooper:run"
