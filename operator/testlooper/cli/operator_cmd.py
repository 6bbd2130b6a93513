"""`testlooper operator`: the Kubernetes operator, the container's entrypoint."""

from __future__ import annotations

import argparse
import os
import re

from testlooper.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "operator",
        help="run the Kubernetes operator (the container entrypoint)",
        description="Watch Repo, TestRun and WorkerPool resources and test every new commit of each Repo. "
        "Reads the cluster like every Kubernetes client: in-cluster config, else KUBECONFIG.",
    )
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", dest="namespaces", action="append", default=[], metavar="NS",
                       help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    parser.add_argument("--standalone", action="store_true",
                        help="no peering: do not look for (or stand by for) other replicas")
    parser.add_argument("--peering", default="testlooper", metavar="NAME",
                        help="the KopfPeering object replicas coordinate through (default: testlooper)")
    parser.add_argument("--priority", type=int, default=0, metavar="N",
                        help="peering priority; the replica with the highest runs, the others stand by (default: 0)")
    parser.add_argument("--store", default=os.environ.get("TESTLOOPER_STORE", ""), metavar="URL",
                        help="the history store, redis://HOST:PORT/DB (default: $TESTLOOPER_STORE)")
    parser.add_argument("--api-host", default="0.0.0.0", metavar="ADDRESS",
                        help="address of the HTTP server: /healthz, /readyz, /metrics, webhooks (default: 0.0.0.0)")
    parser.add_argument("--api-port", type=int, default=8080, metavar="PORT", help="its port (default: 8080)")
    parser.add_argument("--api-url", default=os.environ.get("TESTLOOPER_API_URL", ""), metavar="URL",
                        help="how workers reach that server, e.g. http://testlooper.testlooper.svc:8080")
    parser.add_argument("--worker-image", default=os.environ.get("TESTLOOPER_WORKER_IMAGE", "ghcr.io/testlooper/worker:latest"),
                        metavar="IMAGE", help="the image of a run pod's prepare and report containers")
    parser.add_argument("--operator-namespace", default=os.environ.get("POD_NAMESPACE", ""), metavar="NS",
                        help="where the operator keeps its Secret testlooper-operator (default: $POD_NAMESPACE, "
                             "else the first --namespace)")
    parser.add_argument("--s3-bucket", default=os.environ.get("TESTLOOPER_S3_BUCKET", ""), metavar="NAME",
                        help="keep build artifacts in this S3 bucket rather than under --cache-dir; endpoint and "
                             "credentials as boto3 reads them (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ..., an "
                             "instance role) (default: $TESTLOOPER_S3_BUCKET)")
    parser.add_argument("--s3-prefix", default=os.environ.get("TESTLOOPER_S3_PREFIX", ""), metavar="PREFIX",
                        help="the artifacts' key prefix in that bucket, e.g. testlooper/ (default: none)")
    parser.add_argument("--cache-dir", default=os.environ.get("TESTLOOPER_CACHE_DIR", "/var/cache/testlooper"),
                        metavar="DIR", help="where git mirrors are kept (default: /var/cache/testlooper)")
    parser.add_argument("--max-concurrent-polls", type=int, default=4, metavar="N",
                        help="git fetches running at once across all Repos (default: 4)")
    # The phase machine's limits (decisions/phases.py Settings; docs/operator.md "Phase machine").
    # The defaults are the Settings' own, written out here so that --help needs no import.
    machine = parser.add_argument_group("runs as pods")
    machine.add_argument("--max-infra-retries", metavar="N",
                         help="attempts of a run lost to the infrastructure (evicted, deleted, image pull failing, "
                              "heartbeat lost) that are retried; then the run is an error (default: 3)")
    machine.add_argument("--pending-timeout", metavar="SECONDS",
                         help="how long a pod may stay Pending, not scheduled, before its run is an error (default: 600)")
    machine.add_argument("--image-pull-grace", metavar="SECONDS",
                         help="how long a container may fail to pull its image before the attempt is retried "
                              "(default: 300)")
    machine.add_argument("--heartbeat-grace", metavar="SECONDS",
                         help="how long a running pod's agent may be silent before the attempt is retried; agents "
                              "beat at a third of it, at most every 5 s (default: 180)")
    machine.add_argument("--missing-pod-grace", metavar="SECONDS",
                         help="how long after its creation a run's pod may be missing from the API before it counts "
                              "as deleted (default: 30)")
    machine.add_argument("--result-grace", metavar="SECONDS",
                         help="how long after a pod ended its agent's RESULT is waited for (default: 30)")
    ec2 = parser.add_argument_group("runs as EC2 instances (WorkerPools with provider ec2; docs/ec2.md)")
    ec2.add_argument("--ec2-api-url", default=os.environ.get("TESTLOOPER_EC2_API_URL", ""), metavar="URL",
                     help="how EC2 workers reach the operator's HTTP server, e.g. through an Ingress: "
                          "https://testlooper.example.com (default: $TESTLOOPER_EC2_API_URL, else --api-url)")
    ec2.add_argument("--ec2-sweep-interval", type=float, default=60.0, metavar="SECONDS",
                     help="how often each EC2 pool's instances are listed: orphans terminated, the pool's status "
                          "and gauges written (default: 60)")
    ec2.add_argument("--ec2-orphan-grace", type=float, default=120.0, metavar="SECONDS",
                     help="how old an instance with the pool's worker tag and no live run must be before the sweep "
                          "terminates it (launches not yet recorded are that young) (default: 120)")
    ec2.add_argument("--ec2-boot-timeout", type=float, default=0.0, metavar="SECONDS",
                     help="how long a new instance's agent may take to send its first heartbeat before the attempt "
                          "is retried (default: 0, meaning 600 for Linux and 1800 for Windows)")
    parser.add_argument("--pool-status-interval", type=float, default=10.0, metavar="SECONDS",
                        help="how often each WorkerPool's status and gauges are counted from its pods (default: 10)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="(default: INFO)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from testlooper.cluster.app import run as run_operator
    from testlooper.cluster.context import OperatorOptions

    if not args.namespaces and not args.all_namespaces:
        raise UserError("say which namespaces to watch: --namespace NS (repeatable) or --all-namespaces")
    if not 0 < args.api_port < 65536:
        raise UserError(f"--api-port must be between 1 and 65535, not {args.api_port}")
    if args.max_concurrent_polls < 1:
        raise UserError("--max-concurrent-polls must be at least 1")
    if not args.pool_status_interval >= 0.5:
        raise UserError(f"--pool-status-interval must be at least 0.5 seconds, not {args.pool_status_interval:g}")
    if not args.ec2_sweep_interval >= 1:
        raise UserError(f"--ec2-sweep-interval must be at least 1 second, not {args.ec2_sweep_interval:g}")
    if not args.ec2_orphan_grace >= 0:
        raise UserError(f"--ec2-orphan-grace must be 0 or more seconds, not {args.ec2_orphan_grace:g}")
    if not args.ec2_boot_timeout >= 0:
        raise UserError(f"--ec2-boot-timeout must be 0 or more seconds, not {args.ec2_boot_timeout:g}")
    ec2_api_url = args.ec2_api_url or args.api_url
    if ec2_api_url and not re.match(r"^https?://[^\s/]+", ec2_api_url):
        raise UserError(f"--ec2-api-url must be an http:// or https:// URL, not {ec2_api_url!r}")
    from testlooper.store import is_redis_url

    if args.store and not is_redis_url(args.store):
        raise UserError(f"--store must be a redis:// URL in the cluster, not {args.store!r}")
    run_settings = phase_settings(args)
    s3_bucket, s3_prefix = s3_options(args.s3_bucket, args.s3_prefix)
    try:
        os.makedirs(os.path.join(args.cache_dir, "mirrors"), exist_ok=True)
    except OSError as exc:
        raise UserError(f"--cache-dir {args.cache_dir}: {exc.strerror}") from None
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.log_level != "DEBUG":
        # kopf logs every handler call ("Handler 'status' succeeded") at INFO: one line per
        # TestRun event is noise at scale, and its formatting costs CPU. Problems still show.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    options = OperatorOptions(
        namespaces=tuple(args.namespaces), all_namespaces=args.all_namespaces, standalone=args.standalone,
        peering_name=args.peering, priority=args.priority, store_url=args.store, api_host=args.api_host,
        api_port=args.api_port, api_url=args.api_url, cache_dir=args.cache_dir,
        max_concurrent_polls=args.max_concurrent_polls, worker_image=args.worker_image,
        operator_namespace=args.operator_namespace, run_settings=run_settings,
        pool_status_interval=args.pool_status_interval, s3_bucket=s3_bucket, s3_prefix=s3_prefix,
        ec2_api_url=ec2_api_url, ec2_sweep_interval=args.ec2_sweep_interval, ec2_boot_timeout=args.ec2_boot_timeout,
        ec2_orphan_grace=args.ec2_orphan_grace,
    )
    return run_operator(options)


