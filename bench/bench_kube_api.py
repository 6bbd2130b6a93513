"""One request's CPU in the operator's process: kube/api.py (aiohttp in the event loop) beside
the official client's REST layer run in threads, as kube/api.py made its requests before.

    python bench/bench_kube_api.py [--requests 1000] [--repeat 3]

Prints JSON. On one emulator process (its CPU is not counted), each variant creates
`--requests` Secrets, 16 at once, and its CPU (this process: user + system, getrusage) and
wall time are taken; the median over `--repeat`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "operator"))

from kube_bench_support import Emulator  # noqa: E402

NAMESPACE = "bench"
CONCURRENCY = 16


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _secret(prefix: str, index: int) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{prefix}-{index}"},
            "data": {"token": "c2VjcmV0"}}


async def in_the_loop(api, prefix: str, count: int) -> None:
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(index: int) -> None:
        async with slots:
            await api.create_core("secrets", NAMESPACE, _secret(prefix, index))

    await asyncio.gather(*(one(index) for index in range(count)))
    await api.aclose()


async def in_threads(api, prefix: str, count: int) -> None:
    """The official client's REST layer, a thread per request (8 threads), as before."""
    headers, host = api._auth()
    headers = {**headers, "Content-Type": "application/json", "Accept": "application/json"}
    url = f"{host}/api/v1/namespaces/{NAMESPACE}/secrets"
    loop = asyncio.get_running_loop()
    slots = asyncio.Semaphore(CONCURRENCY)
    with ThreadPoolExecutor(8) as pool:
        async def one(index: int) -> None:
            async with slots:
                await loop.run_in_executor(pool, lambda: api._client.rest_client.request(
                    "POST", url, headers=headers, body=_secret(prefix, index)).read())

        await asyncio.gather(*(one(index) for index in range(count)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    figures: dict[str, list[tuple[float, float]]] = {"in_the_loop": [], "in_threads": []}
    with Emulator(namespaces=[NAMESPACE]) as kube:
        os.environ["KUBECONFIG"] = kube.kubeconfig("bench")
        from testlooper.kube.api import KubeApi

        api = KubeApi()
        try:
            for repeat in range(args.repeat):
                for name, variant in (("in_threads", in_threads), ("in_the_loop", in_the_loop)):
                    cpu, started = _cpu(), time.perf_counter()
                    asyncio.run(variant(api, f"{name.replace('_', '-')}-{repeat}", args.requests))
                    figures[name].append((_cpu() - cpu, time.perf_counter() - started))
        finally:
            api.close()
    result = {"bench": "kube_api", "requests": args.requests, "concurrency": CONCURRENCY, "repeats": args.repeat}
    for name, runs in figures.items():
        result[name] = {"cpu_ms_per_request": round(statistics.median(c for c, _ in runs) / args.requests * 1000, 3),
                        "wall_seconds": round(statistics.median(w for _, w in runs), 3)}
    result["cpu_ratio"] = round(result["in_threads"]["cpu_ms_per_request"] / result["in_the_loop"]["cpu_ms_per_request"], 2)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
