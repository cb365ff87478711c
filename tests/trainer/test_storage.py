"""storage.py against a real S3 server: fetch, cache, upload, errors, secrets."""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest
from botocore.exceptions import ClientError
from lora_trainer.errors import CredentialsError, SourceNotFound, StorageError
from lora_trainer.storage import PART_SIZE, Storage

from devcluster.s3 import S3Server, free_port, s3_server


def test_harness_rejects_wrong_credentials(s3: S3Server) -> None:
    good = s3.client()
    good.put_object(Bucket="data", Key="auth/probe", Body=b"x")
    bad = s3.client(secret_key="not-the-secret")
    with pytest.raises(ClientError) as err:
        bad.get_object(Bucket="data", Key="auth/probe")
    assert err.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}
    unknown = s3.client(access_key="nobody")
    with pytest.raises(ClientError):
        unknown.list_objects_v2(Bucket="data")


def test_fetch_prefix_is_cached(s3: S3Server, tmp_path: Path) -> None:
    client = s3.client()
    big = os.urandom(PART_SIZE + 1234)  # > one part: exercises ranged/multipart transfer
    client.put_object(Bucket="models", Key="cache-test/weights.bin", Body=big)
    client.put_object(Bucket="models", Key="cache-test/sub/config.json", Body=b"{}")
    storage = Storage(tmp_path / "cache", s3.env())

    path = storage.fetch("s3://models/cache-test")
    assert (path / "weights.bin").read_bytes() == big
    assert (path / "sub" / "config.json").read_bytes() == b"{}"
    mtime = (path / "weights.bin").stat().st_mtime_ns

    # A second job on the node (a new Storage, same cache dir) downloads nothing.
    time.sleep(0.01)
    again = Storage(tmp_path / "cache", s3.env()).fetch("s3://models/cache-test")
    assert again == path
    assert (again / "weights.bin").stat().st_mtime_ns == mtime

    # A changed object invalidates the cache entry.
    client.put_object(Bucket="models", Key="cache-test/sub/config.json", Body=b'{"a": 1}')
    third = Storage(tmp_path / "cache", s3.env()).fetch("s3://models/cache-test")
    assert (third / "sub" / "config.json").read_bytes() == b'{"a": 1}'


def test_fetch_single_object(s3: S3Server, tmp_path: Path) -> None:
    s3.client().put_object(Bucket="data", Key="single/train.jsonl", Body=b'{"text": "x"}\n')
    path = Storage(tmp_path, s3.env()).fetch("s3://data/single/train.jsonl")
    assert path.name == "train.jsonl"
    assert path.read_text() == '{"text": "x"}\n'


def test_missing_source(s3: S3Server, tmp_path: Path) -> None:
    storage = Storage(tmp_path, s3.env())
    with pytest.raises(SourceNotFound, match="s3://data/does-not-exist"):
        storage.fetch("s3://data/does-not-exist")
    with pytest.raises(SourceNotFound):
        storage.fetch("/definitely/not/here")


def test_wrong_credentials_are_credentials_error_without_secret(
    s3: S3Server, tmp_path: Path
) -> None:
    env = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-value-123"}
    storage = Storage(tmp_path, env)
    with pytest.raises(CredentialsError) as err:
        storage.fetch("s3://models/cache-test")
    assert err.value.retryable is False
    assert "wrong-secret-value-123" not in str(err.value)
    assert s3.secret_key not in str(err.value)


def test_unreachable_endpoint_is_retryable(tmp_path: Path) -> None:
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",
        "AWS_ACCESS_KEY_ID": "a",
        "AWS_SECRET_ACCESS_KEY": "b",
    }
    storage = Storage(tmp_path, env)
    with pytest.raises(StorageError) as err:
        storage.fetch("s3://models/x")
    assert err.value.retryable


def test_put_read_list_delete_s3_and_local(s3: S3Server, tmp_path: Path) -> None:
    src = tmp_path / "f.bin"
    src.write_bytes(b"payload")
    storage = Storage(tmp_path / "cache", s3.env())
    for base in ("s3://out/roundtrip", str(tmp_path / "dest")):
        storage.put_file(src, f"{base}/a/f.bin")
        storage.put_bytes(b"{}", f"{base}/manifest.json")
        assert storage.read_bytes(f"{base}/a/f.bin") == b"payload"
        assert storage.read_bytes(f"{base}/missing") is None
        names = sorted(o.name for o in storage.list_objects(base))
        assert names == ["a/f.bin", "manifest.json"]
        got = storage.download_prefix(f"{base}/a", tmp_path / "dl" / base.replace("/", "_"))
        assert (got / "f.bin").read_bytes() == b"payload"
        storage.delete_prefix(f"{base}/a")
        assert [o.name for o in storage.list_objects(base)] == ["manifest.json"]


def test_default_endpoint_used_when_env_has_none(s3: S3Server, tmp_path: Path) -> None:
    env = {k: v for k, v in s3.env().items() if k != "AWS_ENDPOINT_URL"}
    storage = Storage(tmp_path, env, default_endpoint=s3.endpoint)
    storage.put_bytes(b"x", "s3://out/default-endpoint/x")
    assert storage.read_bytes("s3://out/default-endpoint/x") == b"x"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        ("RepositoryNotFoundError", SourceNotFound),
        ("RevisionNotFoundError", SourceNotFound),
        ("GatedRepoError", CredentialsError),
    ],
)
def test_hub_errors_are_classified(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str, expected: type[Exception]
) -> None:
    """The Hub is unreachable from the tests; check the error mapping and the token passing."""
    import httpx2  # noqa: PLC0415 - huggingface_hub's HTTP client
    import huggingface_hub  # noqa: PLC0415
    from huggingface_hub import errors as hf_errors  # noqa: PLC0415

    seen: dict[str, object] = {}

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        seen.update(kwargs, repo_id=repo_id)
        response = httpx2.Response(404, request=httpx2.Request("GET", "https://hub.invalid"))
        raise getattr(hf_errors, error)("nope", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    storage = Storage(tmp_path, {"HF_TOKEN": "hf_secrettokenvalue0123456789"})
    with pytest.raises(expected) as err:
        storage.fetch("hf://org/model@v1")
    assert "hf://org/model@v1" in str(err.value)
    assert seen["repo_id"] == "org/model"
    assert seen["revision"] == "v1"
    assert seen["token"] == "hf_secrettokenvalue0123456789"
    assert "hf_secret" not in str(err.value)


def test_harness_leaves_nothing_behind() -> None:
    with s3_server(buckets=["tmp"]) as server:
        assert psutil.pid_exists(server.pid)
        assert server.workdir is not None
        assert server.workdir.exists()
        server.client().put_object(Bucket="tmp", Key="k", Body=b"v")
    assert not psutil.pid_exists(server.pid) or psutil.Process(server.pid).status() == "zombie"
    assert not server.workdir.exists()
