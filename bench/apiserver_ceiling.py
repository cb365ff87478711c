"""The API server's raw write rate: the ceiling of the operator benchmark.

Creates `count` ConfigMaps and merge-patches each one (2 x count writes),
`concurrency` requests in flight, over HTTPS with a client certificate, then
deletes them (not timed). It runs as its own process, so the benchmark's process
(kubelet, watches) is not the client, and prints one JSON line:
`{"writes": ..., "seconds": ..., "writes_per_s": ..., "client_cpu_s": ...}`.

    python -m bench.apiserver_ceiling --server https://127.0.0.1:6443 \\
        --ca ca.crt --cert admin.crt --key admin.key [--count 1000] [--concurrency 16]

`measure_write_ceiling()` starts it and returns that line as a dict.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import REPO_ROOT

__all__ = ["measure_write_ceiling"]

_LABEL = "bench.loraops.dev/ceiling"


async def _write_rate(
    server: str, context: ssl.SSLContext, *, count: int, concurrency: int, namespace: str
) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=concurrency, ssl=context)
    prefix = f"ceiling-{uuid.uuid4().hex[:6]}"
    collection = f"/api/v1/namespaces/{namespace}/configmaps"
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    async with aiohttp.ClientSession(server, connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                name = f"{prefix}-{queue.get_nowait()}"
                body = {"metadata": {"name": name, "labels": {_LABEL: prefix}}, "data": {"a": "1"}}
                async with session.post(collection, json=body) as r:
                    if r.status != 201:
                        raise RuntimeError(f"create {name}: {r.status} {await r.text()}")
                async with session.patch(
                    f"{collection}/{name}",
                    data=json.dumps({"data": {"patched": "yes"}}),
                    headers={"Content-Type": "application/merge-patch+json"},
                ) as r:
                    if r.status != 200:
                        raise RuntimeError(f"patch {name}: {r.status} {await r.text()}")

        cpu = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        cpu = time.process_time() - cpu
        async with session.delete(collection, params={"labelSelector": f"{_LABEL}={prefix}"}) as r:
            r.raise_for_status()
    writes = 2 * count
    return {
        "writes": writes,
        "seconds": seconds,
        "writes_per_s": writes / seconds,
        "client_cpu_s": cpu,
    }


def measure_write_ceiling(
    server: str,
    *,
    ca: Path,
    cert: Path,
    key: Path,
    count: int = 1000,
    concurrency: int = 16,
    namespace: str = "default",
) -> dict[str, Any]:
    """Run the measurement in a child process; its result line as a dict."""
    command = [
        sys.executable,
        "-m",
        "bench.apiserver_ceiling",
        f"--server={server}",
        f"--ca={ca}",
        f"--cert={cert}",
        f"--key={key}",
        f"--count={count}",
        f"--concurrency={concurrency}",
        f"--namespace={namespace}",
    ]
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": pythonpath},
        timeout=600,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"write ceiling measurement failed:\n{result.stderr[-2000:]}")
    line: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.apiserver_ceiling",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--server", required=True, help="https://host:port")
    parser.add_argument("--ca", type=Path, required=True, help="CA certificate (PEM)")
    parser.add_argument("--cert", type=Path, required=True, help="client certificate (PEM)")
    parser.add_argument("--key", type=Path, required=True, help="client key (PEM)")
    parser.add_argument("--count", type=int, default=1000, help="ConfigMaps (2 writes each)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    parser.add_argument("--namespace", default="default")
    args = parser.parse_args(argv)
    context = ssl.create_default_context(cafile=str(args.ca))
    context.load_cert_chain(args.cert, args.key)
    result = asyncio.run(
        _write_rate(
            args.server,
            context,
            count=args.count,
            concurrency=args.concurrency,
            namespace=args.namespace,
        )
    )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
