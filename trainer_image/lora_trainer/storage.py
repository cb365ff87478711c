"""All of the trainer's remote I/O: S3-compatible stores, the Hugging Face Hub, local paths.

Sources (model, dataset, checkpoints) come in through `Storage.fetch`, which
returns a local path. S3 and Hub downloads go through a cache directory keyed by
the source, validated against the remote listing (ETag + size per object), so a
second job on the same node reuses the files instead of downloading them again.
Concurrent jobs on a node serialise on a per-source file lock.

Large objects use boto3's managed transfers: parallel ranged GETs for downloads
and multipart uploads, `max_concurrency` threads each.

Destinations (adapter, checkpoints, manifest) go out through `put_file` /
`put_bytes`; local destinations are written atomically (temp file + rename), with
the mode an ordinary new file gets (0644 under the usual umask).

Every storage failure is turned into a `TrainerError` with the reason the
operator needs: bad credentials, missing sources and keys the store refuses are
permanent, network trouble and 5xx are retryable.

Under an admin policy with allowPrivateEndpoints=false (ENV_ALLOW_PRIVATE_ENDPOINTS)
every S3 request first resolves its host and is refused, permanently, when any address
is loopback, link-local (cloud metadata), unspecified, multicast or reserved: the
operator's check sees only how the endpoint is spelled, not what a DNS name resolves to.
"""

# Heavy clients (boto3, huggingface_hub) are imported where used, keeping startup fast.
# ruff: noqa: PLC0415

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from loraops_contract import endpoints
from loraops_contract.config import parse_uri
from loraops_contract.protocol import (
    ENV_ALLOW_PRIVATE_ENDPOINTS,
    ENV_HF_TOKEN,
    ENV_S3_ACCESS_KEY,
    ENV_S3_ENDPOINT,
    ENV_S3_REGION,
    ENV_S3_SECRET_KEY,
    ENV_S3_SESSION_TOKEN,
)

