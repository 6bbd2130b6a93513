"""`testlooper rerun TESTRUN`: ask a TestRun in the cluster for more runs (raises `spec.runs`)."""

from __future__ import annotations

import argparse

from testlooper.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "rerun",
        help="ask a TestRun in the cluster for more runs",
        description="Raise a TestRun's spec.runs, so the operator runs it more times: more runs, "
        "more evidence for a flaky or broken verdict. Reads the cluster like kubectl: KUBECONFIG, "
        "else the in-cluster service account.",
    )
    parser.add_argument("testrun", metavar="TESTRUN", help="the TestRun's name (kubectl get testruns)")
    parser.add_argument("-n", "--namespace", metavar="NS", help="its namespace (default: the kubeconfig's)")
    amount = parser.add_mutually_exclusive_group()
    amount.add_argument("--runs", metavar="N", type=int, help="run it N times in all (more than it has now)")
    amount.add_argument("--add", metavar="N", type=int, default=None,
                        help="run it N more times (default: as many more as it has now)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import urllib3
    from kubernetes import client

    from testlooper.cli.cluster_access import GROUP, VERSION, connect, read_testrun, reason
    from testlooper.planning.planner import MAX_RUNS

    api, namespace = connect(args.namespace)
    testrun = read_testrun(api, namespace, args.testrun)
    current = int(testrun["spec"].get("runs") or 1)
    wanted = args.runs if args.runs is not None else current + (args.add if args.add is not None else current)
    if args.add is not None and args.add < 1:
        raise UserError("--add must be at least 1")
    if wanted <= current:
        raise UserError(f"TestRun {args.testrun} already has {current} runs: --runs can only raise it "
                        "(runs already made are kept)")
    if wanted > MAX_RUNS:
        raise UserError(f"--runs must be a whole number from 1 to {MAX_RUNS}, not {wanted}")
    # The resourceVersion makes this a compare-and-swap: two reruns at once never lose one.
    patch = {"metadata": {"resourceVersion": testrun["metadata"]["resourceVersion"]}, "spec": {"runs": wanted}}
    try:
        api.patch_namespaced_custom_object(GROUP, VERSION, namespace, "testruns", args.testrun, patch)
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        raise UserError(f"cannot reach the cluster: {reason(exc)}") from None
    except client.ApiException as exc:
        if exc.status == 409:
            raise UserError(f"TestRun {args.testrun} changed meanwhile: run the command again") from None
        raise UserError(f"the cluster refused the change: {exc.status} {exc.reason}") from None
    print(f"{args.testrun}: runs {current} -> {wanted} ({wanted - current} more)")
    return 0
