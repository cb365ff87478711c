"""Transfer benchmark: the trainer's S3 I/O (lora_trainer.storage) vs single-stream boto3.

Against the local SeaweedFS server (devcluster/s3.py) it measures, for one
generated base-model-sized file:

* download: `Storage.fetch` (parallel ranged GETs into the cache) vs one
  `get_object` stream written to disk in 1 MiB chunks (the baseline);
* cache hit: a second `Storage.fetch` of the same URI (start time of the next
  job on the node: one HEAD plus a stamp check, no data);
* upload of an adapter-sized file: `Storage.put_file` (multipart, parallel) vs one
  `put_object`.

Each timing is the median of `--repeats` runs, ours and the baseline alternating.

On loopback a single connection is CPU-bound, not link-bound, so parallel streams
have little to win there. Download and upload are measured a second time through
bench/throttle.py, which limits each connection to `--link-mib-s` (default 48 MiB/s,
about what one S3 connection serves): there a single stream is link-bound, as it is
against a real object store.

    python -m bench.transfer --size-mib 1024 --adapter-mib 160 --link-mib-s 48
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from lora_trainer.storage import CONCURRENCY, PART_SIZE, Storage

from bench.common import add_common_args, format_table, ratio, timed, write_results
from bench.throttle import throttled_proxy
from devcluster.s3 import s3_server

__all__ = ["main", "run"]

_MiB = 1024 * 1024
_CHUNK = _MiB
BUCKET = "models"


def write_random_file(path: Path, size: int, seed: int = 0) -> str:
    """`size` bytes of incompressible data (a random 8 MiB block, each copy salted
    with its index so no two blocks are equal); returns the sha256."""
    block = random.Random(seed).randbytes(8 * _MiB)
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        written = 0
        i = 0
        while written < size:
            chunk = (i.to_bytes(8, "little") + block[8:])[: size - written]
            fh.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            i += 1
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(8 * _MiB):
            digest.update(chunk)
    return digest.hexdigest()


def _drop_page_cache_hint(path: Path) -> None:
    """Ask the kernel to forget a file's pages so a later run reads it cold-ish."""
    with path.open("rb") as fh:
        os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def run(
    size: int,
    adapter_size: int,
    repeats: int,
    work: Path,
    *,
    link_size: int = 0,
    link_mib_s: float = 0.0,
) -> dict[str, Any]:
    """Measure on loopback; with `link_mib_s`, also through a per-connection-limited
    link (bench/throttle.py) with a `link_size` file."""
    src = work / "model.safetensors"
    adapter = work / "adapter_model.safetensors"
    t0 = time.perf_counter()
    want = write_random_file(src, size, seed=1)
    write_random_file(adapter, adapter_size, seed=2)
    print(
        f"generated {size / _MiB:.0f} MiB + {adapter_size / _MiB:.0f} MiB in "
        f"{time.perf_counter() - t0:.1f}s",
        file=sys.stderr,
    )

    result: dict[str, Any] = {
        "params": {
            "size_bytes": size,
            "adapter_bytes": adapter_size,
            "repeats": repeats,
            "part_size_bytes": PART_SIZE,
            "concurrency": CONCURRENCY,
            "server": "SeaweedFS on 127.0.0.1 (devcluster/s3.py)",
        }
    }
    with s3_server(buckets=[BUCKET, "adapters"]) as s3:
        s3.client().upload_file(str(src), BUCKET, "llama/model.safetensors")
        _drop_page_cache_hint(src)
        result.update(
            _measure(
                s3.env(),
                "llama/model.safetensors",
                want=want,
                size=size,
                adapter=adapter,
                repeats=repeats,
                work=work,
            )
        )
        if link_mib_s > 0:
            link_src = work / "link-model.safetensors"
            link_want = write_random_file(link_src, link_size, seed=3)
            s3.client().upload_file(str(link_src), BUCKET, "link/model.safetensors")
            link_src.unlink()
            with throttled_proxy(s3.endpoint, link_mib_s) as endpoint:
                env = {**s3.env(), "AWS_ENDPOINT_URL": endpoint}
                limited = _measure(
                    env,
                    "link/model.safetensors",
                    want=link_want,
                    size=link_size,
                    adapter=adapter,
                    repeats=repeats,
                    work=work,
                )
            del limited["cache_hit"]  # a cache hit sends no data: the same on any link
            result["limited_link"] = {
                "params": {"size_bytes": link_size, "per_connection_mib_s": link_mib_s},
                **limited,
            }
    return result


def _client(env: dict[str, str]) -> Any:
    """A plain boto3 client for the endpoint and keys in `env` (the baseline's)."""
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
        config=Config(s3={"addressing_style": "path"}),
    )