from lora_trainer.errors import (
    ConfigError,
    CredentialsError,
    PolicyViolation,
    SourceNotFound,
    StorageError,
    TrainerError,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

__all__ = ["RemoteObject", "Storage", "join_uri"]

_MiB = 1024 * 1024
# Part size and parallelism of managed transfers: 16 MiB parts keep a 15 GB
# model under ~1000 parts. S3 serves each connection at a bounded rate (tens of
# MB/s to ~100 MB/s), so a node's throughput grows with connections: 16 streams
# (boto3's default is 10) for at most 16 x 16 MiB = 256 MiB of parts in flight.
# Measured against boto3's download_file/upload_file in bench/transfer.py.
PART_SIZE = 16 * _MiB
CONCURRENCY = 16
_CACHE_STAMP = ".lora-trainer-complete.json"
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "ExpiredToken",
        "InvalidToken",
        "InvalidClientTokenId",
        "AuthorizationHeaderMalformed",
        "403",
        "Forbidden",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchBucket", "NoSuchKey", "404", "NotFound"})
# The store refuses the bucket or key itself (e.g. SeaweedFS answers InvalidRequest to a
# key with '..'): the same request fails the same way every time.
_INVALID_NAME_CODES = frozenset(
    {
        "InvalidRequest",
        "InvalidArgument",
        "InvalidBucketName",
        "InvalidObjectName",
        "KeyTooLongError",
    }
)


def join_uri(base: str, *parts: str) -> str:
    """`join_uri("s3://b/p", "x", "y")` -> "s3://b/p/x/y" (also for local paths)."""
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    return f"{base.rstrip('/')}/{tail}" if tail else base


@dataclass(frozen=True)
class RemoteObject:
    """One object under a prefix: its name relative to the prefix, size and ETag."""

    name: str
    size: int
    etag: str


class Storage:
    """S3 / Hub / local I/O with a download cache. One per process."""

    def __init__(
        self,
        cache_dir: Path,
        env: Mapping[str, str] | None = None,
        *,
        default_endpoint: str | None = None,
        default_region: str | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self._env = dict(os.environ if env is None else env)
        self._endpoint = self._env.get(ENV_S3_ENDPOINT) or default_endpoint
        self._region = self._env.get(ENV_S3_REGION) or default_region or "us-east-1"
        self._private_endpoints_allowed = (
            self._env.get(ENV_ALLOW_PRIVATE_ENDPOINTS, "true").strip().lower() != "false"
        )
        self._client: S3Client | None = None

    # --- sources ------------------------------------------------------------

    def fetch(self, uri: str, *, repo_type: str = "model") -> Path:
        """A local path holding `uri` (a file or a directory), downloading if needed."""
        scheme, location, rest = parse_uri(uri)
        if scheme == "file":
            path = Path(location)
            if not path.exists():
                raise SourceNotFound(f"{uri} does not exist (is the volume mounted?)")
            return path
        if scheme == "hf":
            return self._fetch_hf(location, rest, repo_type)
        return self._fetch_s3(location, rest)

    def list_objects(self, uri: str) -> list[RemoteObject]:
        """Objects under a prefix (names relative to it); [] when there are none."""
        scheme, location, key = parse_uri(uri)
        if scheme == "file":
            root = Path(location)
            if not root.is_dir():
                return []
            return [
                RemoteObject(p.relative_to(root).as_posix(), p.stat().st_size, "")
                for p in sorted(root.rglob("*"))
                if p.is_file()
            ]
        if scheme != "s3":
            raise StorageError(f"cannot list {uri}")
        return self._list_s3(location, key)

    def download_prefix(self, uri: str, dest: Path) -> Path:
        """Copy everything under `uri` into `dest` (no cache; used for checkpoints)."""
        scheme, location, key = parse_uri(uri)
        dest.mkdir(parents=True, exist_ok=True)
        if scheme == "file":
            shutil.copytree(location, dest, dirs_exist_ok=True)
            return dest
        for obj in self._list_s3(location, key):
            self._download_s3(location, join_uri(key, obj.name).lstrip("/"), dest / obj.name)
        return dest

    # --- destinations -----------------------------------------------------------

    def put_file(self, local: Path, uri: str) -> None:
        """Upload one file to `uri` (multipart above PART_SIZE)."""
        scheme, location, key = parse_uri(uri)
        if scheme == "file":
            _atomic_copy(local, Path(location))
            return
        with self._s3_errors(uri):
            self.s3.upload_file(str(local), location, key, Config=_transfer_config())

    def put_bytes(self, data: bytes, uri: str) -> None:
        scheme, location, key = parse_uri(uri)
        if scheme == "file":
            _atomic_write(Path(location), data)
            return
        with self._s3_errors(uri):
            self.s3.put_object(Bucket=location, Key=key, Body=data)

    def download_file(self, uri: str, dest: Path) -> None:
        """Copy one object to `dest` (no cache; a `.part` file renamed when complete).
        Used by `kubectl lj adapter`, which verifies it against the manifest."""
        scheme, location, key = parse_uri(uri)
        if scheme == "file":
            _atomic_copy(Path(location), dest)
            return
        if scheme != "s3":
            raise StorageError(f"cannot download {uri}")
        self._download_s3(location, key, dest)

    def read_bytes(self, uri: str) -> bytes | None:
        """The content of one object, or None when it does not exist."""
        scheme, location, key = parse_uri(uri)
        if scheme == "file":
            path = Path(location)
            return path.read_bytes() if path.is_file() else None
        try:
            with self._s3_errors(uri):
                body = self.s3.get_object(Bucket=location, Key=key)["Body"].read()
        except SourceNotFound:
            return None
        return bytes(body)

    def delete(self, uri: str) -> None:
        """Remove one object (no error when it does not exist)."""
        scheme, location, key = parse_uri(uri)
        if scheme == "file":
            Path(location).unlink(missing_ok=True)
            return
        with self._s3_errors(uri):
            self.s3.delete_object(Bucket=location, Key=key)

    def delete_prefix(self, uri: str) -> None:
        """Remove everything under `uri` (old checkpoints)."""
        scheme, location, key = parse_uri(uri)
        if scheme == "file":
            shutil.rmtree(location, ignore_errors=True)
            return
        objs = self._list_s3(location, key)
        for i in range(0, len(objs), 1000):
            batch = [{"Key": join_uri(key, o.name).lstrip("/")} for o in objs[i : i + 1000]]
            with self._s3_errors(uri):
                self.s3.delete_objects(Bucket=location, Delete={"Objects": batch, "Quiet": True})  # type: ignore[typeddict-item]

    # --- S3 -------------------------------------------------------------------

    @property
    def s3(self) -> S3Client:
        if self._client is None:
            import boto3
            from botocore.config import Config

            # Custom endpoints (MinIO, SeaweedFS, Ceph) generally need path-style
            # addressing; AWS itself works best with its own default.
            style: Literal["path", "auto"] = "path" if self._endpoint else "auto"
            self._client = boto3.client(
                "s3",
                endpoint_url=self._endpoint,
                region_name=self._region,
                # None falls back to boto3's chain (IRSA, instance profile, ...).
                aws_access_key_id=self._env.get(ENV_S3_ACCESS_KEY) or None,
                aws_secret_access_key=self._env.get(ENV_S3_SECRET_KEY) or None,
                aws_session_token=self._env.get(ENV_S3_SESSION_TOKEN) or None,
                config=Config(
                    s3={"addressing_style": style},
                    retries={"mode": "standard", "max_attempts": 5},
                    max_pool_connections=CONCURRENCY * 2,
                    connect_timeout=10,
                    read_timeout=60,
                ),
            )
            if not self._private_endpoints_allowed:
                self._client.meta.events.register("before-send.s3", self._refuse_private_peer)
        return self._client

    def _refuse_private_peer(self, request: Any, **_: Any) -> None:
        """botocore's before-send hook: refuse the request when its host is, or resolves
        to, a private address (the policy's allowPrivateEndpoints=false).

        Every request resolves the name again, so a record that changes between jobs or
        attempts is caught; a DNS server answering two lookups a moment apart
        differently could still slip by, which an egress NetworkPolicy closes.
        """
        url = urlsplit(str(request.url))
        host = url.hostname or ""
        refusal = endpoints.host_refusal(host) or _resolved_refusal(
            host, url.port or (443 if url.scheme == "https" else 80)
        )
        if refusal:
            raise PolicyViolation(
                f"spec.storage.endpoint: {self._endpoint or url.netloc}: {refusal}, which the "
                "cluster policy allowPrivateEndpoints=false forbids; nothing was sent to it",
                hint="Use the storage service's cluster DNS name or public URL (one that "
                "resolves to neither loopback nor link-local addresses), or ask your admin.",
            )

    def _list_s3(self, bucket: str, prefix: str) -> list[RemoteObject]:
        base = f"{prefix}/" if prefix else ""
        out: list[RemoteObject] = []
        with self._s3_errors(f"s3://{bucket}/{prefix}"):
            pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base)
            for page in pages:
                for item in page.get("Contents", []):
                    key = item["Key"]
                    if key.endswith("/"):  # directory placeholder objects
                        continue
                    _check_local_name(bucket, key)
                    out.append(
                        RemoteObject(key[len(base) :], int(item["Size"]), str(item.get("ETag", "")))
                    )
        return out

    def _head_s3(self, bucket: str, key: str) -> RemoteObject | None:
        if not key:
            return None
        try:
            with self._s3_errors(f"s3://{bucket}/{key}"):
                head = self.s3.head_object(Bucket=bucket, Key=key)
        except SourceNotFound:
            return None
        return RemoteObject(
            key.rsplit("/", 1)[-1], int(head["ContentLength"]), head.get("ETag", "")
        )

    def _download_s3(self, bucket: str, key: str, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".part")
        with self._s3_errors(f"s3://{bucket}/{key}"):
            self.s3.download_file(bucket, key, str(tmp), Config=_transfer_config())
        tmp.replace(dest)

    def _fetch_s3(self, bucket: str, key: str) -> Path:
        uri = f"s3://{bucket}/{key}"
        single = self._head_s3(bucket, key)
        objects = [single] if single else self._list_s3(bucket, key)
        if not objects:
            raise SourceNotFound(f"{uri} not found (no object and no objects under that prefix)")
        entry = self.cache_dir / "s3" / _cache_name(self._endpoint or "aws", uri)
        stamp = {"uri": uri, "objects": sorted([o.name, o.size, o.etag] for o in objects)}
        with _locked(entry):
            if _stamp_matches(entry, stamp):
                return _cached_path(entry, single)
            files = entry / "files"
            shutil.rmtree(files, ignore_errors=True)
            for obj in objects:
                src_key = key if single else join_uri(key, obj.name).lstrip("/")
                self._download_s3(bucket, src_key, files / obj.name)
            (entry / _CACHE_STAMP).write_text(json.dumps(stamp))
            return _cached_path(entry, single)

    @contextlib.contextmanager
    def _s3_errors(self, uri: str) -> Iterator[None]:
        """Translate botocore/boto3 exceptions into TrainerErrors with a reason."""
        from boto3 import exceptions as b3e
        from botocore import exceptions as bce

        try:
            yield
        except TrainerError:
            raise
        except b3e.S3UploadFailedError as e:
            # upload_file wraps the ClientError of the failed request in this; the reason
            # (AccessDenied, InvalidRequest, 503, ...) is in there.
            cause = e.__context__
            if isinstance(cause, bce.ClientError):
                raise _client_error(cause, uri) from e
            raise StorageError(f"upload to {uri} failed: {e}") from e
        except b3e.Boto3Error as e:  # e.g. RetriesExceededError of a download
            raise StorageError(f"S3 transfer of {uri} failed: {e}") from e
        except bce.NoCredentialsError as e:
            raise CredentialsError(
                f"no S3 credentials for {uri}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "(spec.storage.credentialsSecret)"
            ) from e
        except bce.ClientError as e:
            raise _client_error(e, uri) from e
        except (bce.EndpointConnectionError, bce.ConnectionError, bce.HTTPClientError) as e:
            raise StorageError(f"cannot reach S3 endpoint for {uri}: {e}") from e
        except bce.BotoCoreError as e:
            raise StorageError(f"S3 client error for {uri}: {e}") from e
        except OSError as e:
            raise StorageError(f"I/O error for {uri}: {e}") from e

    # --- Hugging Face Hub -------------------------------------------------------

    def _fetch_hf(self, repo: str, revision: str, repo_type: str) -> Path:
        from huggingface_hub import errors as hf_errors
        from huggingface_hub import snapshot_download

        uri = f"hf://{repo}@{revision}"
        token = self._env.get(ENV_HF_TOKEN) or None
        try:
            path = snapshot_download(
                repo,
                repo_type=repo_type,
                revision=revision,
                cache_dir=self.cache_dir / "hf",
                token=token,
                max_workers=CONCURRENCY,
            )
        except hf_errors.GatedRepoError as e:
            raise CredentialsError(
                f"{uri} is gated: accept its terms on the Hub and provide an HF_TOKEN "
                "(spec.storage.hfTokenSecret) of an account with access"
            ) from e
        except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as e:
            raise SourceNotFound(
                f"{uri} not found (or private without a valid HF_TOKEN)",
                hint="Check the repository name and revision; private repos need "
                "spec.storage.hfTokenSecret.",
            ) from e
        except hf_errors.HfHubHTTPError as e:
            status = getattr(getattr(e, "response", None), "status_code", 0)
            if status in (401, 403):
                raise CredentialsError(f"the Hub rejected the token for {uri}") from e
            raise StorageError(f"Hub error for {uri}: {type(e).__name__}") from e
        except OSError as e:
            raise StorageError(f"cannot download {uri}: {e}") from e
        return Path(str(path))


def _client_error(e: Any, uri: str) -> TrainerError:
    """What an S3 error answer means: permanent for credentials, missing objects and
    refused names, retryable for the rest (5xx, throttling, timeouts)."""
    error = e.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    if code in _CREDENTIAL_CODES or status == 403:
        return CredentialsError(f"S3 rejected the credentials for {uri} ({code})")
    if code in _NOT_FOUND_CODES or status == 404:
        return SourceNotFound(f"{uri} not found ({code or status})")
    if code in _INVALID_NAME_CODES:
        said = str(error.get("Message") or "").strip()
        return ConfigError(
            f"S3 refused {uri} ({code}{': ' + said if said else ''}): the store does not "
            "accept this bucket or key",
            hint="Change the URI in the spec (spec.output.uri, spec.model.uri or "
            "spec.dataset.uri) to plain path segments: letters, digits, '-', '_' and '.'.",
        )
    return StorageError(f"S3 error for {uri}: {code or status}")


def _check_local_name(bucket: str, key: str) -> None:
    """Refuse a listed key that cannot become a file under the download directory:
    "a/../../x" would land outside it and "a//x" at /x (AWS S3 stores such keys)."""
    try:
        parse_uri(f"s3://{bucket}/{key}")
    except ValueError as e:
        raise SourceNotFound(
            f"s3://{bucket}/{key} cannot be downloaded: {e}",
            hint="Rename or remove that object: the keys under a source or checkpoint "
            "prefix must be plain path segments (no '.', '..' or '//').",
        ) from e


def _resolved_refusal(host: str, port: int) -> str | None:
    """Why some address `host` resolves to is private, or None (also when it does not
    resolve: the connection then fails as unreachable, which is retried)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        return None
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if why := endpoints.address_refusal(ip):
            return f"{host} resolves to {ip}, {why}"
    return None


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=PART_SIZE,
        multipart_chunksize=PART_SIZE,
        max_concurrency=CONCURRENCY,
        use_threads=True,
    )


def _cache_name(endpoint: str, uri: str) -> str:
    """Readable and collision-free: tail of the URI plus a hash of endpoint+URI."""
    digest = hashlib.sha256(f"{endpoint}\n{uri}".encode()).hexdigest()[:16]
    tail = "".join(c if c.isalnum() or c in "-_." else "_" for c in uri.rsplit("/", 1)[-1])[:60]
    return f"{tail or 'root'}-{digest}"


def _stamp_matches(entry: Path, stamp: dict[str, Any]) -> bool:
    try:
        saved = json.loads((entry / _CACHE_STAMP).read_text())
    except (OSError, ValueError):
        return False
    return bool(saved == json.loads(json.dumps(stamp)))


def _cached_path(entry: Path, single: RemoteObject | None) -> Path:
    files = entry / "files"
    return files / single.name if single else files


@contextlib.contextmanager
def _locked(entry: Path) -> Iterator[None]:
    """Exclusive lock per cache entry, so two jobs on a node download once."""
    entry.mkdir(parents=True, exist_ok=True)
    with (entry / ".lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _atomic_copy(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    os.close(fd)
    shutil.copyfile(src, tmp)
    _publishable(tmp)
    os.replace(tmp, dest)


def _atomic_write(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    _publishable(tmp)
    os.replace(tmp, dest)


def _publishable(tmp: str) -> None:
    """The mode an ordinary new file gets (0666 less the umask: 0644 under the usual 022),
    as save_pretrained's files have. mkstemp creates 0600, which would leave the adapter
    on a shared volume readable by the trainer's user alone."""
    os.chmod(tmp, 0o666 & ~_umask())


def _umask() -> int:
    """The process umask, read without changing it (os.umask can only swap it, which
    would race with files other threads create meanwhile)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # no /proc (not Linux): swap it, briefly
    os.umask(mask)
    return mask
