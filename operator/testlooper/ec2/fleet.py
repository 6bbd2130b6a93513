"""One WorkerPool's EC2 instances, through boto3: describe them, launch one per run, terminate.

The client comes from the caller (``make_client`` builds one the way boto3 reads its settings:
IRSA, an instance role or the environment for credentials, ``AWS_ENDPOINT_URL`` for an
emulator). Its own retries are turned off so that every HTTP request is one this module sends
and counts: ``api_calls`` is the number the bench reports per reconcile pass. Throttling is
retried here, with exponential backoff and full jitter; any other error becomes one line
naming the call (``Ec2Error``). Nothing here logs request parameters: the user-data holds the
run's token.
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time

from botocore.exceptions import BotoCoreError, ClientError

from testlooper.ec2.model import Instance, instance_type_name

_log = logging.getLogger(__name__)

DEFAULT_WORKER_TAG = "testlooper-worker"
# Our tags besides the worker tag (whose value is the pool's name: one filter finds a pool's own).
POOL_TAG = "testlooper:pool"
RUN_TAG = "testlooper:run"
REPO_TAG = "testlooper:repo"
# Terminated instances stay visible for about an hour: describe() shows them, so that an
# instance terminated behind our back is seen as such rather than as simply gone.
LIVE_STATES = ("pending", "running", "shutting-down", "stopping", "stopped")
ALL_STATES = LIVE_STATES + ("terminated",)
THROTTLING_CODES = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException",
                              "ServiceUnavailable", "Unavailable", "InternalError"})
STATUS_BATCH = 100  # ids per describe_instance_status
TERMINATE_BATCH = 500  # well under the API's limit on ids per request
DESCRIBE_PAGE_SIZE = 1000


class Ec2Error(Exception):
    """An EC2 call failed for good; the message is one line naming the call."""


def make_client(region: str | None = None):
    """An EC2 client with botocore's own retries off (this module retries, and counts)."""
    import boto3
    from botocore.config import Config

    return boto3.client("ec2", region_name=region,
                        config=Config(retries={"total_max_attempts": 1, "mode": "standard"}))


def client_token(run_id: str) -> str:
    """The idempotency token of a run's launch: the same run never gets a second instance, a
    retried attempt (another run id) gets its own. At most 64 ASCII characters, as EC2 asks."""
    return "tl-" + hashlib.sha256(run_id.encode()).hexdigest()[:48]


