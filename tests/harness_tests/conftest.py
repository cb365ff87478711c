"""Fixtures for the harness's own tests: an API server per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness.apiserver import ApiServer
from tests.harness.controlplane import wait_for
from tests.harness_tests.helpers import TEST_CRD, Http


@pytest.fixture
def api(tmp_path: Path) -> Iterator[ApiServer]:
    with ApiServer(tmp_path / "api") as server:
        yield server


@pytest.fixture
def http(api: ApiServer) -> Http:
    return Http(api)


@pytest.fixture
def widget_crd(http: Http) -> dict[str, Any]:
    crd = http.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", TEST_CRD)
    wait_for(lambda: http.get("/apis/example.com/v1")[0] == 200, message="widget CRD served")
    return crd  # type: ignore[no-any-return]
