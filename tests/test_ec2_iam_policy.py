"""The least-privilege IAM policy for the operator's EC2 pools, as the README ("EC2 worker
pools") and docs/ec2.md show it: it parses, and it grants exactly the actions the operator's EC2
calls need, found two ways: from the source (every EC2 client method any module of the operator
calls) and from the requests the fleet adapter sends to a real moto_server when each of its
calls is used. The actions a call implies are added: ec2:CreateTags for RunInstances'
TagSpecifications, iam:PassRole for an instance profile."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import boto3
import pytest

from moto_server import moto_port, point_boto3_at  # noqa: F401 (moto_port: a fixture)
from testlooper.ec2 import fleet as fleet_module
from testlooper.ec2.fleet import DEFAULT_WORKER_TAG, Ec2Fleet, make_client
from testlooper.ec2.model import LaunchRequest

ROOT = Path(__file__).resolve().parents[1]
OPERATOR = ROOT / "operator" / "testlooper"
# Where a call of the fleet needs a second action: the request field, and that action.
IMPLIED = {"TagSpecifications": "ec2:CreateTags", "IamInstanceProfile": "iam:PassRole"}
FLEET_CALLS = {"describe", "impaired", "launch", "terminate"}  # exercised below; a new one must be too


def ec2_method_names() -> dict[str, str]:
    """client method name -> EC2 API operation name, from botocore's EC2 model."""
    return dict(boto3.client("ec2", region_name="us-east-1").meta.method_to_api_mapping)


def ec2_operations_in_source() -> dict[str, set[str]]:
    """EC2 operation -> the operator modules calling it (as a client method or a paginator)."""
    methods = ec2_method_names()
    found: dict[str, set[str]] = {}
    for path in sorted(OPERATOR.rglob("*.py")):
        text = path.read_text()
        for name in re.findall(r"\.([a-z][a-z0-9_]+)\(", text) + re.findall(r'get_paginator\("([a-z0-9_]+)"\)', text):
            if name in methods:
                found.setdefault(methods[name], set()).add(str(path.relative_to(OPERATOR)))
    return found


def needed_actions(operations) -> set[str]:
    source = inspect.getsource(fleet_module)
    return {f"ec2:{operation}" for operation in operations} | {
        action for field, action in IMPLIED.items() if f'"{field}"' in source}


def policy_in(document: Path, heading: str | None = None) -> dict:
    """The first ```json block (after `heading`, when given) of a Markdown file, parsed."""
    text = document.read_text()
    if heading:
        assert heading in text, f"{document.name} has no {heading!r}"
        text = text[text.index(heading):]
    match = re.search(r"```json\n(.*?)```", text, re.DOTALL)
    assert match, f"no ```json block in {document.name}"
    return json.loads(match.group(1))


def granted_actions(policy: dict) -> set[str]:
    actions = set()
    for statement in policy["Statement"]:
        assert statement["Effect"] == "Allow"
        listed = statement["Action"]
        actions |= {listed} if isinstance(listed, str) else set(listed)
    return actions


POLICIES = {"README": (ROOT / "README.md", "### EC2 worker pools"),
            "docs/ec2.md": (ROOT / "docs" / "ec2.md", "### IAM: the operator's least-privilege policy")}


@pytest.fixture
def sent_operations(moto_port, monkeypatch):
    """The EC2 operations the fleet sends while every one of its calls is used once."""
    point_boto3_at(monkeypatch, moto_port)
    setup = make_client("us-east-1")
    vpc = setup.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = setup.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24")["Subnet"]["SubnetId"]
    group = setup.create_security_group(GroupName="workers", Description="workers", VpcId=vpc)["GroupId"]
    boto3.client("iam").create_instance_profile(InstanceProfileName="worker-profile")

    client = make_client("us-east-1")
    sent = []
    client.meta.events.register("before-call.ec2", lambda model, **_: sent.append(model.name))
    fleet = Ec2Fleet(client, "windows-ec2", subnet_id=subnet, security_group_ids=[group], key_name=None,
                     instance_profile="worker-profile", sleep=lambda seconds: None)
    public = {name for name, _ in inspect.getmembers(Ec2Fleet, inspect.isfunction) if not name.startswith("_")}
    assert public == FLEET_CALLS, f"Ec2Fleet's calls are now {sorted(public)}: use each here, and grant what it needs"
    instance = fleet.launch(LaunchRequest("ci.tr.1.1", "t3.medium", "ami-12c6146b", platform="windows"), "<powershell></powershell>")
    fleet.describe()
    fleet.impaired([instance])
    fleet.terminate([instance])
    return set(sent)


def test_the_fleet_is_the_operators_one_ec2_caller_and_sends_what_its_source_says(sent_operations):
    in_source = ec2_operations_in_source()
    assert all(modules == {"ec2/fleet.py"} for modules in in_source.values()), in_source
    assert set(in_source) == sent_operations, (sorted(in_source), sorted(sent_operations))
    assert {"RunInstances", "DescribeInstances", "DescribeInstanceStatus", "TerminateInstances"} <= sent_operations


@pytest.mark.parametrize("where", sorted(POLICIES))
def test_the_documented_policy_grants_exactly_what_the_operator_calls(where, sent_operations):
    policy = policy_in(*POLICIES[where])
    assert policy["Version"] == "2012-10-17"
    assert granted_actions(policy) == needed_actions(sent_operations), where


@pytest.mark.parametrize("where", sorted(POLICIES))
def test_the_documented_policy_is_least_privilege(where):
    statements = policy_in(*POLICIES[where])["Statement"]
    for statement in statements:
        actions = [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]
        assert not any("*" in action for action in actions), statement
        if statement["Resource"] == "*":  # only what IAM cannot narrow by resource, and each conditioned
            assert all(action.startswith("ec2:Describe") for action in actions) or actions == ["ec2:CreateTags"], statement
    by_action = {}
    for statement in statements:
        for action in [statement["Action"]] if isinstance(statement["Action"], str) else statement["Action"]:
            by_action.setdefault(action, []).append(statement)
    terminate, = by_action["ec2:TerminateInstances"]
    assert terminate["Condition"] == {"StringLike": {f"aws:ResourceTag/{DEFAULT_WORKER_TAG}": "*"}}
    tag, = by_action["ec2:CreateTags"]
    assert tag["Condition"] == {"StringEquals": {"ec2:CreateAction": "RunInstances"}}
    # The instance and its volumes may only be created carrying the worker tag.
    created = [statement for statement in by_action["ec2:RunInstances"] if "Condition" in statement]
    assert created and all(statement["Condition"] == {"StringLike": {f"aws:RequestTag/{DEFAULT_WORKER_TAG}": "*"}}
                           for statement in created)
    pass_role, = by_action["iam:PassRole"]
    assert pass_role["Resource"] != "*"
    assert pass_role["Condition"] == {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}}


def test_a_policy_missing_an_action_would_fail(sent_operations):
    policy = policy_in(*POLICIES["README"])
    policy["Statement"] = [statement for statement in policy["Statement"] if statement["Action"] != "ec2:TerminateInstances"]
    assert granted_actions(policy) != needed_actions(sent_operations)