def _measure(
    env: dict[str, str],
    key: str,
    *,
    want: str,
    size: int,
    adapter: Path,
    repeats: int,
    work: Path,
) -> dict[str, Any]:
    """Download (ours vs one stream), cache hit, and adapter upload against `env`'s endpoint."""
    uri = f"s3://{BUCKET}/{key}"
    ours_dl: list[float] = []
    base_dl: list[float] = []
    cache_hit: list[float] = []
    for i in range(repeats):
        # A fresh cache (and a fresh client, so no warm connections) per run.
        cache = work / f"cache-{i}"
        storage = Storage(cache, env=env)
        with timed() as t:
            got = storage.fetch(uri)
        ours_dl.append(t.seconds)
        if i == 0 and sha256_of(got) != want:
            raise RuntimeError("parallel download returned different bytes")
        with timed() as t:
            again = Storage(cache, env=env).fetch(uri)
        cache_hit.append(t.seconds)
        if again != got:
            raise RuntimeError("cache hit returned a different path")
        shutil.rmtree(cache)

        dest = work / "single.bin"
        with timed() as t:
            _single_stream_download(_client(env), BUCKET, key, dest)
        base_dl.append(t.seconds)
        if i == 0 and sha256_of(dest) != want:
            raise RuntimeError("single-stream download returned different bytes")
        dest.unlink()

    adapter_size = adapter.stat().st_size
    ours_up: list[float] = []
    base_up: list[float] = []
    for i in range(repeats):
        storage = Storage(work / "unused-cache", env=env)
        with timed() as t:
            storage.put_file(adapter, f"s3://adapters/ours-{i}/adapter_model.safetensors")
        ours_up.append(t.seconds)
        c = _client(env)
        with timed() as t, adapter.open("rb") as fh:
            c.put_object(Bucket="adapters", Key=f"single-{i}/adapter_model.safetensors", Body=fh)
        base_up.append(t.seconds)

    def mib_s(n: int, seconds: float) -> float:
        return n / _MiB / seconds

    dl_ours, dl_base = statistics.median(ours_dl), statistics.median(base_dl)
    up_ours, up_base = statistics.median(ours_up), statistics.median(base_up)
    return {
        "download": {
            "ours_s": dl_ours,
            "baseline_s": dl_base,
            "ours_mib_s": mib_s(size, dl_ours),
            "baseline_mib_s": mib_s(size, dl_base),
            "speedup": ratio(dl_base, dl_ours),
            "samples": {"ours": ours_dl, "baseline": base_dl},
        },
        "cache_hit": {
            "ours_s": statistics.median(cache_hit),
            "vs_download": ratio(dl_ours, statistics.median(cache_hit)),
            "samples": cache_hit,
        },
        "upload": {
            "ours_s": up_ours,
            "baseline_s": up_base,
            "ours_mib_s": mib_s(adapter_size, up_ours),
            "baseline_mib_s": mib_s(adapter_size, up_base),
            "speedup": ratio(up_base, up_ours),
            "samples": {"ours": ours_up, "baseline": base_up},
        },
    }


def _single_stream_download(client: Any, bucket: str, key: str, dest: Path) -> None:
    """The baseline: one GET, streamed to disk (what a hand-written loader does)."""
    body = client.get_object(Bucket=bucket, Key=key)["Body"]
    with dest.open("wb") as fh:
        for chunk in body.iter_chunks(_CHUNK):
            fh.write(chunk)


def table(result: dict[str, Any]) -> str:
    dl, hit, up = result["download"], result["cache_hit"], result["upload"]
    size_mib = result["params"]["size_bytes"] / _MiB
    adapter_mib = result["params"]["adapter_bytes"] / _MiB
    rows = [
        [
            f"download {size_mib:.0f} MiB",
            dl["ours_s"],
            dl["baseline_s"],
            dl["ours_mib_s"],
            dl["baseline_mib_s"],
            dl["speedup"],
        ],
        [
            f"cache hit {size_mib:.0f} MiB",
            hit["ours_s"],
            dl["baseline_s"],
            None,
            None,
            ratio(dl["baseline_s"], hit["ours_s"]),
        ],
        [
            f"upload {adapter_mib:.0f} MiB",
            up["ours_s"],
            up["baseline_s"],
            up["ours_mib_s"],
            up["baseline_mib_s"],
            up["speedup"],
        ],
    ]
    link = result.get("limited_link")
    if link:
        rate = link["params"]["per_connection_mib_s"]
        link_mib = link["params"]["size_bytes"] / _MiB
        for label, part in (
            (f"download {link_mib:.0f} MiB", "download"),
            (f"upload {adapter_mib:.0f} MiB", "upload"),
        ):
            m = link[part]
            rows.append(
                [
                    f"{label} @{rate:g} MiB/s/conn",
                    m["ours_s"],
                    m["baseline_s"],
                    m["ours_mib_s"],
                    m["baseline_mib_s"],
                    m["speedup"],
                ]
            )
    headers = ["operation", "ours s", "baseline s", "ours MiB/s", "baseline MiB/s", "speedup"]
    return format_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.transfer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_common_args(parser)
    parser.add_argument("--size-mib", type=int, default=1024, help="base model file size")
    parser.add_argument(
        "--adapter-mib",
        type=int,
        default=160,
        help="adapter file size (Llama-3-8B, r=16, all-linear, fp32: ~160 MiB)",
    )
    parser.add_argument(
        "--link-mib-s",
        type=float,
        default=48.0,
        help="per-connection limit of the emulated object-store link (0: skip that part)",
    )
    parser.add_argument(
        "--link-size-mib", type=int, default=256, help="model file size over the limited link"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="scratch directory (default: a temp dir; needs ~2x the size free)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.size_mib, args.adapter_mib, args.repeats, args.link_size_mib = 48, 20, 1, 16
    size, adapter_size = args.size_mib * _MiB, args.adapter_mib * _MiB

    parent = args.work_dir or Path(tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < 3 * (size + adapter_size):  # source + S3 copy + download
        parser.error(
            f"--size-mib {args.size_mib} needs ~{3 * (size + adapter_size) / 2**30:.1f} "
            f"GiB free in {parent}; {free / 2**30:.1f} GiB free (use --work-dir)"
        )
    with tempfile.TemporaryDirectory(prefix="bench-transfer-", dir=parent) as tmp:
        result = run(
            size,
            adapter_size,
            args.repeats,
            Path(tmp),
            link_size=args.link_size_mib * _MiB,
            link_mib_s=args.link_mib_s,
        )
    result["quick"] = args.quick
    print(table(result))
    path = write_results("transfer", result, args.results_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
