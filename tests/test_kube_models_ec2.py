"""The WorkerPool spec of provider ec2: what the model admits and the one-line messages of what
it refuses (rules across fields the CRD's schema cannot express)."""

import copy

import pytest

from testlooper.kube import models

EC2 = {
    "region": "eu-west-1",
    "vpcId": "vpc-0a1b2c3d",
    "subnetId": "subnet-0a1b2c3d4e5f60718",
    "securityGroupIds": ["sg-0a1b2c3d"],
    "instanceTypes": [{"type": "m5.xlarge", "cores": 4, "ramGb": 16}],
    "linuxAmi": "ami-0a1b2c3d",
}


def pool(**changes) -> dict:
    spec = {"provider": "ec2", "platform": "linux", "ec2": copy.deepcopy(EC2)}
    for key, value in changes.items():
        if key.startswith("ec2_"):
            spec["ec2"][key[4:]] = value
        else:
            spec[key] = value
    return spec


def refusal(spec: dict) -> str:
    with pytest.raises(models.SpecError) as refused:
        models.parse_workerpool_spec(spec)
    return str(refused.value)


def test_a_minimal_linux_pool_takes_the_defaults():
    spec = models.parse_workerpool_spec(pool())
    assert spec.ec2.workerTag == "testlooper-worker"
    assert spec.ec2.minLifetimeSeconds == 0 and spec.ec2.reuse is False
    assert spec.ec2.keyName is None and spec.ec2.instanceProfile is None and spec.ec2.hostIps is None
    assert spec.ec2.instanceTypes[0].hourlyPrice is None


def test_the_ec2_settings_belong_to_provider_ec2_only():
    assert refusal({"provider": "ec2"}) == "spec.ec2: is required when provider is ec2"
    assert refusal({**pool(), "provider": "kubernetes"}) == (
        "spec.ec2: is only for provider ec2 (this pool's provider is kubernetes)")


def test_the_ami_of_the_pools_platform_is_required():
    assert refusal(pool(ec2_linuxAmi=None)) == "spec.ec2.linuxAmi: is required for a linux pool"
    assert refusal(pool(platform="windows")) == "spec.ec2.windowsAmi: is required for a windows pool"
    models.parse_workerpool_spec(pool(platform="windows", ec2_windowsAmi="ami-0a1b2c3d4e5f60718"))


def test_reuse_and_a_minimum_lifetime_are_refused_until_the_worker_api_can_hand_an_instance_another_run():
    assert refusal(pool(ec2_reuse=True)) == (
        "spec.ec2.reuse: is only for windows pools (Linux instances boot fast)")
    assert refusal(pool(ec2_minLifetimeSeconds=600)) == (
        "spec.ec2.minLifetimeSeconds: only has a meaning with reuse: true")
    windows = pool(platform="windows", ec2_windowsAmi="ami-0a1b2c3d", ec2_reuse=True, ec2_minLifetimeSeconds=600)
    assert refusal(windows) == ("spec.ec2.reuse: is not supported by this operator yet: each run gets its own "
                                "instance, terminated when the run ends")
    assert refusal({**windows, "ec2": {**windows["ec2"], "minLifetimeSeconds": 90000}}) == (
        "spec.ec2.minLifetimeSeconds: must be at most 86400 (got 90000)")


def test_host_ips_take_only_hostnames_and_ip_addresses():
    spec = models.parse_workerpool_spec(pool(ec2_hostIps={"git.example.com": "10.0.0.1", "api": "fd00::1"}))
    assert spec.ec2.hostIps == {"git.example.com": "10.0.0.1", "api": "fd00::1"}
    # What goes into the worker's hosts file cannot carry more than a name and an address.
    assert refusal(pool(ec2_hostIps={"git.example.com\n1.2.3.4 evil": "10.0.0.1"})) == (
        "spec.ec2.hostIps: 'git.example.com\\n1.2.3.4 evil' is not a valid hostname (letters, digits, dots and dashes)")
    assert refusal(pool(ec2_hostIps={"git": "10.0.0.300"})) == "spec.ec2.hostIps.git: '10.0.0.300' is not an IP address"


@pytest.mark.parametrize("field, value, message", [
    ("region", "US-EAST-1", "spec.ec2.region: must match ^[a-z]{2}(-[a-z]+)+-[0-9]+$ (got 'US-EAST-1')"),
    ("securityGroupIds", [], "spec.ec2.securityGroupIds: must have at least 1 item(s) (got a list)"),
    ("instanceTypes", [], "spec.ec2.instanceTypes: must have at least 1 item(s) (got a list)"),
    ("instanceTypes", [{"type": "m5.xlarge", "cores": 0, "ramGb": 16}],
     "spec.ec2.instanceTypes[0].cores: must be at least 1 (got 0)"),
    ("instanceTypes", [{"type": "m5.xlarge", "cores": 4, "ramGb": 16}, {"type": "m5.xlarge", "cores": 4, "ramGb": 16}],
     "spec.ec2.instanceTypes: lists m5.xlarge more than once"),
    ("instanceProfile", "arn:aws:iam::12345:instance-profile/x",
     "spec.ec2.instanceProfile: must match ^(arn:aws[a-z-]*:iam::[0-9]{12}:instance-profile/[A-Za-z0-9+=,.@/_-]+|[A-Za-z0-9+=,.@_-]{1,128})$ (got 'arn:aws:iam::12345:instance-profile/x')"),
    ("workerTag", "", "spec.ec2.workerTag: must match ^[A-Za-z0-9][A-Za-z0-9._:/=+@-]{0,127}$ (got '')"),
    ("accessKeyId", "AKIA", "spec.ec2.accessKeyId: is not a known field"),
])
def test_a_bad_field_is_named_in_one_line(field, value, message):
    assert refusal(pool(**{f"ec2_{field}": value})) == message


def test_an_instance_profile_is_a_name_or_an_arn():
    for profile in ("testlooper-worker", "arn:aws:iam::123456789012:instance-profile/ci/testlooper"):
        assert models.parse_workerpool_spec(pool(ec2_instanceProfile=profile)).ec2.instanceProfile == profile


def test_docs_ec2_describes_every_field():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "ec2.md").read_text(encoding="utf-8")
    missing = [f"{model.__name__}.{field}" for model in (models.Ec2PoolSpec, models.Ec2InstanceType,
                                                         models.Ec2InstanceStatus)
               for field in model.model_fields if not re.search(rf"\b{field}\b", text)]
    assert missing == []