SETTINGS_FLAGS = {  # flag -> the Settings field it sets
    "max_infra_retries": "max_infra_retries",
    "pending_timeout": "pending_timeout_seconds",
    "image_pull_grace": "image_pull_grace_seconds",
    "heartbeat_grace": "heartbeat_grace_seconds",
    "missing_pod_grace": "missing_pod_grace_seconds",
    "result_grace": "result_grace_seconds",
}


def phase_settings(args: argparse.Namespace):
    """The phase machine's Settings from the flags given (the others keep their defaults);
    a value that is not a count or a duration is a one-line error naming the flag."""
    import dataclasses
    import math

    from testlooper.decisions.phases import Settings

    given = {}
    for attribute, field in SETTINGS_FLAGS.items():
        text = getattr(args, attribute)
        if text is None:
            continue
        flag = "--" + attribute.replace("_", "-")
        if attribute == "max_infra_retries":
            try:
                count = int(text)
            except ValueError:
                raise UserError(f"{flag} must be a whole number of retries (0 or more), not {text!r}") from None
            if count < 0:
                raise UserError(f"{flag} must be 0 or more (0: never retry), not {count}")
            given[field] = count
            continue
        try:
            seconds = float(text)
        except ValueError:
            raise UserError(f"{flag} must be a number of seconds, not {text!r}") from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise UserError(f"{flag} must be a number of seconds greater than 0, not {text!r}")
        given[field] = seconds
    return dataclasses.replace(Settings(), **given)


# S3's rules for new bucket names: 3-63 lowercase letters, digits, dots and hyphens, starting
# and ending with a letter or digit.
S3_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def s3_options(bucket: str, prefix: str) -> tuple[str, str]:
    """--s3-bucket and --s3-prefix checked; the prefix ends in "/" (a folder of the bucket)."""
    if prefix and not bucket:
        raise UserError("--s3-prefix needs --s3-bucket")
    if bucket and not S3_BUCKET_NAME.match(bucket):
        raise UserError(f"--s3-bucket {bucket!r} is not an S3 bucket name (3 to 63 lowercase letters, digits, "
                        "dots and hyphens)")
    prefix = prefix.lstrip("/")
    if prefix and not prefix.endswith("/"):
        prefix += "/"
    return bucket, prefix
