"""Transfer benchmark: the trainer's S3 I/O (lora_trainer.storage) vs boto3's own
managed transfers (`download_file` / `upload_file`, s3transfer's TransferManager).

Against the local SeaweedFS server (devcluster/s3.py) it measures, for one
generated base-model-sized file and one adapter-sized file, three sides in the
same run:

* ours: `Storage.fetch` (HEAD, then boto3's managed download with 16 MiB parts,
  16 in parallel, into the node cache, stamped) and `Storage.put_file` (multipart,
  same parts and parallelism);
* boto3 default: `client.download_file` / `client.upload_file` with no Config,
  i.e. `TransferConfig()`: 8 MiB parts, 10 threads, a default client (pool of 10);
* boto3 tuned: the same calls with what a user tuning for large files would pick:
  16 MiB parts (matched to ours) and 20 threads, twice boto3's default, with the
  client's connection pool raised to 20 to match.

boto3's CRT transfer client (`preferred_transfer_client="crt"`, needs awscrt) is
not a side: boto3 builds its CRT requests without the client's `endpoint_url`
(TLS to AWS's own endpoint, boto3/crt.py), so it cannot reach any other S3 server.

Plus the cache hit: a second `Storage.fetch` of the same URI (the start of the
next job on the node: one HEAD and a stamp check, no data).

Each repeat runs every side once, the order rotated from repeat to repeat; a
fresh client (and, for ours, a fresh cache) each time, its creation timed too.
Reported: medians, min-max, and the range of the per-repeat (paired) ratios.

On loopback a single connection is CPU-bound, not link-bound, so parallel streams
have little to win there. Download and upload are measured a second time through
bench/throttle.py, which limits each connection to `--link-mib-s` (default 48 MiB/s,
about what one S3 connection serves): there throughput grows with the number of
connections, as against a real object store.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.compat import HAS_CRT
from botocore.config import Config
from lora_trainer.storage import CONCURRENCY, PART_SIZE, Storage
from loraops_contract.manifest import file_sha256

from bench.common import add_common_args, format_table, ratio, timed, write_results
from bench.throttle import throttled_proxy
from devcluster.s3 import s3_server

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["main", "run"]

_MiB = 1024 * 1024
BUCKET = "models"
# boto3's TransferConfig() defaults (boto3/s3/transfer.py DEFAULTS) and botocore's
# default connection pool (max_pool_connections=10).
_BOTO3_PART, _BOTO3_THREADS = 8 * _MiB, 10
_TUNED_PART, _TUNED_THREADS = PART_SIZE, 2 * _BOTO3_THREADS
OURS, DEFAULT, TUNED = "ours", "boto3_default", "boto3_tuned"
PEERS = (DEFAULT, TUNED)


@dataclass(frozen=True)
class Side:
    """One way to move a file: its download and upload, and what it runs with."""

    name: str
    part_size: int
    concurrency: int
    what: str
    # (env, bucket, key, scratch dir) -> the downloaded file
    download: Callable[[dict[str, str], str, str, Path], Path]
    # (env, local file, bucket, key)
    upload: Callable[[dict[str, str], Path, str, str], None]


def _ours_download(env: dict[str, str], bucket: str, key: str, scratch: Path) -> Path:
    return Storage(scratch / "cache", env=env).fetch(f"s3://{bucket}/{key}")


def _ours_upload(env: dict[str, str], local: Path, bucket: str, key: str) -> None:
    Storage(local.parent / "unused-cache", env=env).put_file(local, f"s3://{bucket}/{key}")


def _boto3_side(name: str, part: int, threads: int, *, tuned: bool) -> Side:
    """A side that calls boto3's `download_file` / `upload_file`: with no Config, or
    (`tuned`) with `part`-sized parts, `threads` threads and a pool to match."""
    transfer = (
        TransferConfig(multipart_threshold=part, multipart_chunksize=part, max_concurrency=threads)
        if tuned
        else None
    )
    pool = threads if tuned else None

    def client(env: dict[str, str]) -> S3Client:
        extra: dict[str, Any] = {} if pool is None else {"max_pool_connections": pool}
        c: S3Client = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
            # Path style is what any non-AWS endpoint needs; ours sets the same.
            config=Config(s3={"addressing_style": "path"}, **extra),
        )
        return c

    def download(env: dict[str, str], bucket: str, key: str, scratch: Path) -> Path:
        dest = scratch / "download.bin"
        client(env).download_file(bucket, key, str(dest), Config=transfer)
        return dest

    def upload(env: dict[str, str], local: Path, bucket: str, key: str) -> None:
        client(env).upload_file(str(local), bucket, key, Config=transfer)

    config = "TransferConfig(part, part, threads)" if tuned else "no Config (defaults)"
    what = f"client.download_file / upload_file, {config}, pool {pool or 10}"
    return Side(name, part, threads, what, download, upload)


SIDES = (
    Side(
        OURS,
        PART_SIZE,
        CONCURRENCY,
        "lora_trainer.storage: Storage.fetch (into the node cache) / Storage.put_file",
        _ours_download,
        _ours_upload,
    ),
    _boto3_side(DEFAULT, _BOTO3_PART, _BOTO3_THREADS, tuned=False),
    _boto3_side(TUNED, _TUNED_PART, _TUNED_THREADS, tuned=True),
)


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
            "sides": {
                s.name: {
                    "part_size_bytes": s.part_size,
                    "concurrency": s.concurrency,
                    "what": s.what,
                }
                for s in SIDES
            },
            "crt": (
                f"not measured (awscrt installed: {HAS_CRT}): boto3's CRT transfer client "
                "builds its requests without the client's endpoint_url, so it only "
                "reaches AWS itself"
            ),
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


def _rotated(i: int) -> tuple[Side, ...]:
    """Every side once, starting with a different one each repeat (no side always
    runs first, right after the server was idle, or last)."""
    k = i % len(SIDES)
    return SIDES[k:] + SIDES[:k]


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
    """Download (every side), cache hit (ours) and adapter upload (every side)."""
    down: dict[str, list[float]] = {s.name: [] for s in SIDES}
    up: dict[str, list[float]] = {s.name: [] for s in SIDES}
    cache_hit: list[float] = []
    for i in range(repeats):
        for side in _rotated(i):
            scratch = work / f"{side.name}-{i}"
            scratch.mkdir()
            with timed() as t:
                got = side.download(env, BUCKET, key, scratch)
            down[side.name].append(t.seconds)
            if i == 0 and file_sha256(got) != want:
                raise RuntimeError(f"{side.name}: download returned different bytes")
            if side.name == OURS:
                with timed() as t:
                    again = _ours_download(env, BUCKET, key, scratch)
                cache_hit.append(t.seconds)
                if again != got:
                    raise RuntimeError("cache hit returned a different path")
            shutil.rmtree(scratch)

    adapter_size = adapter.stat().st_size
    for i in range(repeats):
        for side in _rotated(i):
            with timed() as t:
                side.upload(env, adapter, "adapters", f"{side.name}-{i}/adapter_model.safetensors")
            up[side.name].append(t.seconds)

    hit = statistics.median(cache_hit)
    return {
        "download": _compare(down, size),
        "cache_hit": {
            "ours_s": hit,
            "vs_download": ratio(statistics.median(down[OURS]), hit),
            "samples": cache_hit,
        },
        "upload": _compare(up, adapter_size),
    }


def _compare(samples: dict[str, list[float]], size: int) -> dict[str, Any]:
    """Per side: median, min, max, MiB/s at the median; per peer: peer/ours of the
    medians and the range of the per-repeat ratios (each repeat ran every side)."""
    out: dict[str, Any] = {}
    for name, seconds in samples.items():
        median = statistics.median(seconds)
        out[name] = {
            "median_s": median,
            "min_s": min(seconds),
            "max_s": max(seconds),
            "mib_s": size / _MiB / median,
            "samples": seconds,
        }
    out["speedup"] = {
        peer: {
            "median": ratio(out[peer]["median_s"], out[OURS]["median_s"]),
            "paired_min": min(p / o for p, o in zip(samples[peer], samples[OURS], strict=True)),
            "paired_max": max(p / o for p, o in zip(samples[peer], samples[OURS], strict=True)),
        }
        for peer in PEERS
    }
    return out


def _rows(label: str, m: dict[str, Any]) -> tuple[list[Any], list[Any]]:
    """One row of the main table and one of the spread table."""
    main = [
        label,
        *(m[s.name]["median_s"] for s in SIDES),
        m[OURS]["mib_s"],
        *(m["speedup"][p]["median"] for p in PEERS),
    ]
    spread = [
        label,
        *(f"{m[s.name]['min_s']:.3g}-{m[s.name]['max_s']:.3g}" for s in SIDES),
        *(
            f"{m['speedup'][p]['paired_min']:.2f}-{m['speedup'][p]['paired_max']:.2f}"
            for p in PEERS
        ),
    ]
    return main, spread


def table(result: dict[str, Any]) -> str:
    size_mib = result["params"]["size_bytes"] / _MiB
    adapter_mib = result["params"]["adapter_bytes"] / _MiB
    parts = [(f"download {size_mib:.0f} MiB", result["download"])]
    dl, hit = result["download"], result["cache_hit"]
    hit_row = [
        f"cache hit {size_mib:.0f} MiB",
        hit["ours_s"],
        *(dl[p]["median_s"] for p in PEERS),
        None,
        *(ratio(dl[p]["median_s"], hit["ours_s"]) for p in PEERS),
    ]
    parts.append((f"upload {adapter_mib:.0f} MiB", result["upload"]))
    link = result.get("limited_link")
    if link:
        rate = link["params"]["per_connection_mib_s"]
        link_mib = link["params"]["size_bytes"] / _MiB
        parts.append((f"download {link_mib:.0f} MiB @{rate:g} MiB/s/conn", link["download"]))
        parts.append((f"upload {adapter_mib:.0f} MiB @{rate:g} MiB/s/conn", link["upload"]))
    mains, spreads = zip(*(_rows(label, m) for label, m in parts), strict=True)
    rows = [mains[0], hit_row, *mains[1:]]
    headers = [
        "operation",
        "ours s",
        "boto3 default s",
        "boto3 tuned s",
        "ours MiB/s",
        "x default",
        "x tuned",
    ]
    spread_headers = [
        "operation (min-max)",
        "ours s",
        "boto3 default s",
        "boto3 tuned s",
        "x default",
        "x tuned",
    ]
    return (
        format_table(headers, rows)
        + "\n\nspread over the repeats (x: peer/ours within each repeat):\n"
        + format_table(spread_headers, list(spreads))
    )


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
    parser.add_argument("--repeats", type=int, default=5, help="runs per side (median)")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="scratch directory (default: a temp dir; needs ~3x the size free)",
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
    # The JSON's machine.load_avg_1m is read at the end, when it counts this benchmark's
    # own server, proxy and streams; the load before it started says what else ran.
    load_before = round(os.getloadavg()[0], 2)
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
    result["load_avg_1m_before"] = load_before
    print(table(result))
    path = write_results("transfer", result, args.results_dir)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
