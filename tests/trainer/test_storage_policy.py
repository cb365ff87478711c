"""storage.py under the admin policy and with refused uploads (issue 11, item 3).

With allowPrivateEndpoints=false the trainer resolves the endpoint before every
request and refuses private addresses; an upload the store refuses for good (bad
credentials, a key it does not accept) is a permanent, clear failure, never an
"unexpected error" retried as a trainer bug. No test needs external DNS: `localhost`
and a patched `socket.getaddrinfo` stand in for names.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
from lora_trainer.errors import (
    ConfigError,
    CredentialsError,
    PolicyViolation,
    SourceNotFound,
    classify,
)
from lora_trainer.storage import Storage
from loraops_contract.protocol import ENV_ALLOW_PRIVATE_ENDPOINTS, ExitCode
from loraops_contract.reasons import Reason

from devcluster.s3 import S3Server

DENY = {ENV_ALLOW_PRIVATE_ENDPOINTS: "false"}


def _named(s3: S3Server, host: str) -> dict[str, str]:
    """The harness env with the endpoint spelled with `host` instead of 127.0.0.1."""
    env = s3.env()
    env["AWS_ENDPOINT_URL"] = env["AWS_ENDPOINT_URL"].replace("127.0.0.1", host)
    return env


def _resolve_to(monkeypatch: pytest.MonkeyPatch, name: str, address: str) -> list[str]:
    """Make `name` resolve to `address`; returns the names looked up."""
    real = socket.getaddrinfo
    asked: list[str] = []

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        asked.append(str(host))
        if host == name:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, int(port or 0)))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return asked


def test_a_name_resolving_to_loopback_is_refused_before_anything_is_sent(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The harness listens on 127.0.0.1: without the policy this name reaches it.
    _resolve_to(monkeypatch, "s3.storage.example", "127.0.0.1")
    env = _named(s3, "s3.storage.example")
    Storage(tmp_path, env).put_bytes(b"allowed", "s3://out/policy/open")

    storage = Storage(tmp_path, env | DENY)
    with pytest.raises(PolicyViolation) as err:
        storage.put_bytes(b"secret adapter", "s3://out/policy/probe")
    failure = err.value
    assert failure.exit_code == ExitCode.INVALID_CONFIG
    assert not failure.retryable
    assert failure.reason == Reason.POLICY_VIOLATION
    assert failure.message.startswith("spec.storage.endpoint: http://s3.storage.example:")
    assert "resolves to 127.0.0.1, a loopback address" in failure.message
    assert "allowPrivateEndpoints=false" in failure.message
    # Nothing reached the server.
    assert Storage(tmp_path, s3.env()).read_bytes("s3://out/policy/probe") is None


def test_localhost_is_refused_by_name(s3: S3Server, tmp_path: Path) -> None:
    storage = Storage(tmp_path, _named(s3, "localhost") | DENY)
    with pytest.raises(PolicyViolation, match="localhost names the local machine"):
        storage.read_bytes("s3://out/policy/probe")


def test_a_dns_name_resolving_to_the_metadata_address_is_refused(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = _resolve_to(monkeypatch, "s3.storage.example", "169.254.169.254")
    storage = Storage(tmp_path, _named(s3, "s3.storage.example") | DENY)
    local = tmp_path / "adapter.bin"
    local.write_bytes(b"x" * 1024)
    # Through the managed transfer (threads, S3UploadFailedError wrapping) too.
    with pytest.raises(PolicyViolation) as err:
        storage.put_file(local, "s3://out/policy/adapter.bin")
    assert "s3.storage.example resolves to 169.254.169.254, a link-local address" in str(err.value)
    assert "s3.storage.example" in asked
    with pytest.raises(PolicyViolation):
        storage.fetch("s3://models/anything")


def test_private_names_are_fine_when_the_policy_allows_them(s3: S3Server, tmp_path: Path) -> None:
    for env in (
        _named(s3, "localhost"),
        _named(s3, "localhost") | {ENV_ALLOW_PRIVATE_ENDPOINTS: "true"},
    ):
        storage = Storage(tmp_path, env)
        storage.put_bytes(b"ok", "s3://out/policy/allowed")
        assert storage.read_bytes("s3://out/policy/allowed") == b"ok"


def test_a_cluster_address_passes_the_check(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An in-cluster S3 service has a private (10/8) address: allowed. The hook is called
    # directly: nothing listens at 10.96.0.10.
    _resolve_to(monkeypatch, "minio.storage.svc", "10.96.0.10")
    storage = Storage(tmp_path, _named(s3, "minio.storage.svc") | DENY)
    refused = storage._refuse_private_peer  # the hook itself, without connecting to 10/8
    request = type("Request", (), {"url": "http://minio.storage.svc:9000/out/x"})()
    refused(request)  # no exception


def test_an_upload_refused_for_its_key_is_permanent_and_clear(s3: S3Server, tmp_path: Path) -> None:
    local = tmp_path / "f.txt"
    local.write_text("x")
    uri = "s3://out/" + "k" * 1100  # longer than S3's 1024-byte key limit
    with pytest.raises(ConfigError) as err:
        Storage(tmp_path, s3.env()).put_file(local, uri)
    assert not err.value.retryable
    assert "KeyTooLongError" in err.value.message
    assert "spec.output.uri" in (err.value.hint or "")
    assert classify(err.value) is err.value


def test_an_upload_with_wrong_credentials_is_a_credentials_error(
    s3: S3Server, tmp_path: Path
) -> None:
    local = tmp_path / "f.txt"
    local.write_text("x")
    env = {**s3.env(), "AWS_SECRET_ACCESS_KEY": "wrong-secret-value-456"}
    with pytest.raises(CredentialsError) as err:
        Storage(tmp_path, env).put_file(local, "s3://out/denied/f.txt")
    assert not err.value.retryable
    assert "s3://out/denied/f.txt" in err.value.message
    assert "wrong-secret-value-456" not in err.value.message


@pytest.mark.parametrize("name", ["../../escaped.bin", "/abs.bin", "a/./b.bin"])
def test_a_listed_key_that_would_leave_the_download_directory_is_refused(
    tmp_path: Path, name: str
) -> None:
    from botocore.stub import Stubber  # noqa: PLC0415 - test-only helper

    # AWS S3 stores such keys (SeaweedFS refuses or normalises them), so the listing is
    # stubbed: "ckpt/../../escaped.bin" would be written two levels above the target.
    env = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}
    storage = Storage(tmp_path / "cache", env, default_endpoint="http://127.0.0.1:9")
    with Stubber(storage.s3) as stub:
        stub.add_response(
            "list_objects_v2",
            {"Contents": [{"Key": f"ckpt/{name}", "Size": 1, "ETag": '"e"'}]},
            {"Bucket": "out", "Prefix": "ckpt/"},
        )
        with pytest.raises(SourceNotFound) as err:
            storage.download_prefix("s3://out/ckpt", tmp_path / "a" / "b" / "dest")
    assert not err.value.retryable
    assert f"s3://out/ckpt/{name} cannot be downloaded" in err.value.message
    assert sorted(p.name for p in tmp_path.rglob("*.bin")) == []
