"""A tracking server that cannot be reached fails the attempt as retryable, one that
refuses the credentials as a permanent CredentialsError naming the Secret; neither
message holds the credentials."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from lora_trainer.errors import CredentialsError, StorageError
from lora_trainer.storage import Storage
from lora_trainer.tracking import Tracker
from loraops_contract.config import TrainerConfig

from devcluster.process import free_port


def _tracker(tmp_path: Path, uri: str) -> Tracker:
    cfg = TrainerConfig.model_validate(
        {
            "model": {"uri": "/models/m"},
            "dataset": {"uri": "/data/d.jsonl"},
            "output": {"uri": str(tmp_path / "out")},
            "tracking": {"tensorboard": False, "mlflow": {"trackingUri": uri}},
        }
    )
    storage = Storage(tmp_path / "cache", {})
    return Tracker(cfg, storage, tmp_path / "work", run_id="r", attempt=1, job_name="ns/j")


@pytest.fixture(autouse=True)
def _fast_mlflow(monkeypatch: pytest.MonkeyPatch) -> None:
    # MLflow retries a failed request for minutes by default.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


class _Refuse(BaseHTTPRequestHandler):
    def _refuse(self) -> None:
        body = b'{"error_code": "UNAUTHENTICATED", "message": "You are not authenticated."}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _refuse

    def log_message(self, format: str, *args: Any) -> None:  # noqa: ARG002 - stdlib signature
        return


@pytest.fixture
def refusing_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_an_unreachable_server_is_a_retryable_failure(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(StorageError) as err:
        _tracker(tmp_path, uri).start()
    assert err.value.retryable
    assert f"spec.tracking.mlflow.trackingUri {uri}" in err.value.message


def test_refused_credentials_name_the_secret(
    tmp_path: Path, refusing_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret-password")
    with pytest.raises(CredentialsError) as err:
        _tracker(tmp_path, refusing_server).start()
    assert not err.value.retryable
    assert "spec.tracking.mlflow.credentialsSecret" in (err.value.hint or "")
    assert "s3cret-password" not in err.value.message
