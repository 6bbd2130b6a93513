"""The adapter's own small records, until the pure core's (decisions/ec2.py) are wired in.

`Instance` follows the contract in the issue's split: what describe() observed of one of our
instances. `LaunchRequest` holds what launch() reads of a planned launch; decisions/ec2.py's
`Launch(run_id, instance_type, ami, platform)` has the same attributes and is accepted as is.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Instance:
    instance_id: str
    type: str
    state: str  # EC2's name: pending, running, shutting-down, terminated, stopping, stopped
    run_id: str | None
    launch_time: datetime | None
    pool: str


@dataclass(frozen=True)
class LaunchRequest:
    run_id: str
    instance_type: str  # a type name, or anything with a `.type` (decisions/ec2.py's InstanceType)
    ami: str
    platform: str = "linux"


def instance_type_name(instance_type) -> str:
    return instance_type if isinstance(instance_type, str) else instance_type.type