class Ec2Fleet:
    def __init__(self, client, pool_name: str, worker_tag: str = DEFAULT_WORKER_TAG, *,
                 subnet_id: str | None = None, security_group_ids=(), key_name: str | None = None,
                 instance_profile: str | None = None, max_attempts: int = 8, base_delay: float = 0.5,
                 max_delay: float = 20.0, sleep=time.sleep, jitter=random.uniform):
        self.client = client
        self.pool_name = pool_name
        self.worker_tag = worker_tag
        self.subnet_id = subnet_id
        self.security_group_ids = list(security_group_ids)
        self.key_name = key_name
        self.instance_profile = instance_profile
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep
        self._jitter = jitter
        self.api_calls = 0  # HTTP requests this fleet sent to EC2, pages and retries included
        self.throttled = 0  # of which answered "slow down"
        # botocore sends from the calling thread: a request seen while this thread is inside
        # one of our calls is ours, even on a client other fleets share.
        self._sending = threading.local()
        client.meta.events.register("before-send.ec2", self._count_request)

    def _count_request(self, **_):
        if getattr(self._sending, "active", False):
            self.api_calls += 1

    # -- the calls ------------------------------------------------------------------------------

    def describe(self, states=ALL_STATES) -> list[Instance]:
        """This pool's instances in ``states``: one describe_instances, paginated."""
        filters = [{"Name": f"tag:{self.worker_tag}", "Values": [self.pool_name]},
                   {"Name": "instance-state-name", "Values": list(states)}]

        def pages():
            paginator = self.client.get_paginator("describe_instances")
            found = []
            for page in paginator.paginate(Filters=filters, PaginationConfig={"PageSize": DESCRIBE_PAGE_SIZE}):
                for reservation in page.get("Reservations", []):
                    found.extend(self._instance(raw) for raw in reservation.get("Instances", []))
            return found

        # A throttled page restarts the listing: a half-read one is never taken for all of it.
        return self._call("DescribeInstances", pages)

    def launch(self, launch, user_data: str, tags: dict[str, str] | None = None) -> str:
        """Starts the one instance of ``launch.run_id``; returns its id. Retried (or raced) for
        the same run, EC2's idempotency token gives back the same instance."""
        tags = dict(tags or {})
        repo = tags.pop("repo", "")
        instance_tags = {"Name": f"testlooper {launch.run_id}", **tags, self.worker_tag: self.pool_name,
                         POOL_TAG: self.pool_name, RUN_TAG: launch.run_id}
        if repo:
            instance_tags[REPO_TAG] = repo
        tag_list = [{"Key": key, "Value": str(value)} for key, value in sorted(instance_tags.items())]
        request = {
            "ImageId": launch.ami, "InstanceType": instance_type_name(launch.instance_type),
            "MinCount": 1, "MaxCount": 1, "ClientToken": client_token(launch.run_id),
            "UserData": user_data, "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [{"ResourceType": "instance", "Tags": tag_list},
                                  {"ResourceType": "volume", "Tags": tag_list}],
            # The user-data holds the run's token: only IMDSv2, and one hop, so that a container
            # on the worker's bridge network cannot read it back (docs/ec2.md).
            "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1},
        }
        if self.subnet_id:
            request["SubnetId"] = self.subnet_id
        if self.security_group_ids:
            request["SecurityGroupIds"] = self.security_group_ids
        if self.key_name:
            request["KeyName"] = self.key_name
        if self.instance_profile:
            key = "Arn" if self.instance_profile.startswith("arn:") else "Name"
            request["IamInstanceProfile"] = {key: self.instance_profile}
        answer = self._call("RunInstances", lambda: self.client.run_instances(**request))
        instance_id = answer["Instances"][0]["InstanceId"]
        _log.info("pool %s: launched %s (%s) for run %s", self.pool_name, instance_id,
                  request["InstanceType"], launch.run_id)
        return instance_id

    def terminate(self, instance_ids) -> list[str]:
        """Terminates the instances, in batches; returns the ids EC2 took. Ids EC2 no longer
        knows are skipped (they are gone, which is what was asked)."""
        ids = sorted(set(instance_ids))
        done = []
        for start in range(0, len(ids), TERMINATE_BATCH):
            batch = ids[start:start + TERMINATE_BATCH]
            try:
                answer = self._call("TerminateInstances", lambda: self.client.terminate_instances(InstanceIds=batch))
            except _NotFound:
                answer = {"TerminatingInstances": []}
                for one in batch:  # which one is unknown: the rest, one by one
                    try:
                        answer["TerminatingInstances"] += self._call(
                            "TerminateInstances",
                            lambda: self.client.terminate_instances(InstanceIds=[one]))["TerminatingInstances"]
                    except _NotFound:
                        _log.info("pool %s: %s is already gone", self.pool_name, one)
            done += [item["InstanceId"] for item in answer.get("TerminatingInstances", [])]
        if done:
            _log.info("pool %s: terminating %s", self.pool_name, ", ".join(done))
        return done

    def impaired(self, instance_ids) -> set[str]:
        """Of ``instance_ids`` (running ones), those whose EC2 instance or system status check
        reports ``impaired``: one describe_instance_status per STATUS_BATCH ids."""
        ids = sorted(set(instance_ids))
        found: set[str] = set()
        for start in range(0, len(ids), STATUS_BATCH):
            batch = ids[start:start + STATUS_BATCH]
            answer = self._call("DescribeInstanceStatus",
                                lambda: self.client.describe_instance_status(InstanceIds=batch))
            for status in answer.get("InstanceStatuses", []):
                checks = (status.get("InstanceStatus") or {}).get("Status"), (status.get("SystemStatus") or {}).get("Status")
                if "impaired" in checks and status.get("InstanceId") in batch:
                    found.add(status["InstanceId"])
        return found

    # -- helpers --------------------------------------------------------------------------------

    def _instance(self, raw) -> Instance:
        tags = {tag["Key"]: tag["Value"] for tag in raw.get("Tags", [])}
        return Instance(instance_id=raw["InstanceId"], type=raw.get("InstanceType", ""),
                        state=raw.get("State", {}).get("Name", ""), run_id=tags.get(RUN_TAG),
                        launch_time=raw.get("LaunchTime"), pool=tags.get(self.worker_tag, ""))

    def _call(self, operation: str, send):
        """``send()``, again after a pause while EC2 says to slow down, up to max_attempts."""
        for attempt in range(1, self.max_attempts + 1):
            self._sending.active = True
            try:
                return send()
            except ClientError as error:
                code = error.response.get("Error", {}).get("Code", "")
                status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if code == "InvalidInstanceID.NotFound" and operation == "TerminateInstances":
                    raise _NotFound() from None
                if code not in THROTTLING_CODES and status != 503:
                    message = error.response.get("Error", {}).get("Message", "")
                    raise Ec2Error(f"EC2 {operation} failed: {code or status}: {_one_line(message)}") from None
                self.throttled += 1
                if attempt == self.max_attempts:
                    raise Ec2Error(f"EC2 {operation} failed: still throttled ({code or status}) "
                                   f"after {attempt} attempts") from None
                delay = self._jitter(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))
                _log.info("EC2 %s throttled (%s); retrying in %.2f s", operation, code or status, delay)
                self._sleep(delay)
            except BotoCoreError as error:
                raise Ec2Error(f"EC2 {operation} failed: {_one_line(str(error))}") from None
            finally:
                self._sending.active = False
        raise AssertionError("unreachable")


class _NotFound(Exception):
    pass


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]
