"""Shared fixtures for the trainer tests: one S3 server and one tiny model per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.s3 import S3Server, s3_server
from devcluster.tiny_model import build_tiny_model


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    with s3_server(buckets=["models", "data", "out"]) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point this process's boto3 at the harness server."""
    env = s3.env()
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env
