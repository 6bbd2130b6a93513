"""EC2 calls the adapter makes for a pool of N instances, against a real `moto_server`; prints JSON.

    python bench/bench_ec2.py [--instances 50 --instances 1200]

For each N: a fresh emulator state, N instances carrying the pool's worker tag (started one by
one, as the adapter launches them, outside the count: moto pages describe_instances by
reservation), then the pool's `describe()`, one `launch()` and a
`terminate()` of all N, as a reconcile pass that reaps everything would do them. It reports
each step's EC2 requests (`Ec2Fleet.api_calls`) and its wall time. The calls grow with
N / 1000 (describe pages) and N / 500 (terminate batches), never with N itself.

Then the operator's own pass (`cluster/ec2_workers.py`, as cluster/runs.py and the pool sweep
call it) for a pool with R runs (`--runs`, default 50 and 200): the R launches an admission
round makes, then one reconcile pass: the round's usage (a fresh describe), the R TestRuns'
decisions (which share one describe), and the sweep (a describe, status checks of the running
instances, 100 a call, and one terminate of the orphans: 5 planted). Each step's EC2 requests
and wall time are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "operator"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from testlooper.ec2.fleet import Ec2Fleet, make_client  # noqa: E402
from testlooper.ec2.model import LaunchRequest  # noqa: E402
from moto_server import start_moto_server  # noqa: E402  (the tests' starter: one way to run moto_server)


def measure(port, count):
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
    client = make_client("us-east-1")
    ami = client.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    for _ in range(count):  # one reservation each, as launches of one instance make them
        client.run_instances(ImageId=ami, InstanceType="t3.micro", MinCount=1, MaxCount=1,
                             TagSpecifications=[{"ResourceType": "instance",
                                                 "Tags": [{"Key": "testlooper-worker", "Value": "bench"}]}])
    fleet = Ec2Fleet(client, "bench")
    steps, seen = {}, []
    for name, step in (("describe", lambda: seen.extend(fleet.describe()) or seen),
                       ("launch", lambda: fleet.launch(LaunchRequest("ns.bench.1.1", "t3.micro", ami), "x", {})),
                       ("terminate", lambda: fleet.terminate([instance.instance_id for instance in seen]))):
        before, started = fleet.api_calls, time.perf_counter()
        result = step()
        steps[name] = {"calls": fleet.api_calls - before, "seconds": round(time.perf_counter() - started, 3)}
        if name == "describe":
            steps[name]["instances"] = len(result)
    return {"instances": count, "steps": steps}


def measure_pass(port, runs):
    import asyncio
    import types

    from testlooper.cluster.ec2_workers import Ec2Workers
    from testlooper.cluster.metrics import OperatorMetrics

    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/moto-api/reset", method="POST"))
    client = make_client("us-east-1")
    ami = client.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    pool = {"metadata": {"name": "bench", "namespace": "ns"},
            "spec": {"provider": "ec2", "ec2": {"region": "us-east-1", "linuxAmi": ami,
                                                "instanceTypes": [{"type": "t3.micro", "cores": 2, "ramGb": 1}]}}}
    context = types.SimpleNamespace(options=types.SimpleNamespace(api_url="http://10.0.0.1:8080", ec2_api_url="",
                                                                  ec2_orphan_grace=0.0),  # the planted ones go
                                    metrics=OperatorMetrics())
    workers = Ec2Workers(context, b"bench-secret", client_factory=lambda region: client)
    testruns = [{"metadata": {"namespace": "ns", "name": f"t{index}"},
                 "spec": {"repo": "r", "definition": {}},
                 "status": {"workerPool": "bench", "active": {"1": {"attempt": 1, "state": "Placed"}}}}
                for index in range(runs)]
    for index in range(5):  # orphans: our tag, no live run, launched long ago as far as the sweep knows
        client.run_instances(ImageId=ami, InstanceType="t3.micro", MinCount=1, MaxCount=1,
                             TagSpecifications=[{"ResourceType": "instance", "Tags": [
                                 {"Key": "testlooper-worker", "Value": "ns/bench"},
                                 {"Key": "testlooper:run", "Value": f"ns.gone{index}.1.1"}]}])
    fleet = workers.fleet(pool)

    async def launch_all():
        for testrun in testruns:
            await workers.launch(testrun, pool, 1, 1)

    async def decisions():
        return [await workers.observe(testrun, pool) for testrun in testruns]

    async def sweep():
        return await workers.sweep(pool, testruns)

    steps = {}
    for name, step in (("launches", launch_all), ("admission_usage", lambda: workers.usage("ns", [pool])),
                       ("decisions", decisions), ("sweep", sweep)):
        before, started = fleet.api_calls, time.perf_counter()
        asyncio.run(step())
        steps[name] = {"calls": fleet.api_calls - before, "seconds": round(time.perf_counter() - started, 3)}
    return {"runs": runs, "steps": steps}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, action="append")
    parser.add_argument("--runs", type=int, action="append")
    options = parser.parse_args()
    for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                        "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(name, value)
    process, port = start_moto_server()
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    try:
        results = [measure(port, count) for count in options.instances or [50, 1200]]
        passes = [measure_pass(port, runs) for runs in options.runs or [50, 200]]
    finally:
        process.kill()
        process.wait()
    print(json.dumps({"bench": "ec2", "results": results, "operator_pass": passes}, indent=2))


if __name__ == "__main__":
    main()
