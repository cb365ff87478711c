"""Helpers for the harness's own tests: an HTTP client and a test CRD."""

from __future__ import annotations

import json
import ssl
from typing import Any

import urllib3

from tests.harness.apiserver import ApiServer

TEST_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.example.com"},
    "spec": {
        "group": "example.com",
        "names": {
            "plural": "widgets",
            "singular": "widget",
            "kind": "Widget",
            "shortNames": ["wd"],
            "categories": ["gadgets"],
        },
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "Size", "type": "integer", "jsonPath": ".spec.size"},
                    {
                        "name": "Ready",
                        "type": "string",
                        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
                    },
                    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                ],
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "apiVersion": {"type": "string"},
                            "kind": {"type": "string"},
                            "metadata": {"type": "object"},
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {"type": "integer", "minimum": 1},
                                    "color": {
                                        "type": "string",
                                        "enum": ["red", "blue"],
                                        "default": "red",
                                    },
                                    "port": {
                                        "x-kubernetes-int-or-string": True,
                                        "anyOf": [{"type": "integer"}, {"type": "string"}],
                                    },
                                    "note": {"type": "string", "nullable": True},
                                    "extra": {
                                        "type": "object",
                                        "x-kubernetes-preserve-unknown-fields": True,
                                    },
                                },
                            },
                            "status": {
                                "type": "object",
                                "x-kubernetes-preserve-unknown-fields": True,
                            },
                        },
                    }
                },
            }
        ],
    },
}


class Http:
    """Minimal authenticated JSON client for poking the API server directly."""

    def __init__(self, server: ApiServer, token: str | None = None) -> None:
        self.base = server.url
        self.token = server.token if token is None else token
        context = ssl.create_default_context(cafile=str(server.tls.ca_cert))
        self.pool = urllib3.PoolManager(ssl_context=context)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
        timeout: float = 10,
    ) -> tuple[int, Any]:
        hdrs = {"Content-Type": content_type, **(headers or {})}
        if self.token:
            hdrs["Authorization"] = f"Bearer {self.token}"
        data = json.dumps(body).encode() if body is not None else None
        response = self.pool.request(
            method, self.base + path, body=data, headers=hdrs, timeout=timeout, preload_content=True
        )
        text = response.data.decode()
        try:
            return response.status, json.loads(text) if text else None
        except ValueError:
            return response.status, text

    def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
        return self.request("POST", path, body, **kw)

    def put(self, path: str, body: Any, **kw: Any) -> tuple[int, Any]:
        return self.request("PUT", path, body, **kw)

    def patch(
        self, path: str, body: Any, content_type: str = "application/merge-patch+json", **kw: Any
    ) -> tuple[int, Any]:
        return self.request("PATCH", path, body, content_type=content_type, **kw)

    def delete(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        return self.request("DELETE", path, body, **kw)

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        status, payload = self.request(method, path, body, **kw)
        assert 200 <= status < 300, f"{method} {path} -> {status}: {payload}"
        return payload

    def watch(self, path: str, *, until: int, timeout: float = 10) -> list[dict[str, Any]]:
        """Read up to `until` watch events from a watch URL (query string included);
        returns early with what arrived when the stream stays silent for `timeout`."""
        hdrs = {"Authorization": f"Bearer {self.token}"}
        response = self.pool.request(
            "GET",
            self.base + path,
            headers=hdrs,
            preload_content=False,
            timeout=urllib3.Timeout(connect=5, read=timeout),
        )
        events: list[dict[str, Any]] = []
        buffer = b""
        try:
            for chunk in response.stream(1024, decode_content=True):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                events.extend(json.loads(line) for line in lines if line.strip())
                if len(events) >= until:
                    break
        except (urllib3.exceptions.ReadTimeoutError, urllib3.exceptions.ProtocolError):
            pass
        finally:
            response.release_conn()
        return events


WIDGETS = "/apis/example.com/v1/namespaces/default/widgets"


def widget(name: str, size: int = 1, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"size": size, **spec},
    }
